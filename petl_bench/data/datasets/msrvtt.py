"""MSR-VTT in the CLIP4Clip layout: the 9k or 7k training ids, the JSFusion "1k-A" test set.

Files (CLIP4Clip's msrvtt_data.zip): `MSRVTT_train.9k.csv` / `MSRVTT_train.7k.csv` (one column `video_id`),
`MSRVTT_JSFUSION_test.csv` (`key,vid_key,video_id,sentence`: 1,000 videos, one caption each) and `MSRVTT_data.json`
(all 200k captions; the training csv files hold ids only). Videos are `<video_id>.mp4`.

Training either iterates every (video, caption) pair or draws one random caption per video per epoch; the DataModule
does that (option `train_captions`), so the loader always returns every caption of a video.
"""

from __future__ import annotations

from pathlib import Path

from petl_bench.data.datasets import DatasetSpec, Items, register_dataset
from petl_bench.data.datasets._common import (
    VIDEO_EXTENSIONS,
    AnnotationError,
    annotation_dir,
    check_caption,
    expect_type,
    find_first_file,
    read_csv,
    read_json,
    require_file,
)

TRAIN_LISTS = {"train_9k": "MSRVTT_train.9k.csv", "train_7k": "MSRVTT_train.7k.csv"}
TEST_CSV = "MSRVTT_JSFUSION_test.csv"
CAPTIONS_JSON = "MSRVTT_data.json"
TRAIN_CAPTION_MODES = ("all", "random_one")
_DOWNLOAD_HINT = (
    "download https://github.com/ArrowLuo/CLIP4Clip/releases/download/v0.0/msrvtt_data.zip and unzip it into the "
    "annotation folder"
)


def _read_caption_json(path: Path) -> dict[str, list[str]]:
    """Captions of every MSR-VTT video from MSRVTT_data.json, in the file's sentence order."""
    data = expect_type(read_json(path), dict, path=path, where="the top level", wanted='an object with "sentences"')
    if "sentences" not in data:
        raise AnnotationError(f'{path}: no "sentences" key at the top level; is this MSR-VTT\'s MSRVTT_data.json?')
    sentences = expect_type(data["sentences"], list, path=path, where='"sentences"', wanted="a list")
    captions: dict[str, list[str]] = {}
    for index, entry in enumerate(sentences):
        where = f"sentences[{index}]"
        expect_type(entry, dict, path=path, where=where, wanted='an object with "video_id" and "caption"')
        for key in ("video_id", "caption"):
            if key not in entry:
                raise AnnotationError(f'{path}: {where} has no "{key}" key')
        video_id = str(entry["video_id"])
        captions.setdefault(video_id, []).append(
            check_caption(entry["caption"], video_id=video_id, path=path, where=where)
        )
    return captions


def _load_test(root: Path) -> Items:
    path = require_file(root / TEST_CSV, what="the 1k-A test set", hint=_DOWNLOAD_HINT)
    items: Items = []
    seen: dict[str, int] = {}
    for line, row in read_csv(path, ("video_id", "sentence")):
        video_id = row["video_id"].strip()
        if not video_id:
            raise AnnotationError(f"{path}: line {line}: empty video_id")
        if video_id in seen:
            raise AnnotationError(f"{path}: line {line}: video {video_id!r} repeats line {seen[video_id]}")
        seen[video_id] = line
        items.append((video_id, [check_caption(row["sentence"], video_id=video_id, path=path, where=f"line {line}")]))
    return items


def _load_train(root: Path, split: str) -> Items:
    list_path = require_file(root / TRAIN_LISTS[split], what=f"the {split} video ids", hint=_DOWNLOAD_HINT)
    ids: list[str] = []
    seen: dict[str, int] = {}
    for line, row in read_csv(list_path, ("video_id",)):
        video_id = row["video_id"].strip()
        if video_id in seen:
            raise AnnotationError(f"{list_path}: line {line}: video {video_id!r} repeats line {seen[video_id]}")
        seen[video_id] = line
        ids.append(video_id)
    captions_path = require_file(
        root / CAPTIONS_JSON,
        what=f"the training captions: {list_path.name} holds video ids only",
        hint=_DOWNLOAD_HINT,
    )
    captions = _read_caption_json(captions_path)
    absent = [video_id for video_id in ids if video_id not in captions]
    if absent:
        raise AnnotationError(
            f"{captions_path}: no captions for {len(absent)} of the {len(ids)} videos in {list_path.name} "
            f"(first: {absent[0]!r}); the caption file does not belong to this split list"
        )
    return [(video_id, captions[video_id]) for video_id in ids]


def load(split: str, annotation_root, *, train_captions: str = "all") -> Items:
    """`[(video_id, [captions])]` in the order of the split's csv file.

    `train_captions` ("all" or "random_one") is validated here but applied by the DataModule: one caption per video
    per epoch is a sampling choice, not a different split.
    """
    if train_captions not in TRAIN_CAPTION_MODES:
        raise ValueError(f"train_captions={train_captions!r}: choose one of {', '.join(TRAIN_CAPTION_MODES)}")
    root = annotation_dir(annotation_root)
    if split == "test_1k":
        return _load_test(root)
    if split in TRAIN_LISTS:
        return _load_train(root, split)
    raise ValueError(f"MSR-VTT has no split {split!r}; choose one of {', '.join(SPEC.splits)}")


def find_video(video_root: Path, video_id: str) -> Path | None:
    return find_first_file(video_root, [video_id], VIDEO_EXTENSIONS)


SPEC = register_dataset(
    DatasetSpec(
        name="msrvtt",
        splits=("train_9k", "train_7k", "test_1k"),
        load=load,
        find_video=find_video,
        train_split="train_9k",
        test_split="test_1k",
        val_split=None,
        description="MSR-VTT: 9k or 7k training videos, JSFusion 1k-A test (1,000 videos x 1 caption)",
        extra={"options": {"train_captions": TRAIN_CAPTION_MODES}},
    )
)
