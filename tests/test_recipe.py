"""Hand-computed checks of what the golden parity fixtures cannot see: the loss on an asymmetric matrix, the two
learning-rate shapes at chosen steps, which tensors weight decay reaches, an adapter's formula, and that each class
built without a config has the defaults its default config (the release's) documents."""

import math
from types import SimpleNamespace

import pytest
import torch

from petl_bench.methods import build_method, read_model_config
from petl_bench.methods.cross_modal_adapter import Adapter
from petl_bench.module import lr_factor, symmetric_infonce


def test_infonce_averages_both_directions_of_an_asymmetric_matrix():
    logits = torch.tensor([[2.0, 0.0], [1.0, 4.0]])
    # text→video rows: log(1 + e^-2), log(1 + e^-3); video→text columns: log(1 + e^-1), log(1 + e^-4)
    rows = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-3))) / 2
    cols = (math.log1p(math.exp(-1)) + math.log1p(math.exp(-4))) / 2
    assert symmetric_infonce(logits).item() == pytest.approx((rows + cols) / 2, rel=1e-6)
    assert abs(rows - cols) > 0.05  # a one-directional loss would fail the line above


@pytest.mark.parametrize(("step", "expected"), [
    (0, 0.0), (5, 0.5), (9, 0.9),  # linear warm-up over the first 10% of the run, lr 0 at the first step
    (10, 0.5 * (1 + math.cos(0.1 * math.pi))),  # 0.9755: the cosine spans the whole run, not the rest of it
    (50, 0.5), (99, 0.5 * (1 + math.cos(0.99 * math.pi))),
])
def test_clip4clip_warmup_cosine_at_chosen_steps(step, expected):
    assert lr_factor("warmup_cosine", step, 100, 0.1) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("step", "expected"), [
    (0, 0.0), (5, 0.5), (10, 1.0),  # 10 warm-up steps, then a full cosine from 1 over the remaining 90
    (55, 0.5), (100, 0.0), (32, 0.5 * (1 + math.cos(22 / 90 * math.pi))),
])
def test_xpool_cosine_after_warmup_at_chosen_steps(step, expected):
    assert lr_factor("cosine_after_warmup", step, 100, 0.1) == pytest.approx(expected, abs=1e-12)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        build_method("zero_shot", backbone="petl-tiny-vit", pretrained=None, lr_schedule="linear")


