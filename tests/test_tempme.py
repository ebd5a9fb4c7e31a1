"""TempMe (petl_bench/methods/tempme.py): parameter counts against the paper, the merging schedule, what trains.

The forward itself is pinned to the official code by tests/test_parity_tempme.py.
"""

from __future__ import annotations

import pytest
import torch

from petl_bench.methods import build_method, read_model_config
from petl_bench.methods.tempme import TempMe, bipartite_merge, join_clips, merge_schedule
from petl_bench.module import symmetric_infonce

PAPER_TRAINABLE = 0.50e6  # "0.50M", ViT-B/32, MSR-VTT (abstract and tables)
# Every TVPt tensor of the release on ViT-B at 12 frames: LoRA (r 8) on in_proj of the 12 image blocks, 8·(768 + 3·768)
# each, and of the 12 text blocks, 8·(512 + 3·512) each, plus the frame position embeddings of the merge layers 8, 9,
# 10: (12 + 6 + 3) vectors of 768.
RELEASE_TRAINABLE = 12 * 8 * 4 * 768 + 12 * 8 * 4 * 512 + (12 + 6 + 3) * 768
# Tokens per clip after each image block, ViT-B/32 at 12 frames (50 tokens per frame), worked by hand from the
# release's rules: blocks 0-7 merge 2 per frame; block 8 joins 2 frames (2·34 = 68, −⌊0.3·68⌋ = 20 → 48, −⌊0.1·48⌋ = 4
# → 44), block 9 joins 2 clips (88 − 26 = 62, − 6 → 56), block 10 joins 3 (168 − 50 = 118, − 11 → 107), block 11
# merges ⌊0.1·107⌋ = 10 → 97.
VIT_B32_TOKENS = [48, 46, 44, 42, 40, 38, 36, 34, 44, 56, 107, 97]
VIT_B32_CLIPS = [12] * 8 + [6, 3, 1, 1]


@pytest.mark.parametrize("backbone", ["ViT-B-32", "ViT-B-16"])
def test_trainable_count_matches_the_paper(backbone):
    model = build_method("tempme", backbone=backbone, pretrained=None, num_frames=12, max_words=32)
    counts = model.parameter_counts()
    assert counts["trainable"] == RELEASE_TRAINABLE == 507_648
    # the paper prints 0.50M: our count (every tensor the release trains) is 0.508M, within 2%
    assert abs(counts["trainable"] - PAPER_TRAINABLE) / PAPER_TRAINABLE < 0.02
    names = model.trainable_names()
    assert len([n for n in names if ".lora_A." in n]) == len([n for n in names if ".lora_B." in n]) == 24
    assert [tuple(p.shape) for p in model.frame_pos] == [(12, 768), (6, 768), (3, 768)]
    if backbone == "ViT-B-16":
        # 197 tokens per frame: the same rules give 493 tokens for the whole video after the last block (vs 12 · 197)
        assert [p.tokens for p in model.plans][-1] == 493 and model.plans[-1].cls == 12


def test_token_counts_per_layer_follow_the_schedule_on_vit_b32():
    plans = merge_schedule(50, 12, 12, [8, 9, 10], [2, 2, 3], 2, 0.3, 0.1)
    assert [p.tokens for p in plans] == VIT_B32_TOKENS and [p.clips for p in plans] == VIT_B32_CLIPS
    assert plans == merge_schedule(50, 12, 12, [-4, -3, -2], [2, 2, -1], 2, 0.3, 0.1)  # the config's spelling
    model = TempMe(backbone="ViT-B-32", pretrained=None, num_frames=12)
    assert model.plans == plans
    shapes = []

    def recording_block(i, block, x, ctx):
        out = TempMe.visual_block(model, i, block, x, ctx)
        shapes.append(tuple(out.shape))
        return out

    model.visual_block = recording_block
    video = torch.randint(0, 256, (1, 12, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        frames = model.encode_video(video, torch.ones(1, 12, dtype=torch.bool))
    assert [s[:2] for s in shapes] == [(c, n) for c, n in zip(VIT_B32_CLIPS, VIT_B32_TOKENS)]
    assert frames.shape == (1, 12, 512)


def test_schedule_on_the_synthetic_backbone_and_bad_frame_counts():
    # 4 blocks, 17 tokens per frame, 8 frames: merges at blocks 0, 1, 2 join 2, 2, 2 clips
    plans = merge_schedule(17, 8, 4, [-4, -3, -2], [2, 2, -1], 2, 0.3, 0.1)
    assert [p.join for p in plans] == [2, 2, 2, 1] and [p.clips for p in plans] == [4, 2, 1, 1]
    assert plans[-1].cls == 8
    with pytest.raises(ValueError, match="not divisible"):
        merge_schedule(50, 10, 12, [8, 9, 10], [2, 2, 3], 2, 0.3, 0.1)
    with pytest.raises(ValueError, match="merge_layers"):
        merge_schedule(50, 12, 4, [8, 9, 10], [2, 2, 3], 2, 0.3, 0.1)


def test_bipartite_merge_keeps_class_tokens_and_mass():
    """Class tokens pass untouched; merged tokens are size-weighted means, so Σ size·x is conserved."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 4, generator=g)
    size = torch.rand(2, 11, 1, generator=g) + 0.5
    for cls in (1, 2):
        merged, new_size = bipartite_merge(x, size, x, 3, cls)
        assert merged.shape == (2, 8, 4)
        torch.testing.assert_close(merged[:, :cls], x[:, :cls])  # (x·size)/size: equal up to rounding
        torch.testing.assert_close((merged * new_size).sum(1), (x * size).sum(1))
        torch.testing.assert_close(new_size.sum(1), size.sum(1))
    joined = join_clips(torch.arange(2 * 3).view(2, 3, 1).float(), 2, 1)
    assert joined.flatten().tolist() == [0.0, 3.0, 1.0, 2.0, 4.0, 5.0]  # class tokens first, then each clip's rest


def test_training_step_moves_exactly_the_lora_tensors_and_frame_positions():
    torch.manual_seed(0)
    model = build_method("tempme", backbone="petl-tiny-vit", pretrained=None, num_frames=8, max_words=16)
    model.mark_trainable()
    names = set(model.trainable_names())
    assert names and all(".lora_A." in n or ".lora_B." in n or n.startswith("frame_pos.") for n in names)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.2)
    video = torch.randint(0, 256, (3, 8, 3, 32, 32), dtype=torch.uint8)
    mask = torch.ones(3, 8, dtype=torch.bool)
    text = torch.randint(1, 400, (3, 16))
    for _ in range(2):  # LoRA B starts at zero, so A first gets a gradient at the second step
        optimizer.zero_grad()
        emb = model.encode_video(video, mask)
        loss = symmetric_infonce(model.logit_scale() * model.similarity(model.encode_text(text), emb, mask))
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == names


def test_a_class_built_without_a_config_has_the_release_defaults_of_its_config():
    _, init_args = read_model_config("tempme")
    model = TempMe(backbone="petl-tiny-vit", pretrained=None, num_frames=8, max_words=16)
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in model.hparams.items()}
    wrong = {k: (plain[k], v) for k, v in init_args.items() if plain[k] != v}
    assert not wrong, f"TempMe() defaults differ from configs/model/tempme.yaml (class, config): {wrong}"
    assert model.lora_config.r == 8 and model.lora_config.lora_alpha == 8  # scaling 1, as the release
