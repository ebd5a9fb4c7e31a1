"""Tests for petl_bench.metrics: the rank rules by hand, the error paths, and the callback in one and two processes."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from petl_bench.metrics import (
    METRIC_NAMES,
    RECALL_AT,
    RetrievalMetrics,
    dual_softmax,
    postprocess,
    ranks_to_metrics,
    t2v_metrics,
    t2v_ranks,
    v2t_metrics,
    v2t_ranks,
)

# ---------------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------------


def test_t2v_ranks_by_hand():
    # Every row scores video j with (12 - j) / 12: distinct, descending, so ground-truth video j ranks j + 1.
    sim = (torch.arange(12, 0, -1).float() / 12).expand(4, 12).contiguous()
    cap_to_vid = torch.tensor([0, 2, 5, 10])
    assert t2v_ranks(sim, cap_to_vid).tolist() == [1, 3, 6, 11]
    metrics = t2v_metrics(sim, cap_to_vid)
    assert list(metrics) == list(METRIC_NAMES)
    assert metrics == pytest.approx({"R@1": 25.0, "R@5": 50.0, "R@10": 75.0, "MdR": 4.5, "MnR": 5.25})
    assert all(isinstance(value, float) for value in metrics.values())


def test_t2v_small_matrix_by_hand():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.3, 0.2],  # gt 0: best -> rank 1
            [0.5, 0.4, 0.6, 0.1],  # gt 1: 0.5 and 0.6 above -> rank 3
            [0.1, 0.2, 0.3, 0.4],  # gt 2: 0.4 above -> rank 2
        ]
    )
    cap_to_vid = torch.tensor([0, 1, 2])
    assert t2v_ranks(sim, cap_to_vid).tolist() == [1, 3, 2]
    assert t2v_metrics(sim, cap_to_vid) == pytest.approx(
        {"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0, "MnR": 2.0}
    )


def test_ties_are_counted_against_the_ground_truth():
    # A collapsed model (constant similarity) gets the worst rank, never R@1 = 100.
    constant = torch.full((4, 4), 0.3)
    diagonal = torch.arange(4)
    assert t2v_metrics(constant, diagonal) == {"R@1": 0.0, "R@5": 100.0, "R@10": 100.0, "MdR": 4.0, "MnR": 4.0}
    for protocol in ("group", "any"):
        assert v2t_ranks(constant, diagonal, protocol).tolist() == [4, 4, 4, 4]

    # One tie with one competitor: rank 2 whichever of the two is the ground truth.
    sim = torch.tensor([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1]])
    assert t2v_ranks(sim, torch.tensor([0, 1])).tolist() == [2, 2]

    # "any": the best ground-truth caption (0.7) ties with a caption of another video -> rank 2; the video's own
    # second caption (also 0.7) does not compete.
    sim = torch.tensor([[0.7, 0.0], [0.7, 0.1], [0.7, 0.9], [0.2, 0.8]])
    cap_to_vid = torch.tensor([0, 0, 1, 1])
    assert v2t_ranks(sim, cap_to_vid, "any").tolist() == [2, 1]
    # "group": group scores for video 0 are (0.7, 0.7) -> tie -> rank 2.
    assert v2t_ranks(sim, cap_to_vid, "group").tolist() == [2, 1]


MULTI_CAPTION_SIM = torch.tensor(
    [  # video:  0    1    2
        [0.5, 0.3, 0.2],  # caption 0 of video 0
        [0.2, 0.1, 0.9],  # caption 1 of video 0
        [0.9, 0.6, 0.4],  # caption 2 of video 1
        [0.8, 0.7, 0.3],  # caption 3 of video 1
        [0.1, 0.8, 0.5],  # caption 4 of video 2
    ]
)
MULTI_CAPTION_VIDEO = torch.tensor([0, 0, 1, 1, 2])


def test_v2t_protocols_differ_on_multi_caption_data():
    # Video 0 scores captions (0.5, 0.2 | 0.9, 0.8 | 0.1).
    #   group: groups (0.5, 0.9, 0.1) -> one group above -> rank 2; any: two captions above 0.5 -> rank 3.
    # Video 1 scores (0.3, 0.1 | 0.6, 0.7 | 0.8): group (0.3, 0.7, 0.8) -> rank 2; any: 0.8 above 0.7 -> rank 2.
    # Video 2 scores (0.2, 0.9 | 0.4, 0.3 | 0.5): group (0.9, 0.4, 0.5) -> rank 2; any: 0.9 above 0.5 -> rank 2.
    assert v2t_ranks(MULTI_CAPTION_SIM, MULTI_CAPTION_VIDEO, "group").tolist() == [2, 2, 2]
    assert v2t_ranks(MULTI_CAPTION_SIM, MULTI_CAPTION_VIDEO, "any").tolist() == [3, 2, 2]
    assert v2t_metrics(MULTI_CAPTION_SIM, MULTI_CAPTION_VIDEO) == pytest.approx(
        {"R@1": 0.0, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0, "MnR": 2.0}
    )
    assert v2t_metrics(MULTI_CAPTION_SIM, MULTI_CAPTION_VIDEO, "any") == pytest.approx(
        {"R@1": 0.0, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0, "MnR": 7 / 3}
    )
    # T2V on the same matrix: ranks (1, 2, 2, 2, 2).
    assert t2v_ranks(MULTI_CAPTION_SIM, MULTI_CAPTION_VIDEO).tolist() == [1, 2, 2, 2, 2]


def test_one_caption_per_video_v2t_is_the_transpose_of_t2v():
    generator = torch.Generator().manual_seed(0)
    num = 23
    sim = torch.randint(0, 6, (num, num), generator=generator).float()  # few values: many ties
    cap_to_vid = torch.randperm(num, generator=generator)  # caption i describes video cap_to_vid[i]
    video_to_cap = torch.argsort(cap_to_vid)
    transposed = t2v_ranks(sim.T.contiguous(), video_to_cap)
    for protocol in ("group", "any"):
        assert torch.equal(v2t_ranks(sim, cap_to_vid, protocol), transposed)
        assert v2t_metrics(sim, cap_to_vid, protocol) == t2v_metrics(sim.T.contiguous(), video_to_cap)


def _brute_force_ranks(sim, cap_to_vid, direction):
    """The tie rule as written in the module docstring, one query at a time."""
    num_captions, num_videos = len(sim), len(sim[0])
    ranks = []
    if direction == "t2v":
        for i in range(num_captions):
            truth = sim[i][cap_to_vid[i]]
            ranks.append(1 + sum(int(sim[i][j] >= truth) for j in range(num_videos) if j != cap_to_vid[i]))
    elif direction == "group":
        for v in range(num_videos):
            groups = [max(sim[c][v] for c in range(num_captions) if cap_to_vid[c] == g) for g in range(num_videos)]
            ranks.append(1 + sum(int(groups[g] >= groups[v]) for g in range(num_videos) if g != v))
    else:
        for v in range(num_videos):
            best = max(sim[c][v] for c in range(num_captions) if cap_to_vid[c] == v)
            ranks.append(1 + sum(int(sim[c][v] >= best) for c in range(num_captions) if cap_to_vid[c] != v))
    return ranks


@pytest.mark.parametrize("block_elements", [1, 7, 1 << 24])
def test_vectorised_ranks_match_the_definition(block_elements):
    generator = torch.Generator().manual_seed(1)
    num_videos, num_captions = 9, 31
    sim = torch.randint(0, 8, (num_captions, num_videos), generator=generator).float() / 8
    cap_to_vid = torch.cat([torch.arange(num_videos), torch.randint(0, num_videos, (num_captions - num_videos,))])
    cap_to_vid = cap_to_vid[torch.randperm(num_captions, generator=generator)]
    rows = sim.tolist()
    labels = cap_to_vid.tolist()
    assert t2v_ranks(sim, cap_to_vid, block_elements=block_elements).tolist() == _brute_force_ranks(rows, labels, "t2v")
    for protocol in ("group", "any"):
        got = v2t_ranks(sim, cap_to_vid, protocol, block_elements=block_elements).tolist()
        assert got == _brute_force_ranks(rows, labels, protocol)


def test_ranks_to_metrics_median_of_even_count_is_the_mean_of_the_middle_pair():
    assert ranks_to_metrics(torch.tensor([1, 2, 7, 30])) == pytest.approx(
        {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0, "MdR": 4.5, "MnR": 10.0}
    )


def test_non_finite_similarity_is_an_error_with_its_position():
    sim = torch.rand(4, 5)
    sim[1, 2] = float("nan")
    sim[3, 0] = float("inf")
    for compute in (t2v_metrics, v2t_metrics, lambda s, c: v2t_metrics(s, c, "any")):
        with pytest.raises(ValueError, match=r"2 non-finite entries.*caption 1, video 2"):
            compute(sim, torch.tensor([0, 1, 2, 3]))


def test_shape_and_label_errors():
    sim = torch.rand(4, 3)
    with pytest.raises(ValueError, match="one video column per caption"):
        t2v_metrics(sim, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="2-D tensor"):
        t2v_metrics(torch.rand(4), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="caption 3 points to column 3"):
        t2v_metrics(sim, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        t2v_metrics(sim, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="protocol"):
        v2t_metrics(sim, torch.tensor([0, 1, 2, 0]), "best")


def test_v2t_names_a_video_without_caption():
    sim = torch.rand(3, 4)
    cap_to_vid = torch.tensor([0, 0, 2])  # videos 1 and 3 have no caption
    assert t2v_metrics(sim, cap_to_vid)["R@10"] == 100.0  # fine for T2V: they are distractors
    for protocol in ("group", "any"):
        with pytest.raises(ValueError, match=r"2 of 4 video columns have none: 1, 3"):
            v2t_metrics(sim, cap_to_vid, protocol)


def test_dual_softmax_by_hand():
    sim = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    e = math.e
    # Column 0 softmax over the three captions: (e, 1, 1) / (e + 2).
    expected = torch.tensor([[e / (e + 2), 0.0], [0.0, e / (e + 2)], [0.0, 0.0]])
    assert torch.allclose(dual_softmax(sim, temperature=1.0), expected)
    assert torch.allclose(dual_softmax(sim, 0.5, query_dim=1), dual_softmax(sim.T, 0.5, query_dim=0).T)


@pytest.mark.filterwarnings("ignore:index_reduce")
def test_msvd_sized_matrix_matches_explicit_group_scores():
    """27,763 captions x 670 videos (MSVD test) in bounded working memory; the group protocol's per-video ranks match
    an explicit group-score matrix."""
    generator = torch.Generator().manual_seed(2)
    num_videos, num_captions = 670, 27_763
    cap_to_vid = torch.cat([torch.arange(num_videos), torch.randint(0, num_videos, (num_captions - num_videos,))])
    sim = torch.randn(num_captions, num_videos, generator=generator)
    ranks = v2t_ranks(sim, cap_to_vid, "group")
    group_scores = torch.full((num_videos, num_videos), -math.inf).index_reduce_(
        1, cap_to_vid, sim.T.contiguous(), "amax"
    )
    expected = (group_scores >= group_scores.diagonal()[:, None]).sum(1)
    assert torch.equal(ranks, expected)
    assert set(t2v_metrics(sim, cap_to_vid)) == set(METRIC_NAMES)
    assert set(v2t_metrics(sim, cap_to_vid, "any")) == set(METRIC_NAMES)


def _torchmetrics_retrieval(preds: torch.Tensor, target: torch.Tensor, hit_rate: bool = False) -> dict[str, float]:
    """R@K (%) and MRR of [queries x candidates] scores by torchmetrics: RetrievalRecall (RetrievalHitRate when a
    query has several relevant candidates and any one counts) and RetrievalMRR."""
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalRecall

    indexes = torch.arange(preds.shape[0])[:, None].expand_as(preds).flatten()
    preds, target = preds.flatten(), target.flatten()
    recall = RetrievalHitRate if hit_rate else RetrievalRecall
    out = {f"R@{k}": 100.0 * float(recall(top_k=k)(preds, target, indexes=indexes)) for k in RECALL_AT}
    out["MRR"] = float(RetrievalMRR()(preds, target, indexes=indexes))
    return out


def _approx(expected: dict[str, float]):
    return pytest.approx(expected, rel=1e-6, abs=1e-6)  # torchmetrics returns float32


def _ours(ranks: torch.Tensor) -> dict[str, float]:
    metrics = ranks_to_metrics(ranks)
    return {**{f"R@{k}": metrics[f"R@{k}"] for k in RECALL_AT}, "MRR": float((1.0 / ranks.double()).mean())}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_agree_with_torchmetrics_retrieval_on_tie_free_matrices(seed):
    """The suite's rank functions against torchmetrics' retrieval metrics, where the tie rule cannot matter."""
    generator = torch.Generator().manual_seed(seed)
    num_videos, num_captions = 40, 97
    cap_to_vid = torch.cat([torch.arange(num_videos), torch.randint(0, num_videos, (num_captions - num_videos,))])
    cap_to_vid = cap_to_vid[torch.randperm(num_captions, generator=generator)]
    # Positive scores: torchmetrics 1.9's reciprocal rank drops relevant candidates scored <= 0 (a cosine can be).
    sim = 0.01 + torch.rand(num_captions, num_videos, generator=generator, dtype=torch.float64)
    assert sim.unique().numel() == sim.numel()  # tie-free
    relevant = cap_to_vid[:, None] == torch.arange(num_videos)[None, :]  # [captions x videos]

    # T2V: one relevant video per caption.
    assert _ours(t2v_ranks(sim, cap_to_vid)) == _approx(_torchmetrics_retrieval(sim, relevant))
    # V2T "any": a video ranks all captions, and any of its captions is a hit.
    assert _ours(v2t_ranks(sim, cap_to_vid, "any")) == _approx(
        _torchmetrics_retrieval(sim.T, relevant.T, hit_rate=True)
    )
    # V2T "group": a video ranks the caption groups, each scored by its best caption.
    groups = torch.full((num_videos, num_videos), -math.inf, dtype=sim.dtype)
    groups.scatter_reduce_(1, cap_to_vid.expand(num_videos, -1), sim.T, reduce="amax")
    assert _ours(v2t_ranks(sim, cap_to_vid, "group")) == _approx(
        _torchmetrics_retrieval(groups, torch.eye(num_videos, dtype=torch.bool))
    )
    # ... and the check can fail: a rank off by one would show.
    assert _ours(t2v_ranks(sim, cap_to_vid) + 1) != _approx(_torchmetrics_retrieval(sim, relevant))


# ---------------------------------------------------------------------------------------------------------------------
# A tiny real retrieval model and data: swap these two for the real RetrievalModule / DataModule when they exist.
# ---------------------------------------------------------------------------------------------------------------------

FEATURE_DIM, MAX_FRAMES = 8, 4
CAPTION_VIDEOS = [3, 0, 6, 1, 5, 2, 4, 0, 2, 3, 5]  # 11 captions over 7 videos, not grouped by video


class VideoFeatures(Dataset):
    """Per-frame features with a varying number of valid frames (the rest padded and masked)."""

    def __init__(self, num_videos: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.frames = torch.randn(num_videos, MAX_FRAMES, FEATURE_DIM, generator=generator)
        lengths = torch.randint(1, MAX_FRAMES + 1, (num_videos,), generator=generator)
        self.mask = torch.arange(MAX_FRAMES)[None, :] < lengths[:, None]
        self.frames[~self.mask] = 0.0

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, index):
        return {"index": index, "frames": self.frames[index], "mask": self.mask[index]}


class CaptionFeatures(Dataset):
    """A noisy copy of its video's mean frame feature, so retrieval is better than chance but not perfect."""

    def __init__(self, videos: VideoFeatures, caption_videos: list[int], seed: int = 1):
        generator = torch.Generator().manual_seed(seed)
        self.video_index = torch.tensor(caption_videos)
        mean_frames = videos.frames.sum(1) / videos.mask.sum(1, keepdim=True)
        self.text = mean_frames[self.video_index] + 1.5 * torch.randn(
            len(caption_videos), FEATURE_DIM, generator=generator
        )

    def __len__(self):
        return len(self.text)

    def __getitem__(self, index):
        return {"index": index, "text": self.text[index], "video_index": self.video_index[index]}


