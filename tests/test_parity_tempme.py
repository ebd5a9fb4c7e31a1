"""Golden parity: the suite's TempMe against the official code (LunarShen/TempMe).

The fixture (tests/fixtures/parity/tempme.*) holds a seeded 5-block CLIP (width 64, 28×28 frames in 4×4 patches: 50
tokens per frame, the count the release's code assumes for "ViT-B/32"), seeded LoRA factors and frame position
embeddings (the release's zero-initialised ones re-drawn), inputs, and the release's outputs and gradients, produced
outside this repository by the release's own ``VTRModel`` in fp32 on CPU with ``--merge_layer 1-2-3`` (the release's
8-9-10 needs 12 blocks) and every other argument at the release's default (``--merge_frame_num 2-2-3
--merge_token_proportion 30-10 --tome_r 2 --frame_pos 1 --lora_dim 8``, 12 frames). Its JSON says how.
To stay small (< 0.5 MB) every weight is stored as int8 times a power-of-two step, exact in fp32.

Here the same numbers go into `TempMe` and every output must agree within 1e-5 relative. The mutation tests show the
fixture catches the mistakes that matter: another merging schedule, another LoRA scale, no frame position
embedding, no proportional attention, another matching metric.
"""

from __future__ import annotations

import pytest
import torch

from petl_bench.methods import tempme as tempme_module
from petl_bench.methods.tempme import TempMe
from tests.parity import assert_rel_close, load_fixture, relative_error, section, training_outputs

FIXTURE = "tempme"
MUTATION_MARGIN = 1e-3  # a mutation must move some output by 100x the parity tolerance


