"""Retrieval over your own videos: ``petl-bench index`` embeds a folder with trained methods, ``petl-bench search``
ranks it for a sentence.

``petl-bench index --ckpt A [--ckpt NAME=B ...] VIDEO_DIR --out INDEX`` finds every video under VIDEO_DIR
(recursively, by extension), samples frames with each method's ``num_frames`` and one frame protocol (CLIP4Clip's
``fps`` by default, ``--frame-protocol uniform`` for X-Pool's segments), and stores each method's per-frame
embeddings — the text-conditioned head needs frames, not a pooled vector. A ``--ckpt`` is a run folder, a
trainable-only checkpoint or an export (`petl_bench.export`); the index keeps an export of each under
``INDEX/adapters/`` so `search` needs nothing else.

- One frozen CLIP serves every method (`BackbonePool`): it is built once per (model, pretrained source) and each
  method's own tensors are attached to it; frames are decoded once per distinct frame count.
- Resumable: embeddings go to ``INDEX/embeddings/<adapter>/shard-NNNNN.safetensors``, each written atomically and
  naming its videos (relative path, size, mtime) in its header. A rerun skips every video a shard already holds
  unchanged; a changed file is embedded again (the newer shard wins). ``--ckpt`` may add an adapter to an index.
- Never fatal on a bad file: a video that does not decode is skipped, listed with the reason in
  ``INDEX/report.json`` and counted in the summary line; it is tried again on the next run.

``petl-bench search INDEX "a man is cooking" [--ckpt NAME ...] [-k 5]`` encodes the sentence with each indexed
method (or those named), scores it against every video with the method's similarity head (meanP or
text-conditioned, exactly as at test time), and prints the top k per method.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from petl_bench.atomic import write_json_atomic
from petl_bench.data.video import FRAME_PROTOCOLS, VideoDecodeError, load_video
from petl_bench.export import (
    BackbonePool,
    ExportError,
    export_checkpoint,
    export_paths,
    load_export,
    read_export,
    tensor_bytes,
    write_bytes_atomic,
)

__all__ = [
    "VIDEO_EXTENSIONS",
    "IndexSummary",
    "build_index",
    "find_videos",
    "index_command",
    "search_command",
    "search_index",
]

INDEX_FORMAT = "petl-bench-index"
INDEX_VERSION = 1
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv",
                              ".3gp", ".ts", ".mts", ".m2ts", ".ogv", ".vob"})


# ------------------------------------------------------------------------------------------------ videos
def find_videos(folder: str | Path, exclude: Path | None = None) -> list[str]:
    """Relative POSIX paths of the video files under `folder` (recursive, sorted; hidden files and `exclude`
    skipped)."""
    folder = Path(folder)
    exclude = exclude.resolve() if exclude is not None else None
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() not in VIDEO_EXTENSIONS:
            continue
        if exclude is not None and path.resolve().is_relative_to(exclude):
            continue
        if path.is_file():
            found.append(rel.as_posix())
    return sorted(found)


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


class _Frames(Dataset):
    """Each pending video decoded once per frame count any adapter asks for; a failure is returned, not raised."""

    def __init__(self, root: Path, keys: list[str], frame_counts: dict[str, list[int]], image_size: int,
                 protocol: str):
        self.root, self.keys, self.frame_counts = root, keys, frame_counts
        self.image_size, self.protocol = image_size, protocol

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        key = self.keys[i]
        path = self.root / key
        try:
            stat = _stat(path)
            frames = {n: load_video(path, n, self.image_size, self.protocol) for n in self.frame_counts[key]}
        except (VideoDecodeError, OSError, ValueError, IndexError) as err:
            # IndexError/ValueError: decord or the sampler rejecting an odd stream; the file is at fault, not the run
            return {"key": key, "error": str(err).splitlines()[0]}
        return {"key": key, "stat": stat, "frames": frames}


# ------------------------------------------------------------------------------------------------ adapters
def _adapter_name(ckpt: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` → (name, path); the name of a bare path is its export / run / checkpoint name."""
    if "=" in ckpt and not Path(ckpt).exists():
        name, _, path = ckpt.partition("=")
        return name, Path(path).expanduser()
    path = Path(ckpt).expanduser()
    if path.is_dir():
        return path.name, path
    if path.suffix in (".json", ".safetensors"):
        return path.stem, path
    if path.suffix == ".ckpt" and path.parent.name == "checkpoints":
        return path.parent.parent.name, path
    return path.stem, path


