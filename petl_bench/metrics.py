"""Retrieval metrics for text-video benchmarks and the Lightning callback that computes them.

Two layers:

* Pure functions on a similarity matrix ``sim`` of shape ``[num_captions x num_videos]`` and ``cap_to_vid`` (the
  video column of each caption): :func:`t2v_metrics`, :func:`v2t_metrics`, their per-query ``*_ranks`` and
  :func:`dual_softmax`. Tensors in, python floats out.
* :class:`RetrievalMetrics`, a callback that collects the embeddings the ``RetrievalModule`` returns from its
  validation/test steps, gathers them from every process by dataset index, scores all captions against all videos in
  chunks through ``pl_module.similarity`` and logs / saves the numbers.

Metrics (what papers report): ``R@K`` is the percentage of queries whose ground truth ranks within the top K;
``MdR`` / ``MnR`` are the median / mean 1-based rank (the median of an even count is the mean of the two middle
ranks, as ``numpy.median`` gives in the CLIP4Clip family of evaluation scripts).

Protocols:

* T2V: every caption is a query over all videos.
* V2T ``"group"`` (CLIP4Clip's multi-caption protocol): a video scores each caption group (all captions of one video)
  by the group's best caption and ranks the ``num_videos`` groups.
* V2T ``"any"`` (COCO style): a video ranks all captions; its rank is that of its best ground-truth caption.
  With one caption per video both protocols are the transpose of T2V.

Tie rule, pessimistic: ``rank = 1 + (number of competing candidates whose score is >= the ground truth's score)``.
For ``"any"`` the competitors are the non-ground-truth captions, compared with the best ground-truth caption's score;
for ``"group"`` they are the other videos' group scores. Why: any other rule lets a degenerate model look good. Counting
only strictly better candidates gives a collapsed model (constant similarity) R@1 = 100%; breaking ties by sort order
makes the number depend on the order of the test items (and, with a ground truth at index 0, flatters the first
query); CLIP4Clip's reference script adds one rank entry per tied candidate, so the number of "queries" changes. Under
the pessimistic rule the collapsed model ranks every ground truth last, and the result is independent of item order.

Non-finite similarities are an error, not a silently dropped query (reference scripts drop NaN rows in T2V and so
report recall over fewer queries than the test set has).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from petl_bench.atomic import write_json_atomic

METRIC_NAMES = ("R@1", "R@5", "R@10", "MdR", "MnR")
RECALL_AT = (1, 5, 10)

# Working blocks hold at most this many similarity entries whatever the matrix size. Counting a boolean block goes
# through an int64 copy, so a block costs about 9 bytes an entry (~38 MB); MSVD's 27,763 x 670 test matrix takes five.
DEFAULT_BLOCK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------------


def check_similarity(sim: torch.Tensor, cap_to_vid: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``sim`` is a finite float [num_captions x num_videos] matrix and ``cap_to_vid``
    holds one valid video column per caption."""
    if not isinstance(sim, torch.Tensor) or sim.ndim != 2:
        shape = tuple(sim.shape) if isinstance(sim, torch.Tensor) else type(sim).__name__
        raise ValueError(f"sim must be a 2-D tensor [num_captions x num_videos]; got {shape}")
    if not sim.is_floating_point():
        raise ValueError(f"sim must be a floating point tensor; got dtype {sim.dtype}")
    num_captions, num_videos = sim.shape
    if num_captions == 0 or num_videos == 0:
        raise ValueError(f"sim is empty (shape {tuple(sim.shape)}): there is nothing to rank")
    if not isinstance(cap_to_vid, torch.Tensor) or cap_to_vid.ndim != 1 or cap_to_vid.shape[0] != num_captions:
        shape = tuple(cap_to_vid.shape) if isinstance(cap_to_vid, torch.Tensor) else type(cap_to_vid).__name__
        raise ValueError(
            f"cap_to_vid must be a 1-D tensor with one video column per caption ({num_captions},); got {shape}"
        )
    if cap_to_vid.is_floating_point() or cap_to_vid.is_complex() or cap_to_vid.dtype == torch.bool:
        raise ValueError(f"cap_to_vid must be an integer tensor; got dtype {cap_to_vid.dtype}")
    out_of_range = (cap_to_vid < 0) | (cap_to_vid >= num_videos)
    if out_of_range.any():
        caption = int(out_of_range.nonzero()[0, 0])
        raise ValueError(
            f"cap_to_vid must hold video columns 0..{num_videos - 1}; caption {caption} points to column "
            f"{int(cap_to_vid[caption])} ({int(out_of_range.sum())} captions out of range)"
        )
    # Block by block: isfinite's temporaries are larger than the matrix.
    num_non_finite, first = 0, None
    step = _rows_per_block(num_videos, DEFAULT_BLOCK_ELEMENTS)
    for start in range(0, num_captions, step):
        non_finite = ~torch.isfinite(sim[start : start + step])
        count = int(non_finite.sum())
        if count and first is None:
            caption, video = (int(i) for i in non_finite.nonzero()[0])
            first = (start + caption, video)
        num_non_finite += count
    if num_non_finite:
        raise ValueError(
            f"sim has {num_non_finite} non-finite entries (NaN or inf); the first is at caption {first[0]}, "
            f"video {first[1]}. Check the embeddings for NaN (e.g. fp16 overflow, a zero-norm vector being normalised)."
        )