def _optimizer_groups(model, steps: int = 100) -> dict[str, tuple[float, float]]:
    """name → (lr, weight decay) as `configure_optimizers` groups them (the Trainer only supplies the step count)."""
    model._trainer = SimpleNamespace(estimated_stepping_batches=steps)
    opt = model.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["initial_lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def test_weight_decay_reaches_exactly_the_adapter_matrices():
    model = build_method("cross_modal_adapter", backbone="petl-tiny-vit", pretrained=None)
    groups = _optimizer_groups(model)
    assert set(groups) == set(model.trainable_names())
    decayed = {n for n, (_, wd) in groups.items() if wd > 0}
    expected = {n for n in groups if n.endswith(("down.weight", "up.weight"))
                or (n.startswith("shared_up.") and n.endswith(".weight"))}
    # tiny backbone: 4 blocks x 2 positions x 2 towers x (down, up) + 4 x 2 shared up-projections
    assert decayed == expected and len(expected) == 4 * 2 * 2 * 2 + 4 * 2
    assert all(wd == 0.2 for n, (_, wd) in groups.items() if n in decayed)
    assert {lr for lr, _ in groups.values()} == {1e-5}


def test_full_finetune_decays_clip_matrices_at_the_clip_learning_rate():
    model = build_method("full_finetune", backbone="petl-tiny-vit", pretrained=None)
    groups = _optimizer_groups(model)
    params = dict(model.named_parameters())
    for name, (lr, wd) in groups.items():
        assert lr == 1e-7, name  # every trainable tensor is CLIP's own (CLIP4Clip's coef_lr)
        assert (wd == 0.2) == (params[name].ndim >= 2), name  # LayerNorm gains, biases, logit_scale: no decay
    assert groups["clip.model.logit_scale"] == (1e-7, 0.0)


def test_cross_modal_adapter_formula_by_hand():
    adapter = Adapter(width=2, bottleneck=1, share_dim=0)
    with torch.no_grad():
        adapter.down.weight.copy_(torch.tensor([[1.0, 1.0]]))
        adapter.down.bias.zero_()
        adapter.up.weight.copy_(torch.tensor([[1.0], [2.0]]))
        adapter.up.bias.copy_(torch.tensor([0.5, 0.0]))
    h = torch.tensor([[1.0, 0.0]])
    a = 1.0 / (1.0 + math.exp(-1.702))  # QuickGELU(1) = 1·σ(1.702); GELU(1) would be 0.8413
    out = adapter(h, None)
    assert out[0].tolist() == pytest.approx([1.0 + a + 0.5, 2 * a], abs=1e-6)  # h + Up(act(Down h)), residual inside


# each method class against its default config: a class built without a config is the release's default
DEFAULT_CONFIGS = ["full_finetune", "cross_modal_adapter", "mv_adapter", "vop"]


@pytest.mark.parametrize("name", DEFAULT_CONFIGS)
def test_a_class_built_without_a_config_has_its_default_configs_values(name):
    class_path, init_args = read_model_config(name)
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    model = cls(backbone="petl-tiny-vit", pretrained=None)
    wrong = {k: (model.hparams[k], v) for k, v in init_args.items() if model.hparams[k] != v}
    assert not wrong, f"{class_name}() defaults differ from configs/model/{name}.yaml (class, config): {wrong}"
    for key, value in init_args.items():
        assert model.hparams[key] == value, (
            f"{class_name}() has {key}={model.hparams[key]!r} but configs/model/{name}.yaml says {value!r}")


def _visual_ctx(videos: int = 2, frames: int = 3):
    """The context of a visual block for `videos` x `frames` images, all frames real."""
    from petl_bench.backbone import ForwardContext

    return ForwardContext("visual", batch_size=videos, num_frames=frames,
                          frame_mask=torch.ones(videos, frames, dtype=torch.bool))


def test_mv_adapter_adds_its_output_scaled_by_one_tenth_next_to_the_ffn():
    torch.manual_seed(0)
    model = build_method("mv_adapter", backbone="petl-tiny-vit", pretrained=None, num_frames=3, max_words=16,
                         tying="none").eval()
    with torch.no_grad():
        for p in model.visual_adapters.parameters():
            p.normal_(0, 0.2)  # Up starts at zero: make the adapter's output visible
    block, ctx = model.clip.visual_blocks[0], _visual_ctx()
    x = torch.randn(6, 17, 64)

    def block_out(scale: float) -> torch.Tensor:
        model.visual_adapters[0].scale = scale
        with torch.no_grad():
            return model.visual_block(0, block, x, ctx)

    from petl_bench.backbone import attention_part, mlp_part

    with torch.no_grad():
        h = x + attention_part(block, x)
        frozen = h + mlp_part(block, h)
    assert torch.equal(block_out(0.0), frozen)  # the adapter sits beside the FFN: scale 0 is the frozen block
    tenth, one = block_out(0.1) - frozen, block_out(1.0) - frozen
    assert tenth.abs().max() > 1e-3
    assert torch.allclose(tenth * 10, one, atol=1e-5)  # linear in the scale: the 0.1 multiplies the adapter output
    assert model.hparams.scale == 0.1


def test_vop_prompts_replace_not_accumulate_at_every_visual_block():
    torch.manual_seed(0)
    model = build_method("vop", backbone="petl-tiny-vit", pretrained=None, num_frames=2, max_words=16).eval()
    seen = {}
    hooks = [blk.ln_1.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, args[0].detach().clone()))
             for i, blk in enumerate(model.clip.visual_blocks)]
    frames = torch.randint(0, 256, (1, 2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        model.encode_video(frames)
    for h in hooks:
        h.remove()
    n, grid = 8, (32 // 8) ** 2
    for i, x in seen.items():
        assert x.shape == (2, 1 + n + grid, 64), f"block {i}: prompts must not accumulate"
        if i > 0:  # [CLS, this layer's 8 prompts, patches]: the prompts are this layer's parameters, exactly
            assert torch.equal(x[:, 1:1 + n], model.visual_prompts[str(i)].expand(2, -1, -1))
            assert not torch.equal(x[:, :1], model.visual_prompts[str(i)][:1].expand(2, -1, -1))
    # layer 0: the prompts went through ln_pre with the tokens (inserted before it, without positional embedding)
    ln_pre = model.clip.visual.ln_pre
    assert torch.allclose(seen[0][:, 1:1 + n], ln_pre(model.visual_prompts["0"]).expand(2, -1, -1), atol=1e-6)
