"""MV-Adapter (Jin, Zhang et al., "MV-Adapter: Multimodal Video Transfer Learning for Video Text Retrieval",
arXiv 2301.07868; official code: zhangbw17/MV-Adapter). CLIP stays frozen; adapters (and, in the release, CLIP's bias
vectors) train. Two configs: ``mv_adapter_release`` (the released code, pinned by a golden parity test) and
``mv_adapter`` (the default: the suite's Kronecker reconstruction of the v1 description, see "Cross Modality Tying").

The paper states: one bottleneck adapter per block of both towers on the FFN output, scaled by 0.1; Down → a small
transformer → Up, Up zero-initialised; a temporal video adapter with [CC] / frame / patch-context tokens and a
calibration of Up; a causal text adapter; and Cross Modality Tying (CMT) of the two towers' adapters. v1 (Jan 2023,
the version the seed reviews) builds CMT from Kronecker products and reports about 2.56% extra parameters; v2 and the
release use a shared scaling vector on the last 2 layers and report 2.39% (a count that holds at its "Down-In"
position; the release's MSR-VTT config uses "down out").

The release does (configs/msrvtt/msrvtt.py, modules/adapter/mv_adapter.py), and this file reproduces it:

Where the adapter sits. Every residual block of both towers gets one adapter that reads the FFN output and whose
output, scaled by ``scale`` = 0.1, is added next to it (the release's ``forward='seq'`` MLP adapters):

    h ← x + Attn(LN1(x));    m = MLP(LN2(h));    x ← h + m + 0.1 · Adapter(m)

Adapter = Down (d→r, r = 64) → one small pre-LN transformer block over a sequence (``heads`` = 2, MLP ratio 4, with a
LayerNorm and learned positions in front) → Up (r→d). Up's weight and bias are zero-initialised, so every adapter
outputs exactly 0 at step 0 and the model is the frozen CLIP (bit for bit). The activation is QuickGELU, CLIP's
x·σ(1.702x), as in the release (the paper writes GELU).

Video adapter (the Temporal Adaptation Module). The visual tower sees B·T frames; per video the block runs over
2T+1 tokens of width r: a learned [CC] token (global context), the T frame [CLS] tokens after Down→QuickGELU (frame
context) and the T per-frame means of the down-projected patch tokens (local context), plus learned positions
(index 0: [CC], 1…T: frame [CLS], T+1…2T: patch means). Padded frames (``ctx.frame_mask`` False) are masked as keys.
Patch tokens themselves only get Down→QuickGELU→Up. A frame's [CLS] token gets Up(α_i ⊙ c_i), where c_i is the
block's output at that frame's [CLS] position after QuickGELU and α_i is the calibration

    α_i = 1 + FC2(ReLU(FC1([c_i + p_i ; g(c_cc)])))       (g: r→r, FC1: 2r→16, FC2: 16→r without bias, zero init)

with p_i the block's output at frame i's patch-mean position and c_cc at [CC] (the input is zeroed for padded frames,
as in the release). Parameters per layer, r = 64, d = 768, T = 12: Down 49,216 + Up 49,920 + LN 128 + block 49,984 +
positions 1,600 + [CC] 64 + calibration 7,248 = **158,160**.

Text adapter. Down (no activation) → + positions (``max_words`` of them) → LayerNorm → the block over the words with
CLIP's causal mask → QuickGELU → Up. Per layer, d = 512, L = 32: 32,832 + 33,280 + 128 + 49,984 + 2,048 = **118,272**.

Cross Modality Tying, on the last ``tied_layers`` (= 2) blocks of each tower, pairing the visual and the text adapter
of the same depth counted from the top. A factor shared by the pair builds or calibrates both adapters' Down weights,
so gradients from either modality reach it. ``tying`` chooses the form:

- ``"scale"`` (the released code and the v2 paper; ``mv_adapter_release``). A shared vector f ∈ R^32 per tied layer
  (``tying_factor_dim``), zero-initialised; per modality β_m = Linear_m(f) and the Down weight is calibrated
  W_down ← β_m ⊙ W_down along its input channels (``tying_position="down_in"``, Linear_m: 32→d_m) or its output
  channels (``"down_out"``, 32→r). Released quirk kept: with f = 0 at init, β_m is Linear_m's (PyTorch-default,
  uniform ±1/√32) bias, so tied Down weights start scaled by small random factors; the identity at init holds (Up is
  zero). ``mv_adapter_release`` takes the release's MSR-VTT position, ``down_out``: 32 + 2·(32·64 + 64) = 4,256 per
  tied layer, **3,496,704** trainable with all CLIP bias vectors (171,008 for ViT-B), 2.34% of ViT-B/16. Down-In
  (``mv_adapter_release_down_in``) costs 32 + (32·768 + 768) + (32·512 + 512) = 42,272 per tied layer, which gives
  the v2 paper's count: 12·276,432 + 2·42,272 + 171,008 = **3,572,736** (2.39%).
- ``"kronecker"`` (the default ``mv_adapter``). **The suite's reconstruction of the v1 description, not a released
  design:** the v1 text is not available here and no code for it was released, and the reconstruction does not match
  v1's reported ≈2.56% (≈3.83M on ViT-B/16): it has **3,194,432** trainable parameters on ViT-B/16 (or B/32) at
  T = 12, L = 32 = **2.14%**. Each tied adapter's Down weight (r × d_m) is a sum of Kronecker products
  W_down^m = Σ_{k=1..n} S_k ⊗ M_k^m (PHM / Compacter style), with n = ``kronecker_factors`` = 4, S_k ∈ R^{n×n}
  shared by the two towers of that layer and M_k^m ∈ R^{(r/n)×(d_m/n)} specific to modality m. n must divide r and
  both widths: with r = 64, d_v = 768 and d_t = 512, M_k^v is 16×192 and M_k^t is 16×128. The modality factors
  replace the dense Down weight of that adapter (its Down bias stays). Cost per tied layer: shared n³ = 64, visual
  r·d_v/n = 12,288 (dense: 49,152), text r·d_t/n = 8,192 (dense: 32,768), i.e. 61,376 fewer than untied adapters:
  12·(158,160 + 118,272) − 2·61,376 = 3,194,432 (CLIP biases frozen). Init: S_k ~ N(0, 1/n) and M_k^m ~ N(0, σ_m²)
  with σ_m the dense Down's init std of that tower, so each entry of W_down has the dense init's variance.
- ``"none"``: no tying; every Down is a dense, untied Linear (3,317,184 for ViT-B).

Initialisation follows the release: blocks' attention in-projection ~ N(0, d⁻¹), out-projection and MLP weights ~
N(0, (2d)⁻¹) with d the tower's width (not r), zero attention biases; visual Down is PyTorch's Linear default with a
zero bias, text Down ~ N(0, (2d)⁻¹) with a zero bias; positions ~ N(0, 0.01²); [CC] ~ N(0, 1/r).

Hyperparameters (configs/model/mv_adapter*.yaml): adapter lr 5e-6, weight decay 0.2, meanP similarity (the release's
mean pooling); the release variant also trains every CLIP bias vector (LayerNorm biases included, LayerNorm gains not:
the release's "no decay" name filter) at ``bias_lr`` = 1e-7 (``train_clip_biases``).

Parity (tests/test_parity_mv_adapter.py): the official model, built from configs/msrvtt/msrvtt.py shrunk to a 3-layer
width-64 CLIP (bottleneck 32, 4 frames, 12 words, CMT on the top 2 layers, every zero-initialised tensor
randomised), and this file agree within 1e-5 (measured ≤ 2.5e-6, fp32 CPU) on frame and text embeddings, similarity,
loss and gradients (adapters, calibration, shared factors, CLIP biases): two fixtures, the release's literal
``position='down out'`` against ``mv_adapter_release`` and ``position='down in'`` against
``mv_adapter_release_down_in``.

Differences from the release (the suite chose; everything the forward computes is the release's):

| what | the release (MSR-VTT config, runner, data) | the suite | expected effect |
|---|---|---|---|
| CMT position | msrvtt.py says ``position='down out'`` (β scales Down's 64 output channels, 4,256 per tied layer) | the same in ``mv_adapter_release``; ``mv_adapter_release_down_in`` is the v2 paper's count (3,401,728 adapter + CMT) | Down-In has 2·(42,272 − 4,256) = 76,032 more parameters; the published 2.39% is Down-In |
| precision | ``convert_weights`` makes every Linear / Conv / MHA weight and bias fp16 (adapters included), trained under fp16 autocast with no fp32 master copy; LayerNorms, positions, [CC], f stay fp32 | fp32 weights, bf16-mixed compute (trainer config) | release updates are quantised: a CLIP bias update of ~lr = 1e-7 is below half an fp16 ulp of any value above ≈2·10⁻⁴, so most CLIP Linear biases never change there (LayerNorm biases do); adapter updates (5e-6) are coarsened once weights reach ~10⁻² |
| optimiser | BertAdam: no bias correction (early steps up to ≈1.5× larger, the first one ≈0.7×), decoupled decay on every tensor whose name lacks "bias" (adapter LayerNorm gains, positions, [CC], f) and on the CLIP biases too (wd 0.2 at 1e-7); global clip 1.0 (its per-tensor clip 1.0 is then a no-op) | AdamW (β 0.9/0.98, ε 1e-6, bias-corrected), decay on weight matrices only, positions / [CC] / f / biases exempt; clip 1.0 | small: lr·wd ≤ 10⁻⁶ per step |
| lr schedule | factor x/0.1 over the first 10% (x = step / total; the first update has lr 0), then 0.5(1 + cos πx) over the whole run (1 → 0.976 at the end of warm-up) | the same shape (``lr_schedule: warmup_cosine``, the module's default) | none |
| multi-GPU gradient | CLIP4Clip's AllGather passes back only the local slice, DDP averages: the gradient is ∇(global loss)/N on N GPUs | Lightning's all-gather sums the slices back: ∇(global loss) | Adam is scale-free except ε and clipping: with N× smaller gradients, the release's clip at 1.0 binds less often |
| batch, epochs | 16 per GPU (N not stated), DistributedSampler shuffling, drop_last; 5 epochs; lrs 5e-6 / 1e-7 | configs/data: 16 per GPU, global 128 on 8 GPUs; 5 epochs; same lrs | none at 8 GPUs |
| frames | pre-extracted frame images listed in the annotation files (extraction rate not in the repo); ``slice_framepos=2``: frame 0 and floor(i·n/12), i = 1…11 (the first frame of each of 12 equal segments), train and test alike; fewer frames are zero-padded after normalisation | decoded from the videos: ``uniform`` takes the middle (eval) or a random (train) frame of each segment, ``fps`` CLIP4Clip's 1 frame/s; pads uint8 zeros (normalised to −mean/std) | frame choice: small (half a segment earlier); padding: none (masked keys, masked pooling; checked) |
| resizing | PIL bicubic resize of the short side to 224 + centre crop on JPEG frames | torch bicubic (antialiased) on decoded uint8 frames | pixel-level only |
| text | max_words 32: [SOT] + 30 BPE tokens + [EOT], zero padding; positions must be exactly ``max_words`` long | open_clip's tokenizer at ``max_words`` = 32 (same truncation); positions sliced to the length given | none |
| video positions | the first 2T+1 rows | indexed by role (frame i's patch mean → T_max+1+i) | none while T = ``num_frames`` (always: frames are padded) |
| padded-frame mask | −10⁶ added | −∞ | none |
| model selection | evaluates the 1k-A test set (its only validation set) after every epoch and logs the best epoch per metric (t2v, v2t, sums) | the model after the last epoch | release numbers may be best-of-5 on the test set, optimistic by the epoch-to-epoch spread |
| backbone | OpenAI CLIP jit files (``clip_arch`` v16 by default; B/32, L/14 accepted) with adapter widths and layer lists written in the config for B/16 | any open_clip ViT; widths read from the model, tied layers paired from the top (towers of different depth allowed) | none on ViT-B/16 |
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from petl_bench.backbone import ForwardContext, attention_part, mlp_part
from petl_bench.module import RetrievalModule

TYING_FORMS = ("kronecker", "scale", "none")
SCALE_POSITIONS = ("down_in", "down_out")


class QuickGELU(nn.Module):
    """CLIP's GELU approximation x·σ(1.702x), the activation throughout the release's adapters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class AdapterBlock(nn.Module):
    """The adapter's small pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)), width r."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, init_width: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"bottleneck {width} is not divisible by heads={heads}")
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * mlp_ratio)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * mlp_ratio, width)),
        ]))
        # the release scales these by the *tower's* width, not the bottleneck's
        nn.init.normal_(self.attn.in_proj_weight, std=init_width ** -0.5)
        nn.init.normal_(self.attn.out_proj.weight, std=(2 * init_width) ** -0.5)
        nn.init.normal_(self.mlp.c_fc.weight, std=(2 * init_width) ** -0.5)
        nn.init.normal_(self.mlp.c_proj.weight, std=(2 * init_width) ** -0.5)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask, key_padding_mask=key_padding_mask)[0]
        return x + self.mlp(self.ln_2(x))


class AdapterDown(nn.Module):
    """Down projection d→r of one adapter, with its part of Cross Modality Tying if its layer is tied.

    The factor shared with the other tower is not registered here: the method owns it (one Parameter, one name) and
    passes it to `forward`, so gradients from both towers accumulate on the same tensor.

    tying="none": a dense weight (r, d).   tying="scale": the dense weight, calibrated by β = Linear(f) on its input
    (``down_in``) or output (``down_out``) channels.   tying="kronecker": W = Σ_k S_k ⊗ M_k with M (n, r/n, d/n) here
    and the shared S (n, n, n) passed in.
    """

    def __init__(
        self, width: int, bottleneck: int, init_std: float | None, tying: str = "none",
        factor_dim: int = 32, scale_position: str = "down_in", kronecker_factors: int = 4,
    ):
        super().__init__()
        self.width, self.bottleneck, self.tying = width, bottleneck, tying
        self.bias = nn.Parameter(torch.zeros(bottleneck))
        if tying == "kronecker":
            n = kronecker_factors
            if bottleneck % n or width % n:
                raise ValueError(
                    f"kronecker_factors={n} must divide the bottleneck ({bottleneck}) and the tower width ({width}); "
                    "pick a common divisor (4 works for ViT-B and petl-tiny-vit)"
                )
            std = init_std if init_std is not None else 1.0 / math.sqrt(3 * width)  # Linear default's std
            self.factors = nn.Parameter(torch.randn(n, bottleneck // n, width // n) * std)
            return
        self.weight = nn.Parameter(torch.empty(bottleneck, width))
        if init_std is None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        else:
            nn.init.normal_(self.weight, std=init_std)
        if tying == "scale":
            out = width if scale_position == "down_in" else bottleneck
            self.scale_position = scale_position
            self.calibration = nn.Linear(factor_dim, out)

    def effective_weight(self, shared: torch.Tensor | None) -> torch.Tensor:
        """The (r, d) Down weight this forward uses."""
        if self.tying == "none":
            return self.weight
        if shared is None:
            raise ValueError(f"a {self.tying}-tied Down projection needs the shared factor of its layer")
        if self.tying == "scale":
            beta = self.calibration(shared)
            return self.weight * (beta[None, :] if self.scale_position == "down_in" else beta[:, None])
        return kronecker_sum(shared, self.factors)

    def forward(self, x: torch.Tensor, shared: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.effective_weight(shared), self.bias)


def kronecker_sum(shared: torch.Tensor, specific: torch.Tensor) -> torch.Tensor:
    """Σ_k shared[k] ⊗ specific[k]: shared (n, a, b), specific (n, p, q) → (a·p, b·q)."""
    _, a, b = shared.shape
    _, p, q = specific.shape
    return torch.einsum("kij,krs->irjs", shared, specific).reshape(a * p, b * q)


class TemporalCalibration(nn.Module):
    """α = 1 + FC2(ReLU(FC1([frame context ; g(global context)]))), FC2 zero-initialised so α starts at 1."""

    def __init__(self, bottleneck: int, hidden: int):
        super().__init__()
        self.g = nn.Linear(bottleneck, bottleneck)
        self.fc1 = nn.Linear(2 * bottleneck, hidden)
        self.fc2 = nn.Linear(hidden, bottleneck, bias=False)
        nn.init.zeros_(self.fc2.weight)

    def forward(self, global_ctx: torch.Tensor, frame_ctx: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """global_ctx (B, r), frame_ctx (B, T, r), frame_mask (B, T) → α (B, T, r)."""
        g = self.g(global_ctx)[:, None].expand_as(frame_ctx)
        u = torch.cat([frame_ctx, g], dim=-1) * frame_mask[..., None].to(frame_ctx.dtype)
        return 1 + self.fc2(F.relu(self.fc1(u)))


class VideoAdapter(nn.Module):
    """MV-Adapter's visual adapter: a temporal transformer over [CC], frame [CLS] and patch-mean tokens."""

    def __init__(
        self, width: int, bottleneck: int, num_frames: int, heads: int, mlp_ratio: int, calibration_hidden: int,
        scale: float, down: AdapterDown,
    ):
        super().__init__()
        self.num_frames, self.scale = num_frames, scale
        self.down = down
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.ln_pre = nn.LayerNorm(bottleneck)
        self.block = AdapterBlock(bottleneck, heads, mlp_ratio, init_width=width)
        self.positional_embedding = nn.Parameter(torch.randn(2 * num_frames + 1, bottleneck) * 0.01)
        self.cc_token = nn.Parameter(torch.randn(bottleneck) * bottleneck ** -0.5)
        self.calibration = TemporalCalibration(bottleneck, calibration_hidden)

    def forward(self, h: torch.Tensor, ctx: ForwardContext, shared: torch.Tensor | None = None) -> torch.Tensor:
        """h: the FFN output (B·T, N, d), token 0 = [CLS] → the scaled adapter output, same shape."""
        B, T = ctx.batch_size, ctx.num_frames
        if T > self.num_frames:
            raise ValueError(f"clip of {T} frames but the MV-Adapter was built for num_frames={self.num_frames}")
        frame_mask = ctx.frame_mask if ctx.frame_mask is not None else h.new_ones(B, T, dtype=torch.bool)
        down = quick_gelu(self.down(h, shared)).unflatten(0, (B, T))  # (B, T, N, r)
        cls_down, patch_down = down[:, :, 0], down[:, :, 1:]
        frame_idx = torch.arange(T, device=h.device)
        positions = self.positional_embedding[torch.cat([frame_idx.new_zeros(1), 1 + frame_idx,
                                                         1 + self.num_frames + frame_idx])]
        seq = torch.cat([self.cc_token.to(down.dtype).expand(B, 1, -1), cls_down, patch_down.mean(dim=2)], dim=1)
        seq = self.ln_pre(seq + positions.to(seq.dtype))
        keep = torch.cat([frame_mask.new_ones(B, 1), frame_mask, frame_mask], dim=1)  # [CC] is always visible
        seq = quick_gelu(self.block(seq, key_padding_mask=~keep))
        cc_out, cls_out, patch_out = seq[:, 0], seq[:, 1:T + 1], seq[:, T + 1:]
        alpha = self.calibration(cc_out, cls_out + patch_out, frame_mask)
        # α scales Up's input channels, for the frame's [CLS] only; one Up over [CLS; patches] in the r-wide space
        # (the same per-token products as two calls, without concatenating two d-wide outputs)
        up_in = torch.cat([(alpha * cls_out)[:, :, None], patch_down], dim=2)
        return self.scale * self.up(up_in).flatten(0, 1)


