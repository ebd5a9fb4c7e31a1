"""The classic parameter-efficient baselines (issue 13): trainable counts on ViT-B/32 and B/16 through the same path as
`petl-bench params`, identity at init where the method says so, order-awareness of the temporal ones, LoRA merged into
the frozen weights, a training step that moves exactly the trainable tensors, and trainable-only checkpoints."""

import json

import lightning
import open_clip
import pytest
import torch

from petl_bench.cli import main
from petl_bench.methods import build_method, read_model_config
from petl_bench.methods.zero_shot import ZeroShot
from petl_bench.metrics import t2v_metrics
from petl_bench.module import mean_pool

TINY = {"backbone": "petl-tiny-vit", "pretrained": None, "num_frames": 4, "max_words": 16}
CAPTIONS = ["a red square moves left", "a blue dot moves right", "two bars swap places"]
METHODS = ["bitfit", "proj", "partial", "adapter_attn", "adapter_ffn", "lora", "st_adapter", "convpass",
           "vpt_shallow", "vpt_deep", "seqtransf"]
ORDER_AWARE = {"st_adapter", "seqtransf"}
# exact identity with the frozen backbone at step 0 (zero-init up / conv / B, or nothing added)
IDENTITY_AT_INIT = {"bitfit", "proj", "partial", "adapter_ffn", "lora", "st_adapter", "convpass"}
# not an identity, by the method's own init: Houlsby's near-identity N(0, 1e-2) up; prompts change CLS; seqTransf
# starts as a copy of CLIP's first text blocks added to the frames
NOT_IDENTITY_AT_INIT = {"adapter_attn", "vpt_shallow", "vpt_deep", "seqtransf"}

EXPECTED = {  # ViT-B/32 and ViT-B/16 alike (no count depends on the patch grid)
    "bitfit": 171_008, "proj": 655_360, "partial": 10_240_256, "adapter_attn": 1_982_976, "adapter_ffn": 1_982_976,
    "lora": 1_720_320, "st_adapter": 8_885_376, "convpass": 4_211_712, "vpt_shallow": 6_144, "vpt_deep": 73_728,
    "seqtransf": 12_648_960,
}


def tiny_batch(seed: int = 0, pad: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, T = len(CAPTIONS), TINY["num_frames"]
    video_mask = torch.ones(B, T, dtype=torch.bool)
    if pad:
        video_mask[-1, -1] = False
    video = torch.randint(0, 256, (B, T, 3, 32, 32), dtype=torch.uint8, generator=g)
    video[~video_mask] = 0
    text = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS, context_length=TINY["max_words"])
    return {"video": video, "video_mask": video_mask, "text": text,
            "index": torch.arange(B), "video_index": torch.arange(B)}


def perturb_trainable(m, seed: int = 1, std: float = 0.05) -> None:
    """Move every trainable tensor off its init, so zero-initialised branches are live."""
    g = torch.Generator().manual_seed(seed)
    m.mark_trainable()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def test_every_method_has_its_expectations():
    assert set(METHODS) == set(EXPECTED) == ORDER_AWARE | (set(METHODS) - ORDER_AWARE)
    assert IDENTITY_AT_INIT | NOT_IDENTITY_AT_INIT == set(METHODS) and not IDENTITY_AT_INIT & NOT_IDENTITY_AT_INIT


