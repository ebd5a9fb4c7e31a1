"""Convpass (Jie & Deng, "Convolutional Bypasses Are Better Vision Transformer Adapters", arXiv 2207.07039; official
code JieShibo/PETL-ViT @ 026e4f1, convpass/vtab/convpass.py), as MV-Adapter's Convpass baseline for retrieval
(tunable 2.80% on ViT-B/16).

The paper states: a convolutional bypass parallel to each attention and each MLP sublayer of a frozen ViT: Down
(1×1) → 3×3 convolution over the patch grid → Up (1×1), scaled by s and added with the sublayer's output.

The release does (and this module follows): ``Convpass`` = Linear D → d, QuickGELU, ``Conv2d(d, d, 3, padding=1)`` on
the (H, W) grid of patch tokens, with the CLS token passed through the same convolution as a 1×1 image (only the
kernel's centre tap reaches it), QuickGELU, Dropout(0.1), Linear d → D. Two per block (``method == "convpass"``):
x ← x + Attn(LN1 x) + s·C_attn(LN1 x); x ← x + MLP(LN2 x) + s·C_mlp(LN2 x) — the bypass reads the same normalised
input as its sublayer. Init (``xavier_init: False``): the conv kernel zero except its centre, which is the identity,
conv bias zero; Down xavier_uniform, bias zero; Up weight and bias zero — an exact identity at step 0. The release
tunes s per VTAB task (0.01–100, most often 0.1, 1 or 10).

The suite chose:
- s = 1 (no retrieval setting exists; one of the release's common values);
- the image tower only; the text tower stays frozen (Convpass is an image-tower method; MV-Adapter's setting is not
  stated). The convolution is spatial, per frame: Convpass is order-blind;
- the size. The release's d = 8 gives 24·(9d² + 1538d + 768) = 327,552 on ViT-B/16 (0.22%); MV-Adapter's table says
  2.80%, so the default here is d = 78: 4,211,712 = 2.815% of 149,620,737 (d = 77 gives 2.768%; no integer d gives
  2.80 exactly); the same on B/32, which has the same widths.
Head: meanP.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from petl_bench.backbone import ForwardContext, attention_part, mlp_part
from petl_bench.module import RetrievalModule


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ConvBypass(nn.Module):
    """Up(Dropout(QuickGELU(Conv3x3(QuickGELU(Down(h)))))) with CLS as its own 1×1 image."""

    def __init__(self, width: int, dim: int, dropout: float, xavier_init: bool):
        super().__init__()
        self.down = nn.Linear(width, dim)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.up = nn.Linear(dim, width)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            if xavier_init:
                nn.init.xavier_uniform_(self.conv.weight)
            else:  # identity through the kernel's centre
                nn.init.zeros_(self.conv.weight)
                self.conv.weight[:, :, 1, 1] += torch.eye(dim)
            nn.init.zeros_(self.conv.bias)
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        N, L, _ = h.shape
        side = math.isqrt(L - 1)
        if side * side != L - 1:
            raise ValueError(f"Convpass needs a square patch grid, got {L - 1} patch tokens")
        z = self.act(self.down(h))
        d = z.shape[-1]
        patches = self.conv(z[:, 1:].reshape(N, side, side, d).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        cls = self.conv(z[:, :1].reshape(N, 1, 1, d).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        z = torch.cat([cls.reshape(N, 1, d), patches.reshape(N, L - 1, d)], dim=1)
        return self.up(self.dropout(self.act(z)))


class BlockBypasses(nn.Module):
    def __init__(self, width: int, dim: int, dropout: float, xavier_init: bool):
        super().__init__()
        self.attn = ConvBypass(width, dim, dropout, xavier_init)
        self.mlp = ConvBypass(width, dim, dropout, xavier_init)


class Convpass(RetrievalModule):
    """Frozen CLIP + two convolutional bypasses per visual block.

    Args:
        dim: the bypass width d (78: MV-Adapter's 2.80%; the release's 8).
        scale: s, the bypass's output scale.
        dropout: dropout before Up (the release's 0.1).
        xavier_init: the release's per-task switch for the conv kernel (False: identity centre, the default).
    """

    def __init__(self, dim: int = 78, scale: float = 1.0, dropout: float = 0.1, xavier_init: bool = False,
                 similarity: str = "meanP", lr: float = 1e-4, **kwargs):
        super().__init__(similarity=similarity, lr=lr, **kwargs)
        if dim < 1:
            raise ValueError(f"dim must be a positive number of channels, got {dim}")
        self.scale = scale
        self.bypasses = nn.ModuleList(BlockBypasses(self.clip.visual_width, dim, dropout, xavier_init)
                                      for _ in self.clip.visual_blocks)

    def visual_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        bypass = self.bypasses[i]
        x = x + attention_part(block, x, ctx.attn_mask) + self.scale * bypass.attn(block.ln_1(x))
        return x + mlp_part(block, x) + self.scale * bypass.mlp(block.ln_2(x))

    def is_trainable(self, name: str) -> bool:
        return name.startswith("bypasses.")
