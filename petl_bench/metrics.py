"""Retrieval metrics for text-video benchmarks, inference-time post-processing, and the Lightning callback.

Three layers:

* Pure functions on a similarity matrix ``sim`` of shape ``[num_captions x num_videos]`` and ``cap_to_vid`` (the
  video column of each caption): :func:`t2v_metrics`, :func:`v2t_metrics` and their per-query ``*_ranks``. Tensors
  in, python floats out.
* Post-processing (:func:`dual_softmax`, :func:`querybank_normalise`, :func:`sinkhorn_normalise`, dispatched by
  :func:`postprocess`): score transforms some papers apply before ranking. They are a labelled axis of the report,
  never the headline (see "Post-processing" below).
* :class:`RetrievalMetrics`, a callback that accumulates the embeddings the ``RetrievalModule`` returns from its
  validation/test steps in torchmetrics :class:`EmbeddingTable` metrics (synchronised across processes, de-duplicated
  by dataset index), scores all captions against all videos in chunks through ``pl_module.similarity`` and logs /
  saves the numbers.

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
On tie-free matrices the ranks agree with torchmetrics' retrieval metrics (``RetrievalRecall``, ``RetrievalMRR``;
cross-checked in tests/test_metrics.py); the rank functions stay the suite's own for the tie rule and the protocols.

Non-finite similarities are an error, not a silently dropped query (reference scripts drop NaN rows in T2V and so
report recall over fewer queries than the test set has).

Post-processing (issue 15): ``none`` is the headline and is always computed. ``dsl``, ``qb_norm`` and ``sinkhorn`` are
opt-in (``RetrievalMetrics(postprocessing=[...])``, ``--metrics.postprocessing``), reported under their own keys
(``test/dsl/t2v/R@1``) beside the plain numbers, which they never change. Their parameters are fixed in the config, or,
given as a list, chosen on the *validation* similarity (:func:`choose_parameters`, called only in the validation
stage) and reused at test; the test matrix never reaches the choice. Each direction is post-processed on its own: the
T2V matrix treats captions (rows) as queries, the V2T matrix videos (columns); both are then ranked with the rules
above.

* ``dsl`` -- dual softmax. The paper states (CAMoE, Cheng et al. 2021, arXiv 2109.04290, "Dual Softmax Loss"): the
  similarity is multiplied by a prior, the softmax of the similarity over the *other* queries (temperature-scaled),
  which demotes candidates close to every query. It is transductive: each test query's score depends on all the other
  test queries. The suite chose: temperature 0.01 (CLIP's logit scale of 100) unless configured.
* ``qb_norm`` -- querybank normalisation with the Dynamic Inverted Softmax. The paper states (Bogolin et al., "Cross
  Modal Retrieval with Querybank Normalisation", CVPR 2022): a bank of *training* queries is scored against the
  gallery; a test query whose top-1 gallery item is in the activation set (items in the top-k of some bank query) has
  its scores replaced by ``exp(beta s) / sum_bank exp(beta s_bank)`` per gallery item; other queries keep their raw
  scores. The release (ioanacroi/qb-norm, ``dynamic_inverted_softmax.py``) defaults to k=1, beta=20 and works in the
  exp domain. The suite chose: the log domain (``beta s - logsumexp``, the same order without overflow); the bank is
  a seeded subset of the training split (captions for T2V, videos for V2T) embedded by the evaluated model at
  evaluation time (the datamodule's ``querybank_dataloaders``); k=1, beta=20 on the cosine unless configured. Beware:
  some released codebases (DGL, STOP: ``search_for_best_r1_with_qb_norm.py``) grid-search beta on the *test* matrix by
  test R@1 and add an occurrence threshold theta to the activation set; the suite does neither.
* ``sinkhorn`` -- Sinkhorn-Knopp normalisation, as UCoFiA (Wang et al., ICCV 2023) uses it at inference. The release
  (Ziyang412/UCoFiA, ``eval_t2v/main_ucofia.py``) runs 4 Sinkhorn-Knopp iterations (rows then columns summing to one)
  on ``exp(logits)`` of *training captions x test videos* and adds the log column scaling to every test caption's
  logits as a per-video bias, so videos every caption likes are demoted; that bias leaves V2T unchanged. The suite
  chose: the same bias computed in the log domain (equal up to a constant, which ranks ignore) with logits = cosine /
  temperature (0.01, CLIP's logit scale), 4 iterations; V2T gets the symmetric per-caption bias from a bank of training
  videos.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

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


def streamed_ranks(
    similarity: Any,
    text_emb: torch.Tensor,
    video_emb: torch.Tensor,
    video_mask: torch.Tensor,
    cap_to_vid: torch.Tensor,
    chunk_size: int = 1024,
    max_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T2V ranks [num_captions] and V2T ``"group"`` ranks [num_videos] without the full similarity matrix.

    ``similarity(text, video, mask) -> (C, V)`` scores caption chunks against every video; the ranks are those of
    :func:`t2v_ranks` / :func:`v2t_ranks` on the full matrix (same tie rule). Working memory is one chunk's rows
    instead of ``num_captions x num_videos`` floats (1.6 GB at 20k x 20k), at the price of scoring twice: pass 1 ranks
    the captions and finds each video's best ground-truth score, pass 2 counts, per video, the caption groups with a
    caption scoring at least that. Chunks end at group boundaries (captions are visited grouped by video), so a group
    is counted once. A chunk is recomputed identically in both passes (same inputs, same shapes).
    ``max_chunks`` stops each pass after that many chunks (cost measurements only: the ranks are then incomplete).
    """
    num_captions, num_videos = text_emb.shape[0], video_emb.shape[0]
    cap_to_vid = cap_to_vid.long().to(text_emb.device)
    if cap_to_vid.shape != (num_captions,) or bool(((cap_to_vid < 0) | (cap_to_vid >= num_videos)).any()):
        raise ValueError(f"cap_to_vid must hold one video column in 0..{num_videos - 1} per caption")
    _require_caption_per_video(cap_to_vid, num_videos)
    order = torch.argsort(cap_to_vid, stable=True)
    sorted_vid = cap_to_vid[order]
    bounds, start = [], 0
    while start < num_captions:
        stop = min(start + chunk_size, num_captions)
        if stop < num_captions:  # extend to the end of the last group in the chunk
            stop = int(torch.searchsorted(sorted_vid, sorted_vid[stop - 1], right=True))
        bounds.append((start, stop))
        start = stop
    bounds = bounds[:max_chunks] if max_chunks else bounds

    def scores(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = order[start:stop]
        block = similarity(text_emb[idx], video_emb, video_mask)
        if not bool(torch.isfinite(block).all()):
            raise ValueError(f"similarity has non-finite entries for captions {idx[:5].tolist()}...; check the "
                             "embeddings for NaN (e.g. fp16 overflow, a zero-norm vector being normalised)")
        return idx, block

    t2v = torch.empty(num_captions, dtype=torch.long)
    best_truth = torch.full((num_videos,), -math.inf, device=text_emb.device)
    for start, stop in bounds:
        idx, block = scores(start, stop)
        truth = block.gather(1, cap_to_vid[idx, None])
        t2v[idx.cpu()] = (block >= truth).sum(dim=1).cpu()
        best_truth = best_truth.to(block.dtype)
        best_truth.scatter_reduce_(0, cap_to_vid[idx], truth[:, 0], reduce="amax")
    v2t = torch.zeros(num_videos, dtype=torch.long, device=text_emb.device)
    for start, stop in bounds:
        idx, block = scores(start, stop)
        _, group = torch.unique_consecutive(cap_to_vid[idx], return_inverse=True)
        hits = (block >= best_truth[None, :]).to(torch.uint8)
        group_hits = torch.zeros(int(group.max()) + 1, num_videos, dtype=torch.uint8, device=block.device)
        group_hits.scatter_reduce_(0, group[:, None].expand_as(hits), hits, reduce="amax")
        v2t += group_hits.sum(dim=0)
    return t2v, v2t.cpu()


# ---------------------------------------------------------------------------------------------------------------------
# Post-processing (a labelled axis beside the plain numbers; see the module docstring for the papers and releases)
# ---------------------------------------------------------------------------------------------------------------------

# name -> its parameters, in the order a grid is enumerated
POSTPROCESSINGS: dict[str, tuple[str, ...]] = {
    "dsl": ("temperature",),
    "qb_norm": ("k", "beta"),
    "sinkhorn": ("temperature", "iterations"),
}
# these score the test gallery against a bank of training queries
NEEDS_BANK = frozenset({"qb_norm", "sinkhorn"})


def dual_softmax(sim: torch.Tensor, temperature: float = 0.01, query_dim: int = 0) -> torch.Tensor:
    """Dual-softmax inference re-weighting (DSL, CAMoE): ``sim * softmax(sim / temperature over query_dim)``.

    The prior says how strongly a candidate prefers this query over the other queries, which demotes "hub" candidates
    that are close to everything. ``query_dim=0`` re-weights ``[captions x videos]`` for T2V; use ``query_dim=1`` on the
    same matrix for V2T. It uses the whole query set at once (transductive), so report it only beside plain numbers.
    """
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D; got shape {tuple(sim.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    return sim * torch.softmax(sim.float() / temperature, dim=query_dim).to(sim.dtype)


def _check_bank(sim: torch.Tensor, bank_sim: torch.Tensor | None, name: str) -> torch.Tensor:
    if bank_sim is None:
        raise ValueError(f"{name} needs the similarity of a bank of training queries to the gallery; got none")
    if bank_sim.ndim != 2 or bank_sim.shape[1] != sim.shape[1] or bank_sim.shape[0] == 0:
        raise ValueError(
            f"{name}: the bank similarity must be [bank queries x {sim.shape[1]} gallery items]; got "
            f"{tuple(bank_sim.shape)}"
        )
    return bank_sim


def querybank_normalise(sim: torch.Tensor, bank_sim: torch.Tensor, k: int = 1, beta: float = 20.0) -> torch.Tensor:
    """QB-Norm with the Dynamic Inverted Softmax (Bogolin et al., CVPR 2022); rows of ``sim`` are queries.

    ``bank_sim`` is ``[bank queries x gallery]``, the bank drawn from training queries. Rows whose top-1 gallery item
    is in the bank's top-k activation set become ``beta * s - logsumexp_bank(beta * s_bank)`` (the log of the paper's
    inverted softmax: the same order, no overflow); the other rows keep ``sim``. Each row is ranked on its own, so a
    row's scale never meets another's. Returns float64.
    """
    _check_bank(sim, bank_sim, "qb_norm")
    if k < 1 or beta <= 0:
        raise ValueError(f"qb_norm needs k >= 1 and beta > 0; got k={k}, beta={beta}")
    sim, bank_sim = sim.double(), bank_sim.double()
    active = torch.zeros(sim.shape[1], dtype=torch.bool, device=sim.device)
    active[bank_sim.topk(min(int(k), sim.shape[1]), dim=1).indices.flatten()] = True
    log_norm = torch.logsumexp(beta * bank_sim, dim=0)
    rows = active[sim.argmax(dim=1)]
    out = sim.clone()
    out[rows] = beta * sim[rows] - log_norm
    return out


def sinkhorn_bias(bank_sim: torch.Tensor, temperature: float = 0.01, iterations: int = 4) -> torch.Tensor:
    """Log column scaling of Sinkhorn-Knopp on ``exp(bank_sim / temperature)`` ([bank queries x gallery] -> [gallery]).

    Starts with a column normalisation, then ``iterations`` times rows-to-one and columns-to-one, all in the log
    domain (UCoFiA's schedule, see the module docstring).
    """
    if temperature <= 0 or iterations < 0:
        raise ValueError(f"sinkhorn needs temperature > 0 and iterations >= 0; got {temperature}, {iterations}")
    logits = bank_sim.double() / temperature
    log_col = -torch.logsumexp(logits, dim=0)
    for _ in range(int(iterations)):
        log_row = -torch.logsumexp(logits + log_col[None, :], dim=1)
        log_col = -torch.logsumexp(logits + log_row[:, None], dim=0)
    return log_col


def sinkhorn_normalise(
    sim: torch.Tensor, bank_sim: torch.Tensor, temperature: float = 0.01, iterations: int = 4
) -> torch.Tensor:
    """``sim / temperature`` plus the per-gallery-item Sinkhorn bias of the bank (rows of ``sim`` are queries)."""
    _check_bank(sim, bank_sim, "sinkhorn")
    return sim.double() / temperature + sinkhorn_bias(bank_sim, temperature, iterations)[None, :]


def postprocess(
    name: str,
    sim: torch.Tensor,
    params: Mapping[str, Any],
    t2v_bank: torch.Tensor | None = None,
    v2t_bank: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The post-processed ``[captions x videos]`` matrices to rank for T2V and for V2T.

    ``t2v_bank``: training captions x the videos; ``v2t_bank``: training videos x the captions (only ``qb_norm`` and
    ``sinkhorn`` use them). V2T treats videos as queries, so it works on the transpose and transposes back.
    """
    if name == "dsl":
        return dual_softmax(sim, params["temperature"], 0), dual_softmax(sim, params["temperature"], 1)
    if name == "qb_norm":
        k, beta = params["k"], params["beta"]
        return querybank_normalise(sim, t2v_bank, k, beta), querybank_normalise(sim.T, v2t_bank, k, beta).T
    if name == "sinkhorn":
        t, n = params["temperature"], params["iterations"]
        return sinkhorn_normalise(sim, t2v_bank, t, n), sinkhorn_normalise(sim.T, v2t_bank, t, n).T
    raise ValueError(f"unknown post-processing {name!r}; choose from {sorted(POSTPROCESSINGS)}")


def parameter_grid(options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the options; a scalar is a one-value list (so a fully fixed config gives one entry)."""
    names = list(options)
    values = [list(v) if isinstance(v, (list, tuple)) else [v] for v in options.values()]
    if any(not v for v in values):
        raise ValueError(f"post-processing parameters need at least one value each; got {dict(options)}")
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def choose_parameters(
    name: str,
    grid: Sequence[Mapping[str, Any]],
    sim: torch.Tensor,
    cap_to_vid: torch.Tensor,
    t2v_bank: torch.Tensor | None = None,
    v2t_bank: torch.Tensor | None = None,
    v2t_protocol: Literal["group", "any"] = "group",
) -> tuple[dict[str, Any], float]:
    """The grid entry with the best T2V R@1 + V2T R@1 on ``sim`` (first in grid order on a tie), and that sum.

    The callback calls this with the *validation* similarity only; test numbers are then computed once with the
    chosen entry. Never call it on a test matrix.
    """
    best, best_score = None, -math.inf
    for params in grid:
        t2v, v2t = postprocess(name, sim, params, t2v_bank, v2t_bank)
        score = t2v_metrics(t2v, cap_to_vid)["R@1"] + v2t_metrics(v2t, cap_to_vid, v2t_protocol)["R@1"]
        if score > best_score:
            best, best_score = dict(params), score
    return best, best_score


# ---------------------------------------------------------------------------------------------------------------------
# Accumulation and synchronisation: a torchmetrics Metric
# ---------------------------------------------------------------------------------------------------------------------

VIDEO_LOADER, CAPTION_LOADER = 0, 1
# loader -> (what it holds, {returned key: ndim})
_CONTRACT = {
    VIDEO_LOADER: ("videos", {"index": 1, "video_emb": 3, "video_mask": 2}),
    CAPTION_LOADER: ("captions", {"index": 1, "text_emb": 2, "video_index": 1}),
}
# One dtype per key on every process (collectives need it): long ids, uint8 masks, float32 embeddings.
_STATE_DTYPE = {"index": torch.long, "video_index": torch.long, "video_mask": torch.uint8}


def _pad_frames(tensor: torch.Tensor, frames: int) -> torch.Tensor:
    """Zero-pad dim 1 (frames) to ``frames``; padded frames are masked out."""
    if tensor.shape[1] >= frames:
        return tensor
    grown = tensor.new_zeros((tensor.shape[0], frames, *tensor.shape[2:]))
    grown[:, : tensor.shape[1]] = tensor
    return grown


class EmbeddingTable(Metric):
    """The rows one eval dataloader returned (videos or captions), from every process, one row per dataset index.

    States are lists with ``dist_reduce_fx="cat"``: ``compute`` gathers them from all processes (torchmetrics pads
    uneven sizes), then keeps the first row of each dataset index (DistributedSampler pads its shards with
    duplicates) in index order. Frames (dim 1 of the video tensors) are zero-padded to the longest seen.
    """

    full_state_update = False

    def __init__(self, columns: Mapping[str, int]) -> None:
        super().__init__(compute_with_cache=False)
        self.columns = dict(columns)
        for name in self.columns:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, **rows: torch.Tensor) -> None:
        for name, ndim in self.columns.items():
            value = rows[name].detach().to(_STATE_DTYPE.get(name, torch.float32))
            stored = getattr(self, name)
            if ndim > 1 and stored and value.shape[1] != stored[0].shape[1]:
                frames = max(value.shape[1], stored[0].shape[1])
                stored[:] = [_pad_frames(t, frames) for t in stored]
                value = _pad_frames(value, frames)
            stored.append(value)

    def _fill_empty(self) -> None:
        # a process that saw no batch still joins every collective, with tensors of the right rank and dtype
        for name, ndim in self.columns.items():
            state = getattr(self, name)
            if isinstance(state, list) and not state:
                dtype = _STATE_DTYPE.get(name, torch.float32)
                state.append(torch.zeros((0,) * ndim, dtype=dtype, device=self.device))

    def sync(self, *args: Any, **kwargs: Any) -> None:
        self._fill_empty()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # cat across processes needs one frame count: agree on the largest first
            for name, ndim in self.columns.items():
                if ndim > 1:
                    state = getattr(self, name)
                    frames = torch.tensor(max(t.shape[1] for t in state), device=self.device)
                    torch.distributed.all_reduce(frames, op=torch.distributed.ReduceOp.MAX)
                    state[:] = [_pad_frames(t, int(frames)) for t in state]
        super().sync(*args, **kwargs)

    def compute(self) -> dict[str, torch.Tensor]:
        self._fill_empty()
        table = {name: dim_zero_cat(getattr(self, name)) for name in self.columns}
        if "video_mask" in table:
            table["video_mask"] = table["video_mask"].bool()
        order = torch.argsort(table["index"], stable=True)
        first = torch.ones_like(order, dtype=torch.bool)
        first[1:] = table["index"][order][1:] != table["index"][order][:-1]
        keep = order[first]
        return {name: value[keep] for name, value in table.items()}


def _compute_table(table: EmbeddingTable, device: torch.device) -> dict[str, torch.Tensor]:
    """Gather (on ``device``: NCCL needs it), de-duplicate, reset; the rows come back on the CPU."""
    table.to(device)
    with warnings.catch_warnings():
        # a process (or a truncated run) without a batch is handled by `_fill_empty`
        warnings.filterwarnings("ignore", message=".*called before the ``update`` method.*")
        rows = {name: value.cpu() for name, value in table.compute().items()}
    table.reset()
    table.to("cpu")
    return rows


def _gather_rows(trainer: Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process in rank order (sizes may differ); a CPU tensor."""
    if trainer.world_size == 1:
        return tensor.cpu()
    return torch.cat([piece.cpu() for piece in gather_all_tensors(tensor.contiguous())])


# ---------------------------------------------------------------------------------------------------------------------
# The Lightning callback
# ---------------------------------------------------------------------------------------------------------------------


def _format_indices(indices: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in list(indices)[:limit])
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"


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

    The step outputs go into two :class:`EmbeddingTable` metrics; at epoch end torchmetrics gathers them from every
    process, the duplicates DistributedSampler pads with are dropped by dataset index, and indices must cover
    ``0..N-1`` (an error names the missing ones; a truncated run, i.e. the sanity check or ``limit_{val,test}_batches``,
    is evaluated on what ran, with a warning). Each process scores a share of the caption chunks and the similarity
    rows are all-gathered, so every process holds the same matrix and logs the same numbers (``rank_zero_only=False``:
    ``ModelCheckpoint`` can monitor ``val/t2v/R@1`` on every rank).

    Logged keys: ``{stage}/t2v/{R@1,R@5,R@10,MdR,MnR}``, ``{stage}/v2t/...`` (``v2t_protocol``; with ``"both"``,
    ``v2t`` is the group protocol and ``v2t_any`` the any protocol), ``{stage}/num_videos``, ``{stage}/num_captions``,
    ``{stage}/{subset}/t2v/...`` per evaluation subset, ``{stage}/{name}/accuracy`` per named set of hard pairs from the
    datamodule's ``eval_pairs(stage)`` (the synthetic order pairs: does a caption score its own clip above the
    time-reversed twin?), and per requested post-processing ``{stage}/{dsl,qb_norm,sinkhorn}/{t2v,v2t,v2t_any}/...``
    beside (never instead of) the plain numbers. Nothing is logged or saved during the sanity check. Rank 0 writes
    ``{stage}_metrics.json`` to ``save_dir``, with the parameters each post-processing used and where they came from.

    Post-processing parameters: a scalar is fixed; a list is a grid whose entry is chosen on the validation similarity
    (T2V + V2T R@1) at each validation epoch end and reused at test. A grid with no validation choice yet is not
    reported at test (a warning says so): it is never chosen on the test set. ``qb_norm`` and ``sinkhorn`` need a bank
    of training queries: the datamodule's ``querybank_dataloaders(num_captions, num_videos, seed, rank, world_size)``
    gives this process's share of a seeded subset of the *training* split as ``[videos, captions]`` loaders; the
    callback embeds them with the stage's step (the model being evaluated) and scores them with ``similarity``.

    Args:
        v2t_protocol: ``"group"`` (CLIP4Clip), ``"any"`` (COCO style) or ``"both"``.
        chunk_size: captions per ``similarity`` call.
        video_chunk_size: videos per ``similarity`` call (``None``: all at once); bounds the memory of
            text-conditioned heads, which build a (captions x videos x frames) tensor.
        save_dir: where the JSON goes; default ``trainer.log_dir`` (falls back to ``trainer.default_root_dir``).
        extra_subsets: name -> caption indices whose T2V metrics (against all videos) are reported as well. Subsets
            from ``eval_subsets()`` on the datamodule (else the module) are added; that method may take the stage
            (``"val"`` or ``"test"``) as its one argument.
        postprocessing: which of ``dsl``, ``qb_norm``, ``sinkhorn`` to report besides the plain numbers (``none``, the
            headline, is always computed); default none.
        dsl_temperature: DSL's softmax temperature (0.01 = CLIP's logit scale of 100), or a list to choose on val.
        qb_norm_k: QB-Norm's activation set: the top-k gallery items of each bank query (the release's 1).
        qb_norm_beta: QB-Norm's inverse temperature on the similarity (the release's 20).
        sinkhorn_temperature: Sinkhorn's logits are similarity / temperature (0.01: CLIP's logit scale, as UCoFiA).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (UCoFiA's 4).
        querybank_captions: training captions in the bank (T2V queries of ``qb_norm``, ``sinkhorn``).
        querybank_videos: training videos in the bank (V2T); videos cost a forward pass of every frame each.
        querybank_seed: which subset of the training split forms the bank.
    """

    def __init__(
        self,
        v2t_protocol: Literal["group", "any", "both"] = "group",
        chunk_size: int = 1024,
        video_chunk_size: int | None = None,
        save_dir: str | None = None,
        extra_subsets: Mapping[str, Sequence[int]] | None = None,
        postprocessing: Sequence[str] = (),
        dsl_temperature: float | list[float] = 0.01,
        qb_norm_k: int | list[int] = 1,
        qb_norm_beta: float | list[float] = 20.0,
        sinkhorn_temperature: float | list[float] = 0.01,
        sinkhorn_iterations: int | list[int] = 4,
        querybank_captions: int = 5000,
        querybank_videos: int = 1000,
        querybank_seed: int = 0,
    ) -> None:
        super().__init__()
        if v2t_protocol not in ("group", "any", "both"):
            raise ValueError(f"v2t_protocol must be 'group', 'any' or 'both'; got {v2t_protocol!r}")
        if chunk_size < 1 or (video_chunk_size is not None and video_chunk_size < 1):
            raise ValueError(
                f"chunk sizes must be >= 1; got chunk_size={chunk_size}, video_chunk_size={video_chunk_size}"
            )
        names = [name for name in dict.fromkeys(postprocessing) if name != "none"]
        unknown = [name for name in names if name not in POSTPROCESSINGS]
        if unknown:
            raise ValueError(f"unknown post-processing {unknown}; choose from none, {', '.join(POSTPROCESSINGS)}")
        if min(querybank_captions, querybank_videos) < 1:
            raise ValueError(f"querybank sizes must be >= 1; got {querybank_captions}, {querybank_videos}")
        self.v2t_protocol = v2t_protocol
        self.chunk_size = chunk_size
        self.video_chunk_size = video_chunk_size
        self.save_dir = save_dir
        self.extra_subsets = dict(extra_subsets or {})
        self.postprocessing = names
        options = {
            "dsl": {"temperature": dsl_temperature},
            "qb_norm": {"k": qb_norm_k, "beta": qb_norm_beta},
            "sinkhorn": {"temperature": sinkhorn_temperature, "iterations": sinkhorn_iterations},
        }
        self.grids = {name: parameter_grid(options[name]) for name in names}
        self.querybank = {"num_captions": querybank_captions, "num_videos": querybank_videos, "seed": querybank_seed}
        # name -> {"params", "chosen_on", "epoch", "global_step", "val_objective"}: choices made on validation
        self.chosen: dict[str, dict[str, Any]] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}
        self._tables = {loader: EmbeddingTable(columns) for loader, (_, columns) in _CONTRACT.items()}
        self._embedding_dtype: dict[str, torch.dtype] = {}

    # -- collection ----------------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        for table in self._tables.values():
            table.reset()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._tables[self._check_dataloader(dataloader_idx, "validation_step")].update(
            **self._check_outputs(outputs, dataloader_idx, "validation_step")
        )

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._tables[self._check_dataloader(dataloader_idx, "test_step")].update(
            **self._check_outputs(outputs, dataloader_idx, "test_step")
        )

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate(trainer, pl_module, "test")

    def state_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.chosen = dict(state_dict.get("chosen", {}))

    @staticmethod
    def _check_dataloader(dataloader_idx: int, step_name: str) -> int:
        if dataloader_idx not in _CONTRACT:
            raise ValueError(
                f"RetrievalMetrics expects two eval dataloaders (0 = videos, 1 = captions); {step_name} ran on "
                f"dataloader_idx={dataloader_idx}"
            )
        return dataloader_idx

    def _check_outputs(self, outputs: Any, dataloader_idx: int, step_name: str) -> dict[str, torch.Tensor]:
        """The step's tensors for one loader, detached on the CPU, after checking the contract."""
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
        return row

    # -- completeness --------------------------------------------------------------------------------------------------

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
        return _gather_rows(trainer, local)

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
        videos = _compute_table(self._tables[VIDEO_LOADER], pl_module.device)
        captions = _compute_table(self._tables[CAPTION_LOADER], pl_module.device)

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
        used = self._postprocess(trainer, pl_module, stage, sim, cap_to_vid, videos, captions, metrics)
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
            if used:
                payload["postprocessing"] = used
            write_json_atomic(os.path.join(save_dir, f"{stage}_metrics.json"), payload, sort_keys=True)

    def compute(
        self, sim: torch.Tensor, cap_to_vid: torch.Tensor, v2t_sim: torch.Tensor | None = None
    ) -> dict[str, float]:
        """The flat metric dict for one similarity matrix (keys like ``t2v/R@1``, ``v2t/MdR``); ``v2t_sim`` (default
        ``sim``) is the matrix ranked for V2T, which post-processing makes differ from the T2V one."""
        v2t_sim = sim if v2t_sim is None else v2t_sim
        protocols = ["group", "any"] if self.v2t_protocol == "both" else [self.v2t_protocol]
        metrics = {f"t2v/{k}": v for k, v in t2v_metrics(sim, cap_to_vid).items()}
        for position, protocol in enumerate(protocols):
            prefix = "v2t" if position == 0 else f"v2t_{protocol}"
            metrics.update({f"{prefix}/{k}": v for k, v in v2t_metrics(v2t_sim, cap_to_vid, protocol).items()})
        return metrics

    # -- post-processing -----------------------------------------------------------------------------------------------

    def _postprocess(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stage: str,
        sim: torch.Tensor,
        cap_to_vid: torch.Tensor,
        videos: dict[str, torch.Tensor],
        captions: dict[str, torch.Tensor],
        metrics: dict[str, float],
    ) -> dict[str, dict[str, Any]]:
        """Add ``{name}/...`` keys to ``metrics`` for each requested post-processing; returns what each one used."""
        used: dict[str, dict[str, Any]] = {}
        if not self.postprocessing:
            return used
        t2v_bank = v2t_bank = None
        if NEEDS_BANK & set(self.postprocessing):
            bank = self._querybank(trainer, pl_module, stage)
            t2v_bank = self._similarity(trainer, pl_module, bank["text_emb"], videos["video_emb"], videos["video_mask"])
            v2t_bank = self._similarity(
                trainer, pl_module, captions["text_emb"], bank["video_emb"], bank["video_mask"]
            ).T.contiguous()
        first_protocol = "any" if self.v2t_protocol == "any" else "group"
        for name in self.postprocessing:
            grid = self.grids[name]
            if len(grid) == 1:
                choice = {"params": grid[0], "chosen_on": "config"}
            elif stage == "val":
                # the only place a parameter is chosen: on the validation similarity
                params, objective = choose_parameters(name, grid, sim, cap_to_vid, t2v_bank, v2t_bank, first_protocol)
                choice = {
                    "params": params,
                    "chosen_on": "val",
                    "epoch": trainer.current_epoch,
                    "global_step": trainer.global_step,
                    "val_objective": objective,
                }
                self.chosen[name] = choice
            elif name in self.chosen:
                choice = self.chosen[name]
                if choice.get("global_step") != trainer.global_step:
                    rank_zero_warn(
                        f"RetrievalMetrics: {name}'s parameters {choice['params']} were chosen on validation at global "
                        f"step {choice.get('global_step')}; these weights are at step {trainer.global_step}."
                    )
            else:
                rank_zero_warn(
                    f"RetrievalMetrics: {name} has a parameter grid but no choice made on validation in this run, so it "
                    f"is not reported for {stage} (a parameter is never chosen on the test set). Fix one value in the "
                    f"config or validate first."
                )
                continue
            t2v, v2t = postprocess(name, sim, choice["params"], t2v_bank, v2t_bank)
            metrics.update({f"{name}/{k}": v for k, v in self.compute(t2v, cap_to_vid, v2t).items()})
            used[name] = dict(choice)
        if t2v_bank is not None:
            used_bank = {
                "num_captions": int(t2v_bank.shape[0]),
                "num_videos": int(v2t_bank.shape[0]),
                "seed": self.querybank["seed"],
                "split": "train",
            }
            for name in NEEDS_BANK & set(used):
                used[name]["querybank"] = used_bank
        return used

    def _querybank(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> dict[str, torch.Tensor]:
        """Embeddings of the training bank (videos and captions), this process's share embedded here, then gathered."""
        provider = getattr(getattr(trainer, "datamodule", None), "querybank_dataloaders", None)
        if not callable(provider):
            raise TypeError(
                "RetrievalMetrics: qb_norm and sinkhorn need a bank of training queries, from the datamodule's "
                "querybank_dataloaders(num_captions, num_videos, seed, rank, world_size); this datamodule has none"
            )
        loaders = provider(**self.querybank, rank=trainer.global_rank, world_size=trainer.world_size)
        step = pl_module.validation_step if stage == "val" else pl_module.test_step
        tables = {loader: EmbeddingTable(columns) for loader, (_, columns) in _CONTRACT.items()}
        with torch.no_grad(), trainer.precision_plugin.val_step_context():
            for loader, dataloader in enumerate(loaders):
                for batch_idx, batch in enumerate(dataloader):
                    outputs = step(move_data_to_device(batch, pl_module.device), batch_idx, loader)
                    tables[loader].update(**self._check_outputs(outputs, loader, "querybank embedding"))
        bank = {
            key: value
            for table in tables.values()
            for key, value in _compute_table(table, pl_module.device).items()
            if key in ("text_emb", "video_emb", "video_mask")
        }
        if bank["text_emb"].shape[0] == 0 or bank["video_emb"].shape[0] == 0:
            raise ValueError("RetrievalMetrics: the querybank loaders returned no training caption or video")
        return bank
