"""TempMe (Shen et al., "TempMe: Video Temporal Token Merging for Efficient Text-Video Retrieval", ICLR 2025,
arXiv 2409.01156; release github.com/LunarShen/TempMe at e62493037bc6defb95b281c6e720b7d6afcbd607).

The paper states: a frozen CLIP tuned with LoRA, whose image tower becomes a "progressive multi-granularity" video
encoder. ImgMe blocks merge redundant tokens inside each frame (ToMe's bipartite soft matching); ClipMe blocks then
join neighbouring clips (2 frames, then 4, then the whole video), merge tokens *across* the frames of the new clip
(cross-clip merging) and again inside it (intra-clip merging), so that the last blocks see one short sequence per video
holding every frame's class token. 0.50M trainable parameters on ViT-B/32; about half the GFLOPs of its LoRA baseline.

The release does (``tvr/models/modeling.py``, ``module_tome_patch.py``, ``module_tome_merge.py``, ``main.py``):
- LoRA on the fused q, k, v projection (``in_proj``) of every attention block of *both* towers: ΔW = B·A, A r×D
  (kaiming-uniform, a=√5), B 3D×r (zero), r = 8, scaling 1, no dropout; the image tower's attention is computed by
  hand so that it can return its keys.
- Image tower, ViT-B (12 blocks), 12 frames, ``--merge_layer 8-9-10 --merge_frame_num 2-2-3
  --merge_token_proportion 30-10 --tome_r 2 --frame_pos 1``:
  - blocks 0–7 (ImgMe): after attention, before the MLP, merge ``tome_r`` = 2 tokens per frame (bipartite matching on
    the keys averaged over heads; the class tokens never merge; merged tokens are size-weighted means);
  - blocks 8, 9, 10 (ClipMe): join ``f`` = 2, 2, 3 consecutive clips into one sequence (all class tokens first, then
    each clip's patch tokens in frame order), add a learnt per-frame position embedding (zero-initialised, one vector
    per frame of the clips *before* joining: 12, 6, 3 vectors), merge ⌊0.3·N·f⌋ tokens across the joined frames with
    the block's *input* as the matching metric, run attention, merge ⌊0.1·N'⌋ more on the keys, then the MLP;
  - block 11: merge ⌊0.1·N⌋ tokens after attention. Every count is capped at half the mergeable tokens.
  - proportional attention: log(token size) is added to the attention logits of every image block (ToMe's).
  ViT-B/32 at 12 frames: 50 tokens per frame → 34 after block 7; 44 per 2-frame clip after block 8, 56 per 4-frame
  clip after 9, 107 for the whole video after 10, 97 after 11 (against 12 × 50 = 600 for frozen CLIP).
- Read-out: the 12 class tokens (one per frame, in frame order) → ``ln_post`` → ``proj``; the video is the masked mean
  of the L2-normalised frame embeddings (meanP); symmetric InfoNCE with CLIP's frozen temperature.
- Trains every ``TVPt*`` tensor: the LoRA factors of both towers and the frame position embeddings.
  AdamW (β 0.9/0.999, ε 1e-6, weight decay 0.2 on all of them), lr 6e-4, 10% linear warm-up then cosine
  (transformers' ``get_cosine_schedule_with_warmup``), gradient clipping at norm 1, batch 128, 5 epochs,
  ``--max_words 32 --max_frames 12``, frames at 1 fps then evenly spaced (CLIP4Clip), RandAugment at training.

The suite chose:
- LoRA through ``peft`` (the suite's `petl_bench.methods.lora.LoRA`, target ``in_proj`` in both towers: peft's
  ``ParamWrapper`` on ``attn.in_proj_weight``, r 8, α 8, i.e. the release's factors, init and scaling). The text tower
  runs peft's wrapped attention unchanged; in the image tower TempMe computes attention itself (it needs the keys and
  the size bias) from W + peft's ``get_delta_weight``, the same ΔW = (α/r)·B·A.
- Merge layers may be negative (counted from the end) and the last frame factor may be -1 ("all remaining clips"), so
  one config gives the release's 8-9-10 / 2-2-3 on ViT-B at 12 frames and still runs on other depths and frame counts
  (the 4-block synthetic backbone at 8 frames: blocks 0, 1, 2 join 2, 2, 2 clips; block 3 merges within the video).

Trainable parameters, ViT-B/32 or B/16 at 12 frames (``petl-bench params tempme``): LoRA 8·(D + 3D) per block:
12·32·768 = 294,912 (image) + 12·32·512 = 196,608 (text), plus (12 + 6 + 3)·768 = 16,128 frame position embeddings:
507,648. The paper prints 0.50M: our count is 0.508M (0.49M without the position embeddings); we read the paper's
figure as this count truncated, not rounded — every TVPt tensor of the release is counted here, nothing else trains.

Differences from the release (and their expected effect):

| difference | release | suite | effect |
|---|---|---|---|
| LoRA arithmetic | x·Wᵀ + (x·Aᵀ)·Bᵀ, hand-written | x·(W + B·A)ᵀ, peft's ΔW | fp32 rounding (parity ≤ 2e-6 relative) |
| text padding mask | causal + key-padding mask | causal only | none: the EOT read-out never sees padding |
| logit scale | exp(logit_scale), frozen | the same, clamped at 100 (suite rule) | none for OpenAI's 100 |
| precision | fp32 (no autocast) | the trainer's: fp32 on CPU, bf16-mixed on GPU | bf16 may flip near-tied token matches |
| multi-GPU gradient | loss on the gathered batch, local slice of its gradient, DDP mean: 1/W of the true one | true gradient of the global loss | Adam is nearly scale-free; clipping at 1 bites W× sooner here |
| optimiser | hand-written AdamW, decay after the step | torch AdamW, decay before | negligible |
| augmentation | RandAugment on training frames | none (one pipeline for every method) | the release may gain slightly |
| padded frames | never (short videos repeat frames) | uint8 zeros, merged like real frames | none on MSR-VTT (every video has 12 frames) |
| layer / frame lists | fixed 8-9-10 and 2-2-3 | negative layers, last factor -1 | none on ViT-B at 12 frames |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from petl_bench.backbone import ForwardContext, mlp_part
from petl_bench.methods.lora import LoRA


@dataclass(frozen=True)
class BlockPlan:
    """What one image block does to its tokens (counts per clip)."""

    join: int  # clips joined into one before attention (1: none)
    cross: int  # tokens merged across the joined frames, before attention
    intra: int  # tokens merged after attention, before the MLP
    clips: int  # clips per video after this block
    cls: int  # class tokens per clip after this block (they lead the sequence and never merge)
    tokens: int  # tokens per clip after this block


def merge_schedule(num_tokens: int, num_frames: int, num_layers: int, merge_layers, merge_frames, tome_r: int,
                   cross_ratio: float, intra_ratio: float) -> list[BlockPlan]:
    """The release's token schedule: one `BlockPlan` per image block for frames of ``num_tokens`` tokens (class
    included). Counts follow ``VTRModel.get_video_feat``: int() truncation, each capped at half the mergeable tokens."""
    layers = [layer + num_layers if layer < 0 else layer for layer in merge_layers]
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"merge_layers {list(merge_layers)} must be distinct, increasing and within the "
                         f"{num_layers} image blocks (negative: from the end)")
    factors = list(merge_frames)
    if len(factors) != len(layers):
        raise ValueError(f"merge_frames {factors} must give one factor per merge layer {layers}")
    if any(f == -1 for f in factors[:-1]) or any(f < 2 and f != -1 for f in factors):
        raise ValueError(f"merge_frames {factors}: factors of at least 2; only the last may be -1 (all remaining clips)")
    done = math.prod(factors[:-1])
    if factors[-1] == -1:
        if num_frames % done:
            raise ValueError(f"{num_frames} frames cannot be joined in clips of {factors[:-1]} frames")
        factors[-1] = num_frames // done
        if factors[-1] < 2:
            raise ValueError(f"{num_frames} frames leave nothing for the last merge layer after clips of {done}")
    if num_frames % math.prod(factors):
        raise ValueError(f"{num_frames} frames are not divisible by the merge factors {factors} (product "
                         f"{math.prod(factors)}); set model.merge_frames to factors of the frame count")
    plans, tokens, cls, clips, factor_of = [], num_tokens, 1, num_frames, dict(zip(layers, factors))
    for i in range(num_layers):
        join, cross = factor_of.get(i, 1), 0
        if join > 1:
            cross = min(int(tokens * join * cross_ratio), (tokens - cls) * join // 2)
            tokens, cls, clips = tokens * join - cross, cls * join, clips // join
            intra = min(int(tokens * intra_ratio), (tokens - cls) // 2)
        elif i < layers[0]:
            intra = tome_r  # ImgMe: ToMe's constant r per frame, as the release (uncapped there)
            if intra > (tokens - cls) // 2:
                raise ValueError(f"tome_r={tome_r} exceeds half of the {tokens - cls} patch tokens left at block {i}")
        else:
            intra = min(int(tokens * intra_ratio), (tokens - cls) // 2)
        tokens -= intra
        plans.append(BlockPlan(join, cross, intra, clips, cls, tokens))
    return plans


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, cls: int):
    """ToMe's bipartite soft matching as the release runs it: the first ``cls`` tokens stay; the patch tokens alternate
    between a source and a destination set (which set starts depends on the parity of ``cls``); the ``r`` sources most
    similar (cosine of ``metric``) to some destination are folded into it as size-weighted means.
    Returns (x, size) with r fewer tokens: [class tokens, unmerged sources in order, destinations]."""
    with torch.no_grad():
        m = metric[:, cls:]
        m = m / m.norm(dim=-1, keepdim=True)
        src_m, dst_m = (m[:, ::2], m[:, 1::2]) if cls % 2 == 0 else (m[:, 1::2], m[:, ::2])
        best, best_dst = (src_m @ dst_m.transpose(-1, -2)).max(dim=-1)
        order = best.argsort(dim=-1, descending=True)[..., None]
        keep_idx = order[:, r:].sort(dim=1)[0]
        src_idx = order[:, :r]
        dst_idx = best_dst[..., None].gather(dim=1, index=src_idx)

    def merge(t: torch.Tensor) -> torch.Tensor:
        head, patches = t[:, :cls], t[:, cls:]
        src, dst = (patches[:, ::2], patches[:, 1::2]) if cls % 2 == 0 else (patches[:, 1::2], patches[:, ::2])
        n, s, c = src.shape
        kept = src.gather(dim=1, index=keep_idx.expand(n, s - r, c))
        moved = src.gather(dim=1, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(n, r, c), moved, reduce="sum")
        return torch.cat([head, kept, dst], dim=1)

    weighted, size = merge(x * size), merge(size)
    return weighted / size, size


def join_clips(x: torch.Tensor, join: int, cls: int) -> torch.Tensor:
    """(n·join, N, C) → (n, join·N, C): ``join`` consecutive clips become one; their class tokens lead, then each
    clip's other tokens in order (the release's layout, so class tokens stay in frame order)."""
    n, N, C = x.shape
    x = x.view(n // join, join, N, C)
    return torch.cat([x[:, :, :cls].flatten(1, 2), x[:, :, cls:].flatten(1, 2)], dim=1)


def in_proj_weight(attn: nn.Module) -> tuple[torch.Tensor, nn.Module]:
    """(q, k, v projection with any active peft LoRA update added, the underlying nn.MultiheadAttention)."""
    base = attn.get_base_layer() if hasattr(attn, "get_base_layer") else attn
    weight = base.in_proj_weight
    if hasattr(attn, "lora_A") and not attn.disable_adapters and not attn.merged:
        for name in attn.active_adapters:
            if name in attn.lora_A:
                weight = weight + attn.get_delta_weight(name)
    return weight, base


def attention_with_keys(block: nn.Module, x: torch.Tensor, size: torch.Tensor | None):
    """ls_1(Attn(LN1(x))) with ToMe's proportional attention (log size added to the logits), and the keys averaged
    over heads (the intra-merge metric)."""
    weight, mha = in_proj_weight(block.attn)
    h = block.ln_1(x)
    n, N, C = h.shape
    heads = mha.num_heads
    q, k, v = F.linear(h, weight, mha.in_proj_bias).view(n, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    logits = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, N, C)
    return block.ls_1(mha.out_proj(out)), k.mean(dim=1)


class TempMe(LoRA):
    """Frozen CLIP + LoRA (in_proj, both towers) + progressive temporal token merging in the image tower.

    Args:
        rank / alpha: LoRA's r and α (release: 8, scaling 1).
        merge_layers: image blocks that join clips (ClipMe); negative counts from the end. Release: 8, 9, 10 (= -4,
            -3, -2 on 12 blocks). Blocks before the first are ImgMe blocks; blocks after merge within the clip.
        merge_frames: clips joined at each merge layer; the last may be -1 (all remaining). Release: 2, 2, 3.
        tome_r: tokens merged per frame in each ImgMe block (release 2).
        cross_ratio / intra_ratio: fraction of tokens merged across frames when clips join / within a clip (release
            0.3 / 0.1, ``--merge_token_proportion 30-10``).
        frame_pos: learn the per-frame position embeddings added when clips join (release ``--frame_pos 1``).
        proportional_attention: add log(token size) to the attention logits (release ``--tome_propattn True``).
    """

    def __init__(self, rank: int = 8, alpha: float = 8.0, merge_layers: tuple[int, ...] = (-4, -3, -2),
                 merge_frames: tuple[int, ...] = (2, 2, -1), tome_r: int = 2, cross_ratio: float = 0.3,
                 intra_ratio: float = 0.1, frame_pos: bool = True, proportional_attention: bool = True,
                 similarity: str = "meanP", lr: float = 6e-4, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.2, lr_schedule: str = "cosine_after_warmup", warmup_ratio: float = 0.1,
                 **kwargs):
        # the optimiser defaults are the release's (main.py: AdamW betas 0.9/0.999, decay 0.2, transformers' cosine)
        super().__init__(rank=rank, alpha=alpha, dropout=0.0, target_modules=("in_proj",), towers=("visual", "text"),
                         similarity=similarity, lr=lr, betas=betas, weight_decay=weight_decay,
                         lr_schedule=lr_schedule, warmup_ratio=warmup_ratio, **kwargs)
        self.merge_layers, self.merge_frames = tuple(merge_layers), tuple(merge_frames)
        self.tome_r, self.cross_ratio, self.intra_ratio = tome_r, cross_ratio, intra_ratio
        self.proportional_attention = proportional_attention
        grid = self.clip.visual.grid_size
        self.plans = self.schedule(grid[0] * grid[1] + 1, self.num_frames)  # fails early on an impossible schedule
        width = self.clip.visual_width
        # one vector per frame of the clips entering each merge layer (release: zero-initialised, 12 + 6 + 3 on ViT-B)
        clips_in = [self.num_frames] + [p.clips for p in self.plans]
        self.frame_pos = nn.ParameterList(
            [nn.Parameter(torch.zeros(clips_in[i], width)) for i, p in enumerate(self.plans) if p.join > 1]
        ) if frame_pos else None

    def schedule(self, num_tokens: int, num_frames: int) -> list[BlockPlan]:
        return merge_schedule(num_tokens, num_frames, len(self.clip.visual_blocks), self.merge_layers,
                              self.merge_frames, self.tome_r, self.cross_ratio, self.intra_ratio)

    def is_trainable(self, name: str) -> bool:
        return super().is_trainable(name) or name.startswith("frame_pos.")

    # ------------------------------------------------------------------ hooks
    def visual_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        st = ctx.state
        if i == 0:
            if ctx.num_frames != self.num_frames:  # eval batches may come with another frame count
                st["plans"] = self.schedule(x.shape[1], ctx.num_frames)
            st["size"], st["cls"], st["pos"] = torch.ones_like(x[..., :1]), 1, 0
        plan = st.get("plans", self.plans)[i]
        size = st["size"]
        if plan.join > 1:
            cls = st["cls"]
            metric = join_clips(x.detach(), plan.join, cls)  # the block input, before the position embedding
            if plan.cross > 0 and self.frame_pos is not None:
                pos = self.frame_pos[st["pos"]]
                x = x + pos.repeat(ctx.batch_size, 1)[:, None, :].to(x.dtype)  # row j is frame j mod clips
            st["pos"] += 1
            x, size = join_clips(x, plan.join, cls), join_clips(size, plan.join, cls)
            if plan.cross > 0:
                x, size = bipartite_merge(x, size, metric, plan.cross, plan.cls)
        out, keys = attention_with_keys(block, x, size if self.proportional_attention else None)
        x = x + out
        if plan.intra > 0:
            x, size = bipartite_merge(x, size, keys, plan.intra, plan.cls)
        st["size"], st["cls"] = size, plan.cls
        return x + mlp_part(block, x)

    def visual_readout(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # the class tokens lead each clip in frame order: (B·clips, cls, D) → (B·T, D)
        return x[:, :ctx.state["cls"]].reshape(-1, x.shape[-1])