@pytest.mark.parametrize("backbone", ["ViT-B-32", "ViT-B-16"])
def test_trainable_counts_through_petl_bench_params(backbone, capsys):
    assert main(["params", "--backbone", backbone, "--json", *METHODS]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert {m: rows[m]["trainable"] for m in METHODS} == EXPECTED
    total = 151_277_313 if backbone == "ViT-B-32" else 149_620_737
    frozen_only = {"bitfit", "proj", "partial"}  # nothing added: the total is CLIP's
    assert all(rows[m]["total"] == total for m in frozen_only)
    assert all(rows[m]["total"] == total + EXPECTED[m] for m in set(METHODS) - frozen_only - {"lora"})
    assert rows["lora"]["total"] == total + EXPECTED["lora"]


@pytest.mark.parametrize("name", METHODS)
def test_a_class_built_without_a_config_has_its_default_configs_values(name):
    class_path, init_args = read_model_config(name)
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    model = cls(**TINY)
    if name == "vpt_deep":  # one class, two configs: the class default is the shallow point
        init_args = {**init_args, "deep": False}
    wrong = {k: (model.hparams[k], v) for k, v in init_args.items()
             if (list(model.hparams[k]) if isinstance(model.hparams[k], tuple) else model.hparams[k]) != v}
    assert not wrong, f"{class_name}() defaults differ from configs/model/{name}.yaml (class, config): {wrong}"


def _frozen_twin(m):
    zs = ZeroShot(**TINY).eval()
    base = m.merged_clip() if hasattr(m, "merged_clip") else m.clip.model
    zs.clip.model.load_state_dict(base.state_dict())
    return zs


@pytest.mark.parametrize("name", METHODS)
def test_init_is_an_identity_exactly_where_the_method_says_so(name):
    m = build_method(name, **TINY).eval()
    zs = _frozen_twin(m)
    batch = tiny_batch()
    with torch.no_grad():
        v, t = m.encode_video(batch["video"], batch["video_mask"]), m.encode_text(batch["text"])
        v0, t0 = zs.encode_video(batch["video"], batch["video_mask"]), zs.encode_text(batch["text"])
        # 1e-5: peft's parametrised attention (W + 0) takes another kernel path; differences are float rounding
        same = torch.allclose(v, v0, atol=1e-5, rtol=0) and torch.allclose(t, t0, atol=1e-5, rtol=0)
        assert same == (name in IDENTITY_AT_INIT), name
        perturb_trainable(m)  # the added modules are in the forward: moving them changes an embedding
        moved = m.encode_video(batch["video"], batch["video_mask"]), m.encode_text(batch["text"])
    assert not (torch.allclose(moved[0], v, atol=1e-6) and torch.allclose(moved[1], t, atol=1e-6)), name


@pytest.mark.parametrize("name", METHODS)
def test_order_aware_methods_see_reversed_frames(name):
    m = build_method(name, **TINY).eval()
    perturb_trainable(m)  # zero-initialised temporal branches (ST-Adapter's conv) must be live
    batch = tiny_batch(pad=False)
    with torch.no_grad():
        forward = mean_pool(m.encode_video(batch["video"], batch["video_mask"]), batch["video_mask"])
        backward = mean_pool(m.encode_video(batch["video"].flip(1), batch["video_mask"]), batch["video_mask"])
    diff = (forward - backward).abs().max().item()
    if name in ORDER_AWARE:
        assert diff > 1e-4, f"{name} should see the order of frames (max diff {diff})"
    else:
        assert diff < 1e-5, f"{name} should be blind to the order of frames (max diff {diff})"


def _fit(m, steps: int = 2, **kwargs) -> lightning.Trainer:
    trainer = lightning.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kwargs)
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader([tiny_batch(0), tiny_batch(1)], batch_size=None))
    return trainer


@pytest.mark.parametrize("name", METHODS)
def test_training_moves_exactly_the_trainable_tensors_and_checkpoints_only_them(name, tmp_path, synthetic_backbone):
    # a backbone from a file, so that the checkpoint's reload rebuilds the same frozen weights
    args = {**TINY, "pretrained": str(synthetic_backbone)}
    m = build_method(name, **args)
    perturb_trainable(m)  # zero-init Up / conv / B: what feeds them gets no gradient otherwise (lr is 0 at step 0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainer = _fit(m)
    trainable = set(m.trainable_names())
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert trainable and changed == trainable, (sorted(changed ^ trainable)[:5])
    assert all(n.startswith("clip.") == (name in {"bitfit", "proj", "partial", "lora"}) for n in trainable)
    assert torch.equal(m.clip.model.logit_scale, before["clip.model.logit_scale"])
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert set(ckpt["state_dict"]) == trainable
    fresh = type(m).load_from_checkpoint(path, **args).eval()
    m.eval()
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_video(batch["video"], batch["video_mask"]),
                                   m.encode_video(batch["video"], batch["video_mask"]), rtol=0, atol=0)
        torch.testing.assert_close(fresh.encode_text(batch["text"]), m.encode_text(batch["text"]), rtol=0, atol=0)


def test_lora_merged_into_the_frozen_weights_gives_the_same_embeddings_and_metrics():
    m = build_method("lora", **TINY)
    perturb_trainable(m, std=0.2)
    m.eval()
    merged = m.merged_clip()
    plain = open_clip.create_model("petl-tiny-vit", pretrained=None)
    assert set(merged.state_dict()) == set(plain.state_dict())  # open_clip's own keys: no LoRA left
    assert not any("lora" in n for n, _ in merged.named_modules())
    zs = ZeroShot(**TINY).eval()
    zs.clip.model.load_state_dict(merged.state_dict())
    batch = tiny_batch()
    with torch.no_grad():
        v, t = m.encode_video(batch["video"], batch["video_mask"]), m.encode_text(batch["text"])
        vm, tm = zs.encode_video(batch["video"], batch["video_mask"]), zs.encode_text(batch["text"])
    torch.testing.assert_close(vm, v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tm, t, rtol=1e-5, atol=1e-5)
    sim, sim_merged = m.similarity(t, v, batch["video_mask"]), zs.similarity(tm, vm, batch["video_mask"])
    assert t2v_metrics(sim, batch["video_index"]) == t2v_metrics(sim_merged, batch["video_index"])
    # the merge changed the weights (the update is not zero) and left the LoRA module as it was
    base = {k.replace(".base_layer", ""): val for k, val in m.clip.model.state_dict().items() if "lora_" not in k}
    changed = [k for k, val in merged.state_dict().items() if not torch.equal(val, base[k])]
    assert changed and all(k.endswith(("in_proj_weight", "c_fc.weight", "c_proj.weight")) for k in changed)
    assert len(changed) == 3 * 4 * 2  # three targets x 4 blocks x 2 towers


