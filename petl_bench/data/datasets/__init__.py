"""Dataset registry: every benchmark is one module in this package that calls `register_dataset`.

A dataset answers three questions for the one DataModule: which (video, captions) items make up a split, where a
video file lives, and how its test set is scored (single caption per video or caption groups; sentence or paragraph).
Modules are imported on first use, so adding a file here is all it takes to add a dataset.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# (video_id, [captions]) in split order; paragraph datasets give one caption (the joined paragraph) per video.
Items = list[tuple[str, list[str]]]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    splits: tuple[str, ...]
    # load(split, annotation_root, **options) -> Items
    load: Callable[..., Items]
    # find_video(video_root, video_id) -> Path | None (None when the file is missing)
    find_video: Callable[[Path, str], Path | None]
    train_split: str = "train"
    test_split: str = "test"
    # None: no official validation split disjoint from test (the DataModule then holds out training videos when
    # data.val_holdout is set, else nothing validates); never the test split (petl_bench/data/protocol.py)
    val_split: str | None = None
    # "group": CLIP4Clip's multi-caption V2T; single-caption datasets use it too (it reduces to the transpose).
    v2t_protocol: str = "group"
    paragraph: bool = False
    description: str = ""
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, DatasetSpec] = {}
_DISCOVERED = False


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"dataset {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def get_dataset(name: str) -> DatasetSpec:
    _discover()
    if name not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def dataset_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)
