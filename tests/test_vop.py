"""VoP and its variants: the reported sizes, identity with zero-length prompts, VoP^F's joint attention (mixing frames
only in deep layers, masking padded frames), VoP^C's context dependence, the text read-outs for every caption length
(the release's, the default, and the suite's at EOT), and a real training step that moves exactly the prompts.
Agreement with the released code itself: tests/test_parity_vop.py."""

import lightning
import open_clip
import pytest
import torch

from petl_bench.backbone import ForwardContext
from petl_bench.methods import build_method
from petl_bench.methods.vop import VoP
from petl_bench.methods.zero_shot import ZeroShot

TINY = {"backbone": "petl-tiny-vit", "pretrained": None, "num_frames": 4, "max_words": 16}
VARIANTS = ("vop", "vop_eot", "vop_p", "vop_c", "vop_f", "vop_fp", "vop_fc")
PROMPT_PREFIXES = ("visual_prompts.", "frame_prompts.", "text_prompts", "context_generator.")
CAPTIONS = ["a red square moves left", "a blue dot moves right", "two bars swap places"]
TOKENIZER = open_clip.get_tokenizer("ViT-B-32")
EOT_ID = TOKENIZER.eot_token_id


def tiny_batch(seed: int = 0, num_frames: int = TINY["num_frames"]) -> dict:
    g = torch.Generator().manual_seed(seed)
    B = len(CAPTIONS)
    video_mask = torch.ones(B, num_frames, dtype=torch.bool)
    video_mask[-1, -1] = False  # one padded frame, as the datamodule produces for short videos
    video = torch.randint(0, 256, (B, num_frames, 3, 32, 32), dtype=torch.uint8, generator=g)
    video[~video_mask] = 0
    text = TOKENIZER(CAPTIONS, context_length=TINY["max_words"])
    return {"video": video, "video_mask": video_mask, "text": text,
            "index": torch.arange(B), "video_index": torch.arange(B)}


def frozen_twin(m: VoP) -> ZeroShot:
    zs = ZeroShot(**TINY).eval()
    zs.clip.load_state_dict(m.clip.state_dict())
    return zs


def record_cls_per_layer(m: VoP) -> list:
    """Make ``m`` record each image layer's CLS outputs (B·T, D); returns the (cleared-per-forward) record."""
    record = []
    hook = m.visual_block

    def recording_block(i, block, x, ctx):
        if i == 0:
            record.clear()
        out = hook(i, block, x, ctx)
        record.append(out[:, 0].detach().clone())
        return out

    m.visual_block = recording_block
    return record


# ---------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("backbone", ["ViT-B-32", "ViT-B-16"])
@pytest.mark.parametrize(
    "name, expected",
    [
        ("vop", 122_880),  # 12·8·768 + 12·8·512
        ("vop_eot", 122_880),  # the read-out moves no parameter
        ("vop_f", 122_880),  # no parameters beyond VoP
        ("vop_p", 528_384),  # frame prompts in 6 of 12 image layers
        ("vop_fp", 393_216),  # frame prompts in the 4 joint layers
        ("vop_c", 14_263_576),  # paper: 14.3M (reconstructed sizes, see vop.py)
        ("vop_fc", 14_128_408),  # paper: 14.1M
    ],
)
def test_trainable_counts_match_the_paper(name, expected, backbone):
    m = build_method(name, backbone=backbone, pretrained=None, num_frames=12, max_words=32)
    assert m.parameter_counts()["trainable"] == expected
    # where the enhanced prompts go on a 12-layer tower
    assert m.joint_layers == (set(range(8, 12)) if name.startswith("vop_f") else set())
    expected_frame_layers = {"vop_p": range(6, 12), "vop_c": range(6, 12), "vop_fp": range(8, 12),
                             "vop_fc": range(8, 12)}.get(name, ())
    assert m.frame_prompt_layers == set(expected_frame_layers)


def test_only_prompts_and_generator_train_and_logit_scale_stays_frozen():
    for name in ("vop", "vop_fc"):
        m = build_method(name, **TINY)
        names = m.trainable_names()
        assert names and all(n.startswith(PROMPT_PREFIXES) for n in names)
        assert not any(p.requires_grad for n, p in m.named_parameters() if n.startswith("clip."))
    assert any(n.startswith("context_generator.lstm.") for n in names)
    # prompts are token embeddings (no weight decay); the generator's matrices decay
    assert m.param_weight_decay("text_prompts", m.text_prompts) == 0.0
    gen = m.context_generator.frame_weight
    assert m.param_weight_decay("context_generator.frame_weight", gen) == m.hparams.weight_decay


