"""A frame cache: every video decoded and resized once, its uint8 frames stored as one ``.npy`` file, reused by every
run and every method.

Decoding dominates the data time of CLIP-based retrieval (a ViT-B/32 forward of 12 frames costs less than decoding
them from a 30 fps H.264 file), and a benchmark decodes the same videos for every method and seed. The cache is built
by ``petl-bench prepare <dataset> --frame-cache DIR`` and read by the DataModule with ``data.frame_cache: DIR``.

What is stored, per video, is chosen so that reading from the cache changes nothing a run depends on:

- the exact evaluation frames of both frame protocols (``uniform`` segment middles and ``fps`` one-per-second frames)
  for the cache's ``num_frames``: evaluating from the cache reads the very pixels decoding would give;
- ``frames_per_segment x num_frames`` frames spread evenly over the clip, so that training can still draw a random
  frame per segment (X-Pool's rule) among several candidates instead of always seeing the middle one;
- a clip with fewer source frames than that is stored whole.

Frames go through `VideoSource.read`, the same decode + bicubic resize + centre crop as the decoding path.

Layout of a cache folder::

    DIR/manifest.json   what the cache holds: dataset, image size, sampling (written first; a rebuild must match it)
    DIR/index.jsonl     one line per cached video: id, frames file, source frame count and rate, cached indices, the
                        source file's size (a changed file is not read from the cache); a later line wins
    DIR/frames/<id>.npy uint8 (K, 3, S, S), written to a temporary file then renamed, so a file that exists is whole

The index is appended after each frames file is in place, so an interrupted build keeps what it finished; a torn last
line is ignored. One builder at a time per folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from petl_bench.atomic import write_text_atomic
from petl_bench.data.video import VideoDecodeError, VideoSource, sample_frame_indices, usable_frames

log = logging.getLogger(__name__)

CACHE_FORMAT = "petl-bench-frame-cache"
# 2: frames resized at their shown shape (rotation, sample aspect ratio; see video.py). Version 1 caches held rotated
# phone clips squeezed and non-square-pixel clips stretched, so they are refused rather than read.
CACHE_VERSION = 2
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.jsonl"
FRAMES_DIR = "frames"
# ``data.frame_cache: auto`` reads the data folder's own cache, ``<root>/frame_cache`` (`prepare --frame-cache auto`)
AUTO_FRAME_CACHE = "auto"
FRAME_CACHE_DIR = "frame_cache"


class FrameCacheError(RuntimeError):
    """A frame cache folder cannot be used as asked (wrong dataset or image size, unreadable files)."""


@dataclass(frozen=True)
class CacheSampling:
    """Which frames of a video the cache keeps (see the module docstring).

    Args:
        num_frames: the run's frame count whose evaluation frames are stored exactly (12 for MSR-VTT, MSVD, VATEX;
            64 for the paragraph datasets).
        frames_per_segment: evenly spread frames per segment on top of those, the candidates of training draws.
        max_seconds: only the first ``max_seconds`` of a video are sampled (DiDeMo: 30); ``None`` for all of it.
    """

    num_frames: int = 12
    frames_per_segment: int = 2
    max_seconds: float | None = None

    def __post_init__(self):
        if self.num_frames < 1 or self.frames_per_segment < 1:
            raise ValueError(
                f"frame cache sampling needs num_frames >= 1 and frames_per_segment >= 1, got {self.num_frames} and "
                f"{self.frames_per_segment}"
            )
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive or None, got {self.max_seconds}")

    def indices(self, num_source_frames: int, fps: float) -> list[int]:
        """The source frame indices to store, increasing."""
        usable = usable_frames(num_source_frames, fps, self.max_seconds)
        keep = set(sample_frame_indices(usable, fps, self.frames_per_segment * self.num_frames, "uniform"))
        keep.update(sample_frame_indices(usable, fps, self.num_frames, "uniform"))
        if math.isfinite(fps) and fps > 0:
            keep.update(sample_frame_indices(usable, fps, self.num_frames, "fps"))
        return sorted(keep)


@dataclass(frozen=True)
class CachedVideo:
    """One cached video: where its frames are and which source frames they are."""

    video_id: str
    file: str  # relative to the cache folder
    source_frames: int
    source_fps: float
    indices: tuple[int, ...]
    source_bytes: int
    source_name: str

    def to_json(self) -> str:
        record = asdict(self)
        record["indices"] = list(self.indices)
        return json.dumps(record, separators=(",", ":"))


@dataclass
class FrameCache:
    """An opened cache folder: its manifest and the index of cached videos."""

    root: Path
    dataset: str
    image_size: int
    sampling: CacheSampling
    entries: dict[str, CachedVideo] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------------------- open / create
    @classmethod
    def open(cls, root: str | os.PathLike, dataset: str | None = None, image_size: int | None = None) -> FrameCache:
        """Open an existing cache for reading; a cache of another dataset or image size is an error."""
        root = Path(root).expanduser()
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FrameCacheError(
                f"{root} is not a frame cache (no {MANIFEST_NAME}); build one with `petl-bench prepare "
                f"{dataset or '<dataset>'} --root DATA --frame-cache {root}`, or unset data.frame_cache"
            )
        manifest = _read_manifest(manifest_path)
        cache = cls(
            root=root,
            dataset=manifest["dataset"],
            image_size=int(manifest["image_size"]),
            sampling=CacheSampling(**manifest["sampling"]),
        )
        if dataset is not None and cache.dataset != dataset:
            raise FrameCacheError(
                f"frame cache {root} holds {cache.dataset!r} videos, not {dataset!r}; point data.frame_cache at the "
                f"cache built for {dataset}"
            )
        if image_size is not None and cache.image_size != image_size:
            raise FrameCacheError(
                f"frame cache {root} holds {cache.image_size}x{cache.image_size} frames but this run needs "
                f"{image_size}x{image_size} (the backbone's input size); rebuild it with `petl-bench prepare "
                f"{cache.dataset} ... --frame-cache DIR --image-size {image_size}` into another folder"
            )
        cache.entries = _read_index(root / INDEX_NAME)
        return cache

    @classmethod
    def create(cls, root: str | os.PathLike, dataset: str, image_size: int, sampling: CacheSampling) -> FrameCache:
        """Open a cache for building: a new folder gets a manifest; an existing one must have been built with the
        same dataset, image size and sampling (its cached videos are then kept and only the rest is added)."""
        root = Path(root).expanduser()
        if (root / MANIFEST_NAME).is_file():
            cache = cls.open(root, dataset, image_size)
            if cache.sampling != sampling:
                raise FrameCacheError(
                    f"frame cache {root} was built with sampling {asdict(cache.sampling)}, not {asdict(sampling)}; "
                    "use another folder (or the same options) so that cached videos agree"
                )
            _end_torn_line(root / INDEX_NAME)
            return cache
        (root / FRAMES_DIR).mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "dataset": dataset,
            "image_size": image_size,
            "sampling": asdict(sampling),
            "dtype": "uint8",
            "layout": "(frames, 3, image_size, image_size) per video, RGB, resized short side + centre crop",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_text_atomic(root / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        return cls(root=root, dataset=dataset, image_size=image_size, sampling=sampling)

    # ---------------------------------------------------------------------------------------------------- lookup
    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, video_id: str) -> bool:
        return video_id in self.entries

    def lookup(self, video_id: str, source: Path | None) -> CachedVideo | None:
        """The entry of a video if its frames are cached and still belong to ``source`` (same file size)."""
        entry = self.entries.get(video_id)
        if entry is None or not (self.root / entry.file).is_file():
            return None
        if source is not None and source.is_file() and source.stat().st_size != entry.source_bytes:
            return None  # the video file changed since it was cached
        return entry

    def holds_every_frame(self) -> bool:
        """Whether every cached video holds all its source frames (then any sampling reads exact frames)."""
        return all(len(e.indices) == e.source_frames for e in self.entries.values())

    def frames_path(self, entry: CachedVideo) -> Path:
        return self.root / entry.file

    # ---------------------------------------------------------------------------------------------------- build
    def add(self, video_id: str, source: Path) -> CachedVideo:
        """Decode one video's cached frames, write them, and append the index line.

        Raises:
            VideoDecodeError: the file cannot be decoded (nothing is written).
        """
        entry = cache_video(self.root, video_id, source, self.image_size, self.sampling)
        self.record(entry)
        return entry

    def record(self, entry: CachedVideo) -> None:
        """Append a video whose frames file is in place to the index (only the builder process writes it)."""
        with open(self.root / INDEX_NAME, "a", encoding="utf-8") as index:
            index.write(entry.to_json() + "\n")
            index.flush()
        self.entries[entry.video_id] = entry

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in (self.root / FRAMES_DIR).glob("*.npy"))

    # ---------------------------------------------------------------------------------------------------- read
    def read(
        self,
        entry: CachedVideo,
        num_frames: int,
        protocol: str = "uniform",
        train: bool = False,
        rng: np.random.Generator | None = None,
        max_seconds: float | None = None,
    ) -> torch.Tensor:
        """The frames a run asks for, as uint8 ``(n, 3, S, S)`` with ``n <= num_frames`` (the caller pads).

        The wanted source frames follow the same rules as decoding (`sample_frame_indices` on the same source frame
        count); each is served by the cached frame at, or nearest to, that index. Training with the uniform protocol
        draws a random cached frame inside each segment.
        """
        positions = cached_positions(
            entry.indices, entry.source_frames, entry.source_fps, num_frames, protocol, train, rng, max_seconds
        )
        path = self.root / entry.file
        try:
            frames = np.load(path, mmap_mode="r", allow_pickle=False)
            if frames.ndim != 4 or frames.shape[0] != len(entry.indices) or frames.dtype != np.uint8:
                raise ValueError(f"array of shape {frames.shape} and type {frames.dtype}")
            picked = np.ascontiguousarray(frames[positions])
        except (OSError, ValueError) as err:
            raise FrameCacheError(
                f"cannot read cached frames {path} of video {entry.video_id!r} ({err}); the cache is damaged: rebuild "
                f"it with `petl-bench prepare {self.dataset} ... --frame-cache {self.root}` after deleting that file"
            ) from err
        return torch.from_numpy(picked)


def cache_image_size(root: str | os.PathLike) -> int | None:
    """The frame size of the cache in ``root``, or None when ``root`` holds no readable cache of this version."""
    try:
        manifest = _read_manifest(Path(root) / MANIFEST_NAME)
    except (FrameCacheError, OSError):
        return None
    return int(manifest["image_size"])


def cached_positions(
    cached: tuple[int, ...] | list[int],
    source_frames: int,
    fps: float,
    num_frames: int,
    protocol: str = "uniform",
    train: bool = False,
    rng: np.random.Generator | None = None,
    max_seconds: float | None = None,
) -> list[int]:
    """Positions in a cached frame array (whose source indices are ``cached``, increasing) serving one sample."""
    cached = np.asarray(cached, dtype=np.int64)
    usable = usable_frames(source_frames, fps, max_seconds)
    wanted = np.asarray(sample_frame_indices(usable, fps, num_frames, protocol, train=False), dtype=np.int64)
    positions = _nearest(cached, wanted)
    if train and protocol == "uniform" and usable > num_frames:
        # X-Pool's training rule on the cached frames: any cached frame of the segment, uniformly
        rng = rng if rng is not None else np.random.default_rng()
        bounds = np.floor(np.linspace(0, usable, num_frames + 1)).astype(np.int64)
        first = np.searchsorted(cached, bounds[:-1], side="left")
        stop = np.searchsorted(cached, bounds[1:], side="left")
        has = stop > first
        draws = rng.integers(first, np.maximum(stop, first + 1))
        positions = np.where(has, draws, positions)
    return positions.tolist()


def _nearest(cached: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index into ``cached`` of the value nearest each ``wanted`` (the lower one on a tie)."""
    right = np.clip(np.searchsorted(cached, wanted, side="left"), 0, len(cached) - 1)
    left = np.clip(right - 1, 0, len(cached) - 1)
    take_left = np.abs(cached[left] - wanted) <= np.abs(cached[right] - wanted)
    return np.where(take_left, left, right)


