"""Golden parity: the suite's Cross-Modal Adapter against the official code (LeapLabTHU/Cross-Modal-Adapter).

The fixture (tests/fixtures/parity/cross_modal_adapter.*) holds a small seeded CLIP, seeded adapters, inputs and the
release's outputs and gradients, produced outside this repository by running the release's own entry point (train.py's
argument parser on the README's MSR-VTT command, ``init_model``, one training forward and ``loss.backward()``) in fp32
on CPU; its JSON says how. Here the same weights go into `CrossModalAdapter` and every output must agree within 1e-5
(relative to each tensor's scale). The mutation tests show that the fixture would catch the mistakes that matter:
another activation, another adapter position, and a shared up-projection that is not shared.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from petl_bench.backbone import attention_part, mlp_part
from petl_bench.methods.cross_modal_adapter import CrossModalAdapter
from tests.parity import assert_rel_close, load_fixture, relative_error, section, training_outputs

FIXTURE = "cross_modal_adapter"
MUTATION_MARGIN = 1e-3  # a mutation must move some output by 100x the parity tolerance

# The release stacks each adapter tensor per tower over positions: index 2·i is the adapter after the attention branch
# of layer i, 2·i + 1 the one after its MLP branch (module_clip_jointvt_upshare_adapter.CLIP.encode_image/encode_text).
# Its up-projection is split: ``*_up_unique_*`` gives the first D − d_s output channels (per tower), and
# ``vt_adapter_up_share_*`` the last d_s, one tensor read by both towers. Suite name -> (official name, position).
POSITIONS = {"attn": 0, "mlp": 1}


def adapter_name_map(depth_visual: int, depth_text: int) -> dict[str, tuple[str, int]]:
    """Suite parameter name -> (official stacked tensor, index into it)."""
    mapping = {}
    for tower, official, depth in (("visual", "visual", depth_visual), ("text", "text", depth_text)):
        for i in range(depth):
            for pos, offset in POSITIONS.items():
                idx = 2 * i + offset
                for part in ("weight", "bias"):
                    mapping[f"{tower}_adapters.{i}.{pos}.down.{part}"] = (f"clip.{official}_adapter_down_{part}", idx)
                    mapping[f"{tower}_adapters.{i}.{pos}.up.{part}"] = (f"clip.{official}_adapter_up_unique_{part}",
                                                                        idx)
    for i in range(depth_visual):
        for pos, offset in POSITIONS.items():
            for part in ("weight", "bias"):
                mapping[f"shared_up.{i}.{pos}.{part}"] = (f"clip.vt_adapter_up_share_{part}", 2 * i + offset)
    return mapping


def clip_name_map(official_weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """open_clip name (under ``clip.model.``) -> official name. open_clip's CLIP keeps OpenAI's state-dict names, so
    the map only drops the release's ``clip.`` prefix; the adapter tensors are not CLIP's."""
    return {name.removeprefix("clip."): name for name in official_weights if "adapter" not in name}


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(FIXTURE)


def build(fixture) -> tuple[CrossModalAdapter, dict[str, tuple[str, int]]]:
    tensors, meta = fixture
    args = meta["method_args"]
    module = CrossModalAdapter(
        backbone=meta["model_name"], pretrained=None, num_frames=args["num_frames"], max_words=args["max_words"],
        bottleneck=args["bottleneck"], share_dim=args["share_dim"], similarity=args["similarity"],
        text_conditioned_temperature=args["text_conditioned_temperature"],
    )
    weights = section(tensors, "weights")
    clip_state = {ours: weights[theirs].float() for ours, theirs in clip_name_map(weights).items()}
    module.clip.model.load_state_dict(clip_state, strict=True)
    mapping = adapter_name_map(len(module.visual_adapters), len(module.text_adapters))
    params = dict(module.named_parameters())
    assert set(mapping) == {n for n in params if module.is_trainable(n)}, "the name map must cover every adapter"
    with torch.no_grad():
        for ours, (theirs, idx) in mapping.items():
            params[ours].copy_(weights[theirs][idx])
    module.mark_trainable()
    return module.eval(), mapping


def run(module: CrossModalAdapter, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `training_step` computes, on the fixture's inputs, plus the gradients of the adapters."""
    return training_outputs(module, section(tensors, "input"))


def official_layout_grads(module: CrossModalAdapter, mapping, tensors) -> dict[str, torch.Tensor]:
    """The suite's adapter gradients stacked into the release's tensors, for a whole-tensor comparison."""
    grads = {name: torch.zeros_like(value) for name, value in section(tensors, "grad").items()}
    params = dict(module.named_parameters())
    for ours, (theirs, idx) in mapping.items():
        if params[ours].grad is not None:  # an adapter a mutation bypasses gets none: it stays zero, and fails
            grads[theirs][idx] = params[ours].grad
    return grads


def comparisons(module, mapping, tensors) -> dict[str, float]:
    """Relative error of every compared output; frame embeddings at real frames only (see below)."""
    ours = run(module, tensors)
    expected = section(tensors, "out")
    real = tensors["input.video_mask"]
    # The release pads a short video with a frame that is zero AFTER normalisation; the suite pads uint8 zeros, which
    # normalise to −mean/std. Both are masked out of the similarity (compared below), so only real frames are compared.
    errors = {"frame_emb": relative_error(ours["frame_emb"][real], expected["frame_emb"][real])}
    for key in ("text_emb", "similarity", "logits", "loss"):
        errors[key] = relative_error(ours[key], expected[key])
    for name, grad in official_layout_grads(module, mapping, tensors).items():
        errors[f"grad.{name}"] = relative_error(grad, tensors[f"grad.{name}"])
    return errors


