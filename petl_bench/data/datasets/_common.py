"""Shared reading helpers for the benchmark loaders: every bad annotation file fails here with a message that names the
file, the line (or key) and what to do, instead of a bare `KeyError` or `UnicodeDecodeError` deep inside a DataModule.

Also holds the two pieces every dataset shares beyond parsing: locating a video under a few accepted names, and
`check_videos`, which counts the listed videos that exist (VATEX and DiDeMo always miss some) for `petl-bench prepare`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from petl_bench.data.datasets import DatasetSpec, Items

# Containers a video file may come in after the usual re-encoding; each dataset puts its canonical one first.
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")


class AnnotationError(ValueError):
    """An annotation file exists but cannot be used as it is (malformed, wrong structure, empty or missing captions)."""


class AnnotationFileNotFoundError(FileNotFoundError):
    """An annotation file the split needs is not in the annotation folder."""


class SkippedItemsWarning(UserWarning):
    """Listed videos were left out of a split (only when the caller asked for `missing="skip"`).

    The attributes let a DataModule record the count in the run's metadata instead of parsing the message.
    """

    def __init__(self, message: str, *, dataset: str, split: str, skipped: Sequence[str]):
        super().__init__(message)
        self.dataset = dataset
        self.split = split
        self.skipped = list(skipped)


# ---------------------------------------------------------------------------------------------------------------------
# Files


def annotation_dir(annotation_root: str | os.PathLike) -> Path:
    """The annotation folder as a Path; a clear error when it does not exist (rather than one per missing file)."""
    root = Path(annotation_root).expanduser()
    if not root.is_dir():
        raise AnnotationFileNotFoundError(
            f"annotation folder {str(root)!r} does not exist or is not a folder; pass the folder that holds the "
            "dataset's annotation files (they may live apart from the videos)"
        )
    return root


def require_file(path: Path, *, what: str, hint: str = "") -> Path:
    """Return `path` if it is a file, else raise an error saying which file the split needs and how to get it."""
    if path.is_file():
        return path
    message = f"missing annotation file {str(path)!r} ({what})"
    if hint:
        message += f"; {hint}"
    raise AnnotationFileNotFoundError(message)


def read_text(path: Path) -> str:
    """Read a whole file as strict UTF-8 (a leading BOM is dropped).

    Captions in another encoding would otherwise reach the tokenizer as mojibake, so a non-UTF-8 byte is an error that
    says where it is.
    """
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise AnnotationError(
            f"{path}: not valid UTF-8 (byte 0x{data[err.start]:02x} at line {line}, column {column}); re-save the "
            "file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`"
        ) from None


def read_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error names the line and column."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}; the file is probably "
            "truncated or edited by hand: download it again"
        ) from None


def read_csv(path: Path, required_columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Read a CSV file with a header row into `(line number, row)` pairs, blank lines skipped.

    A row with a different number of fields than the header is an error: a silently shifted column would turn an id
    into a caption.
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise AnnotationError(f"{path}: empty CSV file; expected a header row with {', '.join(required_columns)}")
        header = [name.strip() for name in header]
        absent = [name for name in required_columns if name not in header]
        if absent:
            raise AnnotationError(
                f"{path}: line 1: the header {','.join(header)!r} lacks column(s) {', '.join(absent)}; "
                f"expected columns {', '.join(required_columns)}"
            )
        rows = []
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if len(fields) != len(header):
                raise AnnotationError(
                    f"{path}: line {reader.line_num}: expected {len(header)} fields ({','.join(header)}), found "
                    f"{len(fields)}; a caption with a comma must be quoted"
                )
            rows.append((reader.line_num, dict(zip(header, fields))))
    except csv.Error as err:
        raise AnnotationError(f"{path}: line {reader.line_num}: malformed CSV: {err}") from None
    return rows


def read_id_list(path: Path) -> list[str]:
    """Read a split list: one video id per line, surrounding whitespace and blank lines ignored.

    A repeated id is an error, since it would enter the gallery twice and turn one correct match into a wrong one.
    """
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        video_id = line.strip()
        if not video_id:
            continue
        if video_id in first_line:
            raise AnnotationError(
                f"{path}: line {number}: video id {video_id!r} is listed twice (first on line "
                f"{first_line[video_id]}); remove the duplicate"
            )
        first_line[video_id] = number
        ids.append(video_id)
    if not ids:
        raise AnnotationError(f"{path}: the list holds no video ids")
    return ids


def check_caption(caption: Any, *, video_id: str, path: Path, where: str = "") -> str:
    """Return the caption with surrounding whitespace removed; an empty or non-string caption is an error naming the
    video, because an empty query would be scored like any other and silently drag every metric down."""
    place = f" ({where})" if where else ""
    if not isinstance(caption, str):
        raise AnnotationError(
            f"{path}: caption of video {video_id!r}{place} is a {type(caption).__name__}, not a string; fix the entry"
        )
    caption = caption.strip()
    if not caption:
        raise AnnotationError(f"{path}: empty caption for video {video_id!r}{place}; fix or remove the entry")
    return caption


def expect_type(value: Any, expected: type | tuple[type, ...], *, path: Path, where: str, wanted: str) -> Any:
    """Check the JSON structure one level at a time so a wrong file names the key that differs from the format."""
    if not isinstance(value, expected):
        raise AnnotationError(f"{path}: {where} is a {type(value).__name__}; expected {wanted}")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Pickles (MSVD raw-captions.pkl)

_PLAIN_PICKLE_TYPES = (dict, list, tuple, str, int, float)


class _PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that cannot import anything.

    Every way a pickle runs code (REDUCE, BUILD, INST, OBJ, NEWOBJ) needs a callable, and the only way a pickle gets
    one is through `find_class` (GLOBAL, STACK_GLOBAL and the extension-registry opcodes all call it). Refusing here
    stops a malicious file before any of its code can run; plain containers and strings need no globals at all.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="utf-8")
        self._path = path

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"{self._path}: refused to load: the pickle asks for {module}.{name}, but only plain data "
            "(dict, list, tuple, str, int, float) is accepted; a caption file never needs code. Do not use this file; "
            "use captions_msvd.json or a raw-captions.pkl from a source you trust"
        )

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"{self._path}: refused to load: the pickle uses persistent ids")


def _check_plain(value: Any, path: Path) -> None:
    """Walk the loaded object; anything but the plain types (a set, bytes, None, bool) is refused."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) not in _PLAIN_PICKLE_TYPES:
            raise AnnotationError(
                f"{path}: refused: the pickle holds a {type(item).__name__}; only dict, list, tuple, str, int and "
                "float are accepted"
            )
        if type(item) is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        elif type(item) in (list, tuple):
            stack.extend(item)


