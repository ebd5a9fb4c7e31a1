"""Cross-Modal Adapter: sizes against the paper's formula, the one shared Parameter per position, identity at zero
init, the equal-depth requirement, and a real training step that moves only the adapters."""

import json

import lightning
import open_clip
import pytest
import torch

from petl_bench.backbone import MODEL_CONFIG_DIR
from petl_bench.methods import build_method
from petl_bench.methods.cross_modal_adapter import CrossModalAdapter
from petl_bench.methods.zero_shot import ZeroShot

TINY = {"backbone": "petl-tiny-vit", "pretrained": None, "num_frames": 4, "max_words": 16}
CAPTIONS = ["a red square moves left", "a blue dot moves right", "two bars swap places"]
ADAPTER_PREFIXES = ("visual_adapters.", "text_adapters.", "shared_up.")


def tiny_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, T = len(CAPTIONS), TINY["num_frames"]
    video_mask = torch.ones(B, T, dtype=torch.bool)
    video_mask[-1, -1] = False  # one padded frame, as the datamodule produces for short videos
    video = torch.randint(0, 256, (B, T, 3, 32, 32), dtype=torch.uint8, generator=g)
    video[~video_mask] = 0
    text = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS, context_length=TINY["max_words"])
    return {"video": video, "video_mask": video_mask, "text": text,
            "index": torch.arange(B), "video_index": torch.arange(B)}


@pytest.mark.parametrize(
    "backbone, overrides, expected",
    [
        ("ViT-B-32", {}, 519_168),  # the released MSR-VTT setting r=8, d_s=16 (paper: 0.52M)
        ("ViT-B-16", {}, 519_168),  # patch size does not enter the count
        ("ViT-B-32", {"bottleneck": 16, "share_dim": 32}, 1_001_472),  # MSVD's 1.00M
        ("ViT-B-32", {"share_dim": 0}, 522_624),  # two independent uni-modal adapters
        ("ViT-B-32", {"bottleneck": 4}, 274_752),
        ("ViT-B-32", {"bottleneck": 16}, 1_008_000),
        ("ViT-B-32", {"bottleneck": 32}, 1_985_664),
    ],
)
def test_trainable_counts_match_the_paper(backbone, overrides, expected):
    m = build_method("cross_modal_adapter", backbone=backbone, pretrained=None, num_frames=12, max_words=32,
                     **overrides)
    assert m.parameter_counts()["trainable"] == expected


def test_per_dataset_and_ablation_configs():
    msvd = build_method("cross_modal_adapter_msvd", **TINY)
    vatex = build_method("cross_modal_adapter_vatex", **TINY)
    meanp = build_method("cross_modal_adapter_meanp", **TINY)
    default = build_method("cross_modal_adapter", **TINY)
    assert (msvd.bottleneck, msvd.share_dim) == (16, 32)
    assert (vatex.bottleneck, vatex.share_dim) == (16, 64)
    assert default.similarity_head == "text_conditioned" and meanp.similarity_head == "meanP"
    assert default.hparams.lr == 1e-5 and default.hparams.text_conditioned_temperature == 5.0


def test_only_adapters_train_and_logit_scale_stays_frozen():
    m = build_method("cross_modal_adapter", **TINY)
    names = m.trainable_names()
    assert names and all(n.startswith(ADAPTER_PREFIXES) for n in names)
    assert "clip.model.logit_scale" not in names
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.startswith("clip."))
    with pytest.raises(ValueError, match="logit_scale"):
        CrossModalAdapter(train_logit_scale=True, **TINY)


def test_shared_up_projection_is_one_parameter_that_both_towers_train():
    m = build_method("cross_modal_adapter", **TINY)
    m.mark_trainable()
    batch = tiny_batch()
    depth = len(m.clip.visual_blocks)
    shared = [p for i in range(depth) for p in (m.shared_up[i].attn.weight, m.shared_up[i].attn.bias,
                                                 m.shared_up[i].mlp.weight, m.shared_up[i].mlp.bias)]
    # one name each: the parameter is registered once, not once per tower
    shared_ids = {id(p) for p in shared}
    assert sum(id(p) in shared_ids for p in m.parameters()) == len(shared)
    assert all(p.shape[0] == m.share_dim for p in shared)

    def grads_of(loss_fn):
        m.zero_grad(set_to_none=True)
        loss_fn().backward()
        return {n: (p.grad.clone() if p.grad is not None else None) for n, p in m.named_parameters()
                if n.startswith(ADAPTER_PREFIXES)}

    text_only = grads_of(lambda: m.encode_text(batch["text"]).pow(2).sum())
    video_only = grads_of(lambda: m.encode_video(batch["video"], batch["video_mask"]).pow(2).sum())
    both = grads_of(lambda: m.encode_text(batch["text"]).pow(2).sum()
                    + m.encode_video(batch["video"], batch["video_mask"]).pow(2).sum())
    for name in both:
        if name.startswith("shared_up."):
            # a text-only loss and a video-only loss each reach the shared tensor, and their gradients add up
            assert text_only[name] is not None and text_only[name].abs().sum() > 0, name
            assert video_only[name] is not None and video_only[name].abs().sum() > 0, name
            torch.testing.assert_close(both[name], text_only[name] + video_only[name])
        elif name.startswith("visual_adapters."):
            assert text_only[name] is None and video_only[name].abs().sum() > 0, name
        else:
            assert video_only[name] is None and text_only[name].abs().sum() > 0, name


