"""`RetrievalDataModule`: the one data path of the benchmark (DESIGN.md, "The one path data takes").

Training yields (caption, video) pairs; validation and test yield two loaders — every video once (dataloader 0) and
every caption once (dataloader 1) — each item carrying its dataset index, each caption its video's index, so the
metrics callback can gather across processes and drop DistributedSampler's padding duplicates.
Frames travel as uint8 ``(T, 3, S, S)`` with a bool ``video_mask``; normalisation happens on the device.

Nothing changes the evaluation set silently: listed videos whose file is missing are skipped only under
``missing_videos="skip"`` and counted (with their ids) in `summary()`, which every run record carries; listed videos
a loader leaves out for lack of captions (VATEX / MSVD ``missing="skip"``) are counted the same way.
"""

from __future__ import annotations

import logging
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import open_clip
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from petl_bench.data.datasets import DatasetSpec, Items, get_dataset
from petl_bench.data.datasets._common import SkippedItemsWarning
from petl_bench.data.frame_cache import AUTO_FRAME_CACHE, FRAME_CACHE_DIR, CachedVideo, FrameCache, cache_image_size
from petl_bench.data.protocol import HOLDOUT, holdout_ids, ids_sha256, items_sha256
from petl_bench.data.video import FRAME_PROTOCOLS, VideoDecodeError, VideoSource, pad_frames, read_sampled
from petl_bench.resume import ResumableLoader

log = logging.getLogger(__name__)

MISSING_VIDEO_POLICIES = ("skip", "error")
TRAIN_CAPTION_MODES = ("all", "random_one")
# frames up to this size are cached for the synthetic set on first use (47 MB at 32 px, 190 MB at 64 px)
SYNTHETIC_CACHE_MAX_SIZE = 64
# Loader options the DataModule sets itself from its own arguments (they apply to every dataset).
_OWNED_OPTIONS = {"train_captions": "data.train_captions"}


def check_sizes(num_frames, max_words, batch_size, eval_batch_size=None) -> None:
    """Refuse frame, token and batch counts no run can use, naming the key and what to set, before any work starts.

    Without this, ``num_frames=0`` or ``-3`` surfaces later as a "cannot decode video" error (or a negative tensor
    dimension in a temporal module), ``max_words=0`` silently tokenises at open_clip's default of 77 tokens, and
    ``eval_batch_size=0`` silently falls back to ``batch_size``.
    """

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    problems = []
    if not (whole(num_frames) and num_frames >= 1):
        problems.append(f"data.num_frames={num_frames!r}: frames sampled per video must be a whole number >= 1 "
                        "(12 for MSR-VTT, MSVD and VATEX; 64 for ActivityNet and DiDeMo)")
    if not (whole(max_words) and max_words >= 3):
        problems.append(f"data.max_words={max_words!r}: tokens per caption must be a whole number >= 3 (the start and "
                        "end tokens and at least one word; 32 for the sentence datasets, 64 for paragraphs)")
    if not (whole(batch_size) and batch_size >= 1):
        problems.append(f"data.batch_size={batch_size!r}: (video, caption) pairs per process per step must be a whole "
                        "number >= 1")
    if eval_batch_size is not None and not (whole(eval_batch_size) and eval_batch_size >= 1):
        problems.append(f"data.eval_batch_size={eval_batch_size!r}: must be a whole number >= 1, or null to evaluate "
                        "with data.batch_size")
    if problems:
        raise ValueError("; ".join(problems))


# ----------------------------------------------------------------------------------------------------- split tables
def check_dataset_options(spec: DatasetSpec, options: dict | None) -> dict:
    """The dataset options a loader accepts (``spec.extra["options"]``: name -> allowed values, or None for any).

    An unknown option or a value outside the allowed ones is an error naming the key, instead of a ``TypeError`` from
    deep inside a loader (or, worse, an option silently ignored).
    """
    options = dict(options or {})
    accepted = spec.extra.get("options", {})
    for key, value in options.items():
        if key in _OWNED_OPTIONS:
            raise ValueError(
                f"data.dataset_options: {key!r} is not a dataset option; set {_OWNED_OPTIONS[key]} instead (it "
                "applies to every dataset)"
            )
        if key not in accepted:
            known = ", ".join(k for k in accepted if k not in _OWNED_OPTIONS) or "none"
            raise ValueError(
                f"data.dataset_options: {spec.name} has no option {key!r}; its options are: {known}"
            )
        allowed = accepted[key]
        if allowed is not None and value not in allowed:
            raise ValueError(
                f"data.dataset_options.{key}={value!r} is not accepted by {spec.name}; choose one of "
                f"{', '.join(repr(a) for a in allowed)}"
            )
    return options


