"""`RetrievalDataModule`: the one data path of the benchmark (DESIGN.md, "The one path data takes").

Training yields (caption, video) pairs; validation and test yield two loaders — every video once (dataloader 0) and
every caption once (dataloader 1) — each item carrying its dataset index, each caption its video's index, so the
metrics callback can gather across processes and drop DistributedSampler's padding duplicates.
Frames travel as uint8 ``(T, 3, S, S)`` with a bool ``video_mask``; normalisation happens on the device.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import open_clip
import torch
from torch.utils.data import DataLoader, Dataset

from petl_bench.data.datasets import DatasetSpec, get_dataset
from petl_bench.data.video import FRAME_PROTOCOLS, load_video
from petl_bench.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitTable:
    """A split as two tables: videos (id, path) and captions (text, row of its video)."""

    video_ids: list[str]
    video_paths: list[Path]
    captions: list[str]
    caption_video: list[int]
    missing_videos: list[str]


def build_split_table(spec: DatasetSpec, split: str, annotation_root: Path, video_root: Path,
                      missing_videos: str = "skip", **options) -> SplitTable:
    items = spec.load(split, annotation_root, **options)
    ids, paths, captions, caption_video, missing = [], [], [], [], []
    for video_id, caps in items:
        path = spec.find_video(video_root, video_id)
        if path is None:
            missing.append(video_id)
            continue
        for cap in caps:
            captions.append(cap)
            caption_video.append(len(ids))
        ids.append(video_id)
        paths.append(path)
    if missing:
        msg = (f"{spec.name}/{split}: {len(missing)} of {len(items)} listed videos are missing under {video_root} "
               f"(e.g. {', '.join(missing[:3])})")
        if missing_videos == "error":
            raise FileNotFoundError(msg + "; download them, or set data.missing_videos=skip to evaluate without them")
        log.warning(msg + "; skipped (recorded in the run's metadata)")
    if not ids:
        raise FileNotFoundError(f"{spec.name}/{split}: none of the {len(items)} listed videos exist under {video_root}")
    return SplitTable(ids, paths, captions, caption_video, missing)


class _Frames:
    """Shared frame loading of the three datasets below."""

    def __init__(self, num_frames: int, image_size: int, protocol: str, train: bool):
        self.num_frames, self.image_size, self.protocol, self.train = num_frames, image_size, protocol, train

    def load(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        # training samples a random frame per segment; python's RNG is seeded per worker by Lightning
        rng = np.random.default_rng(random.getrandbits(63)) if self.train else None
        return load_video(path, self.num_frames, self.image_size, self.protocol, train=self.train, rng=rng)


class PairDataset(Dataset):
    """Training pairs: every (video, caption) pair, or one random caption per video per epoch."""

    def __init__(self, table: SplitTable, frames: _Frames, tokenize, train_captions: str = "all"):
        self.table, self.frames, self.tokenize, self.train_captions = table, frames, tokenize, train_captions
        self.by_video: list[list[int]] = [[] for _ in table.video_ids]
        for c, v in enumerate(table.caption_video):
            self.by_video[v].append(c)

    def __len__(self) -> int:
        return len(self.table.captions) if self.train_captions == "all" else len(self.table.video_ids)

    def __getitem__(self, i: int) -> dict:
        if self.train_captions == "all":
            c = i
        else:
            c = random.choice(self.by_video[i])
        v = self.table.caption_video[c]
        video, mask = self.frames.load(self.table.video_paths[v])
        return {"video": video, "video_mask": mask, "text": self.tokenize(self.table.captions[c]),
                "index": c, "video_index": v}


class VideoDataset(Dataset):
    def __init__(self, table: SplitTable, frames: _Frames):
        self.table, self.frames = table, frames

    def __len__(self) -> int:
        return len(self.table.video_ids)

    def __getitem__(self, i: int) -> dict:
        video, mask = self.frames.load(self.table.video_paths[i])
        return {"video": video, "video_mask": mask, "index": i}


class CaptionDataset(Dataset):
    def __init__(self, table: SplitTable, tokenize):
        self.table, self.tokenize = table, tokenize

    def __len__(self) -> int:
        return len(self.table.captions)

    def __getitem__(self, i: int) -> dict:
        return {"text": self.tokenize(self.table.captions[i]), "index": i, "video_index": self.table.caption_video[i]}


class RetrievalDataModule(L.LightningDataModule):
    """One DataModule for every dataset and method.

    Args:
        dataset: a registered dataset (``synthetic``, ``msrvtt``, ``msvd``, ``vatex``, ``activitynet``, ``didemo``).
        root: the dataset folder; annotations are read from ``annotation_root`` (default: root) and videos from
            ``video_root`` (default: root/videos). The synthetic set defaults to ``<cache>/synthetic`` and is
            generated there when missing.
        backbone: open_clip model name, linked from the model: it picks the tokenizer and the frame size.
        num_frames / max_words: frames per video and tokens per caption (linked to the model).
        frame_protocol: ``uniform`` segments (default) or CLIP4Clip's ``fps`` (1 fps, then thinned).
        train_captions: ``all`` (video, caption) pairs per epoch, or ``random_one`` caption per video per epoch.
        batch_size: per process; the loss sees batch_size x processes.
        missing_videos: ``skip`` (counted, recorded) or ``error``.
        dataset_options: passed to the dataset's loader (e.g. ``{"missing": "skip"}`` for VATEX caption gaps).
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        root: str | None = None,
        annotation_root: str | None = None,
        video_root: str | None = None,
        backbone: str = "ViT-B-32",
        image_size: int | None = None,
        num_frames: int = 12,
        max_words: int = 32,
        frame_protocol: str = "uniform",
        train_split: str | None = None,
        test_split: str | None = None,
        val_split: str | None = None,
        train_captions: str = "all",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        missing_videos: str = "skip",
        dataset_options: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.spec = get_dataset(dataset)
        if frame_protocol not in FRAME_PROTOCOLS:
            raise ValueError(f"data.frame_protocol must be one of {FRAME_PROTOCOLS}, got {frame_protocol!r}")
        if train_captions not in ("all", "random_one"):
            raise ValueError(f"data.train_captions must be 'all' or 'random_one', got {train_captions!r}")
        if missing_videos not in ("skip", "error"):
            raise ValueError(f"data.missing_videos must be 'skip' or 'error', got {missing_videos!r}")
        if root is None:
            if dataset != "synthetic":
                raise ValueError(f"data.root is required for {dataset}: the folder holding its annotations and videos")
            root = str(cache_dir() / "synthetic")
        self.root = Path(root).expanduser()
        self.annotation_root = Path(annotation_root).expanduser() if annotation_root else self.root
        self.video_root = Path(video_root).expanduser() if video_root else self.root / "videos"
        self.image_size = image_size or _backbone_image_size(backbone)
        self._tokenizer = open_clip.get_tokenizer(backbone)
        self.splits = {
            "train": train_split or self.spec.train_split,
            "test": test_split or self.spec.test_split,
            "val": val_split or self.spec.val_split or test_split or self.spec.test_split,
        }
        self.tables: dict[str, SplitTable] = {}

    def tokenize(self, caption: str) -> torch.Tensor:
        return self._tokenizer([caption], context_length=self.hparams.max_words)[0]

    # ------------------------------------------------------------------ set-up
    def prepare_data(self) -> None:
        # the synthetic set is generated (default parameters) where none exists yet; an existing one is used as is
        if self.hparams.dataset == "synthetic" and not (self.root / "manifest.json").is_file():
            from petl_bench.data.synthetic import generate_synthetic

            generate_synthetic(self.root)

    def table(self, which: str) -> SplitTable:
        split = self.splits[which]
        if split not in self.tables:
            self.tables[split] = build_split_table(
                self.spec, split, self.annotation_root, self.video_root, self.hparams.missing_videos,
                **(self.hparams.dataset_options or {}),
            )
        return self.tables[split]

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            self.table("train")
            self.table("val")
        if stage in ("validate",):
            self.table("val")
        if stage in ("test", None):
            self.table("test")

    def summary(self) -> dict:
        """What the run was evaluated on: recorded in every result file."""
        out = {"dataset": self.hparams.dataset, "frame_protocol": self.hparams.frame_protocol,
               "num_frames": self.hparams.num_frames, "max_words": self.hparams.max_words,
               "train_captions": self.hparams.train_captions, "image_size": self.image_size}
        for which in ("train", "test"):
            split = self.splits[which]
            out[f"{which}_split"] = split
            if split in self.tables:
                t = self.tables[split]
                out[f"{which}_videos"] = len(t.video_ids)
                out[f"{which}_captions"] = len(t.captions)
                out[f"{which}_missing_videos"] = len(t.missing_videos)
        return out

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def _frames(self, train: bool) -> _Frames:
        return _Frames(self.hparams.num_frames, self.image_size, self.hparams.frame_protocol, train)

    def train_dataloader(self) -> DataLoader:
        pairs = PairDataset(self.table("train"), self._frames(True), self.tokenize, self.hparams.train_captions)
        # drop_last: every step sees a full batch, so the InfoNCE task has the same difficulty throughout
        return self._loader(pairs, self.hparams.batch_size, shuffle=True, drop_last=len(pairs) > self.hparams.batch_size)

    def _eval_loaders(self, which: str) -> list[DataLoader]:
        table = self.table(which)
        bs = self.hparams.eval_batch_size or self.hparams.batch_size
        return [self._loader(VideoDataset(table, self._frames(False)), bs, shuffle=False),
                self._loader(CaptionDataset(table, self.tokenize), bs, shuffle=False)]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    # ------------------------------------------------------------------ extra evaluation views
    def eval_pairs(self, stage: str) -> dict[str, list[tuple[int, int, int]]]:
        """Named sets of (caption, its video, a hard negative video) scored beside the full metrics.

        Datasets that know hard twins (the synthetic order pairs: a clip and its time-reversed copy, whose captions
        differ only in direction) give ``{"order_pairs": [...]}``; the others give nothing.
        """
        twins_of = self.spec.extra.get("hard_twins")
        if twins_of is None:
            return {}
        which = "test" if stage == "test" else "val"
        table = self.table(which)
        twin = twins_of(self.annotation_root, self.splits[which])
        row = {vid: i for i, vid in enumerate(table.video_ids)}
        triples = [(c, v, row[twin[table.video_ids[v]]]) for c, v in enumerate(table.caption_video)
                   if twin.get(table.video_ids[v]) in row]
        return {"order_pairs": triples}


def _backbone_image_size(backbone: str) -> int:
    cfg = open_clip.get_model_config(backbone)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {backbone!r} (data.backbone)")
    size = cfg["vision_cfg"]["image_size"]
    return size[0] if isinstance(size, (list, tuple)) else int(size)