def test_fixture_provenance(fixture):
    tensors, meta = fixture
    assert meta["repo"] == "LeapLabTHU/Cross-Modal-Adapter" and len(meta["commit"]) == 40
    assert meta["model_cfg"]["quick_gelu"] is True
    # the fixture records gradients for the adapters only: everything else is frozen in the release
    assert section(tensors, "grad") and all("adapter" in name for name in section(tensors, "grad"))
    assert {"clip.vt_adapter_up_share_weight", "clip.visual_adapter_down_weight", "clip.text_adapter_down_weight",
            "clip.visual_adapter_up_unique_weight", "clip.text_adapter_up_unique_weight"} <= set(section(tensors, "grad"))
    # one padded frame, captions of different lengths: the masks are exercised
    assert not tensors["input.video_mask"].all() and len(set(tensors["input.text_mask"].sum(1).tolist())) > 1


def test_matches_the_official_code(fixture):
    tensors, _ = fixture
    module, mapping = build(fixture)
    ours = run(module, tensors)
    expected = section(tensors, "out")
    real = tensors["input.video_mask"]
    assert_rel_close(ours["frame_emb"][real], expected["frame_emb"][real], "frame embeddings (real frames)")
    assert_rel_close(ours["text_emb"], expected["text_emb"], "text embeddings")
    assert_rel_close(ours["similarity"], expected["similarity"], "cosine similarity (text-conditioned pooling)")
    assert_rel_close(ours["logits"], expected["logits"], "logits (logit_scale x similarity)")
    assert_rel_close(ours["loss"], expected["loss"], "symmetric InfoNCE loss")
    for name, grad in official_layout_grads(module, mapping, tensors).items():
        assert_rel_close(grad, tensors[f"grad.{name}"], f"gradient of {name}")
    # the frozen backbone receives no gradient, as in the release
    assert all(p.grad is None for n, p in module.named_parameters() if not module.is_trainable(n))


# ---------------------------------------------------------------------------------------------- mutations
def _gelu_adapters(module):
    for adapters in (*module.visual_adapters, *module.text_adapters):
        adapters.attn.act = nn.GELU()
        adapters.mlp.act = nn.GELU()


def _adapters_after_the_residual_add(module):
    """A(x + Attn(LN1(x))) instead of x + A(Attn(LN1(x))): the adapter sees the residual stream."""
    def block(i, blk, x, ctx, adapters):
        shared = module.shared_up[i]
        x = adapters.attn(x + attention_part(blk, x, ctx.attn_mask), shared.attn)
        return adapters.mlp(x + mlp_part(blk, x), shared.mlp)

    module.visual_block = lambda i, blk, x, ctx: block(i, blk, x, ctx, module.visual_adapters[i])
    module.text_block = lambda i, blk, x, ctx: block(i, blk, x, ctx, module.text_adapters[i])


def _no_attention_adapter(module):
    """Only the MLP adapter (AdaptFormer-like placement): the attention branch passes through unadapted."""
    def block(i, blk, x, ctx, adapters):
        x = x + attention_part(blk, x, ctx.attn_mask)
        return x + adapters.mlp(mlp_part(blk, x), module.shared_up[i].mlp)

    module.visual_block = lambda i, blk, x, ctx: block(i, blk, x, ctx, module.visual_adapters[i])
    module.text_block = lambda i, blk, x, ctx: block(i, blk, x, ctx, module.text_adapters[i])


def _text_tower_own_shared_up(perturb: bool):
    """The text tower reads its own copy of the shared up-projection instead of the one Parameter both towers share:
    with the same values (perturb=False) the forward is unchanged and only the shared tensor's gradient (now the
    visual contribution alone) shows it; with other values the text embeddings move too."""
    def mutate(module):
        text_shared = copy.deepcopy(module.shared_up)
        if perturb:
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in text_shared.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * p.std())

        def text_block(i, blk, x, ctx):
            adapters, shared = module.text_adapters[i], text_shared[i]
            x = x + adapters.attn(attention_part(blk, x, ctx.attn_mask), shared.attn)
            return x + adapters.mlp(mlp_part(blk, x), shared.mlp)

        module.text_block = text_block

    return mutate


def _meanp_head(module):
    """CLIP4Clip's meanP pooling instead of the release's text-conditioned pooling (its --q_score 1 default)."""
    module.similarity_head = "meanP"


@pytest.mark.parametrize(
    "mutate, must_move",
    [
        (_gelu_adapters, ("frame_emb", "text_emb")),
        (_adapters_after_the_residual_add, ("frame_emb", "text_emb")),
        (_no_attention_adapter, ("frame_emb", "text_emb")),
        (_text_tower_own_shared_up(perturb=False), ("grad.clip.vt_adapter_up_share_weight",)),
        (_text_tower_own_shared_up(perturb=True), ("text_emb", "grad.clip.vt_adapter_up_share_weight")),
        (_meanp_head, ("similarity", "loss")),
    ],
    ids=["gelu-activation", "adapter-after-residual", "no-attention-adapter", "shared-up-split-same-values",
         "shared-up-split-other-values", "meanP-head"],
)
def test_fixture_catches(fixture, mutate, must_move):
    tensors, _ = fixture
    module, mapping = build(fixture)
    mutate(module)
    errors = comparisons(module, mapping, tensors)
    for key in must_move:
        assert errors[key] > MUTATION_MARGIN, f"{key}: relative error {errors[key]:.2e} after the mutation"
