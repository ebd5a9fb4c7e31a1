"""STOP: Integrated Spatial-Temporal Dynamic Prompting for Video Understanding (Liu et al., CVPR 2025; release
github.com/zhoujiahuan1991/CVPR2025-STOP, commit a47eb224fcb8b714664ec2ffc7e9d17ec69e0ca3), built on DGL's code.

STOP is DGL-Transformer (`petl_bench.methods.dgl`: shared latent space, global-local video attention, same read-out
and loss) plus what the release adds (``--temporal_prompt group2-2``, its MSR-VTT script):

- **intra-frame (spatial) prompts on the pixels.** A small 3-D CNN over the normalised frames (Conv3d 3→9, 9→9, PReLU,
  9→9, PReLU, 9→16; kernels 3×11×11) and a per-pixel MLP (16→16, PReLU, 16→3) give a pixel prompt p; a second Conv3d
  (3→1, 5×11×11) scores the frame, the score is averaged into a grid×grid map and its top η = 6 cells form a mask m;
  the frames become x + 0.05·p + 0.05·p·m before the patch embedding. The mask is a hard threshold: the scoring conv
  gets no gradient (as in the release).
- **inter-frame (temporal) prompts.** After ``ln_pre``, all patch tokens of a video go through one multi-head
  attention (width, width/64 heads); a Conv3d stack (1→9→1, kernel 3×15×25, PReLU) over (frames, patches, channels)
  and an MLP over the patch axis (N→16, PReLU, 16→4) give 4 tokens per frame; a Conv3d (1→1, 5×11×11) on the attended
  tokens, weighted up where the spatial mask is on (x + x·m), averaged per frame and min-max normalised gives a frame
  weight w; the tokens (1 + w)·0.05 are added to DGL's frame prompts of *every* layer.
- **a bottleneck side branch in every block of both towers** (the release's ``--lora``, on by default and not
  switchable: ``type=bool``): x ← x + MLP(LN2(x)) + 0.1·(Linear(D→32) → PReLU → Linear(32→D))(x), where x is the
  residual stream after attention. It applies to the global prompts too. The paper does not describe it.
- dropout p = 0.5 at three places of the pixel prompt (after the CNN, twice after the MLP), active in training: the
  release keeps the prompt module out of its train-mode freeze.

The release's geometry is ViT-B/32 at 224 px: the inter-frame MLP takes 49 patches and the grid is 7×7. The suite
sizes both from the backbone (N = grid², grid = image / patch), so it also runs on ViT-B/16 (196 patches) and the tiny
synthetic backbone (η is capped at grid² − 1). The spatial map is taken exactly as the release does: its reshape
``(B, T, 32, 7, 32, 7)`` then mean over the 32s averages the pixels whose (row mod 7, column mod 7) agree — a strided
lattice, not 32×32 patches — and the mask is spread back over the pixels the same way; on other sizes the suite uses
``(image / grid, grid)`` likewise.

Trainable parameters (ViT-B/32, 12 frames; the release's own count of ``requires_grad`` tensors): DGL-Transformer
9,575,168 + prompt module 2,507,168 + side branches 12 × 49,953 (image) + 12 × 33,313 (text) = 13,081,528, exactly the
count the release logs for its own model (tests/test_dgl_stop.py). The paper prints 7.53M; no combination of the
release's modules gives it (DGL-Linear + prompt module + side branches: 4,333,752; without the side branches:
3,334,560 / 12,082,336 for the linear / transformer head; DGL-Transformer alone: 9,575,168), so the suite asserts the
release's 13,081,528 and leaves the paper's figure unexplained. ViT-B/16 (the release cannot run it: 49 is fixed):
13,083,880 (N = 196 patches in the inter-frame MLP).

Differences from the release, beyond DGL's (see `petl_bench.methods.dgl`):

====================  ============================================  =============================================
topic                 release                                        suite
====================  ============================================  =============================================
code state            clip.py, data_dataloaders.py and              the HEAD side (shared_latent_space transformer,
                      scripts/msrvtt.sh hold unresolved merge       as its script); the other side breaks the
                      conflicts (not importable as committed)       linear head (prompt shapes do not broadcast)
optimiser             AdamW lr 1e-3, wd 0.2, batch 32 per GPU × 4   lr 1e-3, wd 0.2 (no decay on biases only)
geometry              224 px, patch 32, width 768, 12 layers hard-  sized from the backbone (see above)
                      coded (49, 7, 768, 12)
frame weight          min-max over the whole batch (B × T): a       same (as released); expected effect: scores of
                      video's embedding depends on its batch         a video vary slightly with the eval batch
pixel prompt          added to the normalised frames before conv1   conv1(p) added to the patch tokens (conv1 is
                                                                    linear, no bias: the same up to rounding)
3-D convolutions      nn.Conv3d                                     ``conv_impl: auto``: nn.Conv3d on GPU, the same
                                                                    map through FFTs on CPU (`SameConv3d`: a
                                                                    synthetic-bench step 15.7 s → 1.3 s on one
                                                                    core; differs by rounding only)
QB-Norm               same search script as DGL (grid search on      not used
                      the test similarity)
====================  ============================================  =============================================

Golden parity: tests/test_parity_dgl_stop.py (fixture tests/fixtures/parity/stop.json: the release run in fp64 on a
seeded CLIP with the release's image geometry, 2 image layers, a 12-layer narrow text tower; every output and gradient
within 1e-5).
"""