class TinyRetrievalData(LightningDataModule):
    def __init__(self, num_videos: int = 7, caption_videos=CAPTION_VIDEOS, batch_size: int = 2, subsets=None):
        super().__init__()
        self.videos = VideoFeatures(num_videos)
        self.captions = CaptionFeatures(self.videos, list(caption_videos))
        self.batch_size = batch_size
        self.subsets = subsets or {}

    def train_dataloader(self):
        return DataLoader(self.captions, batch_size=self.batch_size)

    def val_dataloader(self):
        return [
            DataLoader(self.videos, batch_size=self.batch_size),
            DataLoader(self.captions, batch_size=self.batch_size),
        ]

    test_dataloader = val_dataloader

    def eval_subsets(self, stage):
        return self.subsets


class TinyRetrievalModule(LightningModule):
    """One linear projection per tower and mean pooling over valid frames (meanP), cosine similarity."""

    def __init__(self, drop_video_index: int | None = None):
        super().__init__()
        self.video_proj = nn.Linear(FEATURE_DIM, FEATURE_DIM)
        self.text_proj = nn.Linear(FEATURE_DIM, FEATURE_DIM)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.eye(FEATURE_DIM) if parameter.ndim == 2 else torch.zeros_like(parameter))
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        self.drop_video_index = drop_video_index

    def similarity(self, text_emb, video_emb, video_mask):
        weights = video_mask.unsqueeze(-1).to(video_emb.dtype)
        pooled = (video_emb * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return F.normalize(text_emb, dim=-1) @ F.normalize(pooled, dim=-1).T

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        if dataloader_idx == 0:
            keep = batch["index"] != self.drop_video_index if self.drop_video_index is not None else slice(None)
            return {
                "index": batch["index"][keep],
                "video_emb": self.video_proj(batch["frames"][keep]),
                "video_mask": batch["mask"][keep],
            }
        return {"index": batch["index"], "text_emb": self.text_proj(batch["text"]), "video_index": batch["video_index"]}

    test_step = validation_step

    def training_step(self, batch, batch_idx):
        return self.text_proj(batch["text"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def reference_metrics(module: TinyRetrievalModule, data: TinyRetrievalData, callback: RetrievalMetrics) -> dict:
    """The same numbers computed directly: whole tables, one similarity call, no gathering or chunking."""
    with torch.no_grad():
        video_emb = module.video_proj(data.videos.frames)
        text_emb = module.text_proj(data.captions.text)
        sim = module.similarity(text_emb, video_emb, data.videos.mask)
    metrics = callback.compute(sim, data.captions.video_index)
    for name in callback.postprocessing:  # bank-free ones (dsl) with their fixed parameters
        t2v, v2t = postprocess(name, sim, callback.grids[name][0])
        metrics.update({f"{name}/{k}": v for k, v in callback.compute(t2v, data.captions.video_index, v2t).items()})
    for name, indices in data.subsets.items():
        rows = torch.tensor(sorted(set(indices)))
        metrics.update(
            {f"{name}/t2v/{k}": v for k, v in t2v_metrics(sim[rows], data.captions.video_index[rows]).items()}
        )
        metrics[f"{name}/num_captions"] = float(len(rows))
    metrics["num_videos"] = float(len(data.videos))
    metrics["num_captions"] = float(len(data.captions))
    return metrics


def make_trainer(tmp_path: Path, callback: RetrievalMetrics, **kwargs) -> Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": tmp_path,
        "logger": CSVLogger(tmp_path, name="logs"),
        "callbacks": [callback],
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        **kwargs,
    }
    return Trainer(**options)


# ---------------------------------------------------------------------------------------------------------------------
# Callback, one process
# ---------------------------------------------------------------------------------------------------------------------


def test_callback_validate_logs_every_key_and_writes_json(tmp_path):
    data = TinyRetrievalData(subsets={"order_pairs": [1, 4, 4, 9]})
    module = TinyRetrievalModule()
    callback = RetrievalMetrics(v2t_protocol="both", chunk_size=3, video_chunk_size=4, postprocessing=["dsl"])
    trainer = make_trainer(tmp_path, callback)
    trainer.validate(module, datamodule=data)

    expected = reference_metrics(module, data, callback)
    assert expected["num_videos"] == 7 and expected["num_captions"] == 11
    assert expected["order_pairs/num_captions"] == 3
    for direction in ("t2v", "v2t", "v2t_any", "dsl/t2v", "dsl/v2t", "dsl/v2t_any", "order_pairs/t2v"):
        for name in METRIC_NAMES:
            assert f"{direction}/{name}" in expected
    assert callback.last_metrics["val"] == pytest.approx(expected, abs=1e-9)
    logged = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert logged == pytest.approx({f"val/{key}": value for key, value in expected.items()}, abs=1e-4)

    with open(os.path.join(trainer.log_dir, "val_metrics.json")) as f:
        saved = json.load(f)
    assert saved["metrics"] == pytest.approx(expected, abs=1e-9)
    assert (saved["num_videos"], saved["num_captions"], saved["v2t_protocol"]) == (7, 11, "both")
    assert (saved["epoch"], saved["global_step"], saved["complete"]) == (0, 0, True)
    assert not [name for name in os.listdir(trainer.log_dir) if name.startswith(".tmp_")]

    # The logger received the numbers too.
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["val/t2v/R@1"]) == pytest.approx(expected["t2v/R@1"])


@pytest.mark.parametrize("entry", ["validate", "fit"])
def test_callback_names_a_video_that_never_came_back(tmp_path, entry):
    # The last video is the one a gather-then-truncate evaluation loses; only the dataset length reveals it.
    trainer = make_trainer(tmp_path, RetrievalMetrics(), max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0)
    run = trainer.validate if entry == "validate" else trainer.fit
    with pytest.raises(ValueError, match=r"1 of 7 videos never came back.*indices \[6\]"):
        run(TinyRetrievalModule(drop_video_index=6), datamodule=TinyRetrievalData())


def test_callback_scores_a_truncated_run_on_what_ran_and_says_so(tmp_path):
    # limit_val_batches=2 with batches of 2: videos 0-3 and captions 0-3, whose videos are 3, 0, 6, 1. Caption 2's
    # video never ran and video 2 has no caption, so 3 captions x 3 videos remain.
    callback = RetrievalMetrics()
    trainer = make_trainer(tmp_path, callback, limit_val_batches=2)
    with pytest.warns(UserWarning, match="3 of 7 videos and 3 of 11 captions"):
        trainer.validate(TinyRetrievalModule(), datamodule=TinyRetrievalData())
    with open(os.path.join(trainer.log_dir, "val_metrics.json")) as f:
        saved = json.load(f)
    assert (saved["complete"], saved["num_videos"], saved["num_captions"]) == (False, 3, 3)


def test_callback_rejects_a_step_that_breaks_the_contract(tmp_path):
    class NoMask(TinyRetrievalModule):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            outputs = super().validation_step(batch, batch_idx, dataloader_idx)
            outputs.pop("video_mask", None)
            return outputs

    trainer = make_trainer(tmp_path, RetrievalMetrics())
    with pytest.raises(ValueError, match=r"dataloader 0 \(videos\) must return a dict with keys"):
        trainer.validate(NoMask(), datamodule=TinyRetrievalData())


def test_callback_in_fit_skips_the_sanity_check_and_serves_test(tmp_path):
    data = TinyRetrievalData()
    callback = RetrievalMetrics(save_dir=str(tmp_path / "results"))
    trainer = make_trainer(tmp_path, callback, max_epochs=1, limit_train_batches=2, num_sanity_val_steps=1)
    trainer.fit(TinyRetrievalModule(), datamodule=data)
    trainer.test(trainer.lightning_module, datamodule=data)

    with open(tmp_path / "results" / "val_metrics.json") as f:
        val = json.load(f)
    assert (val["epoch"], val["global_step"], val["num_captions"]) == (0, 2, 11)
    with open(tmp_path / "results" / "test_metrics.json") as f:
        test = json.load(f)
    assert test["metrics"] == callback.last_metrics["test"]
    # The same weights and data: validation after training and test agree.
    assert callback.last_metrics["val"] == callback.last_metrics["test"]
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        val_rows = [row for row in csv.DictReader(f) if row.get("val/t2v/R@1")]
    assert len(val_rows) == 1  # the sanity check (one partial batch per loader) logged nothing


# ---------------------------------------------------------------------------------------------------------------------
# Callback, two CPU processes
# ---------------------------------------------------------------------------------------------------------------------


class RankReportingMetrics(RetrievalMetrics):
    """Writes what each process computed, so the test can check that all ranks agree."""

    def on_validation_end(self, trainer, pl_module):
        with open(os.path.join(self.save_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.last_metrics["val"], f)


@pytest.mark.slow  # ~20-25 s on 2 CPU cores, mostly two fresh interpreters importing torch and lightning
def test_ddp_two_processes_match_one_process_exactly(tmp_path):
    # 7 videos and 11 captions over 2 ranks: DistributedSampler pads each with a duplicate; batches of 2 leave
    # ranks with different batch counts in places. Swap TinyRetrievalModule / TinyRetrievalData for the real ones.
    def make_data():
        return TinyRetrievalData(batch_size=2, subsets={"order_pairs": [0, 5, 10]})

    single = RetrievalMetrics(v2t_protocol="both", chunk_size=2, save_dir=str(tmp_path / "single"))
    make_trainer(tmp_path / "single", single).validate(TinyRetrievalModule(), datamodule=make_data())

    report_dir = tmp_path / "ddp"
    report_dir.mkdir()
    ddp = RankReportingMetrics(v2t_protocol="both", chunk_size=2, save_dir=str(report_dir))
    trainer = make_trainer(report_dir, ddp, devices=2, strategy="ddp_spawn", logger=False)
    trainer.validate(TinyRetrievalModule(), datamodule=make_data())

    expected = single.last_metrics["val"]
    assert expected["num_videos"] == 7 and expected["num_captions"] == 11
    with open(report_dir / "val_metrics.json") as f:
        assert json.load(f)["metrics"] == expected
    for rank in (0, 1):
        with open(report_dir / f"rank{rank}.json") as f:
            assert json.load(f) == expected
