"""Adapter^ATTN: a Houlsby-style sequential bottleneck adapter after the attention branch of every block of both
towers (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019, arXiv 1902.00751), as VoP's
"Adapter^ATTN" baseline (Huang et al., CVPR 2023, arXiv 2211.12764: bottleneck 64, 1,982,976 trainable).

The paper states (Houlsby): the adapter sits on a sublayer's output, after its projection and before the residual add,
and has its own skip connection: A(h) = h + Up(f(Down(h))); its weights are drawn from a zero-mean Gaussian with
standard deviation 1e-2 truncated at two standard deviations, so it starts near (not exactly at) the identity. Houlsby
places one after attention and one after the FFN; VoP's Adapter^ATTN keeps only the one after attention. Neither VoP
nor Houlsby released code for CLIP (adapter-bert is TensorFlow BERT code, not read here).

This module: x ← x + A(Attn(LN1(x))); x ← x + MLP(LN2(x)), in every block of both towers, bottleneck 64 (absolute,
both towers), so 12·(2·768·64 + 64 + 768) + 12·(2·512·64 + 64 + 512) = 1,982,976 on ViT-B/32 and B/16.

The suite chose: f = GELU (nn.GELU, as adapter-bert's ``gelu``); the paper's truncated normal (std 1e-2, ±2 std) for
both weight matrices, zero biases (``up_init: zero`` zero-initialises Up for an exact identity at step 0); no
LayerNorm inside the adapter (Houlsby also trains the blocks' LayerNorms; VoP's count 1,982,976 has no LayerNorm
parameters, so here they stay frozen); meanP head; only adapters train.
"""

from __future__ import annotations

import torch
from torch import nn

from petl_bench.backbone import ForwardContext, attention_part, mlp_part
from petl_bench.module import RetrievalModule

UP_INITS = ("trunc_normal", "zero")


class HoulsbyAdapter(nn.Module):
    """A(h) = h + Up(GELU(Down(h)))."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class BlockAdapters(RetrievalModule):
    """A method with one adapter per block of each tower (``visual_adapters[i]``, ``text_adapters[i]``), all of
    them trainable; a subclass says in `adapted_block` how a block uses its adapter."""

    def adapted_block(self, block: nn.Module, x: torch.Tensor, ctx: ForwardContext, adapter: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def visual_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.adapted_block(block, x, ctx, self.visual_adapters[i])

    def text_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.adapted_block(block, x, ctx, self.text_adapters[i])

    def is_trainable(self, name: str) -> bool:
        return name.startswith(("visual_adapters.", "text_adapters."))


class AdapterAttn(BlockAdapters):
    """Frozen CLIP + one sequential bottleneck adapter after the attention branch of every block of both towers.

    Args:
        bottleneck: the adapters' hidden width (absolute; 64 in VoP's table).
        init_std: std of the truncated normal (truncated at ±2 std, Houlsby) for Down and Up.
        up_init: ``trunc_normal`` (Houlsby: near identity) or ``zero`` (exact identity at step 0).
    """

    def __init__(self, bottleneck: int = 64, init_std: float = 1e-2, up_init: str = "trunc_normal",
                 similarity: str = "meanP", lr: float = 1e-4, **kwargs):
        super().__init__(similarity=similarity, lr=lr, **kwargs)
        if bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive number of channels, got {bottleneck}")
        if up_init not in UP_INITS:
            raise ValueError(f"up_init must be one of {UP_INITS}, got {up_init!r}")
        self.visual_adapters = nn.ModuleList(HoulsbyAdapter(self.clip.visual_width, bottleneck)
                                             for _ in self.clip.visual_blocks)
        self.text_adapters = nn.ModuleList(HoulsbyAdapter(self.clip.text_width, bottleneck)
                                           for _ in self.clip.text_blocks)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if not self.is_trainable(name):
                    continue
                if name.endswith("bias") or (".up." in name and up_init == "zero"):
                    nn.init.zeros_(param)
                else:
                    nn.init.trunc_normal_(param, std=init_std, a=-2 * init_std, b=2 * init_std)

    def adapted_block(self, block: nn.Module, x: torch.Tensor, ctx: ForwardContext, adapter: nn.Module) -> torch.Tensor:
        x = x + adapter(attention_part(block, x, ctx.attn_mask))
        return x + mlp_part(block, x)
