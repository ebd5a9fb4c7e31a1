"""Golden parity: the suite's VoP (``text_readout="release"``, the default) against ModelScope's released VoP code.

The fixture (tests/fixtures/parity/vop.*; provenance in vop.json) holds a small seeded CLIP under the release's
parameter names, its prompts, 3 videos × 4 uint8 frames, 3 captions padded to the release's 69-token context (EOT at
5, 30 and 66: the last one puts the release's read position on a suffix prompt), and what the official code computed:
frame and text embeddings, the cosine similarity, a symmetric InfoNCE loss and the prompts' gradients. The mutation
tests show that the comparison is sharp enough to catch a misplaced prompt or the other read-out.
"""

import pytest
import torch

from petl_bench.methods.vop import VoP
from petl_bench.module import meanp_similarity, symmetric_infonce
from tests.parity import assert_rel_close, load_fixture, relative_error, section

BROKEN = 1e-3  # a mutation must move some output by 100× the parity tolerance


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("vop")


def build(meta: dict, weights: dict[str, torch.Tensor], **overrides) -> VoP:
    """The suite's VoP on the fixture's CLIP, loaded through an explicit map from the release's names."""
    args = {**meta["method_args"], **overrides}
    m = VoP(backbone=meta["model_name"], pretrained=None, **args).eval()
    clip = {name[len("clip."):]: w for name, w in weights.items() if name.startswith("clip.")}
    m.clip.model.load_state_dict(clip, strict=True)  # the release's CLIP uses open_clip's (= OpenAI's) names
    visual = weights["visual_prompt_learner.visual_prompts"]  # (layers, 1, 8, width)
    text = weights["text_prompt_learner.text_prompts"]  # (layers, 4 prefix + 4 suffix, width)
    with torch.no_grad():
        for i in range(visual.shape[0]):
            m.visual_prompts[str(i)].copy_(visual[i, 0])
        m.text_prompts.copy_(text)
    m.mark_trainable()
    assert set(m.trainable_names()) == {*(f"visual_prompts.{i}" for i in range(visual.shape[0])), "text_prompts"}
    return m