def test_lora_options():
    mha = build_method("lora", target_modules=["attn", "c_fc"], towers=["text"], rank=2, **TINY)
    # peft's MultiheadAttention layer adapts in_proj (4·D·r) and out_proj (2·D·r); c_fc 5·D·r; text tower only
    assert mha.parameter_counts()["trainable"] == 4 * (4 + 2 + 5) * 64 * 2
    assert all(n.startswith("clip.model.transformer.") for n in mha.trainable_names())
    assert mha.lora_config.r == 2 and mha.lora_config.lora_alpha == 8.0
    with pytest.raises(ValueError, match="not both"):
        build_method("lora", target_modules=["attn", "in_proj"], **TINY)
    with pytest.raises(ValueError, match="target_modules"):
        build_method("lora", target_modules=["qkv"], **TINY)


def test_seqtransf_follows_clip4clip():
    m = build_method("seqtransf", **TINY)
    text = m.clip.model
    # the release's init: frame positions = CLIP's text positional embedding, blocks = the first text blocks
    assert torch.equal(m.frame_position_embeddings.weight, text.positional_embedding)
    assert len(m.temporal_blocks) == 4
    for copy_, original in zip(m.temporal_blocks, m.clip.text_blocks):
        assert all(torch.equal(a, b) for a, b in zip(copy_.state_dict().values(), original.state_dict().values()))
    # residual to the input: with the blocks' branches zeroed the transformer passes frames + positions through,
    # and the residual adds the frames once more: Transformer(x + pos) + x = 2x + pos
    batch = tiny_batch()
    with torch.no_grad():
        for block in m.temporal_blocks:
            block.attn.out_proj.weight.zero_(), block.attn.out_proj.bias.zero_()
            block.mlp.c_proj.weight.zero_(), block.mlp.c_proj.bias.zero_()
        frames = ZeroShot.encode_video(m, batch["video"], batch["video_mask"])
        torch.testing.assert_close(m.encode_video(batch["video"], batch["video_mask"]),
                                   2 * frames + m.frame_position_embeddings.weight[:4], rtol=0, atol=1e-5)
    # padded frames are masked as keys: changing a padded frame does not move the real frames' outputs
    m = build_method("seqtransf", **TINY).eval()
    other = batch["video"].clone()
    other[-1, -1] = 255
    with torch.no_grad():
        a = m.encode_video(batch["video"], batch["video_mask"])
        b = m.encode_video(other, batch["video_mask"])
    torch.testing.assert_close(a[-1, :-1], b[-1, :-1], rtol=0, atol=1e-5)
    assert not torch.allclose(a[-1, -1], b[-1, -1])
    random = build_method("seqtransf", init="random", **TINY)
    assert not torch.equal(random.frame_position_embeddings.weight, text.positional_embedding)


def test_st_adapter_ignores_padded_frames():
    m = build_method("st_adapter", **TINY).eval()
    perturb_trainable(m)
    batch = tiny_batch()
    other = batch["video"].clone()
    other[-1, -1] = 255  # a padded frame's pixels
    with torch.no_grad():
        a = m.encode_video(batch["video"], batch["video_mask"])
        b = m.encode_video(other, batch["video_mask"])
    torch.testing.assert_close(a[-1, :-1], b[-1, :-1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, kwargs, match", [
    ("partial", {"blocks": 0}, "blocks"), ("partial", {"towers": ["audio"]}, "towers"),
    ("adapter_attn", {"up_init": "ones"}, "up_init"), ("adapter_ffn", {"bottleneck": 0}, "bottleneck"),
    ("st_adapter", {"kernel_size": [2, 1, 1]}, "kernel_size"), ("convpass", {"dim": 0}, "dim"),
    ("vpt_deep", {"prompt_length": 0}, "prompt_length"), ("seqtransf", {"layers": 5}, "layers"),
    ("seqtransf", {"init": "zeros"}, "init"),
])
def test_bad_options_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_method(name, **{**TINY, **kwargs})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "st_adapter", "seqtransf"])  # peft's layers; temporal reshapes of B·T
def test_ddp_fit_gathers_the_global_batch(name, synthetic_root, synthetic_backbone, tmp_path):
    """2-process CPU DDP (spawn pickles the module): the loss sees both processes' pairs."""
    from tests.test_cli import _tiny_args

    main(["fit", *_tiny_args(synthetic_root, tmp_path, name), "--trainer.devices=2", "--trainer.strategy=ddp_spawn",
          "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}", "--trainer.log_every_n_steps=1"])
    lines = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [float(r["train/global_batch"]) for r in rows if r.get("train/global_batch")] == [16.0, 16.0]
    assert all(0 < float(r["train/loss"]) < 10 for r in rows if r.get("train/loss"))
