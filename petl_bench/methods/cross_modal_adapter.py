"""Cross-Modal Adapter (Jiang et al., "Cross-Modal Adapter for Text-Video Retrieval", arXiv 2211.09623;
official code: LeapLabTHU/Cross-Modal-Adapter). CLIP stays frozen; only the adapters train.

What it adds. Every residual block of both towers gets two sequential (Houlsby-style) adapters, one on the attention
branch and one on the MLP branch, before the residual add:

    x ← x + A(Attn(LN1(x)))        x ← x + A(MLP(LN2(x)))        A(h) = h + Up(QuickGELU(Down(h)))

with no LayerNorm, scale or gate inside A. Down maps the tower's width D to a bottleneck of ``bottleneck`` channels
(the paper's r and the release's ``--adapter_reduction_dims``: an absolute dimension, not a ratio D/r — the paper's
parameter counts only add up that way, and the visual and text adapters of a position must share it for the next
point to work).

The cross-modal part. At each of the 2·depth adapter positions, Up's last ``share_dim`` (d_s) output channels come
from one weight (d_s × r) and bias (d_s) that the visual and the text adapter of that position both use: a single
`nn.Parameter` pair in `shared_up`, read by both towers' forwards, so gradients from either modality reach it. The
other D − d_s output channels and the down-projections are per modality; nothing is shared across positions.
``share_dim=0`` gives two independent uni-modal adapters (the paper's baseline).

Size: per position 2r + (D_v + D_t)·r (downs) + (r + 1)·(D_v + D_t − d_s) (ups), i.e. for ViT-B/32 and B/16
(D_v = 768, D_t = 512, 12 layers) N(r, d_s) = 24·[1282·r + (r + 1)·(1280 − d_s)]: r = 8, d_s = 16 → 519,168.

Defaults follow the release's MSR-VTT command line: r = 8, d_s = 16, lr 1e-5, the similarity head
``text_conditioned`` (parameter-free text-conditioned softmax pooling over frames, temperature 5 on un-normalised
embeddings, then cosine; see `petl_bench.module.text_conditioned_similarity`); ``meanP`` is the ablation.
Only adapter weights train — not logit_scale, LayerNorms or projections.

Init: as in the release, every adapter weight (the up-projections included) is drawn with
``nn.init.trunc_normal_(std=0.01)`` and every bias is zero, so the model is close to, but not exactly, CLIP at step 0.
Note that torch's truncation bounds are absolute (±2), i.e. ±200 std here: in effect an untruncated normal; we call
the same function so the distribution is the release's. ``up_init="zero"`` zero-initialises the up-projections
instead, making every adapter an exact identity at step 0 (the adapted model then equals the frozen backbone); the
down-projections then receive no gradient on the first step, only once Up has moved off zero.

Differences from the release (LeapLabTHU/Cross-Modal-Adapter @ 07b2203, its README's MSR-VTT command). The model
itself — adapter placement, QuickGELU, the shared up-projection channels, the text-conditioned head, the symmetric
InfoNCE loss and its gradients — is pinned to the release in fp32 by tests/test_parity_cross_modal_adapter.py (all
outputs and adapter gradients within 5e-6 relative). What remains is training machinery and data:

  aspect          release → suite (default); expected effect
  --------------  ---------------------------------------------------------------------------------------------------
  precision       CLIP in fp16 (``convert_weights``; LayerNorms computed in fp32) and, with
                  ``--adapter_convert2fp16``, pure-fp16 adapters and optimiser state (no fp32 master copy, no loss
                  scaling) → fp32 weights, mixed precision left to the Trainer (bf16-mixed on GPU). Effect: the
                  release's updates (lr 1e-5 on weights ~0.01, about one fp16 ulp) are coarsely rounded and small
                  squared gradients underflow in its fp16 Adam state; the suite's are not. Not measured.
  optimiser       BertAdam → AdamW. Same β (0.9, 0.98), ε 1e-6 and decoupled weight decay 0.2 on adapter weight
                  matrices (none on biases), but BertAdam has no bias correction: its steps are
                  (1 − 0.9^t)/√(1 − 0.98^t) times AdamW's (0.71 at t=1, 1.55 at t≈15, 1.07 at t=100, 1.00 after
                  ~300). All of that falls inside the warm-up (703 of 7,030 steps on MSR-VTT), where the lr is tiny:
                  negligible.
  gradient scale  The release's AllGather backward keeps only the local slice (no all-reduce) and DDP averages, so
  (multi-GPU)     its gradients are 1/N of the global-batch loss's (N = 4 GPUs in the README) → Lightning's
                  ``all_gather(sync_grads=True)`` gives the true gradient. Adam ignores the scale except through ε
                  and clipping: the release's ``clip_grad_norm_(1.0)`` on g/N clips g at norm N, the suite's
                  ``gradient_clip_val: 1.0`` at 1 (set it to N, and ε to N·1e-6, to mimic the release).
  frames          ``--dataset_type img``: JPEG frames pre-extracted at 1 fps (the extraction script is not
                  released), sorted by name, thinned to ``--max_frames 12`` by np.linspace(0, n − 1, 12) cast to int
                  (``--slice_framepos 2``, asserted by train.py), the same frames every epoch
                  (``--feature_framerate`` is not read by that loader) → ``frame_protocol: fps`` (what
                  configs/data/msrvtt.yaml sets) is the same rule on the decoded video: the frame at each whole
                  second, floor(t·fps), then the same thinning. Effect: which frame an unknown extractor took for
                  "second t" may differ by a frame; negligible. (``uniform``, X-Pool's segments, is another protocol.)
  resizing        PIL bicubic Resize(224) + CenterCrop on the JPEGs, ToTensor/Normalize → torch bicubic
                  (antialiased) on decoded uint8 frames, normalised on the device (same formula). Effect: pixel
                  differences of a few grey levels; negligible.
  padding         A short clip is padded with frames that are 0 after normalisation → uint8 zeros (−mean/std after
                  normalisation). Both heads mask padded frames, so scores are unaffected (only the unused embedding
                  of a padded frame differs; the parity test compares real frames).
  backbones       OpenAI's CLIP hard-coded → any open_clip ViT. Sharing indexes positions by layer, so
                  ``share_dim > 0`` needs towers of equal depth (a `ValueError` otherwise); with ``share_dim=0`` the
                  towers may differ in depth. ``share_dim`` may not exceed the narrower tower's width (the release
                  asserts the same).

The same as the release: r = 8, d_s = 16, QuickGELU, trunc_normal(std 0.01) adapter init (another random stream),
only adapters train (logit_scale frozen), the text-conditioned head (τ = 5, ``--q_score 1``), 32 words (SOT + at most
30 BPE tokens + EOT, zero padding, feature at the EOT = largest id), 12 frames, lr 1e-5, weight decay 0.2, the
learning-rate shape (BertAdam's warmup_cosine: 10% linear warm-up from lr 0 at the first step, then ½(1 + cos πx) on
the whole run's progress x; ``lr_schedule: warmup_cosine``, the default, see `petl_bench.module.lr_factor`), 5 epochs,
global batch 128 (release 4 GPUs × 32, configs 8 × 16), every MSR-VTT 9k caption pair per epoch
(``--expand_msrvtt_sentences 1``), gradient clipping at norm 1.0 (see "gradient scale").
"""

