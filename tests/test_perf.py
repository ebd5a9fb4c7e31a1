"""`petl-bench perf` and the cost controls of the block loop (issue 12): each must leave the maths unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from petl_bench.bench.perf import perf_command, run_fresh
from petl_bench.methods import build_method
from petl_bench.metrics import streamed_ranks, t2v_ranks, v2t_ranks
from petl_bench.module import meanp_similarity, text_conditioned_similarity

TINY = {"backbone": "petl-tiny-vit", "pretrained": None, "num_frames": 4, "max_words": 12}
SEED_METHODS = ("full_finetune", "cross_modal_adapter", "mv_adapter", "mv_adapter_release", "vop", "vop_f", "partial")


def _batch(model, batch: int = 2, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    size = model.clip.image_size
    video = torch.randint(0, 256, (batch, 4, 3, size, size), dtype=torch.uint8, generator=gen)
    mask = torch.ones(batch, 4, dtype=torch.bool)
    mask[-1, 3] = False  # one padded frame: masks go through every path
    text = torch.randint(1, 1000, (batch, 12), generator=gen)
    text[:, -1] = 49407
    return {"video": video, "video_mask": mask, "text": text, "index": torch.arange(batch)}


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    video = model.encode_video(batch["video"], batch["video_mask"])
    text = model.encode_text(batch["text"])
    loss = (model.logit_scale() * model.similarity(text, video, batch["video_mask"])).logsumexp(1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return video.detach(), loss.detach(), grads


def _build(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = build_method(name, **TINY, **kw)
    model.mark_trainable()
    with torch.no_grad():  # zero-initialised up-projections would hide the adapters' paths
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("clip.") and not p.any():
                p.normal_(std=0.02)
    return model


# ------------------------------------------------------------------------------------------------- the command
def test_perf_command_writes_json_with_ratios(tmp_path, capsys):
    out = tmp_path / "perf.json"
    assert perf_command(["--backbone", "petl-tiny-vit", "--frames", "4", "--batch", "2", "--words", "12",
                         "--methods", "full_finetune", "cross_modal_adapter", "--steps", "2", "--warmup", "0",
                         "--eval-sizes", "40", "--loader-clips", "1", "--loader-repeats", "1",
                         "--loop-method", "cross_modal_adapter", "--in-process", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    m = result["machine"]
    assert {"device", "torch", "precision", "batch", "frames", "threads"} <= set(m)
    assert (m["precision"], m["batch"], m["frames"], m["threads"]) == ("fp32", 2, 4, 1)
    rows = {r["method"]: r for r in result["methods"]}
    assert set(rows) == {"full_finetune", "cross_modal_adapter"}
    full, cma = rows["full_finetune"], rows["cross_modal_adapter"]
    assert full["step_vs_full"] == full["memory_vs_full"] == full["checkpoint_vs_full"] == 1.0
    assert cma["step_vs_full"] == pytest.approx(cma["ms_per_step"] / full["ms_per_step"], rel=1e-2)
    assert cma["checkpoint_vs_full"] == pytest.approx(cma["checkpoint_bytes"] / full["checkpoint_bytes"], rel=1e-3)
    assert 0 < cma["checkpoint_bytes"] < full["checkpoint_bytes"] and cma["trainable"] < full["trainable"]
    assert cma["clips_per_s"] == pytest.approx(2 / (cma["ms_per_step"] / 1000), rel=1e-2)
    assert {(r["videos"], r["head"]) for r in result["eval"]} == {(40, "meanP"), (40, "text_conditioned")}
    assert all(r["embedding_bytes"] > 0 and "peak_over_embeddings" in r for r in result["eval"])
    assert result["loader"]["same_frames"] is True and result["loader"]["cache_clips_per_s"] > 0
    assert result["loop"]["bare_ms_per_step"] > 0 and result["loop"]["lightning_ms_per_step"] > 0
    assert "cross_modal_adapter" in capsys.readouterr().out  # the table


@pytest.mark.slow  # a fresh interpreter importing torch and lightning: ~10-30 s on 2 busy cores
def test_a_measurement_runs_in_a_fresh_process():
    spec = {"device": "cpu", "threads": 1, "embed_dim": 8, "frames": 3, "eval_chunk": 7}
    row = run_fresh({"kind": "eval", "n": 20, "head": "meanP", "spec": spec}, timeout=120)
    assert "error" not in row, row
    assert row["embedding_bytes"] == 20 * 8 * 4 + 20 * 3 * 8 * 4 + 20 * 3
    assert row["peak_memory_bytes"] >= 0


# ------------------------------------------------------------------------------------------------- streamed ranks
@pytest.mark.parametrize("head", [meanp_similarity, text_conditioned_similarity])
def test_streamed_ranks_equal_the_full_matrix(head):
    gen = torch.Generator().manual_seed(3)
    videos, frames, dim = 23, 3, 6
    cap_to_vid = torch.cat([torch.arange(videos), torch.randint(0, videos, (31,), generator=gen)])
    cap_to_vid = cap_to_vid[torch.randperm(len(cap_to_vid), generator=gen)]
    text = torch.randn(len(cap_to_vid), dim, generator=gen)
    text[5] = text[7]  # exact ties
    video = torch.randn(videos, frames, dim, generator=gen)
    mask = torch.ones(videos, frames, dtype=torch.bool)
    mask[2, 2] = False
    sim = head(text, video, mask)
    t2v, v2t = streamed_ranks(head, text, video, mask, cap_to_vid, chunk_size=5)
    assert torch.equal(t2v, t2v_ranks(sim, cap_to_vid))
    assert torch.equal(v2t, v2t_ranks(sim, cap_to_vid, "group"))


def test_heads_in_video_blocks_equal_one_call(monkeypatch):
    from petl_bench import module

    gen = torch.Generator().manual_seed(0)
    text, video = torch.randn(5, 8, generator=gen), torch.randn(9, 4, 8, generator=gen)
    mask = torch.ones(9, 4, dtype=torch.bool)
    mask[3, 1:] = False
    whole = text_conditioned_similarity(text, video, mask)
    monkeypatch.setattr(module, "_TEXT_CONDITIONED_BLOCK", 5 * 8 * 2)  # two videos per block
    torch.testing.assert_close(text_conditioned_similarity(text, video, mask), whole, rtol=0, atol=1e-6)
    with torch.no_grad():  # evaluation writes the blocks into one buffer
        torch.testing.assert_close(text_conditioned_similarity(text, video, mask), whole, rtol=0, atol=1e-6)
    whole = meanp_similarity(text, video, mask)
    monkeypatch.setattr(module, "_POOL_BLOCK", 4 * 8 * 2)
    torch.testing.assert_close(meanp_similarity(text, video, mask), whole, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------- no-grad prefix
@pytest.mark.parametrize("name", SEED_METHODS)
def test_no_grad_prefix_changes_nothing(name):
    model = _build(name)
    batch = _batch(model)
    video, loss, grads = _loss_and_grads(model, batch)
    model.no_grad_prefix = False  # the plain loop: every block under autograd
    video_plain, loss_plain, grads_plain = _loss_and_grads(model, batch)
    assert torch.equal(video, video_plain) and torch.equal(loss, loss_plain)
    assert grads.keys() == grads_plain.keys() and grads
    for n in grads:
        assert torch.equal(grads[n], grads_plain[n]), n


def test_no_grad_prefix_skips_frozen_blocks_and_keeps_gradients_through_later_frozen_ones():
    model = _build("full_finetune")
    for n, p in model.named_parameters():  # only visual block 1 trains; blocks 2 and 3 after it stay frozen
        p.requires_grad_(n.startswith("clip.model.visual.transformer.resblocks.1."))
    assert model.grad_start("visual") == 1 and model.grad_start("text") == len(model.clip.text_blocks)
    seen = []
    original = type(model).visual_block

    def spy(self, i, block, x, ctx):
        seen.append((i, torch.is_grad_enabled()))
        return original(self, i, block, x, ctx)

    batch = _batch(model)
    type(model).visual_block = spy
    try:
        _, loss, grads = _loss_and_grads(model, batch)
        assert seen == [(0, False), (1, True), (2, True), (3, True)]
        model.no_grad_prefix = False
        _, loss_plain, grads_plain = _loss_and_grads(model, batch)
    finally:
        type(model).visual_block = original
    assert torch.equal(loss, loss_plain)
    assert set(grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    for n in grads:
        assert grads[n].abs().sum() > 0 and torch.equal(grads[n], grads_plain[n]), n


def test_a_methods_own_tensor_keeps_every_block_under_autograd():
    model = _build("cross_modal_adapter")
    assert model.grad_start("visual") == 0 and model.grad_start("text") == 0


# ------------------------------------------------------------------------------------------------- fused projections
def test_cross_modal_adapter_fused_up_projection_is_the_two_projections():
    from petl_bench.methods.cross_modal_adapter import Adapter, SharedUpProjection

    torch.manual_seed(0)
    adapter, shared = Adapter(64, 8, 16), SharedUpProjection(8, 16)
    torch.nn.init.normal_(shared.weight, std=0.1)
    torch.nn.init.normal_(shared.bias, std=0.1)
    h = torch.randn(3, 5, 64, requires_grad=True)
    fused = adapter(h, shared)
    g_fused = torch.autograd.grad(fused.square().sum(), [h, adapter.up.weight, shared.weight, shared.bias])
    z = adapter.act(adapter.down(h))
    reference = h + torch.cat([adapter.up(z), shared(z)], dim=-1)  # the two projections, then the concatenation
    g_ref = torch.autograd.grad(reference.square().sum(), [h, adapter.up.weight, shared.weight, shared.bias])
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-6)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_mv_adapter_single_up_call_is_the_two_calls():
    model = _build("mv_adapter")
    adapter = model.visual_adapters[0]
    torch.nn.init.normal_(adapter.up.weight, std=0.1)
    ctx_b, frames = 2, 4
    from petl_bench.backbone import ForwardContext

    ctx = ForwardContext("visual", batch_size=ctx_b, num_frames=frames, frame_mask=torch.ones(2, 4, dtype=torch.bool))
    h = torch.randn(ctx_b * frames, 5, model.clip.visual_width)
    out = adapter(h, ctx)
    # the same pieces as the forward, with Up applied to [CLS] and patches separately
    up_calls = []
    handle = adapter.up.register_forward_hook(lambda m, i, o: up_calls.append(i[0]))
    adapter(h, ctx)
    handle.remove()
    (up_in,) = up_calls
    separate = torch.cat([adapter.up(up_in[:, :, :1]), adapter.up(up_in[:, :, 1:])], dim=2)
    torch.testing.assert_close(out, adapter.scale * separate.flatten(0, 1), rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("name", ["cross_modal_adapter", "vop_f", "mv_adapter"])
def test_activation_checkpointing_gives_the_same_gradients(name):
    model = _build(name)
    batch = _batch(model)
    video, loss, grads = _loss_and_grads(model, batch)
    model.activation_checkpointing = True
    video_ckpt, loss_ckpt, grads_ckpt = _loss_and_grads(model, batch)
    torch.testing.assert_close(video_ckpt, video, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_activation_checkpointing_is_a_module_option():
    model = build_method("cross_modal_adapter", **TINY, activation_checkpointing=True)
    assert model.activation_checkpointing and model.hparams.activation_checkpointing


# ------------------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("name", ["cross_modal_adapter", "mv_adapter_release", "vop"])
def test_seed_block_hooks_compile_without_graph_breaks(name):
    """Each block hook traces as one graph (``fullgraph=True`` raises at a break); dynamo only, no code generation.
    Known breaks elsewhere: vop_f's padded-frame test (``bool(mask.all())``) and vop_c's packed LSTM."""
    model = _build(name)
    batch = _batch(model)
    video, loss, grads = _loss_and_grads(model, batch)
    torch._dynamo.reset()
    model.__dict__["_compiled_block_hooks"] = {
        "visual": torch.compile(model.visual_block, backend="eager", fullgraph=True, dynamic=False),
        "text": torch.compile(model.text_block, backend="eager", fullgraph=True, dynamic=False)}
    model.compile_blocks = True
    video_c, loss_c, grads_c = _loss_and_grads(model, batch)
    torch.testing.assert_close(video_c, video, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-6)
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.slow  # inductor generates and compiles C++ per block: ~3 minutes on 2 busy cores
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_blocks_match_eager(mode):
    """Regional torch.compile of the block hooks (inductor, CPU) against eager, within 1e-5; ``reduce-overhead`` is
    the CUDA-graph path on a GPU (no GPU here: on a CPU inductor compiles it as it does the default)."""
    model = _build("cross_modal_adapter", compile_mode=mode)
    assert model.compile_mode == mode
    batch = _batch(model, batch=1)
    with torch.no_grad():
        eager_video = model.encode_video(batch["video"], batch["video_mask"])
        eager_text = model.encode_text(batch["text"])
    model.compile_blocks = True
    try:
        with torch.no_grad():
            video = model.encode_video(batch["video"], batch["video_mask"])
            text = model.encode_text(batch["text"])
    except Exception as err:  # noqa: BLE001  (no C++ toolchain, unsupported platform: the option is unusable here)
        pytest.skip(f"torch.compile is not supported on this machine: {type(err).__name__}: {err}")
    torch.testing.assert_close(video, eager_video, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, eager_text, rtol=1e-5, atol=1e-5)


def test_an_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match=r"compile_mode must be one of .*reduce-overhead"):
        _build("cross_modal_adapter", compile=True, compile_mode="cuda-graphs")