def test_zero_init_up_projection_reproduces_the_frozen_backbone_exactly():
    m = build_method("cross_modal_adapter", up_init="zero", **TINY).eval()
    zs = ZeroShot(**TINY).eval()
    zs.clip.load_state_dict(m.clip.state_dict())
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(m.encode_video(batch["video"], batch["video_mask"]),
                           zs.encode_video(batch["video"], batch["video_mask"]))
        assert torch.equal(m.encode_text(batch["text"]), zs.encode_text(batch["text"]))
        # the adapters are in the forward: moving one shared projection changes both towers
        m.shared_up[0].mlp.bias.fill_(0.5)
        assert not torch.equal(m.encode_video(batch["video"], batch["video_mask"]),
                               zs.encode_video(batch["video"], batch["video_mask"]))
        assert not torch.equal(m.encode_text(batch["text"]), zs.encode_text(batch["text"]))


def test_release_init_is_near_but_not_exactly_identity():
    m = build_method("cross_modal_adapter", **TINY).eval()
    zs = ZeroShot(**TINY).eval()
    zs.clip.load_state_dict(m.clip.state_dict())
    ups = [p for n, p in m.named_parameters() if (".up." in n or n.startswith("shared_up.")) and n.endswith("weight")]
    assert all(0.005 < p.std().item() < 0.015 for p in ups)
    assert all(p.abs().max() == 0 for n, p in m.named_parameters() if n.startswith(ADAPTER_PREFIXES)
               and n.endswith("bias"))
    batch = tiny_batch()
    with torch.no_grad():
        adapted, frozen = m.encode_text(batch["text"]), zs.encode_text(batch["text"])
    assert not torch.equal(adapted, frozen)
    torch.testing.assert_close(adapted, frozen, rtol=0.05, atol=0.05)


def test_towers_of_unequal_depth_need_share_dim_zero(tmp_path):
    cfg = json.loads((MODEL_CONFIG_DIR / "petl-tiny-vit.json").read_text())
    cfg["text_cfg"]["layers"] = cfg["vision_cfg"]["layers"] + 1
    (tmp_path / "petl-test-unequal-depth.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    args = dict(TINY, backbone="petl-test-unequal-depth")
    with pytest.raises(ValueError, match="equal depth"):
        CrossModalAdapter(**args)
    uni_modal = CrossModalAdapter(share_dim=0, **args)
    assert (len(uni_modal.visual_adapters), len(uni_modal.text_adapters)) == (4, 5)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="share_dim"):
        CrossModalAdapter(share_dim=65, **TINY)  # the tiny towers are 64 wide
    with pytest.raises(ValueError, match="up_init"):
        CrossModalAdapter(up_init="ones", **TINY)
    with pytest.raises(ValueError, match="bottleneck"):
        CrossModalAdapter(bottleneck=0, **TINY)


def test_share_dim_equal_to_width_shares_the_whole_up_projection():
    m = CrossModalAdapter(share_dim=64, **TINY)
    assert m.visual_adapters[0].attn.up is None and m.text_adapters[0].attn.up is None
    batch = tiny_batch()
    assert m.encode_text(batch["text"]).shape == (3, 64)


def test_training_step_moves_exactly_the_adapters():
    m = build_method("cross_modal_adapter", **TINY)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    # two steps: the release's warm-up (the default ``warmup_cosine``) gives the first step lr 0
    trainer = lightning.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader([tiny_batch()], batch_size=None))
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    adapter_names = {n for n, _ in m.named_parameters() if n.startswith(ADAPTER_PREFIXES)}
    assert with_grad == adapter_names
    assert changed == adapter_names
    assert torch.equal(m.clip.model.logit_scale, before["clip.model.logit_scale"])