def _rows_per_block(num_columns: int, block_elements: int) -> int:
    return max(1, block_elements // max(1, num_columns))


def t2v_ranks(
    sim: torch.Tensor, cap_to_vid: torch.Tensor, *, block_elements: int = DEFAULT_BLOCK_ELEMENTS
) -> torch.Tensor:
    """1-based rank of each caption's video among all videos (pessimistic ties), LongTensor [num_captions]."""
    check_similarity(sim, cap_to_vid)
    cap_to_vid = cap_to_vid.long()
    ranks = torch.empty(sim.shape[0], dtype=torch.long)
    step = _rows_per_block(sim.shape[1], block_elements)
    for start in range(0, sim.shape[0], step):
        block = sim[start : start + step]
        truth = block.gather(1, cap_to_vid[start : start + step, None])
        # The ground truth compares >= with itself, which supplies the "1 +".
        ranks[start : start + step] = (block >= truth).sum(dim=1).cpu()
    return ranks


def _require_caption_per_video(cap_to_vid: torch.Tensor, num_videos: int) -> None:
    captions_per_video = torch.bincount(cap_to_vid.long().cpu(), minlength=num_videos)
    orphans = (captions_per_video == 0).nonzero().flatten().tolist()
    if orphans:
        shown = ", ".join(str(i) for i in orphans[:10]) + (", ..." if len(orphans) > 10 else "")
        raise ValueError(
            f"V2T needs at least one ground-truth caption per video; {len(orphans)} of {num_videos} video columns "
            f"have none: {shown}. Drop those columns from sim or fix cap_to_vid."
        )


def v2t_ranks(
    sim: torch.Tensor,
    cap_to_vid: torch.Tensor,
    protocol: Literal["group", "any"] = "group",
    *,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """1-based rank of each video's ground truth (pessimistic ties), LongTensor [num_videos]; see module docstring."""
    check_similarity(sim, cap_to_vid)
    if protocol not in ("group", "any"):
        raise ValueError(f"protocol must be 'group' or 'any'; got {protocol!r}")
    num_captions, num_videos = sim.shape
    _require_caption_per_video(cap_to_vid, num_videos)
    cap_to_vid = cap_to_vid.long().to(sim.device)

    if protocol == "group":
        ranks = torch.empty(num_videos, dtype=torch.long)
        step = _rows_per_block(num_captions, block_elements)
        for start in range(0, num_videos, step):
            stop = min(start + step, num_videos)
            scores = sim[:, start:stop].T  # [videos in block x captions]
            # group_scores[v, g] = best score video v gives any caption of video g.
            group_scores = torch.full((stop - start, num_videos), -math.inf, dtype=sim.dtype, device=sim.device)
            group_scores.scatter_reduce_(1, cap_to_vid.expand(stop - start, -1), scores, reduce="amax")
            rows = torch.arange(stop - start, device=sim.device)
            truth = group_scores[rows, rows + start]
            ranks[start:stop] = (group_scores >= truth[:, None]).sum(dim=1).cpu()
        return ranks

    # "any": the best ground-truth caption's score per video, then count competing captions block by block.
    truth_scores = sim[torch.arange(num_captions, device=sim.device), cap_to_vid]
    best_truth = torch.full((num_videos,), -math.inf, dtype=sim.dtype, device=sim.device)
    best_truth.scatter_reduce_(0, cap_to_vid, truth_scores, reduce="amax")
    competitors = torch.zeros(num_videos, dtype=torch.long, device=sim.device)
    step = _rows_per_block(num_videos, block_elements)
    for start in range(0, num_captions, step):
        block = sim[start : start + step]
        at_least_as_good = block >= best_truth[None, :]
        rows = torch.arange(block.shape[0], device=sim.device)
        at_least_as_good[rows, cap_to_vid[start : start + step]] = False  # a video's own captions do not compete
        competitors += at_least_as_good.sum(dim=0)
    return (competitors + 1).cpu()


def ranks_to_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 in percent and the 1-based median / mean rank of a 1-D tensor of 1-based ranks."""
    if ranks.ndim != 1 or ranks.numel() == 0:
        raise ValueError(f"ranks must be a non-empty 1-D tensor; got shape {tuple(ranks.shape)}")
    ranks = ranks.double().cpu()
    metrics = {f"R@{k}": float((ranks <= k).double().mean() * 100.0) for k in RECALL_AT}
    ordered = ranks.sort().values
    middle = ordered.numel() // 2
    median = ordered[middle] if ordered.numel() % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    metrics["MdR"] = float(median)
    metrics["MnR"] = float(ranks.mean())
    return metrics


def t2v_metrics(sim: torch.Tensor, cap_to_vid: torch.Tensor, **kwargs: Any) -> dict[str, float]:
    """Text-to-video metrics: each caption (row of ``sim``) is a query over all videos (columns)."""
    return ranks_to_metrics(t2v_ranks(sim, cap_to_vid, **kwargs))


def v2t_metrics(
    sim: torch.Tensor, cap_to_vid: torch.Tensor, protocol: Literal["group", "any"] = "group", **kwargs: Any
) -> dict[str, float]:
    """Video-to-text metrics under the ``"group"`` (CLIP4Clip) or ``"any"`` (COCO-style) protocol."""
    return ranks_to_metrics(v2t_ranks(sim, cap_to_vid, protocol, **kwargs))


def dual_softmax(sim: torch.Tensor, temperature: float = 0.01, query_dim: int = 0) -> torch.Tensor:
    """Dual-softmax inference re-weighting (DSL, from CAMoE): ``sim * softmax(sim / temperature over query_dim)``.

    The prior says how strongly a candidate prefers this query over the other queries, which demotes "hub" candidates
    that are close to everything. ``query_dim=0`` re-weights ``[captions x videos]`` for T2V; use ``query_dim=1`` on the
    same matrix for V2T. It uses the whole query set at once (transductive), so report it only beside plain numbers.
    """
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D; got shape {tuple(sim.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    return sim * torch.softmax(sim.float() / temperature, dim=query_dim).to(sim.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# The Lightning callback
# ---------------------------------------------------------------------------------------------------------------------

VIDEO_LOADER, CAPTION_LOADER = 0, 1
_CONTRACT = {
    VIDEO_LOADER: ("videos", {"index": 1, "video_emb": 3, "video_mask": 2}),
    CAPTION_LOADER: ("captions", {"index": 1, "text_emb": 2, "video_index": 1}),
}


def _format_indices(indices: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in list(indices)[:limit])
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"


def _cat_padding_frames(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate batches along dim 0, zero-padding dim 1 (frames) to the longest; padded frames are masked out."""
    longest = max(p.shape[1] for p in pieces)
    padded = []
    for piece in pieces:
        if piece.shape[1] < longest:
            grown = piece.new_zeros((piece.shape[0], longest, *piece.shape[2:]))
            grown[:, : piece.shape[1]] = piece
            piece = grown
        padded.append(piece)
    return torch.cat(padded)


class RetrievalMetrics(Callback):
    """T2V / V2T retrieval metrics over the full validation / test set, correct under DDP.

    Contract with the LightningModule:

    * Two eval dataloaders: index 0 yields every video once, index 1 every caption once.
    * ``validation_step`` / ``test_step(batch, batch_idx, dataloader_idx)`` returns for videos
      ``{"index": (B,), "video_emb": (B, T, D), "video_mask": (B, T) bool}`` and for captions
      ``{"index": (B,), "text_emb": (B, D), "video_index": (B,)}``; ``index`` is the row in the dataset's video /
      caption table and ``video_index`` the caption's video row.
    * ``pl_module.similarity(text_emb (C, D), video_emb (V, T, D), video_mask (V, T)) -> (C, V)`` is the similarity
      head (mean pooling, text-conditioned pooling, ...); this callback never looks inside it.

    At epoch end the outputs of every process are gathered, the duplicates DistributedSampler pads with are dropped by
    dataset index, and indices must cover ``0..N-1`` (an error names the missing ones; a truncated run, i.e. the
    sanity check or ``limit_{val,test}_batches``, is evaluated on what ran, with a warning). Each process scores a
    share of the caption chunks and the similarity rows are all-gathered, so every process holds the same matrix and
    logs the same numbers (``rank_zero_only=False``: ``ModelCheckpoint`` can monitor ``val/t2v/R@1`` on every rank).

    Logged keys: ``{stage}/t2v/{R@1,R@5,R@10,MdR,MnR}``, ``{stage}/v2t/...`` (``v2t_protocol``; with ``"both"``,
    ``v2t`` is the group protocol and ``v2t_any`` the any protocol), ``{stage}/num_videos``, ``{stage}/num_captions``,
    optionally ``{stage}/{t2v,v2t}_dsl/...`` (dual softmax), ``{stage}/{subset}/t2v/...`` per evaluation subset and
    ``{stage}/{name}/accuracy`` per named set of hard pairs from the datamodule's ``eval_pairs(stage)`` (the synthetic
    order pairs: does a caption score its own clip above the time-reversed twin?).
    Nothing is logged or saved during the sanity check. Rank 0 writes ``{stage}_metrics.json`` to ``save_dir``.

    Args:
        v2t_protocol: ``"group"`` (CLIP4Clip), ``"any"`` (COCO style) or ``"both"``.
        chunk_size: captions per ``similarity`` call.
        video_chunk_size: videos per ``similarity`` call (``None``: all at once); bounds the memory of
            text-conditioned heads, which build a (captions x videos x frames) tensor.
        save_dir: where the JSON goes; default ``trainer.log_dir`` (falls back to ``trainer.default_root_dir``).
        extra_subsets: name -> caption indices whose T2V metrics (against all videos) are reported as well. Subsets
            from ``eval_subsets()`` on the datamodule (else the module) are added; that method may take the stage
            (``"val"`` or ``"test"``) as its one argument.
        report_dual_softmax: also report DSL re-weighted T2V / V2T numbers beside the plain ones.
        dual_softmax_temperature: the DSL softmax temperature (0.01 = CLIP's logit scale of 100).
    """

    def __init__(
        self,
        v2t_protocol: Literal["group", "any", "both"] = "group",
        chunk_size: int = 1024,
        video_chunk_size: int | None = None,
        save_dir: str | None = None,
        extra_subsets: Mapping[str, Sequence[int]] | None = None,
        report_dual_softmax: bool = False,
        dual_softmax_temperature: float = 0.01,
    ) -> None:
        super().__init__()
        if v2t_protocol not in ("group", "any", "both"):
            raise ValueError(f"v2t_protocol must be 'group', 'any' or 'both'; got {v2t_protocol!r}")
        if chunk_size < 1 or (video_chunk_size is not None and video_chunk_size < 1):
            raise ValueError(
                f"chunk sizes must be >= 1; got chunk_size={chunk_size}, video_chunk_size={video_chunk_size}"
            )
        self.v2t_protocol = v2t_protocol
        self.chunk_size = chunk_size
        self.video_chunk_size = video_chunk_size
        self.save_dir = save_dir
        self.extra_subsets = dict(extra_subsets or {})
        self.report_dual_softmax = report_dual_softmax
        self.dual_softmax_temperature = dual_softmax_temperature
        self.last_metrics: dict[str, dict[str, float]] = {}
        self._outputs: dict[int, list[dict[str, torch.Tensor]]] = {VIDEO_LOADER: [], CAPTION_LOADER: []}
        self._embedding_dtype: dict[str, torch.dtype] = {}

    # -- collection ----------------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._outputs = {VIDEO_LOADER: [], CAPTION_LOADER: []}

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, dataloader_idx, "validation_step")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, dataloader_idx, "test_step")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate(trainer, pl_module, "test")

    def _collect(self, outputs: Any, dataloader_idx: int, step_name: str) -> None:
        if dataloader_idx not in _CONTRACT:
            raise ValueError(
                f"RetrievalMetrics expects two eval dataloaders (0 = videos, 1 = captions); {step_name} ran on "
                f"dataloader_idx={dataloader_idx}"
            )
        what, expected = _CONTRACT[dataloader_idx]
        if not isinstance(outputs, Mapping) or any(key not in outputs for key in expected):
            got = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise ValueError(
                f"{step_name} on dataloader {dataloader_idx} ({what}) must return a dict with keys {sorted(expected)} "
                f"for RetrievalMetrics; got {got}"
            )
        row = {}
        for key, ndim in expected.items():
            value = outputs[key]
            if not isinstance(value, torch.Tensor) or value.ndim != ndim:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{step_name} ({what}): {key!r} must be a {ndim}-D tensor; got {shape}")
            row[key] = value.detach().cpu()
        sizes = {key: value.shape[0] for key, value in row.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{step_name} ({what}): the returned tensors disagree on the batch size: {sizes}")
        for key in ("video_emb", "text_emb"):
            if key in row:
                self._embedding_dtype.setdefault(key, row[key].dtype)
        self._outputs[dataloader_idx].append(row)

    # -- gathering -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _all_gather_rows(trainer: Trainer, pl_module: LightningModule, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate ``tensor`` from every process in rank order; sizes may differ (padded to the largest, then
        stripped). Trailing dims are zero-padded to the largest too. Returns a CPU tensor."""
        if trainer.world_size == 1:
            return tensor.cpu()
        device = pl_module.device
        local = tensor.to(device)
        shapes = pl_module.all_gather(torch.tensor(local.shape, dtype=torch.long, device=device)).cpu()
        largest = shapes.max(dim=0).values.tolist()
        padded = local.new_zeros(largest)
        padded[tuple(slice(0, size) for size in local.shape)] = local
        gathered = pl_module.all_gather(padded)  # [world_size, *largest]
        return torch.cat([gathered[rank, : int(shapes[rank, 0])] for rank in range(trainer.world_size)]).cpu()

    def _gather_table(self, trainer: Trainer, pl_module: LightningModule, loader: int) -> dict[str, torch.Tensor]:
        """All rows of one dataloader from every process, de-duplicated and sorted by dataset index."""
        _, expected = _CONTRACT[loader]
        rows = self._outputs[loader]
        table = {}
        for key, ndim in expected.items():
            if rows:
                pieces = [row[key] for row in rows]
                local = _cat_padding_frames(pieces) if key in ("video_emb", "video_mask") else torch.cat(pieces)
            else:  # a process that saw no batch still takes part in every collective
                local = torch.zeros((0,) * ndim)
            # One dtype per key on every process (collectives need it): long ids, float32 embeddings, uint8 masks.
            if key in ("index", "video_index"):
                local = local.long()
            elif key == "video_mask":
                local = local.to(torch.uint8)
            else:
                local = local.float()
            table[key] = self._all_gather_rows(trainer, pl_module, local)
        if "video_mask" in table:
            table["video_mask"] = table["video_mask"].bool()

        order = torch.argsort(table["index"], stable=True)
        sorted_index = table["index"][order]
        first = torch.ones_like(sorted_index, dtype=torch.bool)
        first[1:] = sorted_index[1:] != sorted_index[:-1]
        keep = order[first]
        return {key: value[keep] for key, value in table.items()}

    @staticmethod
    def _dataset_length(trainer: Trainer, stage: str, loader: int) -> int | None:
        """Length of the dataset behind an eval dataloader, or None when it cannot be known."""
        if stage == "test":
            loop = trainer.test_loop
        elif trainer.state.fn == TrainerFn.VALIDATING:
            loop = trainer.validate_loop
        else:
            loop = trainer.fit_loop.epoch_loop.val_loop
        combined = getattr(loop, "_combined_loader", None)
        loaders = combined.iterables if combined is not None else None
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        elif not isinstance(loaders, Sequence):
            loaders = [loaders]
        try:
            return len(loaders[loader].dataset)
        except (AttributeError, IndexError, TypeError):
            return None

    def _check_complete(
        self, trainer: Trainer, stage: str, loader: int, index: torch.Tensor, truncated: bool
    ) -> tuple[int, bool]:
        """Expected table size and whether ``index`` (sorted, unique) covers all of it."""
        what = _CONTRACT[loader][0]
        length = self._dataset_length(trainer, stage, loader)
        seen_max = int(index.max()) + 1 if index.numel() else 0
        if length is not None and seen_max > length:
            raise ValueError(
                f"{stage}: the {what} dataloader returned index {seen_max - 1}, but its dataset has {length} rows; "
                f"'index' must be the row in the dataset's table"
            )
        expected = length if length is not None else seen_max
        if index.numel() and int(index.min()) < 0:
            raise ValueError(f"{stage}: the {what} dataloader returned negative index {int(index.min())}")
        if index.numel() == 0 and not truncated:
            raise ValueError(
                f"{stage}: no {what} came back from the eval steps; RetrievalMetrics needs two eval dataloaders "
                f"(0 = videos, 1 = captions) whose steps return the embeddings"
            )
        complete = index.numel() == expected
        if not complete and not truncated:
            present = torch.zeros(expected, dtype=torch.bool)
            present[index] = True
            missing = (~present).nonzero().flatten().tolist()
            raise ValueError(
                f"{stage}: {len(missing)} of {expected} {what} never came back from the eval steps, dataset indices "
                f"{_format_indices(missing)}. Every {what[:-1]} must be evaluated exactly once (check the sampler and "
                f"that the step returns every row of its batch)."
            )
        return expected, complete

    # -- evaluation ----------------------------------------------------------------------------------------------------

    def _similarity(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        text_emb: torch.Tensor,
        video_emb: torch.Tensor,
        video_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Full [captions x videos] matrix on CPU; each process computes a contiguous share of the caption chunks."""
        similarity = getattr(pl_module, "similarity", None)
        if not callable(similarity):
            raise TypeError(
                f"{type(pl_module).__name__} has no similarity(text_emb, video_emb, video_mask) -> (C, V) method, "
                f"which RetrievalMetrics uses to score captions against videos"
            )
        num_captions, num_videos = text_emb.shape[0], video_emb.shape[0]
        share = math.ceil(num_captions / trainer.world_size)
        start = min(trainer.global_rank * share, num_captions)
        stop = min(start + share, num_captions)
        device = pl_module.device
        video_emb = video_emb.to(device, self._embedding_dtype.get("video_emb", torch.float32))
        video_mask = video_mask.to(device)
        text_dtype = self._embedding_dtype.get("text_emb", torch.float32)
        video_step = self.video_chunk_size or num_videos
        rows = []
        with torch.no_grad(), trainer.precision_plugin.val_step_context():
            for chunk_start in range(start, stop, self.chunk_size):
                text = text_emb[chunk_start : min(chunk_start + self.chunk_size, stop)].to(device, text_dtype)
                block = torch.cat(
                    [
                        similarity(text, video_emb[v : v + video_step], video_mask[v : v + video_step])
                        for v in range(0, num_videos, video_step)
                    ],
                    dim=1,
                )
                if block.shape != (text.shape[0], num_videos):
                    raise ValueError(
                        f"{type(pl_module).__name__}.similarity returned shape {tuple(block.shape)} for "
                        f"{text.shape[0]} captions and {num_videos} videos; expected (captions, videos)"
                    )
                rows.append(block.float())
        local = torch.cat(rows) if rows else torch.zeros((0, num_videos), device=device)
        return self._all_gather_rows(trainer, pl_module, local)

    def _subsets(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> dict[str, Sequence[int]]:
        subsets = dict(self.extra_subsets)
        for owner in (getattr(trainer, "datamodule", None), pl_module):
            provider = getattr(owner, "eval_subsets", None)
            if callable(provider):
                takes_stage = len(inspect.signature(provider).parameters) > 0
                subsets.update(provider(stage) if takes_stage else provider())
                break
        return subsets

    @staticmethod
    def _pairs(trainer: Trainer, stage: str) -> dict[str, Sequence[tuple[int, int, int]]]:
        """Named (caption, video, hard-negative video) triples from the datamodule's ``eval_pairs(stage)``, if any."""
        provider = getattr(getattr(trainer, "datamodule", None), "eval_pairs", None)
        return provider(stage) if callable(provider) else {}

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        videos = self._gather_table(trainer, pl_module, VIDEO_LOADER)
        captions = self._gather_table(trainer, pl_module, CAPTION_LOADER)
        self._reset()

        limit = trainer.limit_val_batches if stage == "val" else trainer.limit_test_batches
        truncated = trainer.sanity_checking or not (isinstance(limit, float) and limit == 1.0)
        num_videos, videos_complete = self._check_complete(trainer, stage, VIDEO_LOADER, videos["index"], truncated)
        num_captions, captions_complete = self._check_complete(
            trainer, stage, CAPTION_LOADER, captions["index"], truncated
        )
        complete = videos_complete and captions_complete
        bad_video = (captions["video_index"] < 0) | (captions["video_index"] >= num_videos)
        if bad_video.any():
            caption = int(captions["index"][bad_video.nonzero()[0, 0]])
            raise ValueError(
                f"{stage}: caption {caption} has video_index {int(captions['video_index'][bad_video][0])}, outside the "
                f"{num_videos} videos of the video dataloader"
            )

        # Row of each dataset index in the gathered tables (all rows when complete).
        video_row = torch.full((num_videos,), -1, dtype=torch.long)
        caption_row = torch.full((num_captions,), -1, dtype=torch.long)
        if not complete:
            # Keep the captions whose video ran and the videos that have such a caption, so that V2T is defined.
            has_video = torch.zeros(num_videos, dtype=torch.bool)
            has_video[videos["index"]] = True
            captions = {k: v[has_video[captions["video_index"]]] for k, v in captions.items()}
            has_caption = torch.zeros(num_videos, dtype=torch.bool)
            has_caption[captions["video_index"]] = True
            videos = {k: v[has_caption[videos["index"]]] for k, v in videos.items()}
            if captions["index"].numel() == 0:
                rank_zero_warn(f"RetrievalMetrics: no caption of the videos that ran in this truncated {stage} run.")
                return
            if not trainer.sanity_checking:
                rank_zero_warn(
                    f"RetrievalMetrics: {stage} ran on part of the set (limit_{stage}_batches={limit}); the metrics use "
                    f"{videos['index'].numel()} of {num_videos} videos and {captions['index'].numel()} of "
                    f"{num_captions} captions and are not comparable with full-set numbers."
                )
        video_row[videos["index"]] = torch.arange(videos["index"].numel())
        caption_row[captions["index"]] = torch.arange(captions["index"].numel())
        cap_to_vid = video_row[captions["video_index"]]

        sim = self._similarity(trainer, pl_module, captions["text_emb"], videos["video_emb"], videos["video_mask"])
        metrics = self.compute(sim, cap_to_vid)
        for name, indices in self._subsets(trainer, pl_module, stage).items():
            rows = torch.as_tensor(list(indices), dtype=torch.long).unique()
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_captions):
                raise ValueError(
                    f"{stage}: evaluation subset {name!r} holds caption index outside 0..{num_captions - 1}"
                )
            rows = caption_row[rows]
            rows = rows[rows >= 0]
            if rows.numel() == 0:
                rank_zero_warn(f"RetrievalMetrics: evaluation subset {name!r} has no caption in this {stage} run.")
                continue
            for key, value in t2v_metrics(sim[rows], cap_to_vid[rows]).items():
                metrics[f"{name}/t2v/{key}"] = value
            metrics[f"{name}/num_captions"] = float(rows.numel())
        for name, triples in self._pairs(trainer, stage).items():
            # (caption, its video, a hard negative): the share of captions scoring their own video strictly higher;
            # a tie counts as a miss, as in the pessimistic rank rule above
            t = torch.as_tensor(list(triples), dtype=torch.long).view(-1, 3)
            rows, pos, neg = caption_row[t[:, 0]], video_row[t[:, 1]], video_row[t[:, 2]]
            keep = (rows >= 0) & (pos >= 0) & (neg >= 0)
            if keep.any():
                rows, pos, neg = rows[keep], pos[keep], neg[keep]
                metrics[f"{name}/accuracy"] = 100.0 * float((sim[rows, pos] > sim[rows, neg]).float().mean())
                metrics[f"{name}/num_pairs"] = float(rows.numel())
        metrics["num_videos"] = float(sim.shape[1])
        metrics["num_captions"] = float(sim.shape[0])

        if trainer.sanity_checking:
            return
        for key, value in metrics.items():
            pl_module.log(
                f"{stage}/{key}",
                value,
                on_step=False,
                on_epoch=True,
                sync_dist=False,
                rank_zero_only=False,
                add_dataloader_idx=False,
            )
        self.last_metrics[stage] = metrics
        save_dir = self.save_dir or trainer.log_dir or trainer.default_root_dir  # log_dir is collective: all ranks
        if trainer.is_global_zero:
            payload = {
                "stage": stage,
                "metrics": metrics,
                "num_videos": int(sim.shape[1]),
                "num_captions": int(sim.shape[0]),
                "v2t_protocol": self.v2t_protocol,
                "complete": complete,
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
            }
            if self.report_dual_softmax:
                payload["dual_softmax_temperature"] = self.dual_softmax_temperature
            write_json_atomic(os.path.join(save_dir, f"{stage}_metrics.json"), payload, sort_keys=True)

    def compute(self, sim: torch.Tensor, cap_to_vid: torch.Tensor) -> dict[str, float]:
        """The flat metric dict for one similarity matrix (keys like ``t2v/R@1``, ``v2t/MdR``)."""
        protocols = ["group", "any"] if self.v2t_protocol == "both" else [self.v2t_protocol]
        metrics = {f"t2v/{k}": v for k, v in t2v_metrics(sim, cap_to_vid).items()}
        for position, protocol in enumerate(protocols):
            prefix = "v2t" if position == 0 else f"v2t_{protocol}"
            metrics.update({f"{prefix}/{k}": v for k, v in v2t_metrics(sim, cap_to_vid, protocol).items()})
        if self.report_dual_softmax:
            t2v_dsl = dual_softmax(sim, self.dual_softmax_temperature, query_dim=0)
            metrics.update({f"t2v_dsl/{k}": v for k, v in t2v_metrics(t2v_dsl, cap_to_vid).items()})
            v2t_dsl = dual_softmax(sim, self.dual_softmax_temperature, query_dim=1)
            metrics.update({f"v2t_dsl/{k}": v for k, v in v2t_metrics(v2t_dsl, cap_to_vid, protocols[0]).items()})
        return metrics