# ---------------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("name, extra", [("vop", {}), ("vop_p", {}), ("vop_c", {}), ("vop_f", {"shallow_layers": 4})])
def test_zero_length_prompts_reproduce_the_frozen_backbone_exactly(name, extra):
    m = build_method(name, visual_prompt_length=0, text_prefix_length=0, text_suffix_length=0, **extra, **TINY).eval()
    zs = frozen_twin(m)
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(m.encode_video(batch["video"], batch["video_mask"]),
                           zs.encode_video(batch["video"], batch["video_mask"]))
        assert torch.equal(m.encode_text(batch["text"]), zs.encode_text(batch["text"]))


def test_prompts_are_in_the_forward():
    m = build_method("vop", **TINY).eval()
    zs = frozen_twin(m)
    batch = tiny_batch()
    with torch.no_grad():
        video, text = m.encode_video(batch["video"], batch["video_mask"]), m.encode_text(batch["text"])
        assert not torch.equal(video, zs.encode_video(batch["video"], batch["video_mask"]))
        assert not torch.equal(text, zs.encode_text(batch["text"]))
        # deep prompts: a late layer's prompts change the output (they are replaced there, not carried over)
        m.visual_prompts["3"].add_(torch.randn_like(m.visual_prompts["3"]))
        m.text_prompts[3].add_(torch.randn_like(m.text_prompts[3]))
        assert not torch.equal(video, m.encode_video(batch["video"], batch["video_mask"]))
        assert not torch.equal(text, m.encode_text(batch["text"]))