def _is_export(path: Path) -> bool:
    return path.suffix in (".json", ".safetensors") or export_paths(path)[1].is_file()


def _stage_adapter(name: str, source: Path, out: Path, pool: BackbonePool) -> dict:
    """Put an export of `source` at ``out/adapters/<name>`` (an index is self-contained); returns its config.

    An adapter of that name already in the index must be the same weights (same SHA-256)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"adapter name {name!r} is not a plain file name; use --ckpt NAME=PATH")
    target = out / "adapters" / name
    existing = export_paths(target)[1]
    staging = out / "adapters" / f".staging-{name}"
    if _is_export(source):
        meta, _ = read_export(source)
        tensors, meta_path = export_paths(source)
    else:
        meta_path = export_checkpoint(source, staging, pool)
        meta, _ = read_export(meta_path)
        tensors = export_paths(staging)[0]
    if existing.is_file():
        old = json.loads(existing.read_text(encoding="utf-8"))
        if old.get("sha256") != meta["sha256"]:
            raise ValueError(f"{out} already holds an adapter named {name!r} with other weights ({existing}); "
                             f"name this one differently (--ckpt OTHER={source}) or index into a new folder")
    else:
        t_path, j_path = export_paths(target)
        write_bytes_atomic(t_path, tensors.read_bytes())
        write_json_atomic(j_path, {**meta, "tensors": t_path.name, "indexed_from": str(source.resolve())})
    for leftover in export_paths(staging):
        leftover.unlink(missing_ok=True)
    return meta


def load_adapters(index: Path, names: list[str], device: str | torch.device | None,
                  pool: BackbonePool | None = None) -> tuple[dict, BackbonePool]:
    """The index's adapters as modules, all built on one `BackbonePool` (one CLIP per model + source)."""
    pool = pool if pool is not None else BackbonePool(device)
    modules = {name: load_export(index / "adapters" / name, pool=pool, device=device) for name in names}
    return modules, pool


# ------------------------------------------------------------------------------------------------ shards
def _shard_dir(index: Path, name: str) -> Path:
    return index / "embeddings" / name


