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

Deviations from the release (the default is ours unless said otherwise):
- Precision: the release trains the adapters in pure fp16 (``--adapter_convert2fp16``: fp16 weights, no fp32 master
  copy). We keep the adapter weights in fp32 and leave mixed precision to the Trainer (fp32, or bf16/fp16 AMP).
- Architecture support: the release hard-codes OpenAI's CLIP; here any open_clip ViT works. Sharing indexes positions
  by layer, so ``share_dim > 0`` needs towers of equal depth (a `ValueError` otherwise); with ``share_dim=0`` the towers
  may differ in depth. ``share_dim`` may not exceed the narrower tower's width (the release asserts the same).
- Optimiser: the suite's common recipe (AdamW, weight decay on weight matrices only — as the release, which exempts
  adapter biases —, warm-up + cosine) rather than the release's BertAdam schedule.
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
        parts = []
        if self.up is not None:
            parts.append(self.up(z))
        if shared_up is not None:
            parts.append(shared_up(z))
        return h + (torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])


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
