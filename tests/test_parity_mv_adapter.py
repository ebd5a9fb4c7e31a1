"""Golden parity of ``mv_adapter_release`` with the official MV-Adapter code (zhangbw17/MV-Adapter).

The fixtures (tests/fixtures/parity/mv_adapter_release*.*) hold seeded weights of a small CLIP (3 layers per tower,
width 64) with the release's MSR-VTT adapters (configs/msrvtt/msrvtt.py: MLP adapters in every layer, ``forward='seq'``,
temporal calibration ``['c']``, mean patch pooling, causal text adapter, CMT on the top 2 layers) at bottleneck 32,
CMT at the position the release config names ("down out") or, for the paper-count variant, Down-In; every
zero-initialised tensor randomised; inputs of 3 videos × 4 frames (one padded frame) and 3 captions of 12 tokens; and what the official model gave: frame and text embeddings, the similarity, the loss and
gradients. The suite's method is built from its release config, loaded with the same weights (the name mapping is
below) and must agree within 1e-5. Mutations of the adapter (activation, scale, position, tying) must not.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from petl_bench.methods import build_method, mv_adapter, read_model_config
from petl_bench.methods.mv_adapter import MVAdapter
from tests.parity import TOLERANCE, load_fixture, relative_error, section, training_outputs

# (suite config, fixture): the release's MSR-VTT config as shipped ("down out"), and the Down-In position the paper counts
CASES = [("mv_adapter_release", "mv_adapter_release"), ("mv_adapter_release_down_in", "mv_adapter_release_down_in")]
CLEAR_MARGIN = 100 * TOLERANCE  # a mutation must move some comparison this far

# the official adapter's parameter names (under ``…resblocks.<i>.mlp.adapter.``) → the suite's (under
# ``visual_adapters.<i>.`` / ``text_adapters.<i>.``); prefixes, longest first
ADAPTER_NAMES = [
    ("md_proj.", "down.calibration."),  # CMT: β = Linear_m(f)
    ("conv_rf_c.g.", "calibration.g."),  # temporal calibration: g, FC1, FC2
    ("conv_rf_c.a.", "calibration.fc1."),
    ("conv_rf_c.b.", "calibration.fc2."),
    ("cc", "cc_token"),
    ("down.", "down."),
    ("up.", "up."),
    ("ln_pre.", "ln_pre."),
    ("block.", "block."),
    ("positional_embedding", "positional_embedding"),
]
# the official CLIP keeps OpenAI's names except q/k/v split out of in_proj and the block LayerNorms moved
CLIP_RENAMES = [(".attn.ln.", ".ln_1."), (".mlp.ln.", ".ln_2.")]
QKV = ("q_proj", "k_proj", "v_proj")
BLOCK = re.compile(r"^clip\.(visual\.)?transformer\.resblocks\.(\d+)\.(.*)$")


def suite_name(official: str) -> str | None:
    """The suite's parameter name for an official one; None for the official adapters' alias of the shared factor."""
    if official.startswith("clip.prompt."):
        return "tied_factors." + official.split(".")[-1]
    match = BLOCK.match(official)
    if match and match.group(3).startswith("mlp.adapter."):
        rest = match.group(3)[len("mlp.adapter."):]
        if rest == "shared_factor":
            return None  # the same tensor as clip.prompt.<k>
        tower = "visual_adapters" if match.group(1) else "text_adapters"
        for old, new in ADAPTER_NAMES:
            if rest.startswith(old):
                return f"{tower}.{match.group(2)}.{new}{rest[len(old):]}"
        raise KeyError(f"no mapping for the official adapter tensor {official}")
    name = official[len("clip."):]
    for old, new in CLIP_RENAMES:
        name = name.replace(old, new)
    for i, qkv in enumerate(QKV):
        name = name.replace(f".attn.{qkv}.", f".attn.in_proj_{i}.")
    return "clip.model." + name


def suite_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fixture's official weights under the suite's names (q, k, v concatenated into in_proj)."""
    state, qkv_parts = {}, {}
    for official, value in weights.items():
        name = suite_name(official)
        if name is None:
            continue
        part = re.search(r"\.attn\.in_proj_(\d)\.(weight|bias)$", name)
        if part:
            key = name[:part.start()] + f".attn.in_proj_{part.group(2)}"
            qkv_parts.setdefault(key, {})[int(part.group(1))] = value
            continue
        state[name] = value
    for key, parts in qkv_parts.items():
        state[key] = torch.cat([parts[i] for i in range(3)])
    return {k: v.float() for k, v in state.items()}  # stored as fp16-exact values; computed in fp32 on both sides


def suite_grad(module: MVAdapter, official: str) -> torch.Tensor:
    """The suite's gradient of the official tensor `official` (a q/k/v slice of in_proj for the split ones)."""
    name = suite_name(official)
    params = dict(module.named_parameters())
    part = re.search(r"\.attn\.in_proj_(\d)\.(weight|bias)$", name)
    if part:
        full = params[name[:part.start()] + f".attn.in_proj_{part.group(2)}"].grad
        return full.chunk(3)[int(part.group(1))]
    return params[name].grad


@pytest.fixture(scope="module", params=CASES, ids=[config for config, _ in CASES])
def fixture(request):
    config, name = request.param
    tensors, meta = load_fixture(name)
    return tensors, {**meta, "config": config}


def build(meta: dict) -> MVAdapter:
    args = meta["method_args"]
    module = build_method(
        meta["config"], backbone=meta["model_name"], pretrained=None, num_frames=args["num_frames"],
        max_words=args["max_words"], bottleneck=args["bottleneck"], heads=args["heads"],
        tied_layers=args["tied_layers"],
    )
    return module