from __future__ import annotations

import torch
from torch import nn

from petl_bench.backbone import ForwardContext
from petl_bench.methods.dgl import DGL

PROMPT_SCALE = 0.05  # the release scales both prompts by 0.05
SIDE_SCALE = 0.1  # and the side branch by 0.1


CONV_IMPLS = ("auto", "fft", "direct")


def fft_size(n: int) -> int:
    """The smallest 2^a·3^b·5^c >= n (sizes the FFT is fast at)."""
    while True:
        m = n
        for f in (2, 3, 5):
            while m % f == 0:
                m //= f
        if m == 1:
            return n
        n += 1


def spectral_matmul(xf: torch.Tensor, wf: torch.Tensor) -> torch.Tensor:
    """Σ_c xf[b, c, f] · wf[o, c, f] for complex spectra, as one real batched matmul over frequencies (a complex bmm
    of tiny matrices runs as a loop of small products on CPU): with (re, im) interleaved, x_c ↦ [Re x_c, Im x_c] and
    w_oc ↦ [[Re w, Im w], [−Im w, Re w]]."""
    B, O, freq = xf.shape[0], wf.shape[0], xf.shape[2:]
    x = torch.view_as_real(xf.flatten(2).permute(2, 0, 1).contiguous()).flatten(2)  # (F, B, 2C)
    w = wf.flatten(2).permute(2, 1, 0)  # (F, C, O)
    re = torch.stack([w.real, w.imag], dim=-1).flatten(2)  # row Re x_c: (Re w, Im w) per output
    im = torch.stack([-w.imag, w.real], dim=-1).flatten(2)  # row Im x_c: (−Im w, Re w)
    y = torch.bmm(x, torch.stack([re, im], dim=2).flatten(1, 2))  # (F, B, 2·O)
    y = torch.view_as_complex(y.view(*y.shape[:2], O, 2))
    return y.permute(1, 2, 0).reshape(B, O, *freq)


