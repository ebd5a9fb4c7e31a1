"""MV-Adapter: the paper's and the Kronecker default's parameter counts, identity at initialisation, order sensitivity
of the temporal module, padded frames masked, tied factors reached from both towers, and a real training step."""

import lightning
import open_clip
import pytest
import torch
from torch import nn

from petl_bench.methods import build_method
from petl_bench.methods.mv_adapter import MVAdapter, kronecker_sum
from petl_bench.methods.zero_shot import ZeroShot
from petl_bench.module import mean_pool

TINY = {"backbone": "petl-tiny-vit", "pretrained": None, "num_frames": 4, "max_words": 16}
VIT_B16 = {"backbone": "ViT-B-16", "pretrained": None, "num_frames": 12, "max_words": 32}
CAPTIONS = ["a red square moves left", "a blue dot moves right", "two bars swap places"]
TYINGS = ("kronecker", "scale", "none")


def tiny_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, T = len(CAPTIONS), TINY["num_frames"]
    video_mask = torch.ones(B, T, dtype=torch.bool)
    video_mask[-1, -2:] = False  # a short video: two padded frames, zeros as the datamodule pads them
    video = torch.randint(0, 256, (B, T, 3, 32, 32), dtype=torch.uint8, generator=g)
    video[~video_mask] = 0
    text = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS, context_length=TINY["max_words"])
    return {"video": video, "video_mask": video_mask, "text": text,
            "index": torch.arange(B), "video_index": torch.arange(B)}


def tiny(tying: str = "kronecker", seed: int = 0, **overrides) -> MVAdapter:
    torch.manual_seed(seed)
    return build_method("mv_adapter", **TINY, tying=tying, **overrides)


@torch.no_grad()
def perturb(m: MVAdapter, seed: int = 1) -> None:
    """Move the zero-initialised parts (Up, the calibration's FC2) off zero so the adapters do something."""
    g = torch.Generator().manual_seed(seed)
    for adapter in [*m.visual_adapters, *m.text_adapters]:
        for p in (adapter.up.weight, adapter.up.bias):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    for adapter in m.visual_adapters:
        fc2 = adapter.calibration.fc2.weight
        fc2.copy_(torch.randn(fc2.shape, generator=g) * 0.2)


def frozen_twin(m: MVAdapter) -> ZeroShot:
    zs = ZeroShot(**TINY)
    zs.clip.load_state_dict(m.clip.state_dict())
    return zs.eval()


# ---------------------------------------------------------------------------------------------- sizes (ViT-B/16)
@pytest.fixture(scope="module")
def release_b16() -> MVAdapter:
    return build_method("mv_adapter_release", **VIT_B16)


@pytest.fixture(scope="module")
def down_in_b16() -> MVAdapter:
    return build_method("mv_adapter_release_down_in", **VIT_B16)


@pytest.fixture(scope="module")
def kronecker_b16() -> MVAdapter:
    return build_method("mv_adapter", **VIT_B16)


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_release_count_as_shipped(release_b16):
    m = release_b16  # the release's MSR-VTT config: CMT at "down out", beta = Linear(32, r) scales Down's outputs
    assert m.parameter_counts()["trainable"] == 3_496_704  # 2.34% of ViT-B/16; the paper's 2.39% counts Down-In
    assert [i for i, a in enumerate(m.visual_adapters) if numel(a) != 158_160] == [10, 11]
    assert numel(m.visual_adapters[11]) - 158_160 == 32 * 64 + 64
    assert numel(m.text_adapters[11]) - 118_272 == 32 * 64 + 64