class TextAdapter(nn.Module):
    """MV-Adapter's text adapter: Down → positions → LN → causal transformer block over words → QuickGELU → Up."""

    def __init__(
        self, width: int, bottleneck: int, max_words: int, heads: int, mlp_ratio: int, scale: float, down: AdapterDown
    ):
        super().__init__()
        self.max_words, self.scale = max_words, scale
        self.down = down
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.ln_pre = nn.LayerNorm(bottleneck)
        self.block = AdapterBlock(bottleneck, heads, mlp_ratio, init_width=width)
        self.positional_embedding = nn.Parameter(torch.randn(max_words, bottleneck) * 0.01)

    def forward(self, h: torch.Tensor, ctx: ForwardContext, shared: torch.Tensor | None = None) -> torch.Tensor:
        """h: the FFN output (B, L, d) → the scaled adapter output, same shape."""
        L = h.shape[1]
        if L > self.max_words:
            raise ValueError(f"text of {L} tokens but the MV-Adapter was built for max_words={self.max_words}")
        z = self.down(h, shared) + self.positional_embedding[:L].to(h.dtype)
        causal = ctx.attn_mask
        if causal is None:
            causal = torch.full((L, L), float("-inf"), device=h.device).triu_(1)
        z = quick_gelu(self.block(self.ln_pre(z), attn_mask=causal.to(z.dtype)))
        return self.scale * self.up(z)