def cache_video(root: Path, video_id: str, source: Path, image_size: int, sampling: CacheSampling) -> CachedVideo:
    """Decode the frames a cache keeps for one video and write them to ``root/frames`` atomically; return the entry
    for the index (not yet recorded: worker processes call this, the builder records).

    Raises:
        VideoDecodeError: the file cannot be decoded (nothing is written).
    """
    source = Path(source)
    video = VideoSource(source, image_size)
    indices = sampling.indices(video.num_frames, video.fps)
    frames = video.read(indices).numpy()
    entry = CachedVideo(
        video_id=video_id,
        file=f"{FRAMES_DIR}/{frames_file_name(video_id)}",
        source_frames=video.num_frames,
        source_fps=video.fps,
        indices=tuple(indices),
        source_bytes=source.stat().st_size,
        source_name=source.name,
    )
    path = Path(root) / entry.file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            np.save(file, frames, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return entry


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._@+-]")


def frames_file_name(video_id: str) -> str:
    """A file name for a video id: the id itself when it is a safe name, else a cleaned id plus a short hash."""
    safe = _SAFE_NAME.sub("_", video_id)
    if safe != video_id or safe.startswith(".") or not safe:
        safe = f"{safe.lstrip('.')}-{hashlib.sha1(video_id.encode()).hexdigest()[:10]}"
    return f"{safe}.npy"


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FrameCacheError(f"{path}: unreadable frame cache manifest ({err}); rebuild the cache") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise FrameCacheError(f"{path}: not a petl-bench frame cache manifest")
    if manifest.get("version") != CACHE_VERSION:
        why = (" (version 1 stored rotated and non-square-pixel videos at the wrong shape)"
               if manifest.get("version") == 1 else "")
        raise FrameCacheError(
            f"{path}: frame cache version {manifest.get('version')}, this petl-bench reads version {CACHE_VERSION}"
            f"{why}; rebuild the cache into a new folder (or delete this one) with `petl-bench prepare <dataset> "
            "--root DATA --frame-cache DIR`"
        )
    for key in ("dataset", "image_size", "sampling"):
        if key not in manifest:
            raise FrameCacheError(f"{path}: the manifest has no {key!r} key; rebuild the cache")
    return manifest


