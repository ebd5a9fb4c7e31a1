"""The synthetic order benchmark: coloured shapes moving left/right/up/down, written by `petl_bench.data.synthetic`.

Layout of a generated root (``generate_synthetic(root)`` or ``petl-bench synth``)::

    root/videos/<video_id>.mp4
    root/annotations/{train,test}.json   # [{"video_id", "captions", "color", "shape", "motion", "pair_id"}, ...]
    root/manifest.json                   # generation parameters, written last

Every test clip has an order twin (the same frames reversed, captioned with the opposite direction), so a method
that pools frames without their order scores at most half the pairs; `order_pairs` lists them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from petl_bench.data.datasets import DatasetSpec, Items, register_dataset
from petl_bench.data.datasets._common import AnnotationError, AnnotationFileNotFoundError, find_first_file, read_text

SPLITS = ("train", "test")


def annotation_file(root: Path, split: str) -> Path:
    """``root/annotations/<split>.json``; ``root`` may also be the annotations folder itself."""
    root = Path(root)
    nested = root / "annotations" / f"{split}.json"
    flat = root / f"{split}.json"
    if nested.is_file() or not flat.is_file():
        return nested
    return flat


def read_synthetic_annotations(path: str | Path) -> list[dict]:
    """Read and check one synthetic annotation file; errors name the file and the line or entry at fault."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationFileNotFoundError(
            f"synthetic annotation file not found: {path}. Generate the data first with `petl-bench synth` or "
            "petl_bench.data.synthetic.generate_synthetic(root), and pass that root."
        )
    try:
        records = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise AnnotationError(
            f"{path}: line {err.lineno}, column {err.colno}: malformed JSON ({err.msg}). Regenerate it with "
            "generate_synthetic(root, overwrite=True)."
        ) from None
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a JSON list of clip records, found {type(records).__name__}")
    seen: set[str] = set()
    for index, record in enumerate(records):
        where = f"{path}: entry {index}"
        if not isinstance(record, dict):
            raise AnnotationError(f"{where}: expected an object, found {type(record).__name__}")
        video_id = record.get("video_id")
        if not isinstance(video_id, str) or not video_id:
            raise AnnotationError(f"{where}: key 'video_id' must be a non-empty string, found {video_id!r}")
        captions = record.get("captions")
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c for c in captions):
            raise AnnotationError(f"{where} ({video_id}): key 'captions' must be a non-empty list of non-empty strings")
        if video_id in seen:
            raise AnnotationError(f"{where}: video_id {video_id!r} appears twice")
        seen.add(video_id)
    return records


def load(split: str, root: Path) -> Items:
    """``[(video_id, [captions])]`` in file order."""
    if split not in SPLITS:
        raise ValueError(f"the synthetic dataset has splits {', '.join(SPLITS)}, not {split!r}")
    return [(r["video_id"], list(r["captions"])) for r in read_synthetic_annotations(annotation_file(root, split))]


def find_video(video_root: Path, video_id: str) -> Path | None:
    """``video_root/<id>.mp4``; the dataset root (holding ``videos/``) is accepted too."""
    return find_first_file(video_root, (video_id, f"videos/{video_id}"), (".mp4",))


def order_twins(root: Path, split: str) -> dict[str, str]:
    """video_id -> the id of its time-reversed twin, for every clip of `split` that has one."""
    records = read_synthetic_annotations(annotation_file(root, split))
    twins = {}
    for a, b in order_pairs(records, split):
        twins[records[a]["video_id"]] = records[b]["video_id"]
        twins[records[b]["video_id"]] = records[a]["video_id"]
    return twins


def _records(items_or_root: str | Path | Iterable[dict], split: str) -> list[dict]:
    if isinstance(items_or_root, (str, Path)):
        return read_synthetic_annotations(annotation_file(Path(items_or_root), split))
    return list(items_or_root)


def order_pairs(items_or_root: str | Path | Iterable[dict], split: str = "test") -> list[tuple[int, int]]:
    """Video positions (in file order) of the order pairs of a split: clips sharing a ``pair_id``, two at a time."""
    members: dict[str, list[int]] = {}
    for position, record in enumerate(_records(items_or_root, split)):
        pair_id = record.get("pair_id")
        if pair_id is not None:
            members.setdefault(pair_id, []).append(position)
    return [(m[0], m[1]) for m in members.values() if len(m) == 2]


def order_pair_caption_indices(items_or_root: str | Path | Iterable[dict], split: str = "test") -> list[int]:
    """Indices, in the flattened caption list (videos in file order, then their captions), of the captions whose
    video belongs to an order pair: the captions on which order-blind models fail. All of them in a generated test set.
    """
    records = _records(items_or_root, split)
    paired = {position for pair in order_pairs(records) for position in pair}
    indices, caption_index = [], 0
    for position, record in enumerate(records):
        for _ in record["captions"]:
            if position in paired:
                indices.append(caption_index)
            caption_index += 1
    return indices


SYNTHETIC = register_dataset(
    DatasetSpec(
        name="synthetic",
        splits=SPLITS,
        load=load,
        find_video=find_video,
        description=(
            "Synthetic coloured shapes moving in one of four directions; each test clip has a twin with its frames "
            "reversed and the opposite direction in its caption, so only order-aware models can separate them."
        ),
        extra={"annotation_subdir": "annotations", "video_subdir": "videos", "hard_twins": order_twins},
    )
)
