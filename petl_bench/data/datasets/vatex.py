"""VATEX with the HGR retrieval split (Chen et al. 2020): 25,991 train, 1,500 val and 1,500 test videos, ten English
captions each, listed in `train_list.txt` / `val_list.txt` / `test_list.txt` (ids `<ytid>_<start6>_<end6>`).

Captions come in three circulating formats, all accepted (the format is read from the content, not the name):
- the official release, a list of `{"videoID", "enCap", "chCap"}` (vatex_training_v1.0.json,
  vatex_validation_v1.0.json, vatex_public_test_english_v1.1.json; HGR's val and test come from the official
  validation file, so every present official file is merged);
- `vatex_data.json`: video id -> {"enCap": [...]};
- `ref_captions.json`: video id -> [captions].

Another random 1.5k test split also circulates; results on it are not comparable with HGR's, so only the lists define
the split here. Videos are `<id>.mp4` (other containers accepted); many YouTube sources are gone, which
`check_videos` counts.
"""

from __future__ import annotations

import logging
from pathlib import Path

from petl_bench.data.datasets import DatasetSpec, Items, register_dataset
from petl_bench.data.datasets._common import (
    VIDEO_EXTENSIONS,
    AnnotationError,
    AnnotationFileNotFoundError,
    annotation_dir,
    captions_for_ids,
    check_caption,
    expect_type,
    find_first_file,
    read_id_list,
    read_json,
    require_file,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
OFFICIAL_PATTERNS = ("vatex_training*.json", "vatex_validation*.json", "vatex_public_test*.json")
DICT_FILES = ("vatex_data.json", "ref_captions.json")
MISSING_POLICIES = ("error", "skip")


def caption_files(annotation_root, captions_file: str | None = None) -> list[Path]:
    """The caption file(s) a load reads: `captions_file` if given, else every official file present (merged), else
    vatex_data.json, else ref_captions.json."""
    root = annotation_dir(annotation_root)
    if captions_file is not None:
        return [require_file(root / captions_file, what="the VATEX captions (option captions_file)")]
    official = [path for pattern in OFFICIAL_PATTERNS for path in sorted(root.glob(pattern)) if path.is_file()]
    if official:
        return official
    for name in DICT_FILES:
        if (root / name).is_file():
            return [root / name]
    raise AnnotationFileNotFoundError(
        f"no VATEX caption file in {str(root)!r}: expected the official vatex_training_v1.0.json / "
        f"vatex_validation_v1.0.json, or {' or '.join(DICT_FILES)}; download the official JSON from "
        "https://eric-xw.github.io/vatex-website/download.html"
    )


def _english_captions(entries, *, video_id: str, path: Path, where: str) -> list[str]:
    expect_type(entries, list, path=path, where=where, wanted="a list of caption strings")
    return [
        check_caption(caption, video_id=video_id, path=path, where=f"{where}[{index}]")
        for index, caption in enumerate(entries)
    ]


def read_captions(path: Path) -> dict[str, list[str]]:
    """English captions per video id from any of the three formats."""
    data = read_json(path)
    captions: dict[str, list[str]] = {}
    if isinstance(data, list):  # official: [{"videoID", "enCap", ...}]
        for index, entry in enumerate(data):
            where = f"entry {index}"
            expect_type(entry, dict, path=path, where=where, wanted='an object with "videoID" and "enCap"')
            for key in ("videoID", "enCap"):
                if key not in entry:
                    raise AnnotationError(f'{path}: {where} has no "{key}" key')
            video_id = str(entry["videoID"])
            if video_id in captions:
                raise AnnotationError(f"{path}: video {video_id!r} appears twice ({where})")
            captions[video_id] = _english_captions(
                entry["enCap"], video_id=video_id, path=path, where=f'{where} "enCap"'
            )
        return captions
    expect_type(data, dict, path=path, where="the top level", wanted="a list of official entries or an object by id")
    for video_id, value in data.items():
        if isinstance(value, dict):  # vatex_data.json: id -> {"enCap": [...]}
            if "enCap" not in value:
                raise AnnotationError(f'{path}: key {video_id!r} has no "enCap" key')
            value = value["enCap"]
            where = f'key {video_id!r} "enCap"'
        else:  # ref_captions.json: id -> [...]
            where = f"key {video_id!r}"
        captions[video_id] = _english_captions(value, video_id=video_id, path=path, where=where)
    return captions


def load(split: str, annotation_root, *, missing: str = "error", captions_file: str | None = None) -> Items:
    """`[(video_id, [captions])]` in the order of `{split}_list.txt`.

    Listed ids with no captions fail by default; `missing="skip"` leaves them out and emits a `SkippedItemsWarning`
    carrying the count, so the evaluated set never shrinks unnoticed.
    """
    if split not in SPLITS:
        raise ValueError(f"VATEX has no split {split!r}; choose one of {', '.join(SPLITS)}")
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing={missing!r}: choose one of {', '.join(MISSING_POLICIES)}")
    root = annotation_dir(annotation_root)
    list_path = require_file(
        root / f"{split}_list.txt",
        what=f"the HGR {split} video ids",
        hint="the HGR split lists ship with CLIP2Video (data/vatex_data/) and HGR",
    )
    ids = read_id_list(list_path)
    paths = caption_files(root, captions_file)
    captions: dict[str, list[str]] = {}
    for path in paths:
        for video_id, entries in read_captions(path).items():
            if video_id in captions and captions[video_id] != entries:
                raise AnnotationError(f"{path}: video {video_id!r} has different captions in another caption file")
            captions.setdefault(video_id, entries)
    log.info("VATEX %s: captions from %s", split, ", ".join(str(path) for path in paths))
    source = paths[0] if len(paths) == 1 else paths[0].parent
    return captions_for_ids(
        ids, captions, dataset="vatex", split=split, list_path=list_path, captions_path=source, missing=missing
    )


def find_video(video_root: Path, video_id: str) -> Path | None:
    return find_first_file(video_root, [video_id], VIDEO_EXTENSIONS)


SPEC = register_dataset(
    DatasetSpec(
        name="vatex",
        splits=SPLITS,
        load=load,
        find_video=find_video,
        train_split="train",
        test_split="test",
        val_split="val",
        v2t_protocol="group",
        description="VATEX, HGR split: 25,991 / 1,500 / 1,500 videos x 10 English captions",
        extra={"options": {"missing": MISSING_POLICIES, "captions_file": None}, "caption_files": caption_files},
    )
)