def loaded(tensors: dict, meta: dict) -> MVAdapter:
    module = build(meta)
    module.load_state_dict(suite_state_dict(section(tensors, "weights")), strict=True)
    for p in module.parameters():
        p.requires_grad_(True)  # gradients of every named tensor, frozen CLIP weights included
    return module.eval()


def parity_errors(module: MVAdapter, tensors: dict) -> dict[str, float]:
    """Relative error of each output and gradient of `module` against the official ones (training_step's loss)."""
    ours, out = training_outputs(module, section(tensors, "input")), section(tensors, "out")
    errors = {name: relative_error(ours[name], out[name])
              for name in ("frame_emb", "text_emb", "similarity", "logits", "loss")}
    for official, grad in section(tensors, "grad").items():
        errors[f"grad {official}"] = relative_error(suite_grad(module, official), grad)
    return errors


def test_release_config_is_what_the_fixture_ran(fixture):
    """The release config's tying is the one the official code ran with; only sizes are overridden."""
    meta = fixture[1]
    _, init_args = read_model_config(meta["config"])
    args = meta["method_args"]
    assert init_args["tying"] == args["tying"] == "scale"
    assert init_args["tying_position"] == args["tying_position"]
    assert meta["official_config"]["changed"]["modal_dynamic.position"] == args["tying_position"].replace("_", " ")
    assert init_args["tied_layers"] == args["tied_layers"] == 2
    assert init_args["heads"] == args["heads"] == 2
    assert init_args["scale"] == 0.1
    assert init_args["train_clip_biases"] is True


def test_weight_mapping_covers_both_sides(fixture):
    tensors, meta = fixture
    state = suite_state_dict(section(tensors, "weights"))
    module = build(meta)
    assert set(state) == set(module.state_dict())
    for name, value in module.state_dict().items():
        assert state[name].shape == value.shape, name


def test_parity_with_the_official_code(fixture):
    tensors, meta = fixture
    errors = parity_errors(loaded(tensors, meta), tensors)
    report = "\n".join(f"{err:.2e}  {name}" for name, err in errors.items())
    print(f"\nrelative errors against the official MV-Adapter:\n{report}")
    assert len(errors) == 5 + len(section(tensors, "grad"))
    bad = {name: err for name, err in errors.items() if not err <= TOLERANCE}
    assert not bad, f"relative difference from the official code exceeds {TOLERANCE:.0e}:\n{report}"


# ---------------------------------------------------------------------------------------------- mutations
def adapter_after_residual(self, i, block, x, ctx):
    """Mutation: the adapter reads the block's output (after the residual add) instead of the FFN output."""
    x = x + mv_adapter.attention_part(block, x, ctx.attn_mask)
    x = x + mv_adapter.mlp_part(block, x)
    adapters, tie = (self.visual_adapters, self.visual_tie) if ctx.tower == "visual" else (
        self.text_adapters, self.text_tie)
    k = tie.get(i)
    return x + adapters[i](x, ctx, None if k is None else self.tied_factors[k])


def adapter_on_attention(self, i, block, x, ctx):
    """Mutation: the adapter reads the attention branch instead of the FFN output."""
    a = mv_adapter.attention_part(block, x, ctx.attn_mask)
    adapters, tie = (self.visual_adapters, self.visual_tie) if ctx.tower == "visual" else (
        self.text_adapters, self.text_tie)
    k = tie.get(i)
    x = x + a + adapters[i](a, ctx, None if k is None else self.tied_factors[k])
    return x + mv_adapter.mlp_part(block, x)


@contextmanager
def mutated(module: MVAdapter, kind: str, monkeypatch):
    if kind == "activation":  # exact GELU instead of the release's QuickGELU inside the adapters
        monkeypatch.setattr(mv_adapter, "quick_gelu", nn.functional.gelu)
    elif kind == "scale":
        for adapter in [*module.visual_adapters, *module.text_adapters]:
            adapter.scale = 1.0
    elif kind in ("after_residual", "on_attention"):
        hook = adapter_after_residual if kind == "after_residual" else adapter_on_attention
        monkeypatch.setattr(module, "visual_block", hook.__get__(module))
        monkeypatch.setattr(module, "text_block", hook.__get__(module))
    elif kind == "split_tying":  # the text tower gets its own copy of each shared factor: same values, own gradient
        text_factors = nn.ParameterList([nn.Parameter(f.detach().clone()) for f in module.tied_factors])
        original = MVAdapter.text_block

        def text_block(i, block, x, ctx):
            shared = module.tied_factors
            module.tied_factors = text_factors
            try:
                return original(module, i, block, x, ctx)
            finally:
                module.tied_factors = shared

        monkeypatch.setattr(module, "text_block", text_block)
    else:
        raise ValueError(kind)
    yield module


@pytest.mark.parametrize("kind", ["activation", "scale", "after_residual", "on_attention", "split_tying"])
def test_mutation_breaks_parity(fixture, kind, monkeypatch):
    tensors, meta = fixture
    module = loaded(tensors, meta)
    with mutated(module, kind, monkeypatch):
        errors = parity_errors(module, tensors)
    worst = max(errors, key=errors.get)
    print(f"\n{kind}: largest relative error {errors[worst]:.2e} ({worst})")
    assert errors[worst] > CLEAR_MARGIN, f"mutation {kind!r} left every comparison within {CLEAR_MARGIN:.0e}"
