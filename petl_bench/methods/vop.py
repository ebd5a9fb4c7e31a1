"""VoP: Text-Video Co-operative Prompt Tuning (Huang et al., CVPR 2023, arXiv 2211.12764), base and enhanced variants.

CLIP stays frozen; learnable prompt tokens enter every layer of both towers and are *replaced* (not carried over) at
every layer ("deep" prompts, as in VPT-deep). The video embedding is the mean of the frame embeddings (meanP). Only the
prompts, and VoP^C's prompt generator, train; ``logit_scale`` stays at its pretrained value.

The paper states the method and prints one rounded size per variant (0.1M for VoP and VoP^F, 0.5M VoP^P, 14.3M VoP^C,
0.4M VoP^F+P, 14.1M VoP^F+C) for every dataset. The release (ModelScope ``modelscope/models/cv/vop_retrieval``) is
inference code for VoP base only. Everything about P, C and F beyond the paper's words is the suite's reconstruction.

One class, `VoP`, builds all variants from three switches (configs/model/vop*.yaml). Trainable parameters on ViT-B/32
and B/16 (``petl-bench params --backbone ViT-B-32 --frames F``); P and C grow with the frame count because they hold
one prompt set (and one generator map) per frame position:

======================  =============  ============  ==========  ==========  ============  =============
config                  video_prompts  function_pr.  12 frames   64 frames   paper prints  exact count
======================  =============  ============  ==========  ==========  ============  =============
vop      (VoP)          shared         false         122,880     122,880     0.1M          as released
vop_eot  (suite's)      shared         false         122,880     122,880     —             as released
vop_p    (VoP^P)        frame          false         528,384     2,445,312   0.5M          reconstructed
vop_c    (VoP^C)        context        false         14,263,576  73,049,368  14.3M         reconstructed
vop_f    (VoP^F)        shared         true          122,880     122,880     0.1M          = VoP's
vop_fp   (VoP^F+P)      frame          true          393,216     1,671,168   0.4M          reconstructed
vop_fc   (VoP^F+C)      context        true          14,128,408  72,275,224  14.1M         reconstructed
======================  =============  ============  ==========  ==========  ============  =============

The paper's single size per variant cannot hold at 64 frames with per-frame prompt sets; a frame-count-invariant
design (e.g. 12 position sets shared by buckets of frames, or interpolated over time) would be a further invention the
paper does not describe, so the suite keeps one set per frame position and reports the counts above per frame count
(MSR-VTT, MSVD, VATEX: 12 frames; DiDeMo, ActivityNet: 64).

**VoP (base)** — as the release does it. Vision: 8 prompts per layer right after CLS, ``[CLS, P1..P8, patches]``, the
same for every frame. At layer 0 they are inserted after the positional embedding (so they carry none) and before
``ln_pre`` (which sees them too) — the `visual_tokens` hook; at every later layer the 8 slots are overwritten with that
layer's prompts. Text: 4 prompts right after SOT and 4 "suffix" prompts, inserted after the token embedding and
*before* CLIP's positional embedding (which then covers the prompt positions too), overwritten at every later layer;
the causal mask is CLIP's own. All prompts start as N(0, 0.02²). 12·8·768 + 12·8·512 = 122,880 parameters.
Read-out (``text_readout``):
- ``release`` (default, as the release): the token ids are zero-padded to the release's fixed context of
  77 − 8 = 69 ids, the suffix prompts go just before the last of those positions (after EOT, among the padding:
  ``[SOT, 4 P, words, EOT, pad…, 4 P, pad]``) and the feature is read at ``argmax(ids) + 8``, i.e. 4 positions after
  the shifted EOT — a padding token for every caption with EOT before position 64. For such captions the suffix
  prompts are dead (causal mask) and the feature is not CLIP's EOT feature. The published numbers were made so.
  The padding is done here (with id 0's embedding, the pad id of both tokenizers) so the result does not depend on
  ``max_words``: a caption that fits ``max_words`` gets exactly the release's feature (tests/test_parity_vop.py).
- ``eot`` (the suite's choice, configs/model/vop_eot.yaml): no padding to 69; the suffix prompts sit right before each
  caption's EOT, ``[SOT, 4 P, words, 4 P, EOT, pad]``, so all 8 are live for every caption, and the feature is read
  at the true EOT. Expected effect: the text prompts' full capacity is used; small changes in R@1 either way
  (untested at full scale).

**VoP^P (frame-position prompts).** In the *P layers* each frame position t ∈ [0, T) has its own prompt set, which
replaces the shared set there; the other layers keep VoP's shared prompts. The paper does not say which layers; 6 of 12
(6·8·768 + 6·12·8·768 + 12·8·512 = 528,384 at 12 frames, the paper's 0.5M, also 0.53M from its percentage) is the
suite's reading, and the suite takes the deeper half (6..11).

**VoP^C (context prompts).** In the *C layers* (also the deeper half by default), the CLS tokens of all T frames
leaving the previous layer go through a context module — a BiLSTM over the frame axis, as reported — and a per-frame
linear layer turns frame t's context vector into frame t's 8 prompts. The sizes are the suite's reconstruction (the
paper gives none):
- one generator (BiLSTM + per-frame weights) is shared by the C layers, and each C layer keeps its own per-frame bias —
  a (T, 8, D) tensor, i.e. exactly a VoP^P prompt set — so prompts differ between layers and ``C = P + context term``.
  A generator per layer cannot match the reports: VoP^C (C in 6 layers) and VoP^F+C (C in 4 layers) differ by only
  ~0.2M, while a per-layer generator of ~2.4M would make them differ by ~4.7M.
- the BiLSTM has ``context_hidden`` = 89 units per direction; the per-frame weights map its 178-d output to 8·768.
  89 is not from the paper: it is the size at which this reconstruction gives 14,263,576 (VoP^C) and 14,128,408
  (VoP^F+C) at 12 frames, i.e. both printed figures (14.3M, 14.1M) after rounding; round sizes miss one of them
  (64 → 10.4M / 10.3M, 96 → 15.3M / 15.2M). Of each total, the BiLSTM is 611,608 and the per-frame weights 13,123,584.
- the CLS tokens are layer-normalised (no parameters) before the BiLSTM: CLIP's residual stream has outlier channels
  of magnitude ≫ 1 that would saturate the LSTM gates. Padded frames are packed out of the BiLSTM.
- the per-frame weights start as N(0, 0.02²) like the prompts, so the generated term starts small but non-zero.

**VoP^F (function prompts).** Shallow layers (index < K^s) work within each frame as usual; deeper layers attend
jointly over all T frames' tokens plus one shared prompt set: (B·T, N, D) is regrouped to (B, T·N + 8, D), the frozen
block runs on that unchanged (its LayerNorms and MLP are per token, so only attention mixes frames), and the result is
split back per frame. Padded frames (``ctx.frame_mask``) are masked out of the joint attention's keys. No parameters
beyond VoP's. K^s = 8 is the suite's reconstruction, not a value the paper states: it is inferred from VoP^F+P's size
(P prompts in the 4 joint layers of 12: 393,216, the paper's 0.4M); ``shallow_layers=None`` means round(2/3 · depth)
= 8 of 12 (3 of the tiny backbone's 4), so the same config works on every backbone. VoP^F+P / VoP^F+C put the P / C
prompts in the joint layers: each frame then brings its own prompt set into the joint sequence (T·8 prompt tokens).

Differences from the release (VoP base; the release is inference-only, so training follows the suite's shared recipe)::

    aspect        the release                          the suite                           expected effect
    ------------  -----------------------------------  ----------------------------------  --------------------------
    text read-    suffix prompts after EOT, read at    the same by default (text_readout:  none by default; vop_eot:
    out           argmax + 8 (padding, most captions)  release); vop_eot reads at EOT      all 8 text prompts live
    text context  69 ids (77 − 8); longer captions     data's max_words (32 MSR-VTT, 64    none within max_words;
                  cut to SOT + 67 tokens + EOT         DiDeMo/ActivityNet), ≤ 77 − 8       longer captions cut
                                                                                           earlier (rare at 32)
    text padding  id 0 up to 69                        id 0 up to max_words (open_clip),   none (same embeddings)
                                                       then id 0's embedding up to 69
    video         short videos repeat their last       zero frames masked out of meanP     videos shorter than T
    padding       frame up to T; all T averaged                                            frames only
    frame         X-Pool uniform: T equal segments     the data config's, common to every  fps: other frames (1 per
    sampling      over all frames; eval frame          method: CLIP4Clip's 1 fps on real   second, thinned); uniform:
                  (s + e − 1) // 2, train [s, e − 2]   data; --data.frame_protocol=uniform ≤ 1 frame offset
                                                       gives segments, eval (s + e) // 2,
                                                       train any of [s, e − 1]
    pixels        cv2, float / 255, torchvision        uint8 bicubic antialiased resize    ~1/255 pixel rounding
                  bicubic Resize + CenterCrop          and crop; CLIP mean/std on device
    similarity    pooled video: mean of normalised     meanP cosine (the mean is           V2T ranking unchanged;
                  frames, not re-normalised            re-normalised)                      T2V may shift slightly
    precision     fp32 (its build_model keeps CLIP     the trainer's: 32-true on CPU,      bf16: ~1e-3 relative
                  in fp32, also on GPU)                bf16-mixed on GPU                   noise
    training      none released (the paper's /         shared AdamW recipe (module.py),    absolute R@1 may differ
    recipe        X-Pool's recipe)                     lr 1e-4, X-Pool's cosine after      from the paper; the
                                                       warm-up, prompts without weight     comparison stays fair
                                                       decay, logit_scale frozen
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from petl_bench.backbone import ForwardContext, attention_part, mlp_part
from petl_bench.module import RetrievalModule

VIDEO_PROMPTS = ("shared", "frame", "context")
TEXT_READOUTS = ("eot", "release")
CONTEXT_MODULES = ("bilstm", "lstm")


# ---------------------------------------------------------------------------------------------------- token surgery
def insert_tokens(x: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Insert ``tokens`` (B, P, D) into ``x`` (B, L, D) so that they land at ``positions`` (B, P) of the result.

    ``positions`` index the output (length L + P), must be increasing along each row, and the original tokens keep
    their order in the remaining slots. Written as one gather so that every row may put its tokens elsewhere.
    """
    B, L, D = x.shape
    P = positions.shape[1]
    is_new = torch.zeros(B, L + P, dtype=torch.bool, device=x.device).scatter(1, positions, True)
    old_rank = (~is_new).long().cumsum(1) - 1  # which original token fills a slot
    new_rank = is_new.long().cumsum(1) - 1 + L  # which inserted token (stored after the originals)
    source = torch.where(is_new, new_rank, old_rank)
    return torch.cat([x, tokens], dim=1).gather(1, source.unsqueeze(-1).expand(-1, -1, D))