def fft_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=(k - 1) // 2)`` for odd kernels and stride 1, through FFTs: the same linear
    map (cross-correlation with zero padding) as a product of spectra. Per axis the grid is >= n + (k − 1) / 2: the
    full convolution (length n + k − 1) then wraps only into the first (k − 1) / 2 outputs, which are cropped away.
    Autograd differentiates it like any other op."""
    size, kernel = x.shape[2:], weight.shape[2:]
    pad = [(k - 1) // 2 for k in kernel]
    grid = [fft_size(n + p) for n, p in zip(size, pad)]
    dims = (-3, -2, -1)
    xf = torch.fft.rfftn(x, s=grid, dim=dims)
    wf = torch.fft.rfftn(weight.flip(dims), s=grid, dim=dims)  # flipped: a convolution, cropped below, is the correlation
    y = torch.fft.irfftn(spectral_matmul(xf, wf), s=grid, dim=dims)
    y = y[..., pad[0]:pad[0] + size[0], pad[1]:pad[1] + size[1], pad[2]:pad[2] + size[2]]
    return y if bias is None else y + bias.view(1, -1, 1, 1, 1)


class SameConv3d(nn.Conv3d):
    """The release's Conv3d (odd kernel, padding (k − 1) / 2, stride 1). ``impl``: ``direct`` is ``nn.Conv3d``;
    ``fft`` computes the same map through FFTs (`fft_conv3d`); ``auto`` takes ``fft`` on CPU in fp32/fp64 and
    ``direct`` elsewhere. Why: on a CPU these 11×11 and 15×25 kernels are the whole cost of a STOP step (oneDNN's
    direct kernels are slow for 1 in/out channel and in backward), while the spectral product is small; both agree
    to rounding (fp32: direct ~1e-6, FFT ~2e-7 relative to an fp64 reference, measured), a GPU's cuDNN picks its own."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], impl: str = "auto"):
        super().__init__(cin, cout, kernel, padding=tuple((k - 1) // 2 for k in kernel))
        if impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fft = self.impl == "fft" or (self.impl == "auto" and x.device.type == "cpu"
                                     and x.dtype in (torch.float32, torch.float64))
        return fft_conv3d(x, self.weight, self.bias) if fft else super().forward(x)


class SpatioTemporalPrompts(nn.Module):
    """STOP's prompt module: pixel prompts with their spatial mask, and inter-frame prompt tokens."""

    def __init__(self, width: int, grid: int, prompt_length: int, eta: int = 6, dropout: float = 0.5,
                 conv_impl: str = "auto"):
        super().__init__()

        def conv3d(cin: int, cout: int, kernel: tuple[int, int, int]) -> SameConv3d:
            return SameConv3d(cin, cout, kernel, conv_impl)

        k = (3, 11, 11)
        self.pixel_conv = nn.Sequential(conv3d(3, 9, k), conv3d(9, 9, k), nn.PReLU(), conv3d(9, 9, k), nn.PReLU(),
                                        conv3d(9, 16, k))
        self.pixel_mlp = nn.Sequential(nn.Linear(16, 16), nn.PReLU(), nn.Linear(16, 3))
        self.pixel_score = conv3d(3, 1, (5, 11, 11))
        self.dropout = nn.Dropout(dropout)
        self.grid = grid
        self.eta = min(eta, grid * grid - 1)
        self.inter_attn = nn.MultiheadAttention(width, max(1, width // 64), batch_first=True)
        k = (3, 15, 25)
        self.inter_conv = nn.Sequential(conv3d(1, 9, k), nn.PReLU(), conv3d(9, 1, k))
        self.inter_mlp = nn.Sequential(nn.Linear(grid * grid, 16), nn.PReLU(), nn.Linear(16, prompt_length))
        self.inter_score = conv3d(1, 1, (5, 11, 11))

    def spatial_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised frames (B, T, 3, H, W) → bool (B, T, grid, grid): the η best cells of the score map."""
        B, T, _, H, W = x.shape
        g = self.grid
        with torch.no_grad():  # a hard threshold follows: no gradient, so no graph to keep
            score = self.pixel_score(x.transpose(1, 2)).squeeze(1)  # (B, T, H, W)
        cells = score.reshape(B, T, H // g, g, W // g, g).mean(dim=(2, 4))  # the release's strided lattice
        bar = cells.reshape(B, T, -1).sort(dim=2, descending=True)[0][:, :, self.eta]
        return cells > bar[:, :, None, None]

    def pixel_prompt(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised frames (B, T, 3, H, W) → (prompt to add to them, spatial mask (B, T, grid, grid))."""
        H, W = x.shape[-2:]
        p = self.dropout(self.pixel_conv(x.transpose(1, 2)))  # (B, 16, T, H, W)
        p = self.dropout(self.pixel_mlp(p.permute(0, 2, 3, 4, 1)))  # (B, T, H, W, 3)
        p = self.dropout(p.permute(0, 1, 4, 2, 3))  # (B, T, 3, H, W)
        mask = self.spatial_mask(x)
        pixel_mask = mask.repeat(1, 1, H // self.grid, W // self.grid).unsqueeze(2)  # pixel (r, c) ← cell (r%g, c%g)
        return PROMPT_SCALE * p + PROMPT_SCALE * p * pixel_mask, mask

    def inter_frame_prompts(self, x: torch.Tensor, mask: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Tokens after ln_pre (B·T, 1 + N, D) and the spatial mask → prompt offsets (B, T, n, D)."""
        BT, _, D = x.shape
        B, T = BT // num_frames, num_frames
        patches = x[:, 1:].reshape(B, -1, D)
        a = self.inter_attn(patches, patches, patches, need_weights=False)[0].reshape(B, 1, T, -1, D)
        w = self.inter_score(a).squeeze(1)  # (B, T, N, D)
        w = w + w * mask.reshape(B, T, -1, 1)
        w = w.mean(dim=(2, 3))
        w = (w - w.min()) / (w.max() - w.min())  # over the whole batch, as released
        y = self.inter_conv(a).squeeze(1)  # (B, T, N, D)
        y = self.inter_mlp(y.transpose(2, 3)).transpose(2, 3)  # (B, T, n, D)
        y = y + y * w[:, :, None, None]
        return PROMPT_SCALE * y


def side_branch(width: int, rank: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, rank), nn.PReLU(), nn.Linear(rank, width))


class STOP(DGL):
    """STOP (module docstring): DGL (``latent_space: transformer`` by default) plus spatial-temporal prompts and the
    side branches. Options beyond `DGL`'s:

    Args:
        side_rank: width of the side branch in every block (32); 0 removes it (not the release).
        eta: spatial-mask cells kept per frame (6).
        prompt_dropout: dropout of the pixel prompt in training (0.5).
        conv_impl: how the prompt module's 3-D convolutions are computed: ``auto`` (FFT on CPU, ``nn.Conv3d``
            elsewhere), ``fft`` or ``direct``; the same maths either way (`SameConv3d`).
        lr: the release's 1e-3.
    """

    def __init__(self, side_rank: int = 32, eta: int = 6, prompt_dropout: float = 0.5, lr: float = 1e-3,
                 conv_impl: str = "auto", **kwargs):
        super().__init__(lr=lr, **kwargs)
        vis_w, text_w = self.clip.visual_width, self.clip.text_width
        grid = self.clip.image_size // self.clip.visual.conv1.kernel_size[0]
        self.temporal = SpatioTemporalPrompts(vis_w, grid, self.local_prompt_length, eta, prompt_dropout, conv_impl)
        self.side_rank = side_rank
        if side_rank > 0:
            self.visual_side = nn.ModuleList(side_branch(vis_w, side_rank) for _ in self.clip.visual_blocks)
            self.text_side = nn.ModuleList(side_branch(text_w, side_rank) for _ in self.clip.text_blocks)

    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T = video.shape[:2]
        frames = self.clip.normalize(video.flatten(0, 1)).view(B, T, *video.shape[2:])
        frames = frames.to(self.temporal.pixel_score.weight.dtype)
        self._pixel_prompt, self._spatial_mask = self.temporal.pixel_prompt(frames)
        try:
            return super().encode_video(video, video_mask)
        finally:
            del self._pixel_prompt, self._spatial_mask

    def visual_tokens(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The pixel prompt enters through the patch embedding: conv1(frames + p) = conv1(frames) + conv1(p)."""
        x = super().visual_tokens(x, ctx)
        conv1 = self.clip.visual.conv1
        prompt = conv1(self._pixel_prompt.flatten(0, 1).to(conv1.weight.dtype)).flatten(2).transpose(1, 2)
        return torch.cat([x[:, :1], x[:, 1:] + prompt.to(x.dtype)], dim=1)

    def local_prompts(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """DGL's frame prompts plus this video's inter-frame prompts, the same offset in every layer."""
        frames = super().local_prompts(x, ctx)  # (1, layers, T, n, D)
        offsets = self.temporal.inter_frame_prompts(x, self._spatial_mask, ctx.num_frames)  # (B, T, n, D)
        return frames + offsets.unsqueeze(1).to(frames.dtype)

    def mlp_residual(self, tower: str, i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = super().mlp_residual(tower, i, block, x)
        if self.side_rank > 0:
            side = (self.visual_side if tower == "visual" else self.text_side)[i]
            out = out + SIDE_SCALE * side(x)
        return out