def load_plain_pickle(path: Path) -> Any:
    """Load a pickle that may only contain plain data, without ever importing or calling anything it names."""
    with path.open("rb") as file:
        try:
            value = _PlainDataUnpickler(file, path).load()
        except pickle.UnpicklingError as err:
            message = str(err)  # a refusal from find_class already names the file and what to do
            if not message.startswith(str(path)):
                message = f"{path}: not a readable pickle ({message}); download it again"
            raise AnnotationError(message) from None
        except UnicodeDecodeError:
            raise AnnotationError(f"{path}: the pickle holds strings that are not valid UTF-8") from None
        except (EOFError, ValueError, IndexError, KeyError, TypeError, AttributeError, MemoryError) as err:
            # What a truncated or garbled stream raises from inside the pickle machine.
            raise AnnotationError(
                f"{path}: not a readable pickle ({type(err).__name__}: {err}); download it again"
            ) from None
    _check_plain(value, path)
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Captions per id


def captions_for_ids(
    ids: Sequence[str],
    captions: dict[str, list[str]],
    *,
    dataset: str,
    split: str,
    list_path: Path,
    captions_path: Path,
    missing: str = "error",
) -> Items:
    """Pair listed ids with their captions in list order; ids without captions fail or, with `missing="skip"`, are
    dropped with a `SkippedItemsWarning` that carries the count."""
    if missing not in ("error", "skip"):
        raise ValueError(f"missing={missing!r}: choose 'error' or 'skip'")
    items = [(video_id, captions[video_id]) for video_id in ids if video_id in captions]
    absent = [video_id for video_id in ids if video_id not in captions]
    if absent:
        shown = ", ".join(repr(video_id) for video_id in absent[:5]) + (", ..." if len(absent) > 5 else "")
        summary = (
            f"{dataset} {split}: {len(absent)} of {len(ids)} videos listed in {list_path} have no captions in "
            f"{captions_path} ({shown})"
        )
        if missing == "error":
            raise AnnotationError(
                f"{summary}; use a caption file that covers the split, or pass missing='skip' to leave them out "
                "(the count is recorded)"
            )
        warnings.warn(
            SkippedItemsWarning(f"{summary}; skipped them", dataset=dataset, split=split, skipped=absent), stacklevel=3
        )
    return items


# ---------------------------------------------------------------------------------------------------------------------
# Videos


def find_first_file(video_root: Path, names: Iterable[str], extensions: Sequence[str] = ("",)) -> Path | None:
    """The first `video_root/<name><extension>` that is a file, trying names in order and extensions within a name."""
    video_root = Path(video_root)
    for name in names:
        for extension in extensions:
            candidate = video_root / f"{name}{extension}"
            if candidate.is_file():
                return candidate
    return None


@dataclass
class VideoCheck:
    """Which listed videos of one split exist under a video folder, in split order."""

    dataset: str
    video_root: Path
    present: dict[str, Path] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.present) + len(self.missing)

    def summary(self) -> str:
        line = f"{self.dataset}: {len(self.present):,} of {self.total:,} listed videos found in {self.video_root}"
        if self.missing:
            shown = ", ".join(self.missing[:5]) + (", ..." if len(self.missing) > 5 else "")
            line += f"; {len(self.missing):,} missing ({shown})"
        return line

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "video_root": str(self.video_root),
            "listed": self.total,
            "present": len(self.present),
            "missing": len(self.missing),
            "missing_ids": list(self.missing),
        }


def check_videos(spec: DatasetSpec, items: Items, video_root: str | os.PathLike) -> VideoCheck:
    """Look up every listed video with the dataset's `find_video`; a missing video folder is an error, not 1,000
    missing videos."""
    video_root = Path(video_root).expanduser()
    if not video_root.is_dir():
        raise FileNotFoundError(f"video folder {str(video_root)!r} does not exist or is not a folder")
    report = VideoCheck(dataset=spec.name, video_root=video_root)
    for video_id, _ in items:
        path = spec.find_video(video_root, video_id)
        if path is None:
            report.missing.append(video_id)
        else:
            report.present[video_id] = path
    return report