from __future__ import annotations

import torch
from torch import nn

from petl_bench.backbone import ForwardContext, attention_part, mlp_part
from petl_bench.module import RetrievalModule

UP_INITS = ("trunc_normal", "zero")
ADAPTER_PREFIXES = ("visual_adapters.", "text_adapters.", "shared_up.")


class QuickGELU(nn.Module):
    """CLIP's GELU approximation x·σ(1.702x), the release's ``--adapter_non_linearity quick_gelu``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SharedUpProjection(nn.Module):
    """The d_s output channels of one adapter position's up-projection that both towers use (weight d_s × r)."""

    def __init__(self, bottleneck: int, share_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(share_dim, bottleneck))
        self.bias = nn.Parameter(torch.zeros(share_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(z, self.weight, self.bias)


class Adapter(nn.Module):
    """A(h) = h + Up(QuickGELU(Down(h))) where Up = [own (D − d_s) channels ; shared d_s channels].

    The shared projection is passed to `forward` rather than registered here, so that the one Parameter has one
    name (under ``shared_up``) and appears once in state dicts and optimiser groups although two towers use it.
    """

    def __init__(self, width: int, bottleneck: int, share_dim: int):
        super().__init__()
        self.share_dim = share_dim
        self.down = nn.Linear(width, bottleneck)
        self.act = QuickGELU()
        # when d_s equals this tower's width the whole up-projection is shared and nothing of its own remains
        self.up = nn.Linear(bottleneck, width - share_dim) if width > share_dim else None

    def forward(self, h: torch.Tensor, shared_up: SharedUpProjection | None) -> torch.Tensor:
        z = self.act(self.down(h))
        if self.up is None:
            return h + shared_up(z)
        if shared_up is None:
            return h + self.up(z)
        # one matmul with the stacked (D × r) weight instead of two and a concatenation of their (…, D) outputs: the
        # same dot products, and the shared rows still receive the gradients of both towers through the cat
        weight = torch.cat([self.up.weight, shared_up.weight])
        bias = torch.cat([self.up.bias, shared_up.bias])
        return h + nn.functional.linear(z, weight, bias)


class BlockAdapters(nn.Module):
    """The two adapters of one residual block: after the attention branch and after the MLP branch."""

    def __init__(self, width: int, bottleneck: int, share_dim: int):
        super().__init__()
        self.attn = Adapter(width, bottleneck, share_dim)
        self.mlp = Adapter(width, bottleneck, share_dim)


class BlockSharedUp(nn.Module):
    """The shared up-projection channels of one layer's two positions (attention, MLP)."""

    def __init__(self, bottleneck: int, share_dim: int):
        super().__init__()
        self.attn = SharedUpProjection(bottleneck, share_dim)
        self.mlp = SharedUpProjection(bottleneck, share_dim)


class CrossModalAdapter(RetrievalModule):
    """Frozen CLIP + cross-modal adapters in every block of both towers.

    Args:
        bottleneck: the adapters' hidden dimension r (absolute, the same for both towers); the release's
            ``--adapter_reduction_dims``.
        share_dim: d_s, how many of Up's output channels the visual and text adapter of a position share; 0 gives
            independent uni-modal adapters.
        up_init: ``trunc_normal`` (the release: std 0.01 like every other adapter weight) or ``zero`` (identity at
            step 0).
        init_std: standard deviation of the truncated-normal init.
        similarity, lr, **kwargs: see `RetrievalModule`; defaults here are the release's (text-conditioned head, 1e-5).
    """

    def __init__(
        self,
        bottleneck: int = 8,
        share_dim: int = 16,
        up_init: str = "trunc_normal",
        init_std: float = 0.01,
        similarity: str = "text_conditioned",
        lr: float = 1e-5,
        **kwargs,
    ):
        if kwargs.get("train_logit_scale"):
            raise ValueError(
                "CrossModalAdapter keeps CLIP's logit_scale frozen (only adapter weights train, as in the release); "
                "remove train_logit_scale from the model config"
            )
        super().__init__(similarity=similarity, lr=lr, **kwargs)
        if bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive number of channels, got {bottleneck}")
        if up_init not in UP_INITS:
            raise ValueError(f"up_init must be one of {UP_INITS}, got {up_init!r}")
        visual_width, text_width = self.clip.visual_width, self.clip.text_width
        visual_depth, text_depth = len(self.clip.visual_blocks), len(self.clip.text_blocks)
        if not 0 <= share_dim <= min(visual_width, text_width):
            raise ValueError(
                f"share_dim must lie in [0, {min(visual_width, text_width)}] for {self.clip.model_name} "
                f"(visual width {visual_width}, text width {text_width}), got {share_dim}"
            )
        if share_dim > 0 and visual_depth != text_depth:
            raise ValueError(
                f"{self.clip.model_name} has {visual_depth} visual and {text_depth} text blocks, but Cross-Modal "
                f"Adapter shares up-projection weights between the two towers layer by layer (share_dim={share_dim}), "
                "which needs towers of equal depth; pick such a backbone or set share_dim: 0 (uni-modal adapters)"
            )
        self.bottleneck = bottleneck
        self.share_dim = share_dim
        self.visual_adapters = nn.ModuleList(
            BlockAdapters(visual_width, bottleneck, share_dim) for _ in range(visual_depth)
        )
        self.text_adapters = nn.ModuleList(BlockAdapters(text_width, bottleneck, share_dim) for _ in range(text_depth))
        self.shared_up = (
            nn.ModuleList(BlockSharedUp(bottleneck, share_dim) for _ in range(visual_depth)) if share_dim > 0 else None
        )
        self.reset_adapters(up_init, init_std)

    @torch.no_grad()
    def reset_adapters(self, up_init: str = "trunc_normal", init_std: float = 0.01) -> None:
        """Weights ~ trunc_normal(0, init_std) (torch's absolute ±2 bounds, as the release), biases 0;
        up-projection weights 0 instead when ``up_init == "zero"``."""
        for name, param in self.named_parameters():
            if not name.startswith(ADAPTER_PREFIXES):
                continue
            is_up = name.startswith("shared_up.") or ".up." in name
            if name.endswith("bias") or (is_up and up_init == "zero"):
                nn.init.zeros_(param)
            else:
                nn.init.trunc_normal_(param, mean=0.0, std=init_std)

    # ------------------------------------------------------------------ hooks
    def _adapted_block(
        self, block: nn.Module, x: torch.Tensor, ctx: ForwardContext, adapters: BlockAdapters, i: int
    ) -> torch.Tensor:
        shared = self.shared_up[i] if self.shared_up is not None else None
        x = x + adapters.attn(attention_part(block, x, ctx.attn_mask), shared.attn if shared is not None else None)
        return x + adapters.mlp(mlp_part(block, x), shared.mlp if shared is not None else None)

    def visual_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self._adapted_block(block, x, ctx, self.visual_adapters[i], i)

    def text_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self._adapted_block(block, x, ctx, self.text_adapters[i], i)

    # ------------------------------------------------------------------ what trains
    def is_trainable(self, name: str) -> bool:
        return name.startswith(ADAPTER_PREFIXES)