def overwrite_tokens(x: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``x`` (B, S, D) with the rows at ``positions`` (B, P) replaced by ``tokens`` (B, P, D) (out of place)."""
    return x.scatter(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]), tokens)


# ---------------------------------------------------------------------------------------------------- VoP^C generator
class ContextPromptGenerator(nn.Module):
    """VoP^C's prompt generator: a (Bi)LSTM over the frames' CLS tokens, then one linear map per frame position.

    Returns only the context term W_t·h_t (B, T, n, D); the per-frame bias of that linear layer is the C layer's own
    frame prompt set, held by `VoP` (see the module docstring).
    """

    def __init__(self, width: int, num_frames: int, prompt_length: int, hidden: int, bidirectional: bool,
                 init_std: float):
        super().__init__()
        self.prompt_length = prompt_length
        self.lstm = nn.LSTM(width, hidden, batch_first=True, bidirectional=bidirectional)
        context_width = hidden * (2 if bidirectional else 1)
        self.frame_weight = nn.Parameter(torch.randn(num_frames, context_width, prompt_length * width) * init_std)

    def forward(self, cls: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """CLS tokens (B, T, D) of the previous layer, real-frame mask (B, T) → prompt offsets (B, T, n, D)."""
        B, T, D = cls.shape
        lengths = frame_mask.sum(1).clamp(min=1)
        if not torch.equal(frame_mask, torch.arange(T, device=cls.device) < lengths.unsqueeze(1)):
            raise ValueError("VoP^C expects real frames first and padding last in video_mask (as the data module "
                             "produces); got a mask with padding before a real frame")
        x = F.layer_norm(cls, (D,)).to(self.frame_weight.dtype)
        if bool((lengths < T).any()):
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            context, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=T)
        else:
            context = self.lstm(x)[0]  # (B, T, hidden·directions)
        offsets = torch.einsum("bth,thk->btk", context, self.frame_weight[:T])
        return offsets.view(B, T, self.prompt_length, D)


_LAYER_KEYS = tuple(str(i) for i in range(256))


def _layer_key(i: int) -> str:
    """The ParameterDict key of layer ``i``; a lookup rather than ``str(i)``, which torch.compile cannot trace
    (a graph break in every visual block)."""
    return _LAYER_KEYS[i] if i < len(_LAYER_KEYS) else str(i)


# ---------------------------------------------------------------------------------------------------- the method
class VoP(RetrievalModule):
    """VoP and its enhanced variants (module docstring). Options beyond `RetrievalModule`'s:

    Args:
        visual_prompt_length: prompts per layer of the image tower (8); per frame in P / C layers.
        text_prefix_length / text_suffix_length: text prompts after SOT (4) and before EOT (4) per layer.
        text_readout: ``release`` (default: ids padded to the release's 77 − 8 context, suffix prompts after EOT
            before the last position, read at argmax + 8, as the released code) or ``eot`` (the suite's variant:
            suffix prompts right before EOT, read at EOT).
        prompt_init_std: std of the normal init of prompts and of VoP^C's per-frame weights (0.02).
        video_prompts: ``shared`` (VoP), ``frame`` (VoP^P), ``context`` (VoP^C) — what the video prompt layers use.
        video_prompt_layers: the P / C layers; None → the joint layers under ``function_prompts``, else the deeper
            half of the image tower.
        function_prompts: VoP^F — layers from ``shallow_layers`` on attend jointly over all frames.
        shallow_layers: K^s, the number of per-frame layers under VoP^F; None → round(2/3 · depth) (8 of 12).
        context_module: ``bilstm`` (reported) or ``lstm`` (one direction); context_hidden: its units per direction.
        lr_schedule: ``cosine_after_warmup`` by default, the schedule of X-Pool (whose code VoP's training builds on);
            other arguments: see `RetrievalModule`.
    """

    def __init__(
        self,
        visual_prompt_length: int = 8,
        text_prefix_length: int = 4,
        text_suffix_length: int = 4,
        text_readout: str = "release",
        prompt_init_std: float = 0.02,
        video_prompts: str = "shared",
        video_prompt_layers: list[int] | None = None,
        function_prompts: bool = False,
        shallow_layers: int | None = None,
        context_module: str = "bilstm",
        context_hidden: int = 89,
        lr_schedule: str = "cosine_after_warmup",
        **kwargs,
    ):
        super().__init__(lr_schedule=lr_schedule, **kwargs)
        if text_readout not in TEXT_READOUTS:
            raise ValueError(f"text_readout must be one of {TEXT_READOUTS}, got {text_readout!r}")
        if video_prompts not in VIDEO_PROMPTS:
            raise ValueError(f"video_prompts must be one of {VIDEO_PROMPTS}, got {video_prompts!r}")
        if context_module not in CONTEXT_MODULES:
            raise ValueError(f"context_module must be one of {CONTEXT_MODULES}, got {context_module!r}")
        if min(visual_prompt_length, text_prefix_length, text_suffix_length) < 0:
            raise ValueError("prompt lengths must be >= 0")
        depth = len(self.clip.visual_blocks)
        text_depth = len(self.clip.text_blocks)
        vis_width, text_width = self.clip.visual_width, self.clip.text_width

        text_context = self.max_words + text_prefix_length + text_suffix_length
        if text_context > self.clip.context_length:
            raise ValueError(
                f"max_words ({self.max_words}) + text prompts ({text_prefix_length} + {text_suffix_length}) = "
                f"{text_context} tokens exceeds {self.clip.model_name}'s text context of {self.clip.context_length}; "
                f"set data.max_words <= {self.clip.context_length - text_prefix_length - text_suffix_length} "
                f"or use fewer text prompts"
            )

        # VoP^F: which layers attend over all frames at once
        if shallow_layers is None:
            shallow_layers = round(2 * depth / 3)
        if function_prompts and not 0 <= shallow_layers <= depth:
            raise ValueError(f"shallow_layers (K^s) must be in [0, {depth}] for {self.clip.model_name}, "
                             f"got {shallow_layers}")
        self.joint_layers = frozenset(range(shallow_layers, depth)) if function_prompts else frozenset()

        # VoP^P / VoP^C: which layers have per-frame prompts
        if video_prompts == "shared":
            if video_prompt_layers:
                raise ValueError("video_prompt_layers is for video_prompts 'frame' or 'context', not 'shared'")
            frame_layers: list[int] = []
        elif video_prompt_layers is None:
            frame_layers = sorted(self.joint_layers) if function_prompts else list(range(depth // 2, depth))
        else:
            frame_layers = sorted({int(i) for i in video_prompt_layers})
            if frame_layers and not 0 <= frame_layers[0] <= frame_layers[-1] < depth:
                raise ValueError(f"video_prompt_layers must lie in [0, {depth}) for {self.clip.model_name}, "
                                 f"got {video_prompt_layers}")
        if video_prompts == "context" and 0 in frame_layers:
            raise ValueError("VoP^C generates a layer's prompts from the previous layer's CLS tokens, so layer 0 "
                             "cannot be a context-prompt layer; drop 0 from video_prompt_layers")
        self.frame_prompt_layers = frozenset(frame_layers)

        self.visual_prompt_length = visual_prompt_length
        self.text_prefix_length = text_prefix_length
        self.text_suffix_length = text_suffix_length
        self.text_readout = text_readout
        # the release tokenises to a fixed context of CLIP's 77 − 8 ids; its suffix slots and read position follow it
        self.release_text_context = self.clip.context_length - text_prefix_length - text_suffix_length

        def normal(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape) * prompt_init_std)

        # shared prompts in every layer without per-frame prompts; one (T, n, D) set per P / C layer
        self.visual_prompts = nn.ParameterDict({
            str(i): normal(visual_prompt_length, vis_width) for i in range(depth) if i not in self.frame_prompt_layers
        })
        self.frame_prompts = nn.ParameterDict({
            str(i): normal(self.num_frames, visual_prompt_length, vis_width) for i in frame_layers
        })
        self.text_prompts = normal(text_depth, text_prefix_length + text_suffix_length, text_width)
        self.context_generator = (
            ContextPromptGenerator(vis_width, self.num_frames, visual_prompt_length, context_hidden,
                                   bidirectional=context_module == "bilstm", init_std=prompt_init_std)
            if video_prompts == "context" and frame_layers else None
        )

    # ------------------------------------------------------------------ what trains
    def is_trainable(self, name: str) -> bool:
        """Prompts and the VoP^C generator; every CLIP weight, logit_scale included, stays frozen."""
        return not name.startswith("clip.")

    def param_weight_decay(self, name: str, param: nn.Parameter) -> float:
        if name.startswith(("visual_prompts.", "frame_prompts.", "text_prompts")):
            return 0.0  # prompts are token embeddings
        return super().param_weight_decay(name, param)

    # ------------------------------------------------------------------ image tower
    def layer_visual_prompts(self, i: int, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The prompts of image layer ``i`` for every frame, (B·T, n, D); ``x`` is what enters that layer."""
        B, T = ctx.batch_size, ctx.num_frames
        if i not in self.frame_prompt_layers:
            shared = self.visual_prompts[_layer_key(i)].to(x.dtype)
            return shared.unsqueeze(0).expand(B * T, -1, -1)
        if T > self.num_frames:
            raise ValueError(f"videos have {T} frames but VoP^P/^C prompts were built for num_frames="
                             f"{self.num_frames}; set model.num_frames to the data's num_frames")
        prompts = self.frame_prompts[_layer_key(i)][:T].unsqueeze(0)  # (1, T, n, D)
        if self.context_generator is not None:
            cls = x[:, 0].view(B, T, -1)
            prompts = prompts + self.context_generator(cls, ctx.frame_mask)
        return prompts.expand(B, -1, -1, -1).reshape(B * T, self.visual_prompt_length, x.shape[-1]).to(x.dtype)

    def visual_tokens(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Layer 0: [CLS, prompts, patches]; the positional embedding is already added, ln_pre comes next."""
        return torch.cat([x[:, :1], self.layer_visual_prompts(0, x, ctx), x[:, 1:]], dim=1)

    def visual_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if i > 0:  # deep prompts: this layer's prompts replace what the previous layer made of its own
            n = self.visual_prompt_length
            x = torch.cat([x[:, :1], self.layer_visual_prompts(i, x, ctx), x[:, 1 + n:]], dim=1)
        if i in self.joint_layers:
            return self.joint_frames_block(block, x, ctx, frame_specific=i in self.frame_prompt_layers)
        return super().visual_block(i, block, x, ctx)

    def joint_frames_block(self, block: nn.Module, x: torch.Tensor, ctx: ForwardContext,
                           frame_specific: bool) -> torch.Tensor:
        """VoP^F's deep layer: the frozen ``block`` over all frames' tokens of a video plus its prompts, at once.

        ``x`` (B·T, 1 + n + M, D) is [CLS, prompts, patches] per frame. The joint sequence is every frame's
        [CLS, patches] followed by one prompt set (shared prompts) or every frame's prompts (P / C layers);
        the output is split back into the per-frame layout.
        """
        B, T = ctx.batch_size, ctx.num_frames
        n = self.visual_prompt_length
        D = x.shape[-1]
        frames = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)  # (B·T, N, D)
        N = frames.shape[1]
        slots = x[:, 1:1 + n].reshape(B, T, n, D)
        prompts = slots.flatten(1, 2) if frame_specific else slots[:, 0]  # shared prompts are equal in every frame
        joint = torch.cat([frames.reshape(B, T * N, D), prompts], dim=1)

        mask = self.joint_attention_mask(ctx, N, frame_specific, block.attn.num_heads, joint.dtype)
        joint = joint + attention_part(block, joint, mask)
        joint = joint + mlp_part(block, joint)

        frames = joint[:, :T * N].reshape(B * T, N, D)
        prompts = joint[:, T * N:]
        slots = prompts.reshape(B, T, n, D) if frame_specific else prompts.unsqueeze(1).expand(B, T, n, D)
        return torch.cat([frames[:, :1], slots.reshape(B * T, n, D), frames[:, 1:]], dim=1)

    def joint_attention_mask(self, ctx: ForwardContext, tokens_per_frame: int, frame_specific: bool,
                             num_heads: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive mask (B·heads, S, S) hiding padded frames' tokens (and their prompts) as keys; None if none."""
        real = ctx.frame_mask
        if real is None or bool(real.all()):
            return None
        real = real | ~real.any(1, keepdim=True)  # a video with no real frame: attend to everything, avoid NaN
        keep = [real.repeat_interleave(tokens_per_frame, dim=1)]
        n = self.visual_prompt_length
        keep.append(real.repeat_interleave(n, dim=1) if frame_specific else real.new_ones(real.shape[0], n))
        keep = torch.cat(keep, dim=1)  # (B, S)
        B, S = keep.shape
        additive = torch.zeros(B, S, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))
        return additive[:, None, None, :].expand(B, num_heads, S, S).reshape(B * num_heads, S, S)

    # ------------------------------------------------------------------ text tower
    def text_prompt_positions(self, eot: torch.Tensor, length: int) -> torch.Tensor:
        """Where the text prompts sit after insertion, (B, n_pre + n_suf): after SOT, and before EOT (``eot``) or
        before the last context position (``release``). ``eot`` is the EOT index before insertion."""
        pre = torch.arange(1, 1 + self.text_prefix_length, device=eot.device).expand(eot.shape[0], -1)
        anchor = eot if self.text_readout == "eot" else torch.full_like(eot, length - 1)
        suf = anchor.unsqueeze(1) + self.text_prefix_length + torch.arange(self.text_suffix_length, device=eot.device)
        return torch.cat([pre, suf], dim=1)

    def text_tokens(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Layer 0: insert the prompts before CLIP's positional embedding is added (``release``: after padding the
        ids to the release's context); move the read-out index."""
        if self.text_prompts.shape[1] == 0:
            return x
        if bool((ctx.eot_index < 1).any()):
            raise ValueError("a caption's token ids have no SOT/EOT (all-zero row?); tokenise with open_clip's "
                             "tokenizer, which starts every caption with SOT and ends it with EOT")
        if self.text_readout == "release":
            x = self.pad_to_release_context(x)
        positions = self.text_prompt_positions(ctx.eot_index, x.shape[1])
        ctx.state["text_prompt_positions"] = positions
        # eot: the true EOT moved past all prompts; release: 4 past it (the released read position)
        ctx.eot_index = ctx.eot_index + self.text_prompts.shape[1]
        prompts = self.text_prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)
        return insert_tokens(x, positions, prompts)

    def pad_to_release_context(self, x: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, D) padded with id 0's embedding (the pad id of the release's and open_clip's
        tokenizers) to the release's context, so that a caption's feature does not depend on ``max_words``."""
        missing = self.release_text_context - x.shape[1]
        if missing <= 0:
            return x
        pad = self.clip.model.token_embedding.weight[0].to(x.dtype)
        return torch.cat([x, pad.expand(x.shape[0], missing, -1)], dim=1)

    def text_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if i > 0 and self.text_prompts.shape[1] > 0:
            prompts = self.text_prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
            x = overwrite_tokens(x, ctx.state["text_prompt_positions"], prompts)
        return super().text_block(i, block, x, ctx)
