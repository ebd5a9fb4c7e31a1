"""ActivityNet Captions as paragraph-to-video retrieval (the CLIP4Clip / collaborative-experts protocol).

Files: `train.json` and `val_1.json`, each `"v_<ytid>" -> {"duration", "timestamps", "sentences"}` (10,009 and 4,917
videos), and optionally `train_ids.json` / `val_ids.json`, id lists that fix the order. The id lists also name a few
videos the caption files lack (15 train, 9 val); those are not part of the split. The test split is `val_1`.

All sentences of a video are stripped and joined with single spaces into one paragraph; timestamps are ignored and the
whole video is sampled. Files on disk are named `v_<ytid>.mp4` or `<ytid>.mp4` depending on the download script, so
both are accepted (and .mkv / .webm).
"""

from __future__ import annotations

import logging
from pathlib import Path

from petl_bench.data.datasets import DatasetSpec, Items, register_dataset
from petl_bench.data.datasets._common import (
    AnnotationError,
    annotation_dir,
    check_caption,
    expect_type,
    find_first_file,
    read_json,
    require_file,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val_1")
ID_FILES = {"train": ("train_ids.json",), "val_1": ("val_ids.json", "val_1_ids.json")}
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm")
_DOWNLOAD_HINT = (
    "the caption files are ActivityNet Captions' captions.zip (https://cs.stanford.edu/people/ranjaykrishna/densevid/)"
)


def paragraph(sentences, *, video_id: str, path: Path) -> str:
    """One paragraph from a video's sentences: each stripped, joined by a single space, in annotation order."""
    expect_type(sentences, list, path=path, where=f'"sentences" of {video_id!r}', wanted="a list of strings")
    if not sentences:
        raise AnnotationError(f'{path}: video {video_id!r} has no sentences; remove it or restore its "sentences"')
    return " ".join(
        check_caption(sentence, video_id=video_id, path=path, where=f"sentence {index}")
        for index, sentence in enumerate(sentences)
    )


def _order(split: str, root: Path, annotated: list[str]) -> list[str]:
    """Video order: the id list when present (ids it names without captions are dropped, and counted in the log), then
    any annotated video the list lacks, in caption-file order; the caption file's order without a list."""
    id_path = next((root / name for name in ID_FILES[split] if (root / name).is_file()), None)
    if id_path is None:
        return annotated
    listed = expect_type(read_json(id_path), list, path=id_path, where="the top level", wanted="a list of video ids")
    annotated_set = set(annotated)
    order, seen = [], set()
    for index, video_id in enumerate(listed):
        if not isinstance(video_id, str):
            raise AnnotationError(f"{id_path}: entry {index} is a {type(video_id).__name__}, not a video id string")
        if video_id in seen:
            raise AnnotationError(f"{id_path}: video {video_id!r} is listed twice (entry {index})")
        seen.add(video_id)
        if video_id in annotated_set:
            order.append(video_id)
    unlisted = [video_id for video_id in annotated if video_id not in seen]
    log.info(
        "ActivityNet %s: order from %s; %d listed ids have no captions (not part of the split), %d annotated videos "
        "are not listed (appended)",
        split,
        id_path,
        len(seen) - len(order),
        len(unlisted),
    )
    return order + unlisted


def load(split: str, annotation_root) -> Items:
    """`[(video_id, [paragraph])]`: one paragraph per video, ids as in the caption file (`v_<ytid>`)."""
    if split not in SPLITS:
        raise ValueError(f"ActivityNet has no split {split!r}; choose one of {', '.join(SPLITS)}")
    root = annotation_dir(annotation_root)
    path = require_file(root / f"{split}.json", what=f"the ActivityNet Captions {split} captions", hint=_DOWNLOAD_HINT)
    data = expect_type(read_json(path), dict, path=path, where="the top level", wanted='an object "v_<ytid>" -> {...}')
    paragraphs: dict[str, str] = {}
    for video_id, entry in data.items():
        expect_type(entry, dict, path=path, where=f"key {video_id!r}", wanted='an object with "sentences"')
        if "sentences" not in entry:
            raise AnnotationError(f'{path}: key {video_id!r} has no "sentences" key')
        paragraphs[video_id] = paragraph(entry["sentences"], video_id=video_id, path=path)
    return [(video_id, [paragraphs[video_id]]) for video_id in _order(split, root, list(paragraphs))]


def find_video(video_root: Path, video_id: str) -> Path | None:
    """`v_<ytid>` or `<ytid>`, whichever the download used; the id's own spelling first."""
    if video_id.startswith("v_"):
        names = [video_id, video_id[2:]]
    else:
        names = [video_id, f"v_{video_id}"]
    return find_first_file(video_root, names, VIDEO_EXTENSIONS)


SPEC = register_dataset(
    DatasetSpec(
        name="activitynet",
        splits=SPLITS,
        load=load,
        find_video=find_video,
        train_split="train",
        test_split="val_1",
        val_split=None,
        paragraph=True,
        description="ActivityNet Captions, paragraph-to-video: train 10,009 videos, test val_1 4,917 videos",
        extra={"options": {}},
    )
)
