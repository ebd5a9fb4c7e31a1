"""The report's trust sections (issue 15): the papers' numbers beside ours, which weights were tested, the data manifest.

- `paper_section`: per method with a figure in ``paper_results.yaml`` for the report's dataset, the paper's T2V / V2T
  R@1, our mean ± std over seeds and the difference (ours − paper), the trainable parameters both ways, the paper's
  backbone and frames, how its protocol differs, and the source. Real datasets only (the synthetic set has no papers).
- `selection_section`: which checkpoint each row tested and why (best validation epoch, last epoch, frozen).
- `manifest_section`: what data the runs saw (`RetrievalDataModule.manifest`): per split listed / found / missing /
  unreadable videos and captions, source fps and resolution, the items hash; the annotation files' hash; and whether
  every run saw the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

PAPER_RESULTS = Path(__file__).with_name("paper_results.yaml")
_DEFAULT_KEYS = ("paper", "backbone", "frames", "protocol", "source")


def load_paper_results(path: Path = PAPER_RESULTS) -> dict:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}


def paper_figure(method: str, dataset: str, table: dict | None = None) -> dict | None:
    """The paper's entry for a method on a dataset, the method's defaults filled in; None when it reports none.

    ``msrvtt_7k`` and other variants of a dataset have no entry of their own: the papers report on the standard split.
    """
    table = load_paper_results() if table is None else table
    entry = table.get(method)
    if not entry or dataset not in (entry.get("datasets") or {}):
        return None
    out = {k: entry.get(k) for k in _DEFAULT_KEYS}
    out.update(entry["datasets"][dataset] or {})
    return out


def _fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ours(row, key: str) -> str:
    s = row.metric(key)
    return "–" if s is None else s.text()


def _delta(row, key: str, paper) -> str:
    s = row.metric(key)
    if s is None or paper is None:
        return "–"
    return f"{s.mean - float(paper):+.1f}"


def paper_section(rows: Sequence, dataset: str, human_count) -> list[str]:
    """Markdown lines: the papers' figures beside ours; empty when no row's method has one for ``dataset``."""
    table = load_paper_results()
    found = [(row, fig) for row in rows if (fig := paper_figure(row.method, dataset, table)) is not None]
    if not found:
        return []
    head = ["method", "T2V R@1 paper", "T2V R@1 ours", "Δ T2V", "V2T R@1 paper", "V2T R@1 ours", "Δ V2T",
            "trainable paper", "trainable ours", "paper backbone / frames", "paper protocol differs", "source"]
    lines = ["## The papers' numbers beside ours", "",
             ("Paper: the figure the method's paper reports for this dataset (≈: read off a plot); ours: mean ± std "
              "over our seeds; Δ = ours − paper, in R@1 points. The papers select their checkpoint on the test set "
              "(ours: on a validation split disjoint from test) and may differ in backbone, frames or schedule, as "
              "the protocol column says; sources are cited in petl_bench/bench/paper_results.yaml."), "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * 7 + "---|---|---|---|"]
    for row, fig in found:
        approx = "≈ " if fig.get("approx") else ""
        t2v, v2t = fig.get("t2v_r1"), fig.get("v2t_r1")
        frames = fig.get("frames")
        cells = [row.label, approx + _fmt(t2v) if t2v is not None else "–", _ours(row, "t2v/R@1"),
                 _delta(row, "t2v/R@1", t2v), _fmt(v2t), _ours(row, "v2t/R@1"), _delta(row, "v2t/R@1", v2t),
                 str(fig.get("params") or "–"), human_count(row.trainable),
                 f"{fig.get('backbone') or '?'} / {frames if frames is not None else 'not stated'}",
                 str(fig.get("protocol") or "–"), str(fig.get("source") or "–")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return [*lines, ""]


def selection_section(rows: Sequence) -> list[str]:
    """Markdown lines: which weights each row tested, and why (from the records' ``checkpoint_selection``)."""
    described = [(row, [r.get("checkpoint_selection") for r in row.records]) for row in rows]
    if not any(s for _, sels in described for s in sels):
        return []
    lines = ["## Which weights were tested", "",
             ("Test metrics are computed once per run, at its end, on the weights named here: the best epoch on the "
              "validation split (never the test split) when the run validated, else the last epoch."), "",
             "| method | tested | why (per seed) |", "|---|---|---|"]
    for row, sels in described:
        kinds = sorted({s.get("tested", "?") for s in sels if s}) or ["not recorded"]
        reasons = "; ".join(f"seed {r.get('seed')}: {s.get('reason')}" if s else f"seed {r.get('seed')}: not recorded"
                            for r, s in zip(row.records, sels))
        lines.append(f"| {row.label} | {', '.join(kinds)} | {reasons.replace('|', '/')} |")
    return [*lines, ""]


def _spread(stats: dict | None, digits: int = 0) -> str:
    if not stats:
        return "–"
    return "/".join(f"{stats[k]:.{digits}f}" for k in ("min", "median", "max"))


def manifest_section(records: Sequence[dict]) -> list[str]:
    """Markdown lines: the data manifest of the runs (one table when they all saw the same data)."""
    manifests = [(r.get("label") or r.get("method"), r.get("seed"), r.get("manifest")) for r in records]
    present = [m for _, _, m in manifests if m]
    if not present:
        return []
    lines = ["## Data manifest", ""]

    def fingerprint(m: dict) -> tuple:
        return (m.get("annotations_sha256"),
                tuple((w, s.get("items_sha256"), s.get("video_ids_sha256")) for w, s in sorted(m["splits"].items())))

    groups: dict[tuple, list[str]] = {}
    for label, seed, m in manifests:
        groups.setdefault(fingerprint(m) if m else ("no manifest",), []).append(f"{label} (seed {seed})")
    if len(groups) == 1 and len(present) == len(manifests):
        lines += [(f"Every run ({len(manifests)}) saw the same data: the same annotation files (SHA-256 "
                  f"`{present[0].get('annotations_sha256', '')[:16]}…`) and, per split, the same listed items and "
                  "found videos."), ""]
    else:
        lines += [("**Warning: the runs did not all see the same data** (annotation files, listed items or found "
                  "videos differ):"), ""]
        lines += [f"- `{key[0][:16] if key[0] else key}…`: {', '.join(runs)}" for key, runs in groups.items()]
        lines.append("")
    m = present[0]
    frames = m.get("frames") or {}
    lines += [f"Frames: `{frames.get('protocol')}` protocol, {frames.get('num_frames')} per video"
              + (f", first {frames.get('max_seconds')} s" if frames.get("max_seconds") else "")
              + f", {frames.get('image_size')} px; {m.get('max_words')} words; training captions: "
              f"`{m.get('train_caption_sampling')}`" + (f"; frame cache `{frames['frame_cache']}`"
                                                       if frames.get("frame_cache") else "") + ".", ""]
    validation = m.get("validation")
    if validation is None:
        lines += ["Validation: none (no split disjoint from test): the last epoch is tested.", ""]
    elif validation.get("holdout"):
        h = validation["holdout"]
        lines += [(f"Validation: {h['videos']} videos held out of `{h['from_split']}` (requested {h['requested']}, "
                  f"seed {h['seed']}, ids SHA-256 `{h['ids_sha256'][:16]}…`, ids in each run record); training uses "
                  "the rest. Never the test split."), ""]
    else:
        lines += [f"Validation: split `{validation.get('split')}` (disjoint from test).", ""]
    lines += [("| split | listed videos | found | missing | no captions | unreadable (probed) | captions | "
              "fps min/med/max | short side px | seconds | items SHA-256 |"), "|---|" + "---:|" * 9 + "---|"]
    for which in ("train", "val", "test"):
        s = (m.get("splits") or {}).get(which)
        if not s:
            continue
        if "error" in s:
            lines.append(f"| {which} (`{s['split']}`) | not loaded: {s['error'].replace('|', '/')} |" + " |" * 9)
            continue
        p = s.get("probe") or {}
        lines.append(
            f"| {which} (`{s['split']}`) | {s['listed_videos']:,} | {s['found_videos']:,} | {s['missing_videos']:,} | "
            f"{s['skipped_without_captions']:,} | {s['unreadable_videos']} ({p.get('probed', 0)} of "
            f"{p.get('of_found_files', 0)}) | {s['captions']:,} | {_spread(p.get('fps'), 1)} | "
            f"{_spread(p.get('short_side'))} | {_spread(p.get('seconds'), 1)} | `{s['items_sha256'][:12]}…` |")
    files = m.get("annotation_files") or {}
    lines += ["", "Annotation files: " + (", ".join(f"`{name}` ({f['bytes']:,} B, `{f['sha256'][:12]}…`)"
                                                  for name, f in sorted(files.items())) or "none found") + ".", ""]
    return lines