def test_down_in_count_matches_the_paper(down_in_b16):
    m = down_in_b16
    assert m.parameter_counts()["trainable"] == 3_572_736  # paper: 2.39%
    # per layer, untied: video adapter at F = 12, text adapter at L = 32
    assert numel(m.visual_adapters[0]) == 158_160
    assert numel(m.text_adapters[0]) == 118_272
    # the top 2 layers add Down-In calibrations Linear(32, d) and one shared 32-d vector each
    assert [i for i, a in enumerate(m.visual_adapters) if numel(a) != 158_160] == [10, 11]
    assert numel(m.visual_adapters[11]) - 158_160 == 32 * 768 + 768
    assert numel(m.text_adapters[11]) - 118_272 == 32 * 512 + 512
    assert [tuple(p.shape) for p in m.tied_factors] == [(32,), (32,)]
    biases = sum(p.numel() for n, p in m.named_parameters() if n.startswith("clip.") and p.requires_grad)
    assert biases == 171_008
    assert all(n.endswith("bias") for n, p in m.named_parameters() if n.startswith("clip.") and p.requires_grad)


def test_kronecker_default_count(kronecker_b16):
    m = kronecker_b16
    assert m.parameter_counts()["trainable"] == 3_194_432  # stated in the module docstring
    assert numel(m.visual_adapters[9]) == 158_160 and numel(m.text_adapters[9]) == 118_272
    # tied layers: Down weight r·d → r·d/n modality factors (n = 4), plus n³ shared per layer
    assert numel(m.visual_adapters[11]) == 158_160 - 64 * 768 + 64 * 768 // 4
    assert numel(m.text_adapters[11]) == 118_272 - 64 * 512 + 64 * 512 // 4
    assert tuple(m.visual_adapters[11].down.factors.shape) == (4, 16, 192)
    assert tuple(m.text_adapters[11].down.factors.shape) == (4, 16, 128)
    assert [tuple(p.shape) for p in m.tied_factors] == [(4, 4, 4), (4, 4, 4)]
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.startswith("clip."))
    assert m.visual_adapters[11].down.effective_weight(m.tied_factors[1]).shape == (64, 768)
    assert m.text_adapters[10].down.effective_weight(m.tied_factors[0]).shape == (64, 512)


def test_configs_and_learning_rates(release_b16, down_in_b16, kronecker_b16):
    r, k = release_b16, kronecker_b16
    assert (r.tying, r.tied_layers, r.hparams.tying_position) == ("scale", 2, "down_out")
    assert (down_in_b16.tying, down_in_b16.hparams.tying_position) == ("scale", "down_in")
    assert (k.tying, k.tied_layers) == ("kronecker", 2)
    assert r.hparams.lr == k.hparams.lr == 5e-6 and r.similarity_head == "meanP"
    assert r.param_lr("clip.model.visual.transformer.resblocks.0.mlp.c_fc.bias") == 1e-7
    assert r.param_lr("visual_adapters.0.up.weight") == 5e-6
    assert r.param_lr("tied_factors.0") == 5e-6