def _shard_headers(index: Path, name: str) -> list[tuple[Path, list]]:
    """[(shard file, [[video, size, mtime_ns], ...])] in write order."""
    from safetensors import safe_open

    out = []
    for path in sorted(_shard_dir(index, name).glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.append((path, json.loads(f.metadata()["videos"])))
    return out


def _write_shard(index: Path, name: str, rows: list[tuple[str, list, torch.Tensor, torch.Tensor]]) -> Path:
    folder = _shard_dir(index, name)
    numbers = [int(p.stem.split("-")[1]) for p in folder.glob("shard-*.safetensors")]
    path = folder / f"shard-{max(numbers, default=-1) + 1:05d}.safetensors"
    videos = [[key, *stat] for key, stat, _, _ in rows]
    state = {"frame_emb": torch.stack([r[2] for r in rows]), "frame_mask": torch.stack([r[3] for r in rows])}
    write_bytes_atomic(path, tensor_bytes(state, metadata={"format": INDEX_FORMAT, "videos": json.dumps(videos)}))
    return path


def read_embeddings(index: str | Path, name: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(videos, frame embeddings (V, T, D), frame masks (V, T)) of one adapter; a video embedded twice (its file
    changed between runs) keeps its newest embedding."""
    from safetensors.torch import load_file

    index = Path(index)
    where: dict[str, tuple[int, int]] = {}
    embs, masks = [], []
    for s, (path, videos) in enumerate(_shard_headers(index, name)):
        state = load_file(str(path))
        embs.append(state["frame_emb"])
        masks.append(state["frame_mask"])
        for row, (key, *_stat) in enumerate(videos):
            where[key] = (s, row)
    keys = sorted(where)
    if not keys:
        return [], torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    emb = torch.stack([embs[s][r] for s, r in (where[k] for k in keys)])
    mask = torch.stack([masks[s][r] for s, r in (where[k] for k in keys)])
    return keys, emb, mask


# ------------------------------------------------------------------------------------------------ index
@dataclass
class IndexSummary:
    videos: int = 0  # video files found
    embedded: dict[str, int] = field(default_factory=dict)  # per adapter, this run
    already: dict[str, int] = field(default_factory=dict)  # per adapter, skipped as finished
    unreadable: dict[str, str] = field(default_factory=dict)  # video → reason
    backbone: dict = field(default_factory=dict)  # BackbonePool.stats
    seconds: float = 0.0

    def line(self, report: Path) -> str:
        per = ", ".join(f"{n}: {self.embedded[n]} new, {self.already[n]} already indexed" for n in self.embedded)
        bad = (f"; {len(self.unreadable)} unreadable file(s) skipped, listed in {report}" if self.unreadable
               else "; no unreadable files")
        return f"indexed {self.videos} video(s) in {self.seconds:.1f} s ({per}){bad}"


def build_index(video_dir: str | Path, ckpts: list[str], out: str | Path, frame_protocol: str = "fps",
                batch_size: int = 16, shard_size: int = 256, num_workers: int = 0,
                device: str | torch.device | None = None, progress: bool = True, console=None) -> IndexSummary:
    """Embed every video under `video_dir` with each checkpoint / run / export of `ckpts` into the index `out`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    start = time.perf_counter()
    console = console or Console()
    video_dir, out = Path(video_dir).expanduser().resolve(), Path(out).expanduser().resolve()
    if not video_dir.is_dir():
        raise FileNotFoundError(f"video folder {video_dir} does not exist")
    if frame_protocol not in FRAME_PROTOCOLS:
        raise ValueError(f"--frame-protocol must be one of {FRAME_PROTOCOLS}, got {frame_protocol!r}")
    if not ckpts:
        raise ValueError("give at least one --ckpt (a run folder, a trainable-only checkpoint or an export)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "video_dir": str(video_dir),
        "frame_protocol": frame_protocol, "adapters": {}}
    for key, value in (("video_dir", str(video_dir)), ("frame_protocol", frame_protocol)):
        if manifest.get(key) != value:
            raise ValueError(f"{out} is an index of {key} {manifest.get(key)!r}, not {value!r}: index into a new "
                             "folder")

    names = {}
    for ckpt in ckpts:
        name, source = _adapter_name(ckpt)
        if name in names:
            raise ValueError(f"two --ckpt are named {name!r}; name them: --ckpt A={names[name]} --ckpt B={source}")
        names[name] = source
    pool = BackbonePool(device)  # one CLIP per (model, source) for staging run checkpoints and for embedding
    metas = {name: _stage_adapter(name, source, out, pool) for name, source in names.items()}
    for name, meta in metas.items():
        trained = meta.get("frame_protocol")
        if trained and trained != frame_protocol:
            console.print(f"[yellow]note:[/yellow] {name} was trained and tested with the {trained!r} frame protocol; "
                          f"this index samples {frame_protocol!r} (--frame-protocol {trained} matches the run)")
        manifest["adapters"][name] = {k: meta.get(k) for k in ("class_path", "backbone", "pretrained", "num_frames",
                                                               "max_words", "similarity", "sha256")}
    write_json_atomic(manifest_path, manifest)

    videos = find_videos(video_dir, exclude=out)
    stats = {}
    pending: dict[str, list[str]] = {}
    summary = IndexSummary(videos=len(videos))
    for name in names:
        done = {key: stat for _, rows in _shard_headers(out, name) for key, *stat in rows}
        todo = []
        for key in videos:
            stat = stats.setdefault(key, _stat(video_dir / key))
            if done.get(key) != stat:
                todo.append(key)
        pending[name] = todo
        summary.already[name] = len(videos) - len(todo)
        summary.embedded[name] = 0
    pending_sets = {name: set(todo) for name, todo in pending.items()}
    keys = [k for k in videos if any(k in todo for todo in pending_sets.values())]
    frame_counts = {k: sorted({metas[n]["num_frames"] for n in names if k in pending_sets[n]}) for k in keys}

    modules = load_adapters(out, list(names), device, pool)[0] if keys else {}
    summary.backbone = dict(pool.stats)
    image_size = next(iter(pool.backbones.values())).image_size if pool.backbones else 0
    if len(pool.backbones) > 1 and keys:
        sizes = {b.image_size for b in pool.backbones.values()}
        if len(sizes) > 1:
            raise ValueError(f"the adapters' backbones take frames of different sizes {sorted(sizes)}; index them "
                             "into separate folders")
    loader = DataLoader(_Frames(video_dir, keys, frame_counts, image_size, frame_protocol), batch_size=None,
                        num_workers=num_workers)
    queue: dict[str, list] = {n: [] for n in names}  # decoded, not yet encoded
    encoded: dict[str, list] = {n: [] for n in names}  # encoded, not yet in a shard

    def encode(name: str) -> None:
        items, queue[name] = queue[name], []
        if not items:
            return
        video = torch.stack([f for _, _, f, _ in items]).to(device)
        mask = torch.stack([m for _, _, _, m in items]).to(device)
        with torch.inference_mode():
            emb = modules[name].encode_video(video, mask).float().cpu()
        encoded[name].extend((k, s, e, m) for (k, s, _, m), e in zip(items, emb))

    def flush(name: str) -> None:
        if encoded[name]:
            _write_shard(out, name, encoded[name])
            summary.embedded[name] += len(encoded[name])
            encoded[name] = []
            write_json_atomic(out / "report.json", _report(summary))

    columns = (TextColumn("[bold]indexing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[current]}"))
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("videos", total=len(keys), current="")
        for item in loader:
            bar.update(task, advance=1, current=item["key"][-40:])
            if "error" in item:
                summary.unreadable[item["key"]] = item["error"]
                continue
            for name in names:
                if item["key"] in pending_sets[name]:
                    frames, mask = item["frames"][metas[name]["num_frames"]]
                    queue[name].append((item["key"], item["stat"], frames, mask))
                    if len(queue[name]) >= min(batch_size, shard_size):  # a shard never waits on a batch
                        encode(name)
                    if len(encoded[name]) >= shard_size:
                        flush(name)
        for name in names:
            encode(name)
            flush(name)
    summary.seconds = time.perf_counter() - start
    write_json_atomic(out / "report.json", _report(summary))
    return summary


def _report(summary: IndexSummary) -> dict:
    return {"videos": summary.videos, "embedded": summary.embedded, "already_indexed": summary.already,
            "unreadable": [{"video": k, "reason": v} for k, v in sorted(summary.unreadable.items())],
            "backbone": summary.backbone, "seconds": round(summary.seconds, 3)}


# ------------------------------------------------------------------------------------------------ search
def search_index(index: str | Path, queries: str | list[str], adapters: list[str] | None = None, k: int = 5,
                 device: str | torch.device | None = None, video_chunk: int = 4096,
                 ) -> dict[str, list[list[tuple[str, float]]]]:
    """Top-`k` (video, score) per query, per adapter, with each adapter's own text encoder and similarity head."""
    import open_clip

    index = Path(index).expanduser()
    manifest_path = index / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{index} is not an index (no manifest.json): build one with `petl-bench index`")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    known = list(manifest["adapters"])
    names = adapters or known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"{index} has no adapter {', '.join(map(repr, unknown))}; it holds {', '.join(known)}")
    queries = [queries] if isinstance(queries, str) else list(queries)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modules, _ = load_adapters(index, names, device)
    results = {}
    for name in names:
        module = modules[name]
        keys, emb, mask = read_embeddings(index, name)
        if not keys:
            results[name] = [[] for _ in queries]
            continue
        tokenizer = open_clip.get_tokenizer(module.hparams.backbone)
        with torch.inference_mode():
            text = module.encode_text(tokenizer(queries, context_length=module.max_words).to(device)).float()
            scores = torch.cat([module.similarity(text, emb[i:i + video_chunk].to(device),
                                                  mask[i:i + video_chunk].to(device)).float().cpu()
                                for i in range(0, len(keys), video_chunk)], dim=1)
        top = scores.topk(min(k, len(keys)), dim=1)
        results[name] = [[(keys[j], float(s)) for s, j in zip(vals.tolist(), idx.tolist())]
                         for vals, idx in zip(top.values, top.indices)]
    return results


# ------------------------------------------------------------------------------------------------ CLI
def index_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="petl-bench index",
        description="Embed every video of a folder with one or more trained methods (one shared CLIP), resumably.")
    p.add_argument("video_dir", help="folder of videos (searched recursively)")
    p.add_argument("--ckpt", action="append", required=True, metavar="[NAME=]PATH",
                   help="a run folder, trainable-only checkpoint or export; repeat to index several methods")
    p.add_argument("--out", required=True, help="the index folder (created, or resumed when it exists)")
    p.add_argument("--frame-protocol", default="fps", choices=FRAME_PROTOCOLS,
                   help="fps: CLIP4Clip's 1 frame per second, evenly thinned (default); uniform: segment middles")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=256, help="videos per embeddings file (the resume granularity)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (0: in this process)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    a = p.parse_args(argv)
    from rich.console import Console

    console = Console()
    try:
        summary = build_index(a.video_dir, a.ckpt, a.out, a.frame_protocol, a.batch_size, a.shard_size, a.workers,
                              a.device, console=console)
    except (ExportError, FileNotFoundError, KeyError, ValueError) as err:
        console.print(f"petl-bench index: {err}", markup=False)
        return 1
    backbone, adapters = summary.backbone, len(summary.embedded)
    if adapters > 1 and backbone.get("builds"):
        attach = backbone["attach_seconds"] / max(1, backbone["attached"])
        console.print(f"{backbone['builds']} CLIP build(s) ({backbone['build_seconds']:.2f} s) served {adapters} "
                      f"adapters; attaching a method to a built CLIP took {attach:.3f} s", soft_wrap=True)
    console.print(summary.line(Path(a.out) / "report.json"), markup=False, soft_wrap=True)
    return 0