def load_split_items(
    spec: DatasetSpec, split: str, annotation_root: Path, options: dict | None = None, train_captions: str = "all"
) -> tuple[Items, list[str]]:
    """``(items, ids the loader skipped for lack of captions)`` for one split.

    Skips are announced by the loaders as `SkippedItemsWarning`; they are caught here, logged, and returned so the
    count reaches the run record.
    """
    if split not in spec.splits:
        raise ValueError(f"{spec.name} has no split {split!r}; its splits are {', '.join(spec.splits)}")
    kwargs = check_dataset_options(spec, options)
    if "train_captions" in spec.extra.get("options", {}):
        kwargs["train_captions"] = train_captions
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedItemsWarning)
        items = spec.load(split, annotation_root, **kwargs)
    skipped: list[str] = []
    for warning in caught:
        if isinstance(warning.message, SkippedItemsWarning):
            skipped.extend(warning.message.skipped)
            log.warning("%s", warning.message)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return items, skipped


@dataclass(frozen=True)
class SplitTable:
    """A split as two tables: videos (id, path) and captions (text, row of its video).

    ``video_paths[i]`` is None only for a video served from the frame cache whose file is not on disk.
    """

    video_ids: list[str]
    video_paths: list[Path | None]
    captions: list[str]
    caption_video: list[int]
    missing_videos: list[str]
    split: str = ""
    listed: int = 0
    skipped_without_captions: list[str] = field(default_factory=list)
    items_sha256: str = ""  # of the listed (id, captions) items: `petl_bench.data.protocol.items_sha256`


def build_split_table(
    spec: DatasetSpec,
    split: str,
    annotation_root: Path,
    video_root: Path,
    missing_videos: str = "skip",
    *,
    options: dict | None = None,
    train_captions: str = "all",
    cache: FrameCache | None = None,
    loaded: tuple[Items, list[str]] | None = None,
    name: str | None = None,
) -> SplitTable:
    """Load a split's annotations and find its videos; a missing video is skipped (counted) or an error, by policy.

    With a frame cache, a video whose file is gone but whose frames are cached still counts as present.
    ``loaded``: the split's ``(items, skipped ids)`` already read (a validation hold-out and the rest of the training
    list are two tables of one file); ``name``: the table's split name (default ``split``).
    """
    if missing_videos not in MISSING_VIDEO_POLICIES:
        raise ValueError(f"missing_videos must be one of {MISSING_VIDEO_POLICIES}, got {missing_videos!r}")
    items, skipped = loaded if loaded is not None else load_split_items(spec, split, annotation_root, options,
                                                                        train_captions)
    split = name or split
    if not video_root.is_dir() and cache is None:
        raise FileNotFoundError(
            f"{spec.name}/{split}: video folder {video_root} does not exist; set data.video_root (default: "
            "<root>/videos) to the folder holding the videos"
        )
    ids, paths, captions, caption_video, missing = [], [], [], [], []
    for video_id, caps in items:
        path = spec.find_video(video_root, video_id) if video_root.is_dir() else None
        if path is None and (cache is None or cache.lookup(video_id, None) is None):
            missing.append(video_id)
            continue
        for cap in caps:
            captions.append(cap)
            caption_video.append(len(ids))
        ids.append(video_id)
        paths.append(path)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        msg = (f"{spec.name}/{split}: {len(missing)} of {len(items)} listed videos are missing under {video_root} "
               f"({shown})")
        if missing_videos == "error":
            raise FileNotFoundError(
                msg + "; download them, or set data.missing_videos=skip to run without them (the count is recorded "
                f"in the run's metadata); `petl-bench prepare {spec.name} --root ...` lists every missing file"
            )
        log.warning(msg + "; skipped (data.missing_videos=skip; counted in the run's metadata)")
    if not ids:
        raise FileNotFoundError(
            f"{spec.name}/{split}: none of the {len(items)} listed videos exist under {video_root}; check "
            f"data.video_root and the file names (`petl-bench prepare {spec.name} --root ...` reports them)"
        )
    return SplitTable(ids, paths, captions, caption_video, missing, split=split, listed=len(items),
                      skipped_without_captions=skipped, items_sha256=items_sha256(items))


