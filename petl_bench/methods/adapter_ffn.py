"""Adapter^FFN: AdaptFormer's parallel adapter beside the MLP of every block of both towers (Chen et al.,
"AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition", NeurIPS 2022, arXiv 2205.13535; official
code ShoufaChen/AdaptFormer @ 6967d67, models/adapter.py and models/vit_video.py), as VoP's "Adapter^FFN" baseline
(Huang et al., CVPR 2023: bottleneck 64 in both towers, 1,982,976 trainable).

The paper states: a bottleneck branch parallel to the frozen MLP, x ← x + MLP(LN2(x)) + s·Up(ReLU(Down(x))), with a
fixed scale s = 0.1 and the up-projection zero-initialised, so the model starts exactly as the pretrained one.

The release does (``--ffn_adapt``, video config): ``ffn_option="parallel"`` — the adapter reads the block's stream x
after the attention residual, *before* LN2, and its output is added with the MLP's; ``ffn_adapter_scalar="0.1"``;
``ffn_adapter_layernorm_option="none"``; ``ffn_adapter_init_option="lora"``: Down weight kaiming_uniform(a=√5)
(torch's default Linear init), Up weight and both biases zero; ReLU; dropout on the bottleneck with the model's
``--drop`` rate, default 0.0; bottleneck ``--ffn_num`` 64. This module follows all of it.

The suite chose: the adapter in both CLIP towers (AdaptFormer adapts an image/video ViT only; VoP's baseline and count
put it in both): 12·(2·768·64 + 64 + 768) + 12·(2·512·64 + 64 + 512) = 1,982,976 on ViT-B/32 and B/16 (1.33% of
ViT-B/16's 149,620,737). MV-Adapter's table lists AdaptFormer at 2.78% on ViT-B/16 (≈ 4.16M) with an unstated
setting: about twice this size (a bottleneck near 128 in both towers, plus the 171,008 biases MV-Adapter trains, gives
4,121,600 = 2.75%); ``bottleneck: 128`` is the nearest point. meanP head; only adapters train.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from petl_bench.backbone import ForwardContext, attention_part, mlp_part
from petl_bench.methods.adapter_attn import BlockAdapters


class ParallelAdapter(nn.Module):
    """s·Up(dropout(ReLU(Down(x)))) — AdaptFormer's adapter without its residual (``add_residual=False``)."""

    def __init__(self, width: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.scale = scale
        self.dropout = dropout
        with torch.no_grad():  # the release's "lora" init
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = nn.functional.dropout(torch.relu(self.down(x)), p=self.dropout, training=self.training)
        return self.up(z) * self.scale


class AdapterFFN(BlockAdapters):
    """Frozen CLIP + AdaptFormer's parallel MLP adapter in every block of both towers.

    Args:
        bottleneck: the adapters' hidden width (64: AdaptFormer's default and VoP's table).
        scale: the fixed scale s (0.1 in AdaptFormer's release).
        dropout: dropout on the bottleneck (the release's default 0.0).
    """

    def __init__(self, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.0, similarity: str = "meanP",
                 lr: float = 1e-4, **kwargs):
        super().__init__(similarity=similarity, lr=lr, **kwargs)
        if bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive number of channels, got {bottleneck}")
        self.visual_adapters = nn.ModuleList(ParallelAdapter(self.clip.visual_width, bottleneck, scale, dropout)
                                             for _ in self.clip.visual_blocks)
        self.text_adapters = nn.ModuleList(ParallelAdapter(self.clip.text_width, bottleneck, scale, dropout)
                                           for _ in self.clip.text_blocks)

    def adapted_block(self, block: nn.Module, x: torch.Tensor, ctx: ForwardContext, adapter: nn.Module) -> torch.Tensor:
        x = x + attention_part(block, x, ctx.attn_mask)
        return x + mlp_part(block, x) + adapter(x)  # the adapter reads x before LN2, in parallel to the MLP