def search_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="petl-bench search",
                                description="Rank the videos of an index for a sentence, per indexed method.")
    p.add_argument("index", help="an index folder built by `petl-bench index`")
    p.add_argument("query", help="the sentence to search for")
    p.add_argument("--ckpt", action="append", default=None, metavar="NAME", help="adapter(s) to use (default: all)")
    p.add_argument("-k", type=int, default=5, help="videos to show (default 5)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print {adapter: [[video, score], ...]} as JSON")
    a = p.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    try:
        results = search_index(a.index, a.query, a.ckpt, a.k, a.device)
    except (ExportError, FileNotFoundError, KeyError) as err:
        console.print(f"petl-bench search: {err}", markup=False)
        return 1
    if a.json:
        print(json.dumps({name: hits[0] for name, hits in results.items()}, indent=2))
        return 0
    video_dir = json.loads((Path(a.index) / "manifest.json").read_text(encoding="utf-8"))["video_dir"]
    for name, hits in results.items():
        table = Table(title=f"{name}: {a.query!r}", caption=f"videos under {video_dir}")
        for col, justify in (("rank", "right"), ("score", "right"), ("video", "left")):
            table.add_column(col, justify=justify)
        for rank, (video, score) in enumerate(hits[0], 1):
            table.add_row(str(rank), f"{score:.4f}", video)
        console.print(table)
    return 0
