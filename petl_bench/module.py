"""`RetrievalModule`: the one LightningModule every method subclasses.

What is shared (DESIGN.md, "Rules that keep the comparison fair"):
- the CLIP forward (`petl_bench.backbone`), reached through the hooks a method overrides;
- two similarity heads — ``meanP`` (CLIP4Clip: mean of the L2-normalised frame embeddings, cosine) and
  ``text_conditioned`` (Cross-Modal Adapter's parameter-free pooling: per text, a softmax over frames of
  ⟨t, v_f⟩/τ on un-normalised embeddings, τ = 5, weights the frames, then cosine);
- the loss: symmetric InfoNCE over the batch all-gathered across processes, gradients flowing through the gather;
- one optimiser recipe: AdamW (β 0.9/0.98, ε 1e-6), weight decay on weight matrices only, linear warm-up then cosine
  in either lineage's shape (`lr_factor`), parameter groups by learning rate (`param_lr`);
- checkpoints that hold only what trains (plus optimiser state): the frozen backbone is rebuilt from its source.

A method subclass adds modules in ``__init__``, overrides hooks, and says what trains with `is_trainable(name)`.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from petl_bench.backbone import CLIPBackbone, CLIPHooks, encode_frames, encode_tokens

SIMILARITY_HEADS = ("meanP", "text_conditioned")

# Checkpoints leave the frozen backbone out on purpose; `on_load_checkpoint` checks what must be there instead.
warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")


def mean_pool(frame_emb: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Mean of L2-normalised frame embeddings over real frames, L2-normalised: (V, T, D) → (V, D)."""
    frames = F.normalize(frame_emb, dim=-1) * frame_mask.unsqueeze(-1)
    video = frames.sum(1) / frame_mask.sum(1, keepdim=True).clamp(min=1)
    return F.normalize(video, dim=-1)