def _read_index(path: Path) -> dict[str, CachedVideo]:
    entries: dict[str, CachedVideo] = {}
    if not path.is_file():
        return entries
    torn = 0
    for line in _lines(path):
        try:
            record = json.loads(line)
            entry = CachedVideo(
                video_id=str(record["video_id"]),
                file=str(record["file"]),
                source_frames=int(record["source_frames"]),
                source_fps=float(record["source_fps"]),
                indices=tuple(int(i) for i in record["indices"]),
                source_bytes=int(record["source_bytes"]),
                source_name=str(record["source_name"]),
            )
        except (ValueError, KeyError, TypeError):
            torn += 1  # an interrupted append; the video is simply not cached
            continue
        entries[entry.video_id] = entry
    if torn:
        log.warning("%s: %d unreadable line(s) ignored (an interrupted build); those videos count as not cached",
                    path, torn)
    return entries


def _end_torn_line(path: Path) -> None:
    """Close a line an interrupted build left unfinished, so the next append starts a line of its own."""
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb+") as file:
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":
                file.write(b"\n")


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as file:
        for line in file:
            if line.strip():
                yield line


__all__ = [
    "AUTO_FRAME_CACHE",
    "FRAME_CACHE_DIR",
    "CacheSampling",
    "CachedVideo",
    "FrameCache",
    "FrameCacheError",
    "VideoDecodeError",
    "cache_image_size",
    "cache_video",
    "cached_positions",
    "frames_file_name",
    "usable_frames",
]