def dequantised(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """weights.* (int8) → fp32 values: int8 · step + offset (see the fixture's notes)."""
    out = {}
    for name, value in section(tensors, "weights").items():
        step, offset = meta["weight_steps"].get(name, (None, None))
        out[name] = value.float() if step is None else value.float() * step + offset
    return out


def name_map(meta: dict, module: TempMe) -> dict[str, str]:
    """Suite parameter name → official name, for TempMe's trainable tensors."""
    mapping = {}
    for tower, official in (("visual.transformer", "clip.visual.transformer"), ("transformer", "clip.transformer")):
        blocks = module.clip.visual_blocks if tower.startswith("visual") else module.clip.text_blocks
        for i in range(len(blocks)):
            for ours, theirs in (("lora_A", "TVPt_LoRA_a"), ("lora_B", "TVPt_LoRA_b")):
                mapping[f"clip.model.{tower}.resblocks.{i}.attn.{ours}.default.weight"] = (
                    f"{official}.resblocks.{i}.attn.{theirs}")
    for k, layer in enumerate(meta["method_args"]["merge_layers"]):
        mapping[f"frame_pos.{k}"] = f"clip.visual.transformer.resblocks.{layer}.TVPt_Video_Positional_embedding"
    return mapping


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(FIXTURE)


def build(fixture, **overrides) -> tuple[TempMe, dict[str, str]]:
    tensors, meta = fixture
    args = {**meta["method_args"], **overrides}
    module = TempMe(backbone=meta["model_name"], pretrained=None, **args)
    weights = dequantised(tensors, meta)
    # open_clip keeps OpenAI's state-dict names; peft moved each attention under ``attn.base_layer``
    clip_state = {name.replace(".attn.", ".attn.base_layer."): value for name, value in weights.items()
                  if not name.startswith("clip.")}
    missing, unexpected = module.clip.model.load_state_dict(clip_state, strict=False)
    assert not unexpected and all(".lora_" in name for name in missing), (missing, unexpected)
    mapping = name_map(meta, module)
    params = dict(module.named_parameters())
    assert set(mapping) == set(module.trainable_names()), "the name map must cover every trainable tensor"
    with torch.no_grad():
        for ours, theirs in mapping.items():
            params[ours].copy_(weights[theirs].view_as(params[ours]))
    module.mark_trainable()
    return module.eval(), mapping


def run(module: TempMe, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `training_step` computes on the fixture's inputs, then the gradients."""
    outputs = training_outputs(module, section(tensors, "input"))
    return {**outputs, "loss": outputs["loss"].reshape(1)}  # the fixture stores the loss as a 1-element tensor


def comparisons(module: TempMe, mapping: dict[str, str], tensors) -> dict[str, float]:
    ours = run(module, tensors)
    expected = section(tensors, "out")
    errors = {key: relative_error(ours[key], expected[key])
              for key in ("frame_emb", "text_emb", "similarity", "logits", "loss")}
    params = dict(module.named_parameters())
    for suite_name, official in mapping.items():
        if f"grad.{official}" in tensors:
            expected_grad = tensors[f"grad.{official}"]
            grad = params[suite_name].grad if suite_name in params else None  # a mutation may remove the tensor
            grad = torch.zeros_like(expected_grad) if grad is None else grad.view_as(expected_grad)
            errors[f"grad.{official}"] = relative_error(grad, expected_grad)
    return errors


def test_fixture_provenance(fixture):
    tensors, meta = fixture
    assert meta["repo"] == "LunarShen/TempMe" and len(meta["commit"]) == 40
    assert meta["release_args"]["merge_frame_num"] == "2-2-3" and meta["release_args"]["merge_token_proportion"] == "30-10"
    grads = section(tensors, "grad")
    assert grads and all("TVPt" in name for name in grads)
    assert any("TVPt_Video_Positional_embedding" in n for n in grads) and any(".transformer.resblocks" in n and
                                                                              "visual" not in n for n in grads)
    # a padded frame and captions of different lengths: the masks are exercised
    assert not tensors["input.video_mask"].all() and len(set(tensors["input.text_mask"].sum(1).tolist())) > 1


def test_matches_the_official_code(fixture):
    tensors, _ = fixture
    module, mapping = build(fixture)
    ours = run(module, tensors)
    expected = section(tensors, "out")
    # the padded frames still enter the merging (as in the release), so every frame embedding is compared
    assert_rel_close(ours["frame_emb"], expected["frame_emb"], "frame embeddings")
    assert_rel_close(ours["text_emb"], expected["text_emb"], "text embeddings")
    assert_rel_close(ours["similarity"], expected["similarity"], "cosine similarity (meanP)")
    assert_rel_close(ours["logits"], expected["logits"], "logits")
    assert_rel_close(ours["loss"], expected["loss"], "symmetric InfoNCE loss")
    params = dict(module.named_parameters())
    for suite_name, official in mapping.items():
        if f"grad.{official}" in tensors:
            assert_rel_close(params[suite_name].grad.view_as(tensors[f"grad.{official}"]), tensors[f"grad.{official}"],
                             f"gradient of {official}")
    assert all(p.grad is None for n, p in module.named_parameters() if not module.is_trainable(n))


def test_token_counts_follow_the_release(fixture):
    """The tokens after every image block, as the release's blocks produced them: (B·clips, tokens)."""
    tensors, meta = fixture
    module, _ = build(fixture)
    shapes = []
    original = TempMe.visual_block

    def record(self, i, block, x, ctx):
        out = original(self, i, block, x, ctx)
        shapes.append(list(out.shape))
        return out

    module.visual_block = record.__get__(module)
    with torch.no_grad():
        module.encode_video(tensors["input.video"], tensors["input.video_mask"])
    assert shapes == meta["visual_tokens_per_block"]
    B = tensors["input.video"].shape[0]
    assert [[B * p.clips, p.tokens] for p in module.plans] == [s[:2] for s in shapes]


# ---------------------------------------------------------------------------------------------- mutations
def _lora_scale(factor: float):
    def mutate(module):
        for name, p in module.named_parameters():
            if ".lora_B." in name:
                p.data.mul_(factor)  # ΔW = factor·B·A: what another α/r would give
    return mutate


def _no_frame_pos(module):
    module.frame_pos = None


def _no_proportional_attention(module):
    module.proportional_attention = False


def _hidden_state_metric(module, monkeypatch):
    """Intra-clip matching on the block's residual stream instead of the attention keys."""
    original = tempme_module.attention_with_keys

    def attention(block, x, size):
        out, _ = original(block, x, size)
        return out, (x + out).detach()
    monkeypatch.setattr(tempme_module, "attention_with_keys", attention)


@pytest.mark.parametrize(
    "overrides, mutate, must_move",
    [
        ({"merge_layers": [2, 3, 4]}, None, ("frame_emb",)),
        ({"merge_frames": [3, 2, 2]}, None, ("frame_emb",)),
        ({"cross_ratio": 0.2}, None, ("frame_emb",)),
        ({"tome_r": 1}, None, ("frame_emb",)),
        ({}, _lora_scale(2.0), ("frame_emb", "text_emb")),
        ({}, _no_frame_pos, ("frame_emb",)),
        ({}, _no_proportional_attention, ("frame_emb",)),
        ({}, "metric", ("frame_emb",)),
    ],
    ids=["merge-layers-shifted", "merge-frames-reordered", "cross-ratio", "tome-r", "lora-scale-x2",
         "no-frame-position", "no-proportional-attention", "hidden-state-metric"],
)
def test_fixture_catches(fixture, monkeypatch, overrides, mutate, must_move):
    tensors, meta = fixture
    if "merge_layers" in overrides or "merge_frames" in overrides:
        # another schedule, same numbers: the frame position embeddings keep their values where the shapes allow
        reference, mapping = build(fixture)
        module = TempMe(backbone=meta["model_name"], pretrained=None, **{**meta["method_args"], **overrides})
        module.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("frame_pos.")},
                               strict=False)
        with torch.no_grad():
            for p, v in zip(module.frame_pos, reference.frame_pos):
                if p.shape == v.shape:
                    p.copy_(v)
        module.mark_trainable()
        mapping = {k: v for k, v in mapping.items() if not k.startswith("frame_pos.")}
    else:
        module, mapping = build(fixture, **overrides)
    if mutate == "metric":
        _hidden_state_metric(module, monkeypatch)
    elif mutate is not None:
        mutate(module)
    errors = comparisons(module, mapping, tensors)
    for key in must_move:
        assert errors[key] > MUTATION_MARGIN, f"{key}: relative error {errors[key]:.2e} after the mutation"