def meanp_similarity(text_emb: torch.Tensor, frame_emb: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (C, V) between texts and mean-pooled videos.

    Pooling makes two (V, T, D) temporaries; beyond ``_POOL_BLOCK`` entries (evaluation: 20k videos, 2 x 0.5 GB)
    videos are pooled in blocks — row by row the same values."""
    step = max(1, _POOL_BLOCK // max(1, frame_emb.shape[1] * frame_emb.shape[2]))
    if frame_emb.shape[0] > step:
        # one buffer rather than a list of pieces to concatenate, which fragments the heap between blocks
        video = frame_emb.new_empty(frame_emb.shape[0], frame_emb.shape[2])
        for v in range(0, frame_emb.shape[0], step):
            video[v:v + step] = mean_pool(frame_emb[v:v + step], frame_mask[v:v + step])
    else:
        video = mean_pool(frame_emb, frame_mask)
    return F.normalize(text_emb, dim=-1) @ video.t()


# (V, T, D) entries mean-pooled at once (8 MB a temporary; a training batch, ≤ 128 x 12 x 512, is one block)
_POOL_BLOCK = 1 << 21
# (C, V, D) entries of text-conditioned pooling computed at once (16 MB a temporary; a global batch of 128 is 2 blocks)
_TEXT_CONDITIONED_BLOCK = 1 << 22


def text_conditioned_similarity(
    text_emb: torch.Tensor, frame_emb: torch.Tensor, frame_mask: torch.Tensor, temperature: float = 5.0
) -> torch.Tensor:
    """Cross-Modal Adapter's parameter-free text-conditioned pooling → cosine similarity (C, V).

    score[c, v, f] = ⟨t_c, v_f⟩ / τ on un-normalised embeddings; padded frames get no weight. The pooled videos
    are (C, V, D): beyond ``_TEXT_CONDITIONED_BLOCK`` entries (evaluation: 1k captions x 20k videos would be 41 GB)
    videos are scored in blocks, each column computed as in one call.
    """
    block = max(1, _TEXT_CONDITIONED_BLOCK // max(1, text_emb.shape[0] * max(frame_emb.shape[1:])))
    if frame_emb.shape[0] > block:
        parts = range(0, frame_emb.shape[0], block)
        if not torch.is_grad_enabled():
            # written into one buffer: a list of pieces kept alive between the blocks' temporaries fragments the heap
            # (glibc: measured 15x the embeddings' memory at 2k videos, 2x with this buffer)
            out = text_emb.new_empty(text_emb.shape[0], frame_emb.shape[0])
            for v in parts:
                out[:, v:v + block] = text_conditioned_similarity(
                    text_emb, frame_emb[v:v + block], frame_mask[v:v + block], temperature)
            return out
        return torch.cat([
            text_conditioned_similarity(text_emb, frame_emb[v:v + block], frame_mask[v:v + block], temperature)
            for v in parts
        ], dim=1)
    scores = torch.einsum("cd,vfd->cvf", text_emb, frame_emb) / temperature
    scores = scores.masked_fill(~frame_mask.unsqueeze(0), float("-inf"))
    weights = scores.softmax(dim=-1)
    video = torch.einsum("cvf,vfd->cvd", weights, frame_emb)
    return torch.einsum("cd,cvd->cv", F.normalize(text_emb, dim=-1), F.normalize(video, dim=-1))


def symmetric_infonce(logits: torch.Tensor) -> torch.Tensor:
    """(CE(S) + CE(Sᵀ)) / 2 for a square logit matrix whose diagonal holds the positives."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


# CLIP tensors outside the blocks: used before the first block (embeddings, ln_pre) or after the last one
CLIP_OUTSIDE_BLOCKS = ("clip.model.visual.conv1.", "clip.model.visual.class_embedding",
                       "clip.model.visual.positional_embedding", "clip.model.visual.ln_pre.", "clip.model.visual.ln_post.",
                       "clip.model.visual.proj", "clip.model.token_embedding.", "clip.model.positional_embedding",
                       "clip.model.ln_final.", "clip.model.text_projection", "clip.model.logit_scale")
BLOCK_PREFIXES = {"visual": "clip.model.visual.transformer.resblocks.", "text": "clip.model.transformer.resblocks."}

LR_SCHEDULES = ("warmup_cosine", "cosine_after_warmup")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # inductor's modes (module option compile_mode)


def lr_factor(schedule: str, step: int, total: int, warmup_ratio: float) -> float:
    """The learning-rate multiplier applied at optimiser step `step` (0-based) of `total`.

    - ``warmup_cosine`` (CLIP4Clip's BertAdam schedule, inherited by Cross-Modal Adapter and MV-Adapter): with the run's
      progress x = step / total, linear warm-up x / w while x < w = warmup_ratio, then 0.5·(1 + cos(π·x)) — the cosine
      spans the *whole* run, so it starts just below 1 after warm-up. The first step has lr 0, as in the release.
    - ``cosine_after_warmup`` (X-Pool's, i.e. transformers' ``get_cosine_schedule_with_warmup``; VoP's lineage): W =
      int(warmup_ratio · total) warm-up steps at step / W, then a cosine from 1 to 0 over the remaining steps.
    """
    if schedule == "warmup_cosine":
        x = step / max(1, total)
        if x < warmup_ratio:
            return x / warmup_ratio
        return 0.5 * (1.0 + math.cos(math.pi * x))
    if schedule == "cosine_after_warmup":
        warmup = int(warmup_ratio * total)
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


class RetrievalModule(CLIPHooks, L.LightningModule):
    """Text-video retrieval with CLIP; subclasses decide what is added and what trains.

    Args:
        backbone: open_clip model name (``ViT-B-32``, ``ViT-B-16``, ``petl-tiny-vit``).
        pretrained: ``openai`` (hub tag), a checkpoint path, ``synthetic`` or null (random; for counting).
        num_frames / max_words: linked from the data config; temporal and text modules size themselves from them.
        similarity: ``meanP`` or ``text_conditioned``.
        lr: learning rate of the parameters a method adds; ``backbone_lr`` of trainable CLIP weights (default: lr).
        train_logit_scale: let CLIP's temperature train (full fine-tuning); it is clamped to ≤ ``max_logit_scale``.
        lr_schedule / warmup_ratio: the learning-rate shape (see `lr_factor`): ``warmup_cosine`` (CLIP4Clip's, the
            default of the methods built on it) or ``cosine_after_warmup`` (X-Pool's, VoP's lineage).
        activation_checkpointing: recompute the blocks that need autograd in the backward pass instead of storing
            their activations (less memory, about one more forward of time; same values and gradients).
        compile: regional ``torch.compile`` of each block hook (`petl_bench.backbone.run_blocks`); same values within
            floating-point reassociation.
        compile_mode: inductor's mode for ``compile``: ``default``, ``reduce-overhead`` (each block replayed as a CUDA
            graph on a GPU, where a step is many small kernels; shapes are static) or ``max-autotune``.
    """

    def __init__(
        self,
        backbone: str = "ViT-B-32",
        pretrained: str | None = "openai",
        num_frames: int = 12,
        max_words: int = 32,
        similarity: str = "meanP",
        text_conditioned_temperature: float = 5.0,
        lr: float = 1e-4,
        backbone_lr: float | None = None,
        weight_decay: float = 0.2,
        warmup_ratio: float = 0.1,
        lr_schedule: str = "warmup_cosine",
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        train_logit_scale: bool = False,
        max_logit_scale: float = 100.0,
        activation_checkpointing: bool = False,
        compile: bool = False,
        compile_mode: str = "default",
    ):
        super().__init__()
        if similarity not in SIMILARITY_HEADS:
            raise ValueError(f"similarity must be one of {SIMILARITY_HEADS}, got {similarity!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {warmup_ratio}")
        self.save_hyperparameters()
        self.clip = CLIPBackbone(backbone, pretrained)
        self.num_frames = num_frames
        self.max_words = max_words
        self.similarity_head = similarity
        self.activation_checkpointing = activation_checkpointing
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        self.compile_blocks = compile
        self.compile_mode = compile_mode
        # Frozen layers never change, so a checkpoint need not carry them; loading restores only what trains.
        self.strict_loading = False

    # ------------------------------------------------------------------ what trains
    def is_trainable(self, name: str) -> bool:
        """Whether the parameter called `name` (as in ``named_parameters()``) trains. Default: nothing."""
        return False

    def mark_trainable(self) -> None:
        """Apply `is_trainable` to every parameter: requires_grad on exactly those, off everywhere else."""
        for name, param in self.named_parameters():
            param.requires_grad_(self.is_trainable(name))

    def trainable_names(self) -> list[str]:
        self.mark_trainable()
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        self.mark_trainable()
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "total": total}

    def setup(self, stage: str) -> None:
        self.mark_trainable()

    def grad_start(self, tower: str) -> int:
        """The first block of ``tower`` with a trainable parameter, read from ``requires_grad``; blocks before it run
        without autograd (`petl_bench.backbone.run_blocks`). A trainable tensor the backbone cannot place — anything a
        method adds, which its hooks may use in any block — gives 0: every block with autograd. Tensors used before
        the blocks (prompts, embeddings) need no rule: ``run_blocks`` sees that the tokens already carry a gradient."""
        first = None
        for name, param in self.named_parameters():
            if not param.requires_grad or name.startswith(CLIP_OUTSIDE_BLOCKS):
                continue
            if not name.startswith(tuple(BLOCK_PREFIXES.values())):
                return 0  # a method's own tensor: its hooks may use it anywhere
            if name.startswith(BLOCK_PREFIXES[tower]):
                index = int(name[len(BLOCK_PREFIXES[tower]):].split(".", 1)[0])
                first = index if first is None else min(first, index)
        blocks = self.clip.visual_blocks if tower == "visual" else self.clip.text_blocks
        return len(blocks) if first is None else first

    # ------------------------------------------------------------------ encoders and heads
    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 frames (B, T, 3, H, W) → frame embeddings (B, T, D)."""
        return encode_frames(self.clip, self, video, video_mask)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """token ids (B, L) → text embeddings (B, D)."""
        return encode_tokens(self.clip, self, text)

    def similarity(self, text_emb: torch.Tensor, video_emb: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (C, V) between C texts (C, D) and V videos given as frame embeddings (V, T, D)."""
        if self.similarity_head == "meanP":
            return meanp_similarity(text_emb, video_emb, video_mask)
        return text_conditioned_similarity(
            text_emb, video_emb, video_mask, self.hparams.text_conditioned_temperature
        )

    def logit_scale(self) -> torch.Tensor:
        scale = self.clip.model.logit_scale.exp()
        return scale.clamp(max=self.hparams.max_logit_scale)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        video_emb = self.encode_video(batch["video"], batch["video_mask"])
        text_emb = self.encode_text(batch["text"])
        video_mask = batch["video_mask"]
        if self._trainer is not None and self.trainer.world_size > 1:
            # gather with gradients so every process's loss sees the global batch (CLIP4Clip's AllGather)
            video_emb = self.all_gather(video_emb, sync_grads=True).flatten(0, 1)
            text_emb = self.all_gather(text_emb, sync_grads=True).flatten(0, 1)
            video_mask = self.all_gather(video_mask).flatten(0, 1)
        scale = self.logit_scale()
        logits = scale * self.similarity(text_emb, video_emb, video_mask)
        loss = symmetric_infonce(logits)
        if not torch.isfinite(loss):
            # stop before the optimizer spreads it into the weights; no checkpoint is written for this state
            from petl_bench.resume import NonFiniteLossError

            items = batch.get("index")
            items = items.tolist() if torch.is_tensor(items) else items
            raise NonFiniteLossError(
                f"{type(self).__name__}: training loss is {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}; dataset items {items}). "
                "Lower the learning rate, check the inputs, or resume from the last checkpoint")
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["text"].shape[0])
        self.log("train/logit_scale", scale.detach(), batch_size=batch["text"].shape[0])
        self.log("train/global_batch", float(logits.shape[0]), batch_size=batch["text"].shape[0])
        return loss

    def _eval_step(self, batch: dict, dataloader_idx: int) -> dict:
        if "video" in batch:
            return {
                "index": batch["index"],
                "video_emb": self.encode_video(batch["video"], batch["video_mask"]).float(),
                "video_mask": batch["video_mask"],
            }
        return {"index": batch["index"], "text_emb": self.encode_text(batch["text"]).float(),
                "video_index": batch["video_index"]}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self._eval_step(batch, dataloader_idx)

    # ------------------------------------------------------------------ optimisation
    def param_lr(self, name: str) -> float:
        """Learning rate of a trainable parameter: CLIP's own weights at ``backbone_lr``, added modules at ``lr``."""
        if name.startswith("clip.") and self.hparams.backbone_lr is not None:
            return self.hparams.backbone_lr
        return self.hparams.lr

    def param_weight_decay(self, name: str, param: nn.Parameter) -> float:
        """Decay weight matrices only; biases, LayerNorm gains, embeddings-as-vectors and scalars are exempt."""
        return self.hparams.weight_decay if param.ndim >= 2 and "embedding" not in name else 0.0

    def configure_optimizers(self):
        self.mark_trainable()
        groups: dict[tuple[float, float], list[nn.Parameter]] = defaultdict(list)
        for name, param in self.named_parameters():
            if param.requires_grad:
                groups[(self.param_lr(name), self.param_weight_decay(name, param))].append(param)
        if not groups:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters: it can be validated or tested, "
                               "not fitted")
        optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
            betas=tuple(self.hparams.betas), eps=self.hparams.eps,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule, ratio = self.hparams.lr_schedule, self.hparams.warmup_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(schedule, step, total, ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ trainable-only checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = set(self.trainable_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["petl_bench"] = {"trainable_keys": sorted(keep), "backbone": self.hparams.backbone,
                                    "pretrained": self.hparams.pretrained, "method": self.class_path(),
                                    "num_frames": self.num_frames}

    @classmethod
    def class_path(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from petl_bench.checkpoint import check_identity

        check_identity(checkpoint, {"method": self.class_path(), "backbone": self.hparams.backbone,
                                    "num_frames": self.num_frames})
        keys = set(checkpoint["state_dict"])
        unknown = sorted(keys - set(self.state_dict()))
        if unknown:
            raise KeyError(f"checkpoint holds {len(unknown)} tensors this {type(self).__name__} does not have, e.g. "
                           f"{unknown[:3]}: was it saved by another method or configuration?")
        missing = sorted(set(self.trainable_names()) - keys)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable tensors of {type(self).__name__}, e.g. "
                           f"{missing[:3]}: was it saved by another method or configuration?")
