"""The evaluation protocol's data side: a validation split that is never the test set, and a data manifest per run.

Validation (the suite chose; issue 15): model selection — the best epoch, early stopping, any sweep or
post-processing choice — only ever sees a split disjoint from the test split.

- Datasets with an official validation split use it: MSVD ``val`` (100 videos), VATEX HGR ``val`` (1,500), DiDeMo
  ``val`` (1,065 on the collaborative-experts list).
- MSR-VTT and ActivityNet have none that is disjoint from their test sets (the papers validate on the 1k-A test set
  and on ``val_1``; ActivityNet's ``val_2`` annotates the same videos as ``val_1``), so a *hold-out* is drawn from
  the training list: ``val_holdout`` videos (a count, or a share of the list when below 1), chosen by `holdout_ids`
  from the listed ids and a seed (``val_seed``, the same for every method and run seed, so all runs select on the same
  videos), and training uses the rest. The chosen ids, their count and hash go into the run record.
- A dataset with neither (the synthetic set, unless ``val_holdout`` is given) has no validation: the last epoch is
  tested. Validating on the test split is refused.

`holdout_ids` ranks ids by ``sha256("<seed>:<id>")`` — a rule any language can repeat, independent of random number
generator versions and of which videos happen to be on disk (missing held-out videos are counted, not replaced).

The manifest (`split_manifest`, `annotation_files`, `probe_videos`) says what a run's data was, so that two runs can be
shown to have seen the same data: per split the videos and captions listed, found, missing and unreadable, a hash of
the (id, captions) items, the frame protocol, the source fps and resolution from a header probe (PyAV reads the
container header only: milliseconds per file; at most ``probe_limit`` videos per split, a seeded sample beyond that),
and a SHA-256 of each annotation file.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

HOLDOUT = "holdout"
ANNOTATION_SUFFIXES = (".json", ".csv", ".txt", ".pkl", ".tsv")


# ---------------------------------------------------------------------------------------------------------- hold-out
def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def holdout_size(size: float, listed: int) -> int:
    """Videos to hold out of ``listed``: ``size`` itself when >= 1 (a count), else that share of the list, rounded."""
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0:
        raise ValueError(f"data.val_holdout={size!r}: a number of videos (>= 1) or a share of the training list (0..1)")
    count = int(size) if size >= 1 else round(size * listed)
    if size >= 1 and count != size:
        raise ValueError(f"data.val_holdout={size!r}: a count must be a whole number (or give a share below 1)")
    if not 1 <= count < listed:
        raise ValueError(f"data.val_holdout={size!r} holds out {count} of {listed} listed training videos; it must "
                         "leave at least one video on each side")
    return count


def holdout_ids(ids: Sequence[str], size: float, seed: int = 0,
                groups: Mapping[str, str] | None = None) -> list[str]:
    """The held-out validation ids of a training list, in list order.

    Ids are ranked by ``sha256(f"{seed}:{group}")`` and taken in that order until ``size`` videos (`holdout_size`)
    are reached; ``groups`` (id -> group key) keeps videos that belong together on one side — the synthetic order
    twins, whose caption pairs would otherwise leak across the split. A group that would overshoot is taken whole.
    """
    count = holdout_size(size, len(ids))
    members: dict[str, list[str]] = {}
    for video_id in ids:
        members.setdefault((groups or {}).get(video_id, video_id), []).append(video_id)
    chosen: set[str] = set()
    for key in sorted(members, key=lambda k: _rank(seed, k)):
        if len(chosen) >= count:
            break
        chosen.update(members[key])
    if len(chosen) >= len(ids):
        raise ValueError(f"data.val_holdout={size!r}: the hold-out would take every training video")
    return [video_id for video_id in ids if video_id in chosen]


def ids_sha256(ids: Sequence[str]) -> str:
    """SHA-256 of the ids, one per line in the given order: a short way to show two runs used the same videos."""
    return hashlib.sha256("".join(f"{i}\n" for i in ids).encode()).hexdigest()


def items_sha256(items: Sequence[tuple[str, Sequence[str]]]) -> str:
    """SHA-256 of a split's (video id, captions) items as canonical JSON: equal whatever file format they came from."""
    payload = json.dumps([[video_id, list(captions)] for video_id, captions in items], ensure_ascii=False,
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------- manifest
def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def annotation_files(annotation_root: Path, subdirs: Sequence[str] = ()) -> dict[str, dict]:
    """``{relative name: {"bytes", "sha256"}}`` of the annotation files (json, csv, txt, pkl, tsv) directly in the
    annotation folder (and in ``subdirs`` of it: the synthetic set's ``annotations/``); symlinks are followed."""
    root = Path(annotation_root)
    out: dict[str, dict] = {}
    for folder in [root, *(root / s for s in subdirs)]:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in ANNOTATION_SUFFIXES and path.is_file() and path.name != "manifest.json":
                out[str(path.relative_to(root))] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return out


def combined_sha256(files: Mapping[str, Mapping]) -> str:
    """One hash over every annotation file (name and content hash): equal iff the files are."""
    return hashlib.sha256("".join(f"{name}\t{files[name]['sha256']}\n" for name in sorted(files)).encode()).hexdigest()


def probe_header(path: Path) -> dict:
    """fps, width, height, frames and duration of a video's first stream from its container header (no decoding)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        duration = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                    else (container.duration / 1e6 if container.duration else None))
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        if width < 1 or height < 1:
            raise ValueError(f"size {width}x{height}")
        return {"fps": float(rate) if rate else None, "width": width, "height": height,
                "frames": int(stream.frames) or None, "seconds": duration}


def _spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def probe_videos(ids: Sequence[str], paths: Sequence[Path | None], limit: int = 256, seed: int = 0) -> dict:
    """Header statistics of a split's found videos: fps, width, height, short side, seconds (min / median / max),
    from all of them or from a seeded sample of ``limit``; ``unreadable`` lists probed files PyAV cannot open.

    Videos served only by the frame cache (no file) are not probed; ``limit=0`` probes nothing.
    """
    candidates = [(i, p) for i, p in zip(ids, paths) if p is not None]
    if limit is not None and len(candidates) > limit:
        candidates = sorted(candidates, key=lambda c: _rank(seed, c[0]))[:limit]
    infos, unreadable = [], []
    for video_id, path in candidates:
        try:
            infos.append(probe_header(Path(path)))
        except Exception as err:  # noqa: BLE001 — any failure to read a header is what "unreadable" counts
            unreadable.append({"id": video_id, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"})
    return {
        "probed": len(candidates), "of_found_files": sum(p is not None for p in paths), "unreadable": len(unreadable),
        "unreadable_ids": unreadable,
        "fps": _spread([i["fps"] for i in infos]), "width": _spread([i["width"] for i in infos]),
        "height": _spread([i["height"] for i in infos]),
        "short_side": _spread([min(i["width"], i["height"]) for i in infos]),
        "seconds": _spread([i["seconds"] for i in infos]),
    }