# ---------------------------------------------------------------------------------------------- Kronecker form
def test_kronecker_sum_is_a_sum_of_kronecker_products():
    shared, specific = torch.randn(4, 4, 4), torch.randn(4, 16, 12)
    expected = sum(torch.kron(shared[k], specific[k]) for k in range(4))
    torch.testing.assert_close(kronecker_sum(shared, specific), expected)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="tying"):
        tiny(tying="bilinear")
    with pytest.raises(ValueError, match="kronecker_factors=3"):
        tiny(kronecker_factors=3)
    with pytest.raises(ValueError, match="tied_layers"):
        tiny(tied_layers=5)
    m = tiny()
    with pytest.raises(ValueError, match="num_frames=4"):
        m.encode_video(torch.zeros(1, 5, 3, 32, 32, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------- behaviour (tiny CLIP)
@pytest.mark.parametrize("tying", TYINGS)
def test_identity_at_initialisation(tying):
    m = tiny(tying).eval()
    zs = frozen_twin(m)
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(m.encode_video(batch["video"], batch["video_mask"]),
                           zs.encode_video(batch["video"], batch["video_mask"]))
        assert torch.equal(m.encode_text(batch["text"]), zs.encode_text(batch["text"]))
        perturb(m)  # and the adapters are live once Up moves
        assert not torch.allclose(m.encode_text(batch["text"]), zs.encode_text(batch["text"]), atol=1e-4)


def test_temporal_module_sees_frame_order():
    m = tiny().eval()
    perturb(m)
    zs = frozen_twin(m)
    batch = tiny_batch()
    video, mask = batch["video"][:2], batch["video_mask"][:2]  # full-length clips
    reversed_video = video.flip(1)
    with torch.no_grad():
        frozen = mean_pool(zs.encode_video(video, mask), mask)
        frozen_rev = mean_pool(zs.encode_video(reversed_video, mask), mask)
        adapted = mean_pool(m.encode_video(video, mask), mask)
        adapted_rev = mean_pool(m.encode_video(reversed_video, mask), mask)
    torch.testing.assert_close(frozen, frozen_rev, atol=1e-6, rtol=0)
    assert (adapted - adapted_rev).abs().max() > 1e-3


def test_padded_frames_do_not_leak_into_real_frames():
    m = tiny().eval()
    perturb(m)
    batch = tiny_batch()
    other = batch["video"].clone()
    pad = ~batch["video_mask"]
    other[pad] = torch.randint(0, 256, other[pad].shape, dtype=torch.uint8)
    with torch.no_grad():
        a = m.encode_video(batch["video"], batch["video_mask"])
        b = m.encode_video(other, batch["video_mask"])
    torch.testing.assert_close(a[batch["video_mask"]], b[batch["video_mask"]], atol=1e-6, rtol=0)
    assert not torch.allclose(a[pad], b[pad])  # the padded frames themselves did change: the check is not vacuous


@pytest.mark.parametrize("tying", ["kronecker", "scale"])
def test_tied_factors_receive_gradients_from_both_towers(tying):
    m = tiny(tying)
    m.mark_trainable()
    perturb(m)  # with Up at zero no gradient reaches any Down weight, tied or not
    batch = tiny_batch()
    shared = list(m.tied_factors)
    assert len(shared) == 2

    m.zero_grad()
    m.encode_text(batch["text"]).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)
    assert all(p.grad is None for p in m.visual_adapters.parameters())

    m.zero_grad()
    m.encode_video(batch["video"], batch["video_mask"]).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)
    assert all(p.grad is None for p in m.text_adapters.parameters())


def test_untied_has_no_shared_factors():
    m = tiny("none")
    assert len(m.tied_factors) == 0
    assert all(a.down.tying == "none" for a in [*m.visual_adapters, *m.text_adapters])


@pytest.mark.parametrize("config", ["mv_adapter", "mv_adapter_release"])
def test_training_step_gives_grads_exactly_on_what_trains(config):
    torch.manual_seed(0)
    m = build_method(config, **TINY)
    perturb(m)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    # two steps: the release's warm-up (the default ``warmup_cosine``) gives the first step lr 0
    trainer = lightning.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader([tiny_batch()], batch_size=None))

    added = {n for n, _ in m.named_parameters() if not n.startswith("clip.")}
    biases = {n for n, _ in m.named_parameters() if n.startswith("clip.model.") and n.endswith("bias")}
    expected = added | biases if config == "mv_adapter_release" else added
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == expected
    dead = {n for n, p in m.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0}
    if config == "mv_adapter_release":
        # the release's quirk: f starts at 0, so β = Linear(f) passes no gradient to Linear's weight on step 1
        assert dead == {f"{tower}_adapters.{i}.down.calibration.weight" for tower in ("visual", "text") for i in (2, 3)}
    else:
        assert dead == set()
    frozen_changed = [n for n, p in m.named_parameters() if n not in expected and not torch.equal(p, before[n])]
    assert frozen_changed == []
    assert not torch.equal(m.visual_adapters[0].up.weight, before["visual_adapters.0.up.weight"])

    lrs = {pg["initial_lr"] for pg in trainer.optimizers[0].param_groups}
    assert lrs == ({5e-6, 1e-7} if config == "mv_adapter_release" else {5e-6})
