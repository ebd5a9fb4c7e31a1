"""MSVD (YouTube2Text) with the split of Venugopalan et al. as circulated by collaborative-experts and CLIP4Clip.

Files: `train_list.txt` / `val_list.txt` / `test_list.txt` (1,200 / 100 / 670 video ids) and the captions, either
`raw-captions.pkl` (CLIP4Clip's msvd_data.zip: video id -> list of token lists) or X-Pool's `captions_msvd.json`
(video id -> list of caption strings). About 41 captions per video; every test caption is a query, and V2T scores a
video against each video's caption group. Videos are `<id>.avi` (re-encoded `.mp4` copies are accepted).

The pickle is read with an unpickler that cannot import anything (see `_common.load_plain_pickle`): a downloaded
pickle is untrusted input, and the plain `pickle.load` would run whatever code it names.
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
    load_plain_pickle,
    read_id_list,
    read_json,
    require_file,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Preferred first when both are present: the pickle is what the CLIP4Clip family reads.
CAPTION_FILES = ("raw-captions.pkl", "captions_msvd.json")
_DOWNLOAD_HINT = (
    "download https://github.com/ArrowLuo/CLIP4Clip/releases/download/v0.0/msvd_data.zip and unzip it into the "
    "annotation folder"
)
_VIDEO_EXTENSIONS = (".avi",) + tuple(ext for ext in VIDEO_EXTENSIONS if ext != ".avi")


def caption_file(annotation_root, captions_file: str | None = None) -> Path:
    """The caption file a load will read: `captions_file` if given (a name in the annotation folder or a path), else
    the first of raw-captions.pkl / captions_msvd.json that exists."""
    root = annotation_dir(annotation_root)
    if captions_file is not None:
        return require_file(root / captions_file, what="the MSVD captions (option captions_file)")
    for name in CAPTION_FILES:
        if (root / name).is_file():
            return root / name
    raise AnnotationFileNotFoundError(
        f"no MSVD caption file in {str(root)!r}: expected {' or '.join(CAPTION_FILES)}; {_DOWNLOAD_HINT}"
    )


def _read_pickle_captions(path: Path) -> dict[str, list[str]]:
    data = expect_type(
        load_plain_pickle(path), dict, path=path, where="the pickle", wanted="a dict video id -> captions"
    )
    captions: dict[str, list[str]] = {}
    for video_id, entries in data.items():
        where = f"video {video_id!r}"
        expect_type(entries, (list, tuple), path=path, where=where, wanted="a list of captions")
        joined = []
        for index, caption in enumerate(entries):
            if isinstance(caption, (list, tuple)):
                if not all(isinstance(token, str) for token in caption):
                    raise AnnotationError(f"{path}: caption {index} of {where} holds a token that is not a string")
                caption = " ".join(token.strip() for token in caption if token.strip())
            joined.append(check_caption(caption, video_id=str(video_id), path=path, where=f"caption {index}"))
        captions[str(video_id)] = joined
    return captions


def _read_json_captions(path: Path) -> dict[str, list[str]]:
    data = expect_type(read_json(path), dict, path=path, where="the top level", wanted="an object video id -> captions")
    captions: dict[str, list[str]] = {}
    for video_id, entries in data.items():
        expect_type(entries, list, path=path, where=f"key {video_id!r}", wanted="a list of caption strings")
        captions[video_id] = [
            check_caption(caption, video_id=video_id, path=path, where=f"caption {index}")
            for index, caption in enumerate(entries)
        ]
    return captions


def load(split: str, annotation_root, *, captions_file: str | None = None, missing: str = "error") -> Items:
    """`[(video_id, [captions])]` in the order of `{split}_list.txt`; all captions of a video, in file order.

    A listed id without captions fails; `missing="skip"` leaves it out with a counted `SkippedItemsWarning`.
    """
    if split not in SPLITS:
        raise ValueError(f"MSVD has no split {split!r}; choose one of {', '.join(SPLITS)}")
    root = annotation_dir(annotation_root)
    list_path = require_file(root / f"{split}_list.txt", what=f"the MSVD {split} video ids", hint=_DOWNLOAD_HINT)
    ids = read_id_list(list_path)
    path = caption_file(root, captions_file)
    log.info("MSVD %s: captions from %s", split, path)
    captions = _read_pickle_captions(path) if path.suffix == ".pkl" else _read_json_captions(path)
    return captions_for_ids(
        ids, captions, dataset="msvd", split=split, list_path=list_path, captions_path=path, missing=missing
    )


def find_video(video_root: Path, video_id: str) -> Path | None:
    return find_first_file(video_root, [video_id], _VIDEO_EXTENSIONS)


SPEC = register_dataset(
    DatasetSpec(
        name="msvd",
        splits=SPLITS,
        load=load,
        find_video=find_video,
        train_split="train",
        test_split="test",
        val_split="val",
        v2t_protocol="group",
        description="MSVD: 1,200 / 100 / 670 videos, ~41 captions each; every test caption is a query",
        extra={"options": {"captions_file": CAPTION_FILES, "missing": ("error", "skip")}, "caption_file": caption_file},
    )
)