def run(m: VoP, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Embeddings, similarity, loss (the suite's meanP head and InfoNCE) and the prompts' gradients."""
    m.zero_grad()
    frames = m.encode_video(inputs["video"], inputs["video_mask"])
    text = m.encode_text(inputs["text"])
    similarity = m.similarity(text, frames, inputs["video_mask"])
    loss = symmetric_infonce(m.logit_scale() * similarity)
    loss.backward()
    layers = len(m.visual_prompts)
    return {
        "frame_emb": frames.detach(), "text_emb": text.detach(), "similarity": similarity.detach(),
        "loss": loss.detach(),
        "grad.visual_prompt_learner.visual_prompts": torch.stack(
            [m.visual_prompts[str(i)].grad for i in range(layers)]).unsqueeze(1),
        "grad.text_prompt_learner.text_prompts": m.text_prompts.grad.clone(),
    }


def errors(got: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    out = section(tensors, "out")
    expected = {k: out[k] for k in ("frame_emb", "text_emb", "similarity", "loss")}
    expected.update({k: v for k, v in tensors.items() if k.startswith("grad.")})
    return {k: relative_error(got[k], v) for k, v in expected.items()}


def test_vop_release_readout_matches_the_official_code(fixture):
    tensors, meta = fixture
    m = build(meta, section(tensors, "weights"))
    inputs = section(tensors, "input")
    got = run(m, inputs)
    out = section(tensors, "out")
    measured = {
        "frame_emb": assert_rel_close(got["frame_emb"], out["frame_emb"], "frame embeddings"),
        "text_emb": assert_rel_close(got["text_emb"], out["text_emb"], "text embeddings"),
        "similarity": assert_rel_close(got["similarity"], out["similarity"], "similarity"),
        "loss": assert_rel_close(got["loss"], out["loss"], "loss"),
    }
    for name in ("grad.visual_prompt_learner.visual_prompts", "grad.text_prompt_learner.text_prompts"):
        measured[name] = assert_rel_close(got[name], tensors[name], name)
    # the near-full caption makes the release's suffix prompts matter: they have a gradient
    assert tensors["grad.text_prompt_learner.text_prompts"][:, 4:].abs().amax() > 0
    # the release's own outputs agree with each other: its normalised frames and pooled video give our cosine
    torch.testing.assert_close(meanp_similarity(out["text_emb"], out["frame_emb"], inputs["video_mask"]),
                               out["similarity"], rtol=1e-5, atol=1e-6)
    print("VoP parity, max relative difference:", {k: f"{v:.1e}" for k, v in measured.items()})


def test_release_readout_does_not_depend_on_max_words(fixture):
    """The release pads ids to 69; the suite pads embeddings to 69 itself, so data at max_words = 32 (MSR-VTT) gives
    the release's features for every caption that fits 32 tokens (here the 2 shorter ones)."""
    tensors, meta = fixture
    m = build(meta, section(tensors, "weights"), max_words=32)
    text = section(tensors, "input")["text"]
    short = text.argmax(-1) < 32
    assert short.tolist() == [True, True, False]
    with torch.no_grad():
        got = m.encode_text(text[short, :32])
    err = assert_rel_close(got, section(tensors, "out")["text_emb"][short], "text embeddings at max_words=32")
    print(f"VoP max_words=32 text parity: {err:.1e}")


# ---------------------------------------------------------------------------------------------------- mutations
def accumulated_visual_prompts(m: VoP):
    """Deeper layers add their prompts next to the previous layer's instead of replacing them."""
    base = m.visual_block

    def block(i, blk, x, ctx):
        if i > 0:  # the base hook then overwrites the first 8 slots (these same prompts) and keeps the old ones
            x = torch.cat([x[:, :1], m.layer_visual_prompts(i, x, ctx), x[:, 1:]], dim=1)
        return base(i, blk, x, ctx)

    m.visual_block = block


def visual_prompts_after_ln_pre(m: VoP):
    """Layer-0 prompts inserted after ln_pre (the release inserts them before, so ln_pre normalises them too)."""
    m.visual_tokens = lambda x, ctx: x
    base = m.visual_block

    def block(i, blk, x, ctx):
        if i == 0:
            x = torch.cat([x[:, :1], m.layer_visual_prompts(0, x, ctx), x[:, 1:]], dim=1)
        return base(i, blk, x, ctx)

    m.visual_block = block


def text_prefix_before_sot(m: VoP):
    """The 4 prefix prompts before SOT instead of right after it."""
    base = m.text_prompt_positions

    def positions(eot, length):
        p = base(eot, length).clone()
        p[:, :m.text_prefix_length] -= 1
        return p

    m.text_prompt_positions = positions


def eot_readout(m: VoP):
    """The suite's own read-out (vop_eot.yaml) in place of the release's."""
    m.text_readout = "eot"


@pytest.mark.parametrize("mutate, broken", [
    (accumulated_visual_prompts, ("frame_emb", "similarity", "grad.visual_prompt_learner.visual_prompts")),
    (visual_prompts_after_ln_pre, ("frame_emb", "similarity", "grad.visual_prompt_learner.visual_prompts")),
    (text_prefix_before_sot, ("text_emb", "similarity", "grad.text_prompt_learner.text_prompts")),
    (eot_readout, ("text_emb", "similarity", "grad.text_prompt_learner.text_prompts")),
], ids=lambda v: getattr(v, "__name__", ""))
def test_mutations_break_the_comparison(fixture, mutate, broken):
    tensors, meta = fixture
    m = build(meta, section(tensors, "weights"))
    mutate(m)
    err = errors(run(m, section(tensors, "input")), tensors)
    print(f"{mutate.__name__}:", {k: f"{v:.1e}" for k, v in err.items()})
    for name in broken:
        assert err[name] > BROKEN, f"{mutate.__name__} left {name} within {err[name]:.1e} of the official code"
