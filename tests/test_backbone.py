"""The explicit CLIP forward equals open_clip's own, and every pretrained source loads through open_clip."""

import open_clip
import pytest
import torch

from petl_bench.backbone import (
    CLIPBackbone,
    CLIPHooks,
    encode_frames,
    encode_tokens,
    reference_encode_image,
    reference_encode_text,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CLIPBackbone("petl-tiny-vit", pretrained=None).eval()


def test_explicit_forward_equals_open_clip(tiny):
    frames = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        ours = encode_frames(tiny, CLIPHooks(), frames)
        ref = tiny.model.encode_image(tiny.normalize(frames.flatten(0, 1))).view(2, 3, -1)
    assert ours.shape == (2, 3, 64)
    assert torch.equal(ours, ref)
    tok = open_clip.get_tokenizer("petl-tiny-vit")
    full = tok(["a red circle moving left", "x"])  # 77 tokens: open_clip's encode_text applies as is
    short = tok(["a red circle moving left", "x"], context_length=16)
    with torch.no_grad():
        assert torch.equal(encode_tokens(tiny, CLIPHooks(), full), tiny.model.encode_text(full))
        assert torch.equal(encode_tokens(tiny, CLIPHooks(), short), reference_encode_text(tiny, short))


def test_hooks_are_called_per_block(tiny):
    calls = []

    class Recorder(CLIPHooks):
        def visual_block(self, i, block, x, ctx):
            calls.append(("v", i, ctx.batch_size, ctx.num_frames, tuple(x.shape)))
            return super().visual_block(i, block, x, ctx)

        def text_block(self, i, block, x, ctx):
            calls.append(("t", i, ctx.batch_size, tuple(x.shape)))
            return super().text_block(i, block, x, ctx)

    frames = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        encode_frames(tiny, Recorder(), frames)
        encode_tokens(tiny, Recorder(), torch.randint(1, 100, (5, 8)))
    assert [c[1] for c in calls if c[0] == "v"] == [0, 1, 2, 3]
    assert calls[0] == ("v", 0, 2, 3, (6, 17, 64))  # B·T images of 1 + 4x4 tokens
    assert next(c for c in calls if c[0] == "t") == ("t", 0, 5, (5, 8, 64))


def test_frames_are_normalised_with_open_clip_mean_std(tiny):
    frames = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    assert torch.allclose(tiny.normalize(frames), (128 / 255 - mean) / std, atol=1e-6)
    with pytest.raises(ValueError, match="expects 32x32"):
        tiny.normalize(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_local_checkpoint_loads_through_open_clip(tiny, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    loaded = CLIPBackbone("petl-tiny-vit", pretrained=str(path)).eval()
    frames = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(reference_encode_image(loaded, frames), reference_encode_image(tiny, frames))


def test_bad_sources_are_clear():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPBackbone("petl-tiny-vit", pretrained="/nonexistent/weights.safetensors")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        CLIPBackbone("ViT-Q-99", pretrained=None)


@pytest.mark.parametrize("positions", [False, True])
def test_synthetic_backbone_knows_colours_shapes_and_positions(synthetic_backbone, positions):
    """The synthetic stand-in is really pre-trained: zero-shot it names a still's colour and shape, and where it is."""
    from petl_bench.data.synthetic import still_images

    model = CLIPBackbone("petl-tiny-vit", pretrained=str(synthetic_backbone)).eval()
    images, captions = still_images(120, 32, seed=123, positions=positions)
    classes = sorted(set(captions))
    tok = open_clip.get_tokenizer("petl-tiny-vit")(classes, context_length=16)
    with torch.no_grad():
        img = torch.nn.functional.normalize(reference_encode_image(model, images), dim=-1)
        txt = torch.nn.functional.normalize(reference_encode_text(model, tok), dim=-1)
    pred = (img @ txt.t()).argmax(1)
    accuracy = (pred == torch.tensor([classes.index(c) for c in captions])).float().mean().item()
    chance = 1 / len(classes)
    assert accuracy > 10 * chance, f"zero-shot still accuracy {accuracy:.2f} (chance {chance:.3f})"
