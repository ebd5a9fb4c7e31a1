"""VoP: Text-Video Co-operative Prompt Tuning (Huang et al., CVPR 2023, arXiv 2211.12764), base and enhanced variants.

CLIP stays frozen; learnable prompt tokens enter every layer of both towers and are *replaced* (not carried over) at
every layer ("deep" prompts, as in VPT-deep). The video embedding is the mean of the frame embeddings (meanP). Only the
prompts, and VoP^C's prompt generator, train; ``logit_scale`` stays at its pretrained value.

One class, `VoP`, builds all six variants from three switches (configs/model/vop*.yaml):

======================  ==================  ==========================  ======================================
config                  ``video_prompts``   ``function_prompts``        trainable on ViT-B/32 and B/16 (12 fr.)
======================  ==================  ==========================  ======================================
vop      (VoP)          shared              false                       122,880      (paper: 0.12M)
vop_p    (VoP^P)        frame               false                       528,384      (paper: 0.53M)
vop_c    (VoP^C)        context             false                       14,263,576   (paper: 14.3M)
vop_f    (VoP^F)        shared              true                        122,880      (paper: 0.12M)
vop_fp   (VoP^F+P)      frame               true                        393,216      (paper: 0.39M)
vop_fc   (VoP^F+C)      context             true                        14,128,408   (paper: 14.1M)
======================  ==================  ==========================  ======================================

**VoP (base).** Vision: 8 prompts per layer right after CLS, ``[CLS, P1..P8, patches]``, the same for every frame.
At layer 0 they are inserted after the positional embedding (so they carry none) and before ``ln_pre`` (which sees
them too) — the `visual_tokens` hook; at every later layer the 8 slots are overwritten with that layer's prompts.
Text: 4 prompts right after SOT and 4 more, inserted after the token embedding and *before* CLIP's positional
embedding (which then covers the prompt positions too, as in the release), overwritten at every later layer; the causal
mask is CLIP's own. All prompts start as N(0, 0.02²). 12·8·768 + 12·8·512 = 122,880 parameters.

**VoP^P (frame-position prompts).** In the *P layers* each frame position t ∈ [0, T) has its own prompt set, which
replaces the shared set there; the other layers keep VoP's shared prompts. The paper does not say which layers; its
528,384 parameters on B/32 mean 6 of 12 (6·8·768 + 6·12·8·768 + 12·8·512), and we take the deeper half (6..11).

**VoP^C (context prompts).** In the *C layers* (also the deeper half by default), the CLS tokens of all T frames
leaving the previous layer go through a context module — a BiLSTM over the frame axis, as reported — and a per-frame
linear layer turns frame t's context vector into frame t's 8 prompts. Reconstruction (the paper gives no sizes):
- one generator (BiLSTM + per-frame weights) is shared by the C layers, and each C layer keeps its own per-frame bias —
  a (T, 8, D) tensor, i.e. exactly a VoP^P prompt set — so prompts differ between layers and ``C = P + context term``.
  A generator per layer cannot match the reports: VoP^C (C in 6 layers) and VoP^F+C (C in 4 layers) differ by only
  ~0.2M, while a per-layer generator of ~2.4M would make them differ by ~4.7M.
- the BiLSTM has ``context_hidden`` = 89 units per direction; the per-frame weights map its 178-d output to 8·768.
  89 is not from the paper: it is the size at which this reconstruction gives 14,263,576 (VoP^C) and 14,128,408
  (VoP^F+C), i.e. both reported figures (14.3M, 14.1M) after rounding; round sizes miss one of them (64 → 10.4M /
  10.3M, 96 → 15.3M / 15.2M). Of each total, the BiLSTM is 611,608 and the per-frame weights 13,123,584.
- the CLS tokens are layer-normalised (no parameters) before the BiLSTM: CLIP's residual stream has outlier channels
  of magnitude ≫ 1 that would saturate the LSTM gates. Padded frames are packed out of the BiLSTM.
- the per-frame weights start as N(0, 0.02²) like the prompts, so the generated term starts small but non-zero.

**VoP^F (function prompts).** Shallow layers (index < K^s) work within each frame as usual; deeper layers attend
jointly over all T frames' tokens plus one shared prompt set: (B·T, N, D) is regrouped to (B, T·N + 8, D), the frozen
block runs on that unchanged (its LayerNorms and MLP are per token, so only attention mixes frames), and the result is
split back per frame. Padded frames (``ctx.frame_mask``) are masked out of the joint attention's keys. No parameters
beyond VoP's. K^s ∈ {4, 8} in the paper, 8 by default; here ``shallow_layers=None`` means round(2/3 · depth) = 8 of
12 (3 of the tiny backbone's 4), so the same config works on every backbone. VoP^F+P / VoP^F+C put the P / C prompts
in the joint layers (4 of 12: 393,216 for F+P as reported): each frame then brings its own prompt set into the joint
sequence (T·8 prompt tokens).

Deviations from the release (ModelScope ``vop_retrieval``, inference code only) and the paper:
- *Text suffix prompts and the read-out position.* The release inserts the 4 "suffix" prompts just before the last
  position of its 69-token padded context, i.e. after EOT among the padding, and reads the feature at
  ``argmax(ids) + 8`` — 4 positions after the (shifted) EOT, a padding token for most captions — so the suffix prompts
  are dead for all but near-full captions (causal mask) and the feature is not CLIP's EOT feature. Default here
  (``text_readout="eot"``): the suffix prompts sit right before each caption's EOT, ``[SOT, 4 P, words, 4 P, EOT, pad]``,
  so they are live for every caption, and the feature is read at the true EOT. ``text_readout="release"`` reproduces
  the release exactly (placement before the last context position, read at argmax + 8).
- *Text context.* The release shortens the context to 77 − 8 = 69 tokens; here the data's ``max_words`` (32 for
  MSR-VTT) plus the 8 prompts must fit CLIP's 77 positions, checked at construction.
- *Weight decay.* Prompts are token embeddings, exempt from weight decay like CLIP's own embeddings; the generator's
  matrices decay as usual.
- The P / C layers and K^s are options (``video_prompt_layers``, ``shallow_layers``); defaults as stated above.
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


# ---------------------------------------------------------------------------------------------------- the method
class VoP(RetrievalModule):
    """VoP and its enhanced variants (module docstring). Options beyond `RetrievalModule`'s:

    Args:
        visual_prompt_length: prompts per layer of the image tower (8); per frame in P / C layers.
        text_prefix_length / text_suffix_length: text prompts after SOT (4) and before EOT (4) per layer.
        text_readout: ``eot`` (suffix before EOT, read at EOT; default) or ``release`` (suffix after EOT, read at
            argmax + prompts, as the released code).
        prompt_init_std: std of the normal init of prompts and of VoP^C's per-frame weights (0.02).
        video_prompts: ``shared`` (VoP), ``frame`` (VoP^P), ``context`` (VoP^C) — what the video prompt layers use.
        video_prompt_layers: the P / C layers; None → the joint layers under ``function_prompts``, else the deeper
            half of the image tower.
        function_prompts: VoP^F — layers from ``shallow_layers`` on attend jointly over all frames.
        shallow_layers: K^s, the number of per-frame layers under VoP^F; None → round(2/3 · depth) (8 of 12).
        context_module: ``bilstm`` (reported) or ``lstm`` (one direction); context_hidden: its units per direction.
    """

    def __init__(
        self,
        visual_prompt_length: int = 8,
        text_prefix_length: int = 4,
        text_suffix_length: int = 4,
        text_readout: str = "eot",
        prompt_init_std: float = 0.02,
        video_prompts: str = "shared",
        video_prompt_layers: list[int] | None = None,
        function_prompts: bool = False,
        shallow_layers: int | None = None,
        context_module: str = "bilstm",
        context_hidden: int = 89,
        **kwargs,
    ):
        super().__init__(**kwargs)
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
            shared = self.visual_prompts[str(i)].to(x.dtype)
            return shared.unsqueeze(0).expand(B * T, -1, -1)
        if T > self.num_frames:
            raise ValueError(f"videos have {T} frames but VoP^P/^C prompts were built for num_frames="
                             f"{self.num_frames}; set model.num_frames to the data's num_frames")
        prompts = self.frame_prompts[str(i)][:T].unsqueeze(0)  # (1, T, n, D)
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
        """Layer 0: insert the prompts before CLIP's positional embedding is added; move the read-out index."""
        if self.text_prompts.shape[1] == 0:
            return x
        if bool((ctx.eot_index < 1).any()):
            raise ValueError("a caption's token ids have no SOT/EOT (all-zero row?); tokenise with open_clip's "
                             "tokenizer, which starts every caption with SOT and ends it with EOT")
        positions = self.text_prompt_positions(ctx.eot_index, x.shape[1])
        ctx.state["text_prompt_positions"] = positions
        # eot: the true EOT moved past all prompts; release: 4 past it (the released read position)
        ctx.eot_index = ctx.eot_index + self.text_prompts.shape[1]
        prompts = self.text_prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)
        return insert_tokens(x, positions, prompts)

    def text_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if i > 0 and self.text_prompts.shape[1] > 0:
            prompts = self.text_prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
            x = overwrite_tokens(x, ctx.state["text_prompt_positions"], prompts)
        return super().text_block(i, block, x, ctx)