def test_joint_attention_over_one_frame_is_the_per_frame_forward():
    m = build_method("vop_f", visual_prompt_length=0, shallow_layers=0, **TINY).eval()
    zs = frozen_twin(m)
    batch = tiny_batch()
    one_frame, mask = batch["video"][:, :1], batch["video_mask"][:, :1]
    with torch.no_grad():
        torch.testing.assert_close(m.encode_video(one_frame, mask), zs.encode_video(one_frame, mask),
                                   rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- VoP^F, VoP^C
@pytest.mark.parametrize("name", ["vop_f", "vop_fp", "vop_fc"])
def test_function_prompts_mix_frames_in_deep_layers_only(name):
    m = build_method(name, shallow_layers=2, **TINY).eval()
    record = record_cls_per_layer(m)
    batch = tiny_batch()
    video, mask = batch["video"], torch.ones_like(batch["video_mask"])
    changed = video.clone()
    changed[:, 1] = 255 - changed[:, 1]  # change frame 1 of every video
    with torch.no_grad():
        m.encode_video(video, mask)
        before = [cls.view(3, 4, -1) for cls in record]
        m.encode_video(changed, mask)
        after = [cls.view(3, 4, -1) for cls in record]
    for i in range(4):
        frame0_same = torch.equal(before[i][:, 0], after[i][:, 0])
        assert frame0_same == (i < 2), f"layer {i}: frame 0's CLS {'un' if frame0_same else ''}changed"
        assert not torch.equal(before[i][:, 1], after[i][:, 1])


def test_without_function_prompts_frames_stay_independent():
    m = build_method("vop_p", **TINY).eval()
    batch = tiny_batch()
    changed = batch["video"].clone()
    changed[:, 1] = 255 - changed[:, 1]
    with torch.no_grad():
        a = m.encode_video(batch["video"], batch["video_mask"])
        b = m.encode_video(changed, batch["video_mask"])
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.equal(a[:, 1], b[:, 1])


def test_context_prompts_carry_other_frames_into_each_frame():
    m = build_method("vop_c", **TINY).eval()
    batch = tiny_batch()
    changed = batch["video"].clone()
    changed[:, 1] = 255 - changed[:, 1]
    with torch.no_grad():
        a = m.encode_video(batch["video"], batch["video_mask"])
        b = m.encode_video(changed, batch["video_mask"])
    # frame 0's prompts come from the BiLSTM over all frames' CLS tokens
    assert not torch.equal(a[:, 0], b[:, 0])


@pytest.mark.parametrize("name", ["vop_f", "vop_fp", "vop_fc", "vop_c"])
def test_padded_frames_do_not_reach_real_frames(name):
    m = build_method(name, shallow_layers=1, **TINY).eval()
    batch = tiny_batch()
    mask = torch.ones_like(batch["video_mask"])
    mask[:, 2:] = False  # two padded frames per video
    video = batch["video"].clone()
    video[:, 2:] = 0
    garbage = video.clone()
    garbage[:, 2:] = torch.randint(0, 256, garbage[:, 2:].shape, dtype=torch.uint8)
    with torch.no_grad():
        a = m.encode_video(video, mask)
        b = m.encode_video(garbage, mask)
        full = m.encode_video(garbage, torch.ones_like(mask))
    torch.testing.assert_close(a[:, :2], b[:, :2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full[:, :2], a[:, :2], atol=1e-4)  # ...whereas unmasked they would


def test_shared_prompt_joint_attention_over_padded_video_equals_the_shorter_video():
    m = build_method("vop_f", shallow_layers=1, **TINY).eval()
    batch = tiny_batch()
    padded_mask = torch.ones_like(batch["video_mask"])
    padded_mask[:, 2:] = False
    with torch.no_grad():
        padded = m.encode_video(batch["video"], padded_mask)
        short = m.encode_video(batch["video"][:, :2], padded_mask[:, :2])
    torch.testing.assert_close(padded[:, :2], short, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- text
def captions_of_every_length(max_words: int) -> list[str]:
    """0 .. max_words words ("a" is one BPE token); the longest are truncated by the tokenizer to fill max_words."""
    return [" ".join(["a"] * k) for k in range(max_words + 1)]


@pytest.mark.parametrize("readout, max_words", [("eot", TINY["max_words"]), ("release", TINY["max_words"]),
                                                 ("release", 69)])
def test_text_prompt_layout_for_every_caption_length(readout, max_words):
    m = build_method("vop", text_readout=readout, **dict(TINY, max_words=max_words)).eval()
    L = max_words
    text = TOKENIZER(captions_of_every_length(L), context_length=L)
    assert (text.argmax(-1) == L - 1).any()  # at least one caption fills max_words
    emb = m.clip.model.token_embedding(text)
    ctx = ForwardContext("text", batch_size=len(text), eot_index=text.argmax(-1))
    eot_before = ctx.eot_index.clone()
    with torch.no_grad():
        x = m.text_tokens(emb, ctx)
    rows = torch.arange(len(text))
    prompts = m.text_prompts[0]
    C = L if readout == "eot" else 77 - 8  # the release pads every caption to its context of 77 − 8 ids
    assert x.shape[1] == C + 8
    assert torch.equal(x[:, 0], emb[:, 0])  # SOT stays first
    assert torch.equal(x[:, 1:5], prompts[:4].expand(len(text), -1, -1))  # 4 prompts right after SOT
    assert torch.equal(ctx.eot_index, eot_before + 8)
    eot_embedding = m.clip.model.token_embedding.weight[EOT_ID]
    if readout == "eot":
        # the read-out position holds EOT for every caption, and the 4 other prompts sit right before it
        assert torch.equal(x[rows, ctx.eot_index], eot_embedding.expand(len(text), -1))
        for k in range(4):
            assert torch.equal(x[rows, ctx.eot_index - 4 + k], prompts[4 + k].expand(len(text), -1))
        words = [x[r, 5:ctx.eot_index[r] - 4] for r in rows]
        assert all(torch.equal(w, emb[r, 1:eot_before[r]]) for r, w in zip(rows, words))
    else:
        # the release: suffix prompts before the last of its 69 positions; the read lands on EOT only for a
        # caption filling those 69, on padding for short ones (all of them at max_words = 16)
        assert torch.equal(x[:, C + 3:C + 7], prompts[4:].expand(len(text), -1, -1))
        # words and EOT follow the prefix in place (a caption filling the 69 ids has its EOT after the suffix)
        fits = rows[eot_before < C - 1]
        assert all(torch.equal(x[r, 5:5 + eot_before[r]], emb[r, 1:eot_before[r] + 1]) for r in fits)
        full = eot_before == C - 1
        assert bool(full.any()) == (L == C)
        assert torch.equal(x[rows[full], ctx.eot_index[full]], eot_embedding.expand(int(full.sum()), -1))
        short = eot_before <= C - 6
        assert bool(short.all()) == (L < C - 5)
        assert torch.equal(x[rows[short], ctx.eot_index[short]],
                           m.clip.model.token_embedding.weight[0].expand(int(short.sum()), -1))


def test_text_feature_is_read_at_eot_for_every_caption_length():
    m = build_method("vop_eot", **TINY).eval()  # the suite's read-out
    L = TINY["max_words"]
    text = TOKENIZER(captions_of_every_length(L), context_length=L)
    scrambled = text.clone()
    after_eot = torch.arange(L) > text.argmax(-1, keepdim=True)
    scrambled[after_eot] = 320  # any non-padding id (smaller than EOT's) after EOT
    with torch.no_grad():
        feature = m.encode_text(text)
        # the causal mask and a read at EOT make whatever follows EOT irrelevant...
        torch.testing.assert_close(m.encode_text(scrambled), feature, rtol=1e-5, atol=1e-5)
        # ...while every caption's feature depends on the prompts before EOT (all 8 are live)
        m.text_prompts[1, 4:].add_(torch.randn_like(m.text_prompts[1, 4:]))  # not a constant: LayerNorm drops it
        moved = m.encode_text(text)
    assert not torch.isclose(moved, feature, atol=1e-4).all(-1).any()


@pytest.mark.parametrize("max_words", [TINY["max_words"], 69])
def test_release_readout_reads_padding_and_leaves_suffix_prompts_dead_for_short_captions(max_words):
    m = build_method("vop", **dict(TINY, max_words=max_words)).eval()
    assert m.text_readout == "release"  # the default, as the released code
    # words → EOT index: 1 → 2; 62 → 63 (read at 71, the last padding slot before the suffix prompts at 72..75);
    # 63 → 64 (read at 72, the first suffix slot: only the last layer's prompt there is live); 67 → 68 (fills the
    # release's 69 ids: read at EOT itself, after all suffix slots)
    words = [w for w in (1, max_words - 2, 62, 63, 67) if w + 2 <= max_words]
    text = TOKENIZER([" ".join(["a"] * w) for w in words], context_length=max_words)
    with torch.no_grad():
        feature = m.encode_text(text)
        m.text_prompts[:, 4:].add_(torch.randn_like(m.text_prompts[:, 4:]))  # every layer's suffix prompts
        moved = m.encode_text(text)
    for w, a, b in zip(words, feature, moved):
        if w + 1 < 64:  # EOT before position 64: the suffix prompts lie after the read position (causal mask)
            torch.testing.assert_close(b, a, msg=f"{w} words: suffix prompts should be dead")
        else:
            assert not torch.allclose(b, a, atol=1e-4), f"{w} words: suffix prompts should be live"


def test_text_context_must_fit_clip():
    with pytest.raises(ValueError, match="max_words"):
        VoP(**dict(TINY, max_words=70))
    VoP(**dict(TINY, max_words=69))  # 69 + 8 = 77 fits (the release's context)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="text_readout"):
        VoP(text_readout="argmax", **TINY)
    with pytest.raises(ValueError, match="video_prompts"):
        VoP(video_prompts="position", **TINY)
    with pytest.raises(ValueError, match="layer 0"):
        VoP(video_prompts="context", video_prompt_layers=[0, 1], **TINY)
    with pytest.raises(ValueError, match="shallow_layers"):
        VoP(function_prompts=True, shallow_layers=8, **TINY)  # the tiny tower has 4 layers
    with pytest.raises(ValueError, match="video_prompt_layers"):
        VoP(video_prompts="frame", video_prompt_layers=[4], **TINY)
    m = VoP(video_prompts="frame", **TINY)
    with pytest.raises(ValueError, match="num_frames"):
        m.encode_video(*[tiny_batch(num_frames=6)[k] for k in ("video", "video_mask")])


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", VARIANTS)
def test_training_step_moves_exactly_the_prompts(name):
    m = build_method(name, **TINY)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainer = lightning.Trainer(  # 2 steps: the warm-up schedule may give the first step lr 0 (module.lr_factor)
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader([tiny_batch()], batch_size=None))
    expected = {n for n, _ in m.named_parameters() if n.startswith(PROMPT_PREFIXES)}
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert with_grad == expected
    assert changed == expected
    assert torch.equal(m.clip.model.logit_scale, before["clip.model.logit_scale"])