class MVAdapter(RetrievalModule):
    """MV-Adapter on both towers; see the module docstring for the design, counts and deviations.

    Args:
        bottleneck: r, the adapters' width (64).
        heads / mlp_ratio: the adapters' transformer block (2, 4).
        scale: the factor on the adapter output (0.1).
        calibration_hidden: FC1's width in the temporal calibration (16).
        tying: ``kronecker`` (default), ``scale`` (the release) or ``none``.
        tied_layers: how many of the top blocks of each tower are tied (2).
        kronecker_factors: n, the number of Kronecker terms and the shared factors' size n×n (4).
        tying_factor_dim: the shared vector's size in the ``scale`` form (32).
        tying_position: ``down_in`` (the class default; the paper's count) or ``down_out`` (the release's MSR-VTT
            config, set by ``mv_adapter_release``) for the ``scale`` form.
        train_clip_biases: also train every CLIP bias vector (the release), at ``bias_lr``.
        bias_lr: learning rate of CLIP's biases (1e-7 in the release); null falls back to ``backbone_lr`` / ``lr``.
        lr: the adapters' learning rate, 5e-6 as in the release; other arguments: see `RetrievalModule`.
    """

    def __init__(
        self,
        bottleneck: int = 64,
        heads: int = 2,
        mlp_ratio: int = 4,
        scale: float = 0.1,
        calibration_hidden: int = 16,
        tying: str = "kronecker",
        tied_layers: int = 2,
        kronecker_factors: int = 4,
        tying_factor_dim: int = 32,
        tying_position: str = "down_in",
        train_clip_biases: bool = False,
        bias_lr: float | None = None,
        lr: float = 5e-6,
        **kwargs,
    ):
        super().__init__(lr=lr, **kwargs)
        if tying not in TYING_FORMS:
            raise ValueError(f"tying must be one of {TYING_FORMS}, got {tying!r}")
        if tying_position not in SCALE_POSITIONS:
            raise ValueError(f"tying_position must be one of {SCALE_POSITIONS}, got {tying_position!r}")
        depth_v, depth_t = len(self.clip.visual_blocks), len(self.clip.text_blocks)
        if not 0 <= tied_layers <= min(depth_v, depth_t):
            raise ValueError(f"tied_layers={tied_layers} must be between 0 and the shallower tower's depth "
                             f"({min(depth_v, depth_t)})")
        self.train_clip_biases, self.bias_lr = train_clip_biases, bias_lr
        if tying == "none":
            tied_layers = 0
        self.tying, self.tied_layers = tying, tied_layers
        # block index → index into `tied_factors`, pairing the towers from the top
        self.visual_tie = {depth_v - tied_layers + k: k for k in range(tied_layers)}
        self.text_tie = {depth_t - tied_layers + k: k for k in range(tied_layers)}

        def make_down(width: int, init_std: float | None, tied: bool) -> AdapterDown:
            return AdapterDown(width, bottleneck, init_std, tying if tied else "none", tying_factor_dim,
                               tying_position, kronecker_factors)

        d_v, d_t = self.clip.visual_width, self.clip.text_width
        self.visual_adapters = nn.ModuleList([
            VideoAdapter(d_v, bottleneck, self.num_frames, heads, mlp_ratio, calibration_hidden, scale,
                         make_down(d_v, None, i in self.visual_tie))
            for i in range(depth_v)
        ])
        self.text_adapters = nn.ModuleList([
            TextAdapter(d_t, bottleneck, self.max_words, heads, mlp_ratio, scale,
                        make_down(d_t, (2 * d_t) ** -0.5, i in self.text_tie))
            for i in range(depth_t)
        ])
        n = kronecker_factors
        self.tied_factors = nn.ParameterList([
            nn.Parameter(torch.randn(n, n, n) / math.sqrt(n) if tying == "kronecker" else torch.zeros(tying_factor_dim))
            for _ in range(tied_layers)
        ])

    # ------------------------------------------------------------------ hooks
    def visual_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + attention_part(block, x, ctx.attn_mask)
        h = mlp_part(block, x)
        k = self.visual_tie.get(i)
        return x + h + self.visual_adapters[i](h, ctx, None if k is None else self.tied_factors[k])

    def text_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + attention_part(block, x, ctx.attn_mask)
        h = mlp_part(block, x)
        k = self.text_tie.get(i)
        return x + h + self.text_adapters[i](h, ctx, None if k is None else self.tied_factors[k])

    # ------------------------------------------------------------------ what trains
    @staticmethod
    def is_clip_bias(name: str) -> bool:
        return name.startswith("clip.model.") and name.endswith("bias")

    def is_trainable(self, name: str) -> bool:
        if not name.startswith("clip."):
            return True  # adapters and tying factors
        return self.train_clip_biases and self.is_clip_bias(name)

    def param_lr(self, name: str) -> float:
        if self.is_clip_bias(name) and self.bias_lr is not None:
            return self.bias_lr
        return super().param_lr(name)