# ------------------------------------------------------------------------------------------------------ frames
class FrameLoader:
    """Frames of the videos of one split: from the frame cache when a video is cached, else decoded from its file.

    Both paths apply the same rules: `sample_frame_indices` on the first ``max_seconds`` of the clip (uniform
    segments: the middle frame at evaluation, a random one per segment in training; or CLIP4Clip's 1 fps), then pad to
    ``num_frames`` with zeros and mask.
    """

    def __init__(self, table: SplitTable, num_frames: int, image_size: int, protocol: str, train: bool,
                 max_seconds: float | None = None, cache: FrameCache | None = None, dataset: str = "",
                 data_root: str = "<data root>"):
        self.table, self.num_frames, self.image_size = table, num_frames, image_size
        self.protocol, self.train, self.max_seconds = protocol, train, max_seconds
        self.dataset, self.data_root = dataset, data_root
        self.cached: list[CachedVideo | None] = [
            cache.lookup(video_id, path) if cache is not None else None
            for video_id, path in zip(table.video_ids, table.video_paths)
        ]
        # a reader without the index: this object travels to every worker process, and `cached` holds what it needs
        self.cache = None if cache is None else FrameCache(cache.root, cache.dataset, cache.image_size, cache.sampling)

    @property
    def num_cached(self) -> int:
        return sum(entry is not None for entry in self.cached)

    def load(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        # training draws fresh frames each time; python's RNG is seeded per worker by Lightning
        rng = np.random.default_rng(random.getrandbits(63)) if self.train else None
        entry = self.cached[row]
        if entry is not None:
            real = self.cache.read(entry, self.num_frames, self.protocol, self.train, rng, self.max_seconds)
        else:
            real = self._decode(row, rng)
        return pad_frames(real, self.num_frames)

    def _decode(self, row: int, rng: np.random.Generator | None) -> torch.Tensor:
        path = self.table.video_paths[row]
        if path is None:  # listed as cached at set-up, but its frames file has gone since
            raise VideoDecodeError(
                f"video {self.table.video_ids[row]!r} of {self.dataset}/{self.table.split} has no file under the "
                "video folder and is no longer in the frame cache; rebuild the cache with `petl-bench prepare`"
            )
        try:
            source = VideoSource(path, self.image_size)
            return read_sampled(source, self.num_frames, self.protocol, self.train, rng, self.max_seconds)
        except VideoDecodeError as err:
            # one string argument: DataLoader workers re-raise the exception type with the message alone
            raise VideoDecodeError(
                f"{err}\n(video {self.table.video_ids[row]!r} of {self.dataset}/{self.table.split}) Run `petl-bench "
                f"prepare {self.dataset} --root {self.data_root} --check-decode` to list every unreadable video before "
                "training; fix or remove them (or drop them from the split list)."
            ) from err


class PairDataset(Dataset):
    """Training pairs: every (video, caption) pair, or one random caption per video per epoch."""

    def __init__(self, table: SplitTable, frames: FrameLoader, tokenize, train_captions: str = "all"):
        self.table, self.frames, self.tokenize, self.train_captions = table, frames, tokenize, train_captions
        self.by_video: list[list[int]] = [[] for _ in table.video_ids]
        for c, v in enumerate(table.caption_video):
            self.by_video[v].append(c)

    def __len__(self) -> int:
        return len(self.table.captions) if self.train_captions == "all" else len(self.table.video_ids)

    def __getitem__(self, i: int) -> dict:
        c = i if self.train_captions == "all" else random.choice(self.by_video[i])
        v = self.table.caption_video[c]
        video, mask = self.frames.load(v)
        return {"video": video, "video_mask": mask, "text": self.tokenize(self.table.captions[c]),
                "index": c, "video_index": v}


class VideoDataset(Dataset):
    def __init__(self, table: SplitTable, frames: FrameLoader):
        self.table, self.frames = table, frames

    def __len__(self) -> int:
        return len(self.table.video_ids)

    def __getitem__(self, i: int) -> dict:
        video, mask = self.frames.load(i)
        return {"video": video, "video_mask": mask, "index": i}


class CaptionDataset(Dataset):
    def __init__(self, table: SplitTable, tokenize):
        self.table, self.tokenize = table, tokenize

    def __len__(self) -> int:
        return len(self.table.captions)

    def __getitem__(self, i: int) -> dict:
        return {"text": self.tokenize(self.table.captions[i]), "index": i, "video_index": self.table.caption_video[i]}


# ------------------------------------------------------------------------------------------------------ module
class RetrievalDataModule(L.LightningDataModule):
    """One DataModule for every dataset and method.

    Args:
        dataset: a registered dataset (``synthetic``, ``msrvtt``, ``msvd``, ``vatex``, ``activitynet``, ``didemo``).
        root: the dataset folder; annotations are read from ``annotation_root`` (default: root) and videos from
            ``video_root`` (default: root/videos). The synthetic set defaults to ``<cache>/synthetic-v<N>`` and is
            generated there when missing.
        backbone: open_clip model name, linked from the model: it picks the tokenizer and the frame size.
        num_frames / max_words: frames per video and tokens per caption (linked to the model).
        frame_protocol: ``uniform`` segments (the class default, used by the synthetic set) or CLIP4Clip's ``fps``
            (1 fps, then evenly thinned; the default of every real dataset config).
        max_seconds: sample only the first ``max_seconds`` of each video (DiDeMo's protocol: 30); None: all of it.
        train_captions: ``all`` (video, caption) pairs per epoch, or ``random_one`` caption per video per epoch.
        val_split: the split model selection sees, never the test split (refused): the dataset's official
            validation split by default (MSVD, VATEX, DiDeMo), or ``holdout``: ``val_holdout`` videos (a count, or a
            share of the list below 1) drawn with ``val_seed`` from the training list, which trains on the rest
            (`petl_bench.data.protocol`; the default wherever ``val_holdout`` is set and the dataset has no validation
            split: MSR-VTT, ActivityNet). No validation split at all (the synthetic set): the last epoch is tested.
        manifest_probe: videos per split whose container header `manifest()` reads for fps / resolution statistics
            (a seeded sample beyond that; 0: none).
        batch_size: per process; the loss sees batch_size x processes. A training set smaller than one batch
            gives one smaller batch per epoch (recorded throughput counts the samples actually seen).
        eval_batch_size: per process at validation and test; None: ``batch_size``.
        missing_videos: a listed video without a file is ``skip``-ped (counted and listed in `summary()`, hence in
            the run record) or an ``error`` naming it.
        dataset_options: passed to the dataset's loader; only the options its spec lists are accepted (e.g.
            ``{"missing": "skip"}`` for VATEX ids without captions, ``{"use_list": false}`` for DiDeMo).
        frame_cache: a folder built by ``petl-bench prepare <dataset> --frame-cache DIR``; cached videos are read
            from it, the others decoded from their files (with a warning saying how many). ``auto``: the data
            folder's own cache, ``<root>/frame_cache``, when it holds this run's frame size (else every video is
            decoded, with a warning). The synthetic set builds its own there (``petl-bench synth``, or here on first
            use at up to 64 px): every frame of every clip, so reading it gives exactly the frames decoding gives.
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
        max_seconds: float | None = None,
        train_split: str | None = None,
        test_split: str | None = None,
        val_split: str | None = None,
        val_holdout: float | None = None,
        val_seed: int = 0,
        manifest_probe: int = 256,
        train_captions: str = "all",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        missing_videos: str = "skip",
        dataset_options: dict | None = None,
        frame_cache: str | None = None,
    ):
        super().__init__()
        check_sizes(num_frames, max_words, batch_size, eval_batch_size)
        self.save_hyperparameters()
        self.spec = get_dataset(dataset)
        if frame_protocol not in FRAME_PROTOCOLS:
            raise ValueError(f"data.frame_protocol must be one of {FRAME_PROTOCOLS}, got {frame_protocol!r}")
        if train_captions not in TRAIN_CAPTION_MODES:
            raise ValueError(f"data.train_captions must be 'all' or 'random_one', got {train_captions!r}")
        if missing_videos not in MISSING_VIDEO_POLICIES:
            raise ValueError(f"data.missing_videos must be 'skip' or 'error', got {missing_videos!r}")
        if max_seconds is not None and not max_seconds > 0:
            raise ValueError(f"data.max_seconds must be positive (or null for whole videos), got {max_seconds!r}")
        self.dataset_options = check_dataset_options(self.spec, dataset_options)
        for which, split in (("train", train_split), ("test", test_split), ("val", val_split)):
            if split is not None and split not in self.spec.splits and not (which == "val" and split == HOLDOUT):
                raise ValueError(
                    f"data.{which}_split={split!r}: {dataset} has no such split; its splits are "
                    f"{', '.join(self.spec.splits)}"
                )
        if root is None:
            if dataset != "synthetic":
                raise ValueError(f"data.root is required for {dataset}: the folder holding its annotations and videos")
            from petl_bench.data.synthetic import default_root

            root = str(default_root())
        self.root = Path(root).expanduser()
        self.annotation_root = Path(annotation_root).expanduser() if annotation_root else self.root
        self.video_root = Path(video_root).expanduser() if video_root else self.root / "videos"
        self.image_size = image_size or _backbone_image_size(backbone)
        self._tokenizer = open_clip.get_tokenizer(backbone)
        self.splits = {
            "train": train_split or self.spec.train_split,
            "test": test_split or self.spec.test_split,
            "val": val_split or self.spec.val_split or (HOLDOUT if val_holdout else None),
        }
        if self.splits["val"] == self.splits["test"]:
            raise ValueError(
                f"data.val_split={self.splits['val']!r} is the test split: model selection (best epoch, early "
                "stopping, post-processing parameters) must not see the test set. Use the dataset's validation split "
                "or data.val_holdout=N (N training videos held out)"
            )
        if self.splits["val"] == HOLDOUT and not val_holdout:
            raise ValueError("data.val_split=holdout needs data.val_holdout: the number (or share) of training videos "
                             "to hold out")
        if val_holdout and self.splits["val"] != HOLDOUT:
            raise ValueError(f"data.val_holdout={val_holdout!r} is set but validation uses the split "
                             f"{self.splits['val']!r}; unset one of them")
        self._holdout: list[str] | None = None  # held-out training ids, once drawn
        self.tables: dict[str, SplitTable] = {}
        self._hard_twins: dict[str, dict[str, str]] = {}  # split -> video id -> twin id, read once per split
        self._cache: FrameCache | None = None
        self._auto_cache_note: str | None = None
        self._cached_counts: dict[str, int] = {}

    def tokenize(self, caption: str) -> torch.Tensor:
        return self._tokenizer([caption], context_length=self.hparams.max_words)[0]

    # ------------------------------------------------------------------ set-up
    def prepare_data(self) -> None:
        # the synthetic set is generated (default parameters) where none exists yet; an existing one is used as is
        if self.hparams.dataset == "synthetic" and not (self.root / "manifest.json").is_file():
            from petl_bench.data.synthetic import generate_synthetic

            generate_synthetic(self.root)
        if (self.hparams.dataset == "synthetic" and self.hparams.frame_cache == AUTO_FRAME_CACHE
                and self.image_size <= SYNTHETIC_CACHE_MAX_SIZE and cache_image_size(self.root / FRAME_CACHE_DIR) is None):
            from petl_bench.data.synthetic import build_frame_cache

            build_frame_cache(self.root, self.image_size)

    def frame_cache_dir(self) -> str | None:
        """The frame cache folder this run reads (``data.frame_cache`` with ``auto`` resolved), or None."""
        value = self.hparams.frame_cache
        if value != AUTO_FRAME_CACHE:
            return value
        folder = self.root / FRAME_CACHE_DIR
        size = cache_image_size(folder)
        if size == self.image_size:
            return str(folder)
        if self._auto_cache_note is None:
            self._auto_cache_note = (f"no frame cache at {folder}" if size is None
                                     else f"the frame cache at {folder} holds {size} px frames, not {self.image_size}")
            log.log(logging.INFO if self.hparams.dataset == "synthetic" else logging.WARNING,
                    "data.frame_cache=auto: %s; decoding every video (build one with `petl-bench prepare %s --root %s "
                    "--frame-cache auto --image-size %d`)", self._auto_cache_note, self.hparams.dataset, self.root,
                    self.image_size)
        return None

    @property
    def frame_cache(self) -> FrameCache | None:
        """The opened frame cache (``data.frame_cache``), or None."""
        folder = self.frame_cache_dir() if self._cache is None else None
        if folder:
            self._cache = FrameCache.open(folder, self.hparams.dataset, self.image_size)
            sampling = self._cache.sampling
            if sampling.max_seconds != self.hparams.max_seconds:
                raise ValueError(
                    f"frame cache {self._cache.root} was built for max_seconds={sampling.max_seconds}, this run uses "
                    f"data.max_seconds={self.hparams.max_seconds}; the cache lacks the frames the run would read — "
                    "rebuild it with the same --max-seconds, or unset data.frame_cache"
                )
            if sampling.num_frames != self.hparams.num_frames and not self._cache.holds_every_frame():
                log.warning(
                    "frame cache %s holds the exact evaluation frames for %d frames per video; this run samples %d, "
                    "so each frame is served by the nearest cached one (rebuild with --num-frames %d for exact "
                    "frames)", self._cache.root, sampling.num_frames, self.hparams.num_frames,
                    self.hparams.num_frames)
        return self._cache

    def _table_key(self, which: str) -> str:
        split = self.splits[which]
        if split is None:
            raise ValueError(f"{self.hparams.dataset} has no validation split here (set data.val_split or "
                             "data.val_holdout)")
        return f"{self.splits['train']}/{HOLDOUT}" if split == HOLDOUT else split

    def table(self, which: str) -> SplitTable:
        key = self._table_key(which)
        if key not in self.tables:
            if self.splits["val"] == HOLDOUT and which in ("train", "val"):
                self._build_holdout()
            else:
                self.tables[key] = build_split_table(
                    self.spec, key, self.annotation_root, self.video_root, self.hparams.missing_videos,
                    options=self.dataset_options, train_captions=self.hparams.train_captions, cache=self.frame_cache,
                )
        return self.tables[key]

    def _twins(self, split: str) -> dict[str, str]:
        twins_of = self.spec.extra.get("hard_twins")
        if twins_of is None:
            return {}
        if split not in self._hard_twins:
            self._hard_twins[split] = twins_of(self.annotation_root, split)
        return self._hard_twins[split]

    def _build_holdout(self) -> None:
        """The training list read once and cut in two tables: the held-out validation ids and the rest."""
        train = self.splits["train"]
        items, skipped = load_split_items(self.spec, train, self.annotation_root, self.dataset_options,
                                          self.hparams.train_captions)
        twins = self._twins(train)  # a clip and its order twin stay on one side
        groups = {a: min(a, b) for a, b in twins.items()}
        held = set(holdout_ids([video_id for video_id, _ in items], self.hparams.val_holdout,
                               self.hparams.val_seed, groups))
        self._holdout = [video_id for video_id, _ in items if video_id in held]
        common = {"options": self.dataset_options, "train_captions": self.hparams.train_captions,
                  "cache": self.frame_cache}
        self.tables[train] = build_split_table(
            self.spec, train, self.annotation_root, self.video_root, self.hparams.missing_videos,
            loaded=([it for it in items if it[0] not in held], skipped), **common)
        self.tables[f"{train}/{HOLDOUT}"] = build_split_table(
            self.spec, train, self.annotation_root, self.video_root, self.hparams.missing_videos,
            loaded=([it for it in items if it[0] in held], []), name=f"{train}/{HOLDOUT}", **common)
        log.info("%s: validation holds out %d of the %d listed %s videos (val_seed %d); training uses the other %d",
                 self.hparams.dataset, len(held), len(items), train, self.hparams.val_seed, len(items) - len(held))

    @property
    def has_validation(self) -> bool:
        return self.splits["val"] is not None

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            self.table("train")
            if self.has_validation:
                self.table("val")
        if stage in ("validate",):
            self.table("val")
        if stage in ("test", None):
            self.table("test")

    def summary(self) -> dict:
        """What the run was trained and evaluated on: recorded in every result file.

        Per split used: its name, videos and captions, listed videos missing on disk (count; the ids too for the
        evaluation splits) and ids dropped for lack of captions; plus the frame protocol, how training drew captions
        (``train_caption_sampling``: every pair or one random caption per video) and, with a frame cache, how many
        videos of each split were read from it. ``val_split`` is None when nothing validates (the last epoch is then
        tested); a hold-out adds ``val_holdout`` (from which split, how many, the seed, the ids and their hash).
        """
        out = {"dataset": self.hparams.dataset, "frame_protocol": self.hparams.frame_protocol,
               "num_frames": self.hparams.num_frames, "max_words": self.hparams.max_words,
               "max_seconds": self.hparams.max_seconds, "train_caption_sampling": self.hparams.train_captions,
               "image_size": self.image_size, "missing_videos": self.hparams.missing_videos,
               "dataset_options": dict(self.dataset_options), "frame_cache": self.frame_cache_dir()}
        out["val_split"] = self.splits["val"]
        for which in ("train", "test", "val"):
            split = self.splits[which]
            out[f"{which}_split"] = split
            if split is None:
                continue
            key = self._table_key(which)
            if key in self.tables:
                t = self.tables[key]
                out[f"{which}_videos"] = len(t.video_ids)
                out[f"{which}_captions"] = len(t.captions)
                out[f"{which}_listed_videos"] = t.listed
                out[f"{which}_missing_videos"] = len(t.missing_videos)
                out[f"{which}_skipped_without_captions"] = len(t.skipped_without_captions)
                if which != "train":
                    out[f"{which}_missing_video_ids"] = list(t.missing_videos)
                    out[f"{which}_skipped_without_captions_ids"] = list(t.skipped_without_captions)
                if key in self._cached_counts:
                    out[f"{which}_videos_from_frame_cache"] = self._cached_counts[key]
        if self._holdout is not None:
            requested = self.hparams.val_holdout  # a count arrives as a float from the CLI: 500.0 -> 500
            requested = int(requested) if float(requested).is_integer() else requested
            out["val_holdout"] = {"from_split": self.splits["train"], "requested": requested,
                                  "seed": self.hparams.val_seed, "videos": len(self._holdout),
                                  "ids_sha256": ids_sha256(self._holdout), "ids": list(self._holdout)}
        return out

    def manifest(self) -> dict:
        """What data the run saw, in enough detail to show that two runs saw the same (`petl_bench.data.protocol`).

        Per split built: videos and captions listed, found, missing (ids for the evaluation splits), left out for lack
        of captions, unreadable among the probed files, a hash of the listed (id, captions) items, and the source
        fps / resolution / duration (min, median, max) from a container-header probe; plus the frame protocol and a
        SHA-256 of every annotation file.
        """
        from petl_bench.data.protocol import annotation_files, combined_sha256, probe_videos

        subdirs = [self.spec.extra["annotation_subdir"]] if "annotation_subdir" in self.spec.extra else []
        files = annotation_files(self.annotation_root, subdirs)
        splits = {}
        for which in ("train", "val", "test"):
            if self.splits[which] is None:
                continue
            try:  # every split, also those this run did not load (a zero-shot run): two manifests compare whole
                t = self.table(which)
            except (OSError, ValueError) as err:
                splits[which] = {"split": self.splits[which], "error": str(err).splitlines()[0][:300]}
                continue
            probe = probe_videos(t.video_ids, t.video_paths, self.hparams.manifest_probe, self.hparams.val_seed)
            splits[which] = {
                "split": t.split, "listed_videos": t.listed + len(t.skipped_without_captions),
                "listed_with_captions": t.listed, "found_videos": len(t.video_ids),
                "missing_videos": len(t.missing_videos), "skipped_without_captions": len(t.skipped_without_captions),
                "unreadable_videos": probe["unreadable"], "captions": len(t.captions),
                "items_sha256": t.items_sha256, "video_ids_sha256": ids_sha256(t.video_ids), "probe": probe,
                **({"missing_video_ids": list(t.missing_videos)} if which != "train" else {}),
            }
        return {
            "dataset": self.hparams.dataset, "annotation_root": str(self.annotation_root),
            "video_root": str(self.video_root),
            "frames": {"protocol": self.hparams.frame_protocol, "num_frames": self.hparams.num_frames,
                       "max_seconds": self.hparams.max_seconds, "image_size": self.image_size,
                       "frame_cache": self.frame_cache_dir()},
            "max_words": self.hparams.max_words, "train_caption_sampling": self.hparams.train_captions,
            "validation": ({"split": self.splits["val"], **({"holdout": self.summary()["val_holdout"]}
                                                            if self._holdout is not None else {})}
                           if self.has_validation else None),
            "splits": splits, "annotation_files": files, "annotations_sha256": combined_sha256(files),
        }

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def _frames(self, which: str, train: bool) -> FrameLoader:
        table = self.table(which)
        cache = self.frame_cache
        loader = FrameLoader(table, self.hparams.num_frames, self.image_size, self.hparams.frame_protocol, train,
                             self.hparams.max_seconds, cache, self.hparams.dataset, str(self.root))
        if cache is not None:
            self._cached_counts[table.split] = loader.num_cached
            uncached = [v for v, e in zip(table.video_ids, loader.cached) if e is None]
            if uncached:
                shown = ", ".join(uncached[:5]) + (", ..." if len(uncached) > 5 else "")
                log.warning(
                    "%s/%s: %d of %d videos are not in the frame cache %s (%s); they are decoded from their files. "
                    "Run `petl-bench prepare %s --root %s --frame-cache %s` to add them.",
                    self.hparams.dataset, table.split, len(uncached), len(table.video_ids), cache.root, shown,
                    self.hparams.dataset, self.root, cache.root)
        return loader

    def train_dataloader(self) -> DataLoader:
        pairs = PairDataset(self.table("train"), self._frames("train", True), self.tokenize,
                            self.hparams.train_captions)
        log.info("%s/%s: training on %s (%d items per epoch)", self.hparams.dataset, self.splits["train"],
                 "every (video, caption) pair" if self.hparams.train_captions == "all"
                 else "one random caption per video per epoch", len(pairs))
        # drop_last: every step sees a full batch, so the InfoNCE task has the same difficulty throughout
        # resumable and seeded per (epoch, item): a resumed or multi-process run sees the same batches (resume.py)
        return ResumableLoader.like(self._loader(pairs, self.hparams.batch_size, shuffle=True,
                                                 drop_last=len(pairs) > self.hparams.batch_size))

    def _eval_loaders(self, which: str) -> list[DataLoader]:
        table = self.table(which)
        bs = self.hparams.batch_size if self.hparams.eval_batch_size is None else self.hparams.eval_batch_size
        return [self._loader(VideoDataset(table, self._frames(which, False)), bs, shuffle=False),
                self._loader(CaptionDataset(table, self.tokenize), bs, shuffle=False)]

    def val_dataloader(self) -> list[DataLoader]:
        if not self.has_validation:  # no split disjoint from test: nothing validates, the last epoch is tested
            log.info("%s: no validation split (data.val_split / data.val_holdout unset)", self.hparams.dataset)
            return []
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    # ------------------------------------------------------------------ extra evaluation views
    def eval_pairs(self, stage: str) -> dict[str, list[tuple[int, int, int]]]:
        """Named sets of (caption, its video, a hard negative video) scored beside the full metrics.

        Datasets that know hard twins (the synthetic order pairs: a clip and its time-reversed copy, whose captions
        differ only in direction) give ``{"order_pairs": [...]}``; the others give nothing.
        """
        if self.spec.extra.get("hard_twins") is None:
            return {}
        which = "test" if stage == "test" else "val"
        table = self.table(which)
        split = self.splits[which]
        twin = self._twins(self.splits["train"] if split == HOLDOUT else split)  # a hold-out keeps its twins
        row = {vid: i for i, vid in enumerate(table.video_ids)}
        triples = [(c, v, row[twin[table.video_ids[v]]]) for c, v in enumerate(table.caption_video)
                   if twin.get(table.video_ids[v]) in row]
        return {"order_pairs": triples}

    def eval_subsets(self, stage: str) -> dict[str, list[int]]:
        """Named caption subsets whose T2V metrics are reported beside the full set's: the order pairs' captions."""
        return {name: sorted({c for c, _, _ in triples}) for name, triples in self.eval_pairs(stage).items()}

    # ------------------------------------------------------------------ querybank (post-processing, metrics.py)
    def querybank_dataloaders(self, num_captions: int, num_videos: int, seed: int = 0, rank: int = 0,
                              world_size: int = 1) -> list[DataLoader]:
        """``[videos, captions]`` loaders over a seeded random subset of the *training* split, never val/test: the
        bank of training queries QB-Norm and Sinkhorn post-processing score the evaluation gallery against.

        Evaluation frame sampling (deterministic); ``index`` is the row in the training tables. This process gets
        every ``world_size``-th item from ``rank``, so the processes embed disjoint shares of the same bank.
        """
        table = self.table("train")
        generator = torch.Generator().manual_seed(seed)
        videos = torch.randperm(len(table.video_ids), generator=generator)[:num_videos].sort().values
        captions = torch.randperm(len(table.captions), generator=generator)[:num_captions].sort().values
        bs = self.hparams.batch_size if self.hparams.eval_batch_size is None else self.hparams.eval_batch_size
        return [
            self._loader(Subset(VideoDataset(table, self._frames("train", False)), videos[rank::world_size].tolist()),
                         bs, shuffle=False),
            self._loader(Subset(CaptionDataset(table, self.tokenize), captions[rank::world_size].tolist()), bs,
                         shuffle=False),
        ]


def _backbone_image_size(backbone: str) -> int:
    cfg = open_clip.get_model_config(backbone)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {backbone!r} (data.backbone)")
    size = cfg["vision_cfg"]["image_size"]
    return size[0] if isinstance(size, (list, tuple)) else int(size)
