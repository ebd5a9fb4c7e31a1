"""``petl-bench prepare <dataset> --root DIR``: check a data folder before any run, and optionally build a frame cache.

What it answers, per split: how many listed videos exist under the video folder and which are missing (VATEX and
DiDeMo always miss some: their sources were YouTube and Flickr), how many captions the split has, and — with
``--check-decode`` — which files cannot be decoded (truncated downloads, zero-frame files, HTML error pages saved as
.mp4). Those would otherwise stop a run hours in. With ``--frame-cache DIR`` it decodes every present video once into
the cache the DataModule reads with ``data.frame_cache: DIR`` (see `petl_bench.data.frame_cache`), under a progress
bar; an interrupted build resumes where it stopped.

The findings are printed and written as JSON (``--report``). The exit status is 1 only for what would make a run fail:
an annotation file a run needs is missing or malformed, the video folder does not exist, a present video cannot be
decoded, the cache cannot be written, or videos a run needs are missing under the missing-videos policy ``error``.
That policy is the dataset config's ``data.missing_videos`` (``error`` for MSR-VTT and MSVD, whose videos ship in one
archive; ``skip`` for the YouTube/Flickr sets), or ``--missing-videos``: under ``skip`` runs leave missing videos out
and count them, so they are reported but not an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from pathlib import Path

import yaml

from petl_bench.atomic import write_text_atomic
from petl_bench.data.datasets import DatasetSpec, dataset_names, get_dataset
from petl_bench.data.datasets._common import AnnotationError, AnnotationFileNotFoundError, check_videos
from petl_bench.data.frame_cache import (
    AUTO_FRAME_CACHE,
    FRAME_CACHE_DIR,
    CacheSampling,
    FrameCache,
    FrameCacheError,
    cache_video,
)
from petl_bench.data.video import VideoDecodeError, VideoSource
from petl_bench.paths import CONFIG_DIR

log = logging.getLogger(__name__)

def config_defaults(dataset: str) -> dict:
    """The ``data:`` section of configs/data/<dataset>.yaml (frames, seconds, options), or {} when there is none."""
    path = CONFIG_DIR / "data" / f"{dataset}.yaml"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as file:
        config = yaml.safe_load(file) or {}
    data = config.get("data") or {}
    return data.get("init_args", data) if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------------------------------- checking
def check_decode(path: Path, image_size: int) -> None:
    """Open a video the way a run does and decode its first, middle and last frames (truncation shows at the end).

    Raises:
        VideoDecodeError: naming the file and the reason.
    """
    video = VideoSource(path, image_size)
    n = video.num_frames
    video.read(sorted({0, n // 2, n - 1}))


def _check_task(video_id: str, path: str, image_size: int) -> tuple[str, str | None]:
    try:
        check_decode(Path(path), image_size)
    except VideoDecodeError as err:
        return video_id, str(err)
    return video_id, None


def _cache_task(root: str, video_id: str, path: str, image_size: int, sampling: CacheSampling):
    try:
        entry = cache_video(Path(root), video_id, Path(path), image_size, sampling)
    except VideoDecodeError as err:
        return video_id, None, str(err)
    return video_id, entry, None


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


class _Runner:
    """Runs tasks in this process (``workers <= 1``) or in a pool of processes, yielding results in order.

    At most a few tasks per worker are in flight, so a slow video does not let finished results pile up.
    """

    def __init__(self, workers: int):
        self.pool = None
        self.window = 4 * max(1, workers)
        if workers > 1:
            import multiprocessing

            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init)

    def map(self, fn, argument_tuples):
        if self.pool is None:
            for arguments in argument_tuples:
                yield fn(*arguments)
            return
        todo = iter(argument_tuples)
        pending: deque[Future] = deque(self.pool.submit(fn, *arguments) for arguments in islice(todo, self.window))
        try:
            while pending:
                result = pending.popleft().result()
                following = next(todo, None)
                if following is not None:
                    pending.append(self.pool.submit(fn, *following))
                yield result
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _progress(enabled: bool, console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, disable=not enabled, transient=False)


def prepare_dataset(
    dataset: str,
    root: str | os.PathLike,
    *,
    annotation_root: str | os.PathLike | None = None,
    video_root: str | os.PathLike | None = None,
    splits: list[str] | None = None,
    options: dict | None = None,
    check_decoding: bool = False,
    frame_cache: str | os.PathLike | None = None,
    image_size: int = 224,
    sampling: CacheSampling | None = None,
    workers: int = 1,
    progress: bool = True,
    console=None,
    missing_videos: str = "skip",
) -> dict:
    """Check one dataset folder (and build its frame cache); return the report as a dict (see `prepare_command`).

    ``report["errors"]`` lists what would make a run fail; everything else is information. ``missing_videos`` is the
    policy the runs will use (``data.missing_videos``): under ``error``, missing videos of a split a run needs are
    an error too.
    """
    from rich.console import Console

    from petl_bench.data.datamodule import MISSING_VIDEO_POLICIES, check_dataset_options, load_split_items

    if missing_videos not in MISSING_VIDEO_POLICIES:
        raise ValueError(f"missing_videos must be one of {MISSING_VIDEO_POLICIES}, got {missing_videos!r}")
    console = console or Console(stderr=True)
    spec: DatasetSpec = get_dataset(dataset)
    root = Path(root).expanduser()
    annotation_root = Path(annotation_root).expanduser() if annotation_root else root
    video_root = Path(video_root).expanduser() if video_root else root / "videos"
    options = check_dataset_options(spec, options)
    explicit = splits is not None
    splits = list(splits) if explicit else list(spec.splits)
    unknown = [s for s in splits if s not in spec.splits]
    if unknown:
        raise ValueError(f"{dataset} has no split {', '.join(map(repr, unknown))}; its splits are "
                         f"{', '.join(spec.splits)}")
    needed = {spec.train_split, spec.test_split} | ({spec.val_split} if spec.val_split else set())

    report: dict = {
        "dataset": dataset, "root": str(root), "annotation_root": str(annotation_root), "video_root": str(video_root),
        "options": options, "missing_videos": missing_videos, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "splits": {}, "unavailable_splits": {}, "errors": [],
    }
    errors: list[str] = report["errors"]
    if not video_root.is_dir():
        errors.append(f"video folder {video_root} does not exist; pass --video-root (default: <root>/videos)")

    cache = None
    if frame_cache is not None:
        try:
            cache = FrameCache.create(frame_cache, dataset, image_size, sampling or CacheSampling())
        except FrameCacheError as err:
            errors.append(str(err))

    # 1. annotations and which listed videos exist
    present: dict[str, Path] = {}  # every present video of the checked splits, once
    split_present: dict[str, list[str]] = {}
    for split in splits:
        try:
            items, skipped = load_split_items(spec, split, annotation_root, options)
        except AnnotationFileNotFoundError as err:
            report["unavailable_splits"][split] = str(err)
            if explicit or split in needed:
                errors.append(f"{split}: {err}")
            continue
        except (AnnotationError, ValueError) as err:
            report["unavailable_splits"][split] = str(err)
            errors.append(f"{split}: {err}")
            continue
        entry = {"listed": len(items), "captions": sum(len(c) for _, c in items),
                 "skipped_without_captions": len(skipped), "skipped_without_captions_ids": skipped}
        if video_root.is_dir():
            found = check_videos(spec, items, video_root)
            present.update(found.present)
            split_present[split] = list(found.present)
            entry.update(present=len(found.present), missing=len(found.missing), missing_ids=list(found.missing),
                         present_captions=sum(len(c) for v, c in items if v in found.present))
            if cache is not None:  # a run reads these from the cache although their files are gone
                entry["missing_but_cached"] = sum(cache.lookup(v, None) is not None for v in found.missing)
            if items and not found.present and not entry.get("missing_but_cached") and (explicit or split in needed):
                errors.append(f"{split}: none of the {len(items):,} listed videos exist under {video_root}; check "
                              "--video-root and the file names (a run stops here)")
            elif missing_videos == "error" and (explicit or split in needed):
                stopping = entry["missing"] - entry.get("missing_but_cached", 0)
                if stopping:
                    errors.append(
                        f"{split}: {stopping:,} listed videos are missing and a run with data.missing_videos=error "
                        f"(configs/data/{dataset}.yaml, unless --missing-videos says otherwise) stops at set-up; "
                        "download them, or run with "
                        "--data.missing_videos=skip to leave them out (the count is recorded), and check with "
                        f"`petl-bench prepare {dataset} ... --missing-videos skip`"
                    )
        entry["unreadable"] = []
        report["splits"][split] = entry

    # 2. decoding: a check, and/or the frame cache (which decodes anyway)
    unreadable: dict[str, str] = {}
    runner = _Runner(workers)
    try:
        if check_decoding:
            todo = [(v, str(p), image_size) for v, p in present.items()
                    if cache is None or cache.lookup(v, p) is None]  # cached videos decoded fine when cached
            with _progress(progress, console) as bar:
                task = bar.add_task(f"{dataset}: decoding", total=len(todo))
                for video_id, problem in runner.map(_check_task, todo):
                    if problem is not None:
                        unreadable[video_id] = problem
                    bar.advance(task)
        if cache is not None:
            report["frame_cache"] = _build_cache(cache, present, unreadable, runner, progress, console, dataset)
    finally:
        runner.close()

    for split, ids in split_present.items():
        report["splits"][split]["unreadable"] = [
            {"video_id": v, "path": str(present[v]), "reason": unreadable[v]} for v in ids if v in unreadable
        ]
    if unreadable:
        shown = ", ".join(str(present[v]) for v in list(unreadable)[:5])
        errors.append(f"{len(unreadable)} video file(s) cannot be decoded ({shown}); re-download or re-encode "
                      "them, or remove them from the split lists — a run stops at the first one")
    report["checked_decoding"] = check_decoding or cache is not None
    report["unreadable"] = len(unreadable)
    report["ok"] = not errors
    return report


def _build_cache(cache: FrameCache, present: dict[str, Path], unreadable: dict[str, str], runner: _Runner,
                 progress: bool, console, dataset: str) -> dict:
    reused = {v for v, p in present.items() if cache.lookup(v, p) is not None}
    todo = [(str(cache.root), v, str(p), cache.image_size, cache.sampling) for v, p in present.items()
            if v not in reused and v not in unreadable]
    added, failed = 0, 0
    with _progress(progress, console) as bar:
        task = bar.add_task(f"{dataset}: caching frames", total=len(todo))
        for video_id, entry, problem in runner.map(_cache_task, todo):
            if problem is None:
                cache.record(entry)
                added += 1
            else:
                unreadable[video_id] = problem
                failed += 1
            bar.advance(task)
    return {"dir": str(cache.root), "image_size": cache.image_size, "sampling": vars(cache.sampling).copy(),
            "videos": len([v for v in present if cache.lookup(v, present[v]) is not None]), "added": added,
            "reused": len(reused), "failed": failed, "bytes": cache.size_bytes()}


# ----------------------------------------------------------------------------------------------------- command
def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="petl-bench prepare",
        description="Check a dataset folder (listed videos present / missing / unreadable) and optionally build the "
                    "frame cache runs read with data.frame_cache. Exit status 1 only for what would make a run fail.",
    )
    p.add_argument("dataset", choices=[d for d in dataset_names() if d != "synthetic"])
    p.add_argument("--root", required=True, help="the dataset folder (as data.root)")
    p.add_argument("--annotation-root", default=None, help="annotation folder (default: --root)")
    p.add_argument("--video-root", default=None, help="video folder (default: <root>/videos)")
    p.add_argument("--split", action="append", default=None, dest="splits",
                   help="a split to check (repeatable; default: every split, those a default run needs required)")
    p.add_argument("--option", action="append", default=[], type=_parse_option, metavar="KEY=VALUE",
                   help="a dataset option (as data.dataset_options), e.g. missing=skip for VATEX")
    p.add_argument("--missing-videos", choices=("skip", "error"), default=None,
                   help="the runs' data.missing_videos policy: under 'error' a missing video a run needs fails the "
                        "check (default: the dataset config's, else skip)")
    p.add_argument("--check-decode", action="store_true",
                   help="open every present video and decode its first, middle and last frames")
    p.add_argument("--frame-cache", default=None, metavar="DIR", help="build (or complete) the frame cache in DIR; auto: <root>/frame_cache, which runs read with "
                        "data.frame_cache=auto")
    p.add_argument("--image-size", type=int, default=224, help="cached frame size (the backbone's input size)")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames per video whose evaluation frames the cache holds exactly (default: the dataset "
                        "config's data.num_frames, else 12)")
    p.add_argument("--frames-per-segment", type=int, default=2,
                   help="evenly spread frames per segment cached for training draws (default 2)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="cache only the first seconds of each video (default: the dataset config's data.max_seconds)")
    p.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    p.add_argument("--report", default=None,
                   help="where to write the JSON report (default: ./prepare_<dataset>.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def prepare_command(argv: list[str]) -> int:
    """``petl-bench prepare``: print the findings, write the JSON report; 0 if a run can use the folder, else 1."""
    from rich.console import Console

    a = build_parser().parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)  # paths stay whole, to be copied
    defaults = config_defaults(a.dataset)
    options = dict(defaults.get("dataset_options") or {})
    options.update(dict(a.option))
    sampling = None
    if a.frame_cache == AUTO_FRAME_CACHE:  # the folder `data.frame_cache: auto` reads
        a.frame_cache = str(Path(a.root).expanduser() / FRAME_CACHE_DIR)
    if a.frame_cache is not None:
        num_frames = a.num_frames or int(defaults.get("num_frames") or 12)
        max_seconds = a.max_seconds if a.max_seconds is not None else defaults.get("max_seconds")
        sampling = CacheSampling(num_frames=num_frames, frames_per_segment=a.frames_per_segment,
                                 max_seconds=max_seconds)
    try:
        report = prepare_dataset(
            a.dataset, a.root, annotation_root=a.annotation_root, video_root=a.video_root, splits=a.splits,
            options=options, check_decoding=a.check_decode, frame_cache=a.frame_cache, image_size=a.image_size,
            sampling=sampling, workers=a.workers, progress=not a.no_progress, console=console,
            missing_videos=a.missing_videos or defaults.get("missing_videos") or "skip",
        )
    except (ValueError, AnnotationError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 1
    report_path = Path(a.report) if a.report else Path(f"prepare_{a.dataset}.json")
    write_text_atomic(report_path, json.dumps(report, indent=2) + "\n")
    print_report(report, console)
    console.print(f"report: {report_path}")
    return 0 if report["ok"] else 1


def print_report(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"{report['dataset']}: videos under {report['video_root']}")
    for column in ("split", "listed", "present", "missing", "captions", "unreadable"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, entry in report["splits"].items():
        unreadable = len(entry["unreadable"]) if report.get("checked_decoding") else "not checked"
        present, missing = (f"{entry[key]:,}" if key in entry else "-" for key in ("present", "missing"))
        table.add_row(split, f"{entry['listed']:,}", present, missing, f"{entry['captions']:,}", str(unreadable))
    console.print(table)
    for split, entry in report["splits"].items():
        if entry.get("missing"):
            shown = ", ".join(entry["missing_ids"][:5]) + (", ..." if entry["missing"] > 5 else "")
            console.print(f"{split}: {entry['missing']:,} listed videos missing ({shown}); a run skips them with "
                          "data.missing_videos=skip (and records the count) or stops with data.missing_videos=error")
            if entry.get("missing_but_cached"):
                console.print(f"{split}: {entry['missing_but_cached']:,} of them are in the frame cache (read from "
                              "it by runs that use the cache)")
        if entry["skipped_without_captions"]:
            console.print(f"{split}: {entry['skipped_without_captions']:,} listed videos have no captions "
                          "(left out with the loader's missing=skip)")
        for bad in entry["unreadable"][:10]:
            console.print(f"[red]{split}: unreadable[/red] {bad['path']}: {bad['reason'].splitlines()[0]}")
    for split, reason in report["unavailable_splits"].items():
        console.print(f"{split}: not checked: {reason}")
    cache = report.get("frame_cache")
    if cache:
        console.print(f"frame cache {cache['dir']}: {cache['videos']:,} videos cached ({cache['added']:,} added, "
                      f"{cache['reused']:,} already there, {cache['failed']:,} failed), "
                      f"{_human_bytes(cache['bytes'])}; use it with --data.frame_cache={cache['dir']}")
    if report["errors"]:
        for error in report["errors"]:
            console.print(f"[red]error:[/red] {error}")
    else:
        skipped = any(entry.get("missing") for entry in report["splits"].values())
        console.print("[green]ok[/green]: a run can use this folder"
                      + (" (missing videos are skipped and counted: data.missing_videos=skip)" if skipped else ""))


def _human_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    exponent = min(4, int(math.log(size, 1024)))
    return f"{size / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB', 'TiB')[exponent - 1]}"


if __name__ == "__main__":
    sys.exit(prepare_command(sys.argv[1:]))
