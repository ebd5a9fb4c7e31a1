"""ST-Adapter (Pan, Lin, Zhu, Shao & Li, "ST-Adapter: Parameter-Efficient Image-to-Video Transfer Learning",
NeurIPS 2022, arXiv 2206.13559; official code linziyi96/st-adapter @ b914b38, models_adapter.py), as MV-Adapter's
ST-Adapter baseline for retrieval (tunable 5.93% on ViT-B/16).

The paper states: a spatio-temporal adapter before the attention of every visual block: Down (a linear map to a
bottleneck) → a depth-wise 3D convolution over (T, H, W) of the patch tokens → Up, added to the stream; the image
backbone stays frozen.

The release does (and this module follows): ``Adapter`` = fc1 (D → r) → depth-wise ``Conv3d`` (groups = r, kernel
(3, 1, 1) — over time only — padding (1, 0, 0), stride 1) → fc2 (r → D), no activation; it acts on the patch tokens
only (the CLS token passes unchanged) of the residual stream and adds its output: x[:, 1:] ← x[:, 1:] + Adapter(x[:,
1:]); with ``adapter_pre_attn`` it runs before ``x = x + attn(ln_1(x))``. Init: conv weight and bias zero, fc1 and fc2
biases zero, fc1/fc2 weights torch's default Linear init — the conv's zero output makes the adapter an exact identity
at step 0, and (unlike a zero Up) gives the conv the first gradients. The frames of a video are (B·T) images that the
adapter reshapes to (B, r, T, H, W).

The suite chose:
- where the text tower gets nothing: ST-Adapter is a video-tower method; the text tower stays frozen, as it would in
  MV-Adapter's comparison of video adapters (its setting is not stated);
- padded frames: the release samples a fixed number of frames and never pads; here the down-projected tokens of padded
  frames are zeroed before the temporal convolution so that padding cannot leak into the real frames (no effect on
  unpadded videos);
- the size. The release's configs are 12×384 (Kinetics: one adapter per block, r = 384) and 24×384 (SSv2: also before
  the MLP). Per adapter r·(2D + 5) + D parameters, so 12×384 is 7,110,144 on ViT-B/16 (4.75%), short of MV-Adapter's
  5.93%; r = 480 gives 12·(480·1541 + 768) = 8,885,376 = 5.94% of ViT-B/16's 149,620,737 — the default here, the
  round width nearest the table (r = 479 gives 5.93%); the same on B/32 (the count has no spatial term). ``bottleneck: 384`` is the release's Kinetics size; ``pre_mlp: true`` adds
  the SSv2 position.
- it is order-aware: the temporal convolution mixes neighbouring frames, so reversing a video changes its embedding.
Head: meanP.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from petl_bench.backbone import ForwardContext, attention_part, mlp_part
from petl_bench.module import RetrievalModule


class STAdapterLayer(nn.Module):
    """Patch tokens (B·T, 1 + H·W, D) → the same tokens plus Up(DWConv3d(Down(patches))); CLS unchanged."""

    def __init__(self, width: int, bottleneck: int, kernel_size: tuple[int, int, int]):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.conv = nn.Conv3d(bottleneck, bottleneck, kernel_size=tuple(kernel_size), stride=1,
                              padding=tuple(k // 2 for k in kernel_size), groups=bottleneck)
        self.up = nn.Linear(bottleneck, width)
        with torch.no_grad():  # the release's init; fc weights keep torch's default
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T = ctx.batch_size, ctx.num_frames
        L = x.shape[1] - 1
        H = W = math.isqrt(L)
        if H * W != L:
            raise ValueError(f"ST-Adapter needs a square patch grid, got {L} patch tokens")
        z = self.down(x[:, 1:])  # (B·T, H·W, r)
        r = z.shape[-1]
        z = z.view(B, T, H, W, r) * ctx.frame_mask.view(B, T, 1, 1, 1).to(z.dtype)  # padded frames: no signal
        z = self.conv(z.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).reshape(B * T, L, r)
        return torch.cat([x[:, :1], x[:, 1:] + self.up(z)], dim=1)


class BlockSTAdapters(nn.Module):
    def __init__(self, width: int, bottleneck: int, kernel_size: tuple[int, int, int], pre_mlp: bool):
        super().__init__()
        self.attn = STAdapterLayer(width, bottleneck, kernel_size)
        self.mlp = STAdapterLayer(width, bottleneck, kernel_size) if pre_mlp else None


class STAdapter(RetrievalModule):
    """Frozen CLIP + ST-Adapters before the attention (and optionally the MLP) of every visual block.

    Args:
        bottleneck: adapter channels r (480: MV-Adapter's 5.93%; the release's 384).
        kernel_size: the depth-wise convolution's (T, H, W) kernel; the release's (3, 1, 1).
        pre_mlp: also an adapter before the MLP (the release's 24×384 SSv2 setting).
    """

    def __init__(self, bottleneck: int = 480, kernel_size: tuple[int, int, int] = (3, 1, 1), pre_mlp: bool = False,
                 similarity: str = "meanP", lr: float = 1e-4, **kwargs):
        super().__init__(similarity=similarity, lr=lr, **kwargs)
        kernel_size = tuple(kernel_size)
        if bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive number of channels, got {bottleneck}")
        if len(kernel_size) != 3 or any(k < 1 or k % 2 == 0 for k in kernel_size):
            raise ValueError(f"kernel_size must be three odd positive sizes (T, H, W), got {kernel_size}")
        self.adapters = nn.ModuleList(BlockSTAdapters(self.clip.visual_width, bottleneck, kernel_size, pre_mlp)
                                      for _ in self.clip.visual_blocks)

    def visual_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        adapters = self.adapters[i]
        x = adapters.attn(x, ctx)
        x = x + attention_part(block, x, ctx.attn_mask)
        if adapters.mlp is not None:
            x = adapters.mlp(x, ctx)
        return x + mlp_part(block, x)

    def is_trainable(self, name: str) -> bool:
        return name.startswith("adapters.")
