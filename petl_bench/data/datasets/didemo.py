"""DiDeMo as paragraph-to-video retrieval (the collaborative-experts / CLIP4Clip protocol).

Files: `{train,val,test}_data.json` from LocalizingMoments, each a list of moments `{"video", "description", "times",
"annotation_id", ...}`, and optionally `{split}_list.txt`, which restricts the split to the videos it names and fixes
their order (collaborative-experts' lists give the common 8,392 / 1,065 / 1,004-video split; test_data.json alone has
1,037 test videos). Without a list, videos keep the order of their first moment.

All descriptions of a video, in annotation order and without de-duplication, form one paragraph. The video id is the
original Flickr file name, extension included (.mov, .avi, .m4v, .mpg, .wmv, ...; 31 end in a bare "."); a copy on disk
may keep that name, drop the extension or carry another one after re-encoding, so `find_video` matches on the stem.
"""

from __future__ import annotations

import os
from pathlib import Path

from petl_bench.data.datasets import DatasetSpec, Items, register_dataset
from petl_bench.data.datasets._common import (
    AnnotationError,
    annotation_dir,
    check_caption,
    expect_type,
    read_id_list,
    read_json,
    require_file,
)

SPLITS = ("train", "val", "test")
_DOWNLOAD_HINT = "the moment files are in https://github.com/LisaAnne/LocalizingMoments (data/)"
# Files that may sit among the videos but never are one.
_NOT_VIDEO_SUFFIXES = (".json", ".txt", ".csv", ".pkl", ".part", ".tmp")


def load(split: str, annotation_root, *, use_list: bool = True) -> Items:
    """`[(video_id, [paragraph])]`, ids being original file names; restricted to and ordered by `{split}_list.txt`
    when it exists and `use_list` is true."""
    if split not in SPLITS:
        raise ValueError(f"DiDeMo has no split {split!r}; choose one of {', '.join(SPLITS)}")
    root = annotation_dir(annotation_root)
    path = require_file(root / f"{split}_data.json", what=f"the DiDeMo {split} moments", hint=_DOWNLOAD_HINT)
    moments = expect_type(read_json(path), list, path=path, where="the top level", wanted="a list of moments")
    descriptions: dict[str, list[str]] = {}
    for index, moment in enumerate(moments):
        where = f"moment {index}"
        expect_type(moment, dict, path=path, where=where, wanted='an object with "video" and "description"')
        for key in ("video", "description"):
            if key not in moment:
                raise AnnotationError(f'{path}: {where} has no "{key}" key')
        video_id = expect_type(moment["video"], str, path=path, where=f'{where} "video"', wanted="a file name")
        if not video_id.strip():
            raise AnnotationError(f'{path}: {where} has an empty "video" file name')
        if "annotation_id" in moment:
            where = f"{where}, annotation_id {moment['annotation_id']}"
        descriptions.setdefault(video_id, []).append(
            check_caption(moment["description"], video_id=video_id, path=path, where=where)
        )
    order = list(descriptions)
    list_path = root / f"{split}_list.txt"
    if use_list and list_path.is_file():
        order = read_id_list(list_path)
        absent = [video_id for video_id in order if video_id not in descriptions]
        if absent:
            raise AnnotationError(
                f"{list_path}: {len(absent)} listed videos have no moments in {path.name} (first: {absent[0]!r}); "
                "the list belongs to another split or another version of the moment file"
            )
    return [(video_id, [" ".join(descriptions[video_id])]) for video_id in order]


def _stem(name: str) -> str:
    """A file name without its last extension: `a.mov` -> `a`, `a.` -> `a`, `a` -> `a`."""
    return name.rsplit(".", 1)[0] if "." in name else name


# folder -> (folder mtime, file names, stem -> file names sorted); rebuilt when the folder changes.
_STEM_INDEX: dict[str, tuple[int, frozenset[str], dict[str, list[str]]]] = {}


def _folder_index(video_root: Path) -> tuple[frozenset[str], dict[str, list[str]]]:
    """Names and stems of the files in `video_root`, listed once per folder: DiDeMo's ids need a stem match, and
    trying every extension for each of 10k videos would cost a dozen stat calls per video."""
    key = str(video_root.resolve())
    mtime = video_root.stat().st_mtime_ns
    cached = _STEM_INDEX.get(key)
    if cached is not None and cached[0] == mtime:
        return cached[1], cached[2]
    names = sorted(
        entry.name
        for entry in os.scandir(video_root)
        if entry.is_file() and not entry.name.startswith(".") and not entry.name.lower().endswith(_NOT_VIDEO_SUFFIXES)
    )
    by_stem: dict[str, list[str]] = {}
    for name in names:
        by_stem.setdefault(_stem(name), []).append(name)
    _STEM_INDEX[key] = (mtime, frozenset(names), by_stem)
    return frozenset(names), by_stem


def find_video(video_root: Path, video_id: str) -> Path | None:
    """The file for an original name: the name itself, else the same stem with any extension or none (`x.mov` ->
    `x.mp4`, `x`), else the name with an extension appended (`x.mov.mp4`). Ties go to the first name in sorted order."""
    video_root = Path(video_root)
    if not video_root.is_dir():
        return None
    names, by_stem = _folder_index(video_root)
    if video_id in names:
        return video_root / video_id
    for stem in (_stem(video_id), video_id):
        matches = by_stem.get(stem)
        if matches:
            return video_root / matches[0]
    return None


SPEC = register_dataset(
    DatasetSpec(
        name="didemo",
        splits=SPLITS,
        load=load,
        find_video=find_video,
        train_split="train",
        test_split="test",
        val_split="val",
        paragraph=True,
        description="DiDeMo, paragraph-to-video: all descriptions of a video joined; test 1,004 videos with the CE list",
        extra={"options": {"use_list": (True, False)}},
    )
)
