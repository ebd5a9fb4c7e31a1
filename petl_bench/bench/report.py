"""The comparison report: ``results/<dataset>/report.md`` and its plots, from the run records beside it.

Rows are a run label (the method, plus backbone / grid values when a sweep varies them) aggregated over seeds:
every metric is the mean ± the sample standard deviation over the seeds that finished. In each metric column the best
mean is **bold**, and a cell within the seed spread of the best (``|Δ mean| ≤`` the larger of the two standard
deviations) carries ``≈``: with these seeds the two are not told apart, and the note under the table lists such close
calls. Beside each row: seeds, trainable parameters (count and % of the model), trainable-only checkpoint size and
training time. A line above the table names the test split, the frame protocol and the words, from the records.

Plots (PNG, matplotlib): ``r1_vs_trainable.png`` — T2V / V2T R@1 against trainable parameters on a log axis (methods
that train nothing are horizontal lines); ``r1_per_method.png`` — T2V and V2T R@1 per method with seed error bars.
``petl-bench report`` without ``--dataset`` does every dataset under results/ and writes ``results/report.md``, the
T2V R@1 of each method on each dataset, with ``r1_by_dataset.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from petl_bench.bench.protocol_report import manifest_section, paper_section, selection_section
from petl_bench.bench.records import PARAMETER_COUNT_RULE, POSTPROCESSED_METRICS, REPORT_METRICS, trainable_percent

PLOT_FILES = ("r1_vs_trainable.png", "r1_per_method.png")


# ---------------------------------------------------------------------------------------------------------- loading
def _is_record(payload) -> bool:
    return isinstance(payload, dict) and "metrics" in payload and "params" in payload


def load_records(results_dir: Path) -> list[dict]:
    """Every finished run record in a dataset folder (``*.json`` except ``*.failed.json``), sorted by file name."""
    records = []
    for path in sorted(Path(results_dir).glob("*.json")):
        if path.name.endswith(".failed.json"):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable run record ({err}); delete it to redo the run") from err
        if not _is_record(rec):
            continue  # another JSON file in the folder (e.g. a dashboard definition)
        rec["_file"] = path.name
        records.append(rec)
    return records


def load_failures(results_dir: Path) -> list[dict]:
    out = []
    for path in sorted(Path(results_dir).glob("*.failed.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            rec = {}
        rec["_file"] = path.name
        out.append(rec)
    return out


def metric(rec: dict, *keys: str):
    """A test metric of a record by its flat key (``"t2v/R@1"``) or path (``"t2v", "R@1"``); None when absent."""
    m = rec.get("metrics", {})
    flat = "/".join(keys)
    if flat in m:
        return m[flat]
    node = m
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


# ---------------------------------------------------------------------------------------------------------- rows
@dataclass
class Stat:
    mean: float
    std: float | None  # None with a single seed
    n: int

    def text(self, digits: int = 1) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def stat(values: Sequence[float]) -> Stat | None:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass
class Row:
    """The runs of one label (all seeds)."""

    label: str
    records: list[dict] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.records[0].get("method", self.label)

    @property
    def seeds(self) -> list:
        return sorted(r.get("seed") for r in self.records if r.get("seed") is not None)

    def metric(self, key: str) -> Stat | None:
        return stat([metric(r, key) for r in self.records])

    @property
    def trainable(self) -> int:
        return int(self.records[0]["params"]["trainable"])

    @property
    def total(self) -> int:
        return int(self.records[0]["params"]["total"])

    @property
    def trainable_percent(self) -> float:
        # against CLIP's own parameters (PARAMETER_COUNT_RULE); a record written before the rule keeps its own value
        share = trainable_percent(self.records[0])
        if share is not None:
            return share
        return float(self.records[0].get("trainable_percent", 100.0 * self.trainable / max(self.total, 1)))

    def efficiency(self, key: str) -> Stat | None:
        return stat([(r.get("efficiency") or {}).get(key) for r in self.records])


def aggregate(records: Sequence[dict]) -> list[Row]:
    """Group records by label (and backbone), ordered by trainable parameters, then label."""
    rows: dict[tuple, Row] = {}
    for rec in records:
        label = rec.get("label") or rec.get("method") or rec["_file"].removesuffix(".json")
        key = (label, rec.get("backbone"))
        rows.setdefault(key, Row(label)).records.append(rec)
    backbones = {b for _, b in rows}
    if len(backbones) > 1:  # two backbones under one label: say which is which
        for (label, backbone), row in rows.items():
            row.label = f"{label} ({backbone})"
    return sorted(rows.values(), key=lambda r: (r.trainable, r.label))


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# ---------------------------------------------------------------------------------------------------------- text
METHOD_NOTES = Path(__file__).with_name("method_notes.yaml")


def _method_notes(methods: set) -> list[tuple[str, str]]:
    """(method, note) for the methods of the report that method_notes.yaml annotates (reconstructions, counts)."""
    notes = yaml.safe_load(METHOD_NOTES.read_text(encoding="utf-8")) or {}
    return [(m, notes[m]) for m in sorted(m for m in methods if m in notes)]


def _protocol_line(records: Sequence[dict]) -> list[str]:
    """What the rows were evaluated on; a warning when they were not all evaluated the same way."""

    def describe(rec: dict) -> str:
        d = rec.get("data", {})
        cfg = rec.get("config", {})
        trainer = cfg.get("trainer", {}) if isinstance(cfg, dict) else {}
        v2t = (cfg.get("metrics") or {}).get("v2t_protocol") if isinstance(cfg, dict) else None
        steps = (f"{trainer['max_steps']} steps" if trainer.get("max_steps", -1) not in (-1, None)
                 else f"{trainer.get('max_epochs')} epochs")
        return (f"test split `{d.get('test_split')}` ({d.get('test_videos')} videos, {d.get('test_captions')} "
                f"captions), {d.get('num_frames')} frames (`{d.get('frame_protocol')}`), {d.get('max_words')} words; "
                f"backbone `{rec.get('backbone')}` (pretrained `{rec.get('pretrained')}`, open_clip config "
                f"`{rec.get('open_clip_model', rec.get('backbone'))}`); V2T protocol `{v2t}`; "
                f"training: {steps}, precision `{trainer.get('precision')}`")

    kinds: dict[str, list[str]] = {}
    for rec in records:
        kinds.setdefault(describe(rec), []).append(rec.get("label") or rec.get("method", "?"))
    if len(kinds) == 1:
        return [f"Protocol: {next(iter(kinds))}.", ""]
    lines = ["**Warning: these runs were not all evaluated the same way** — compare within a protocol only:", ""]
    for text, labels in kinds.items():
        lines.append(f"- {text}: {', '.join(sorted(set(labels)))}")
    return [*lines, ""]


def _best(stats: list[Stat | None], higher: bool) -> float | None:
    means = [s.mean for s in stats if s is not None]
    if not means:
        return None
    return max(means) if higher else min(means)


def _close_to_best(s: Stat, leaders: Sequence[tuple[Row, Stat]]) -> tuple[Row, Stat, float] | None:
    """The leader whose seed spread covers the gap to `s` (the larger of the two stds), if any."""
    for row, ls in leaders:
        spread = max(s.std or 0.0, ls.std or 0.0)
        if spread > 0 and abs(s.mean - ls.mean) <= spread:
            return row, ls, spread
    return None


def metric_table(rows: Sequence[Row], columns: Sequence[tuple[str, str, bool]]) -> tuple[list[str], list[str]]:
    """Markdown table lines and the close-call notes (differences within the seed spread of the best)."""
    head = ["method", *[title for title, _, _ in columns], "seeds", "trainable", "trainable %", "ckpt MB",
            "train s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    cells = [[row.label] for row in rows]
    notes = []
    for title, key, higher in columns:
        stats = [row.metric(key) for row in rows]
        best = _best(stats, higher)
        present = sum(s is not None for s in stats)
        leaders = [(row, s) for row, s in zip(rows, stats) if s is not None and s.mean == best]
        for i, (row, s) in enumerate(zip(rows, stats)):
            if s is None:
                cells[i].append("–")
            elif s.mean == best and present > 1:
                cells[i].append(f"**{s.text()}**")
            elif (close := _close_to_best(s, leaders)) is not None:
                cells[i].append(f"{s.text()} ≈")
                lrow, ls, spread = close
                notes.append(f"{title}: {row.label} ({s.text()}) vs the best, {lrow.label} ({ls.text()}): "
                             f"Δ {abs(s.mean - ls.mean):.1f} ≤ seed spread {spread:.1f}")
            else:
                cells[i].append(s.text())
    for row, row_cells in zip(rows, cells):
        ckpt = row.efficiency("checkpoint_bytes")
        train = row.efficiency("train_seconds")
        row_cells += [str(len(row.records)), human_count(row.trainable), f"{row.trainable_percent:.3f}",
                      "–" if ckpt is None else f"{ckpt.mean / 1e6:.2f}",
                      "–" if train is None else f"{train.mean:.0f}"]
        lines.append("| " + " | ".join(row_cells) + " |")
    return lines, notes


def _present_columns(records: Sequence[dict]) -> list[tuple[str, str, bool]]:
    """Plain metric columns, then post-processed ones (labelled, e.g. "T2V R@1 (DSL)") only where a run has them."""
    return [c for c in (*REPORT_METRICS, *POSTPROCESSED_METRICS) if any(metric(r, c[1]) is not None for r in records)]


def _postprocessing_legend(columns: Sequence[tuple[str, str, bool]]) -> list[str]:
    if not any(c in POSTPROCESSED_METRICS for c in columns):
        return []
    return [("Columns marked (DSL), (QB-Norm) or (Sinkhorn) re-score the same similarity matrix with that inference-time "
             "post-processing (dual softmax; querybank normalisation and Sinkhorn with a bank of training queries); "
             "their parameters were fixed in the config or chosen on validation, never on test. The unmarked columns "
             "are the headline."), ""]


# ---------------------------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def plot_r1_vs_trainable(rows: Sequence[Row], path: Path, title: str) -> Path:
    """T2V and V2T R@1 (panels) against trainable parameters on a log axis; rows training nothing are dashed lines."""
    fig = _figure(11.0, 4.6)
    axes = fig.subplots(1, 2, sharex=True)
    trained = [r for r in rows if r.trainable > 0]
    colors = {row.label: f"C{i % 10}" for i, row in enumerate(rows)}
    for ax, key, name in ((axes[0], "t2v/R@1", "T2V R@1"), (axes[1], "v2t/R@1", "V2T R@1")):
        values = [s.mean for s in (row.metric(key) for row in rows) if s is not None]
        y_span = (max(values) - min(values)) if values else 1.0
        placed: list[tuple[float, float]] = []  # (log10 x, y) of labels so far: near neighbours get stacked labels
        for row in rows:
            s = row.metric(key)
            if s is None:
                continue
            if row.trainable == 0:
                ax.axhline(s.mean, color=colors[row.label], linestyle="--", linewidth=1)
                ax.annotate(f"{row.label} (0 trainable)", (0.01, s.mean), xycoords=("axes fraction", "data"),
                            textcoords="offset points", xytext=(0, 3), fontsize=7, color=colors[row.label])
                continue
            ax.errorbar(row.trainable, s.mean, yerr=s.std or 0, fmt="o", color=colors[row.label], capsize=3)
            here = (math.log10(row.trainable), s.mean)
            crowd = sum(abs(here[0] - x) < 0.35 and abs(here[1] - y) < 0.04 * (y_span or 1.0) for x, y in placed)
            placed.append(here)
            ax.annotate(row.label, (row.trainable, s.mean), textcoords="offset points", xytext=(5, 3 - 9 * crowd),
                        fontsize=7)
        if trained:
            ax.set_xscale("log")
            ax.set_xlim(min(r.trainable for r in trained) / 3, max(r.trainable for r in trained) * 4)
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel(f"{name} (%)")
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title + ("" if all(len(r.records) == 1 for r in rows) else " (error bars: std over seeds)"))
    fig.savefig(path)
    return path


def _bars(ax, rows: Sequence[Row], title: str) -> None:
    import numpy as np

    y = np.arange(len(rows))
    height = 0.38
    for offset, key, name in ((-height / 2, "t2v/R@1", "T2V R@1"), (height / 2, "v2t/R@1", "V2T R@1")):
        stats = [row.metric(key) for row in rows]
        ax.barh(y + offset, [s.mean if s else 0 for s in stats], height,
                xerr=[(s.std or 0) if s else 0 for s in stats], capsize=2, label=name)
    ax.set_yticks(y, [row.label for row in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("R@1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)


def plot_r1_per_method(rows: Sequence[Row], path: Path, title: str) -> Path:
    fig = _figure(7.0, 1.0 + 0.38 * max(len(rows), 2))
    ax = fig.add_subplot()
    _bars(ax, rows, title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------------------------------------- reports
def write_report(results_dir: Path, out_dir: Path | None = None, plots: bool = True) -> Path:
    """Write ``report.md`` (and the plots) for one dataset folder; returns the report's path."""
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    records = load_records(results_dir)
    failures = load_failures(results_dir)
    rows = aggregate(records)
    name = results_dir.name
    lines = [f"# {name}: text-video retrieval", ""]
    if not records:
        lines += [f"No finished run in `{results_dir}`.", ""]
    else:
        lines += _protocol_line(records)
        seeds = sorted({len(r.records) for r in rows})
        if seeds == [1]:
            lines += [("One seed per row: no seed spread is known, so small differences may be noise "
                       "(`make bench SEEDS=3` gives mean ± std)."), ""]
        else:
            lines += [(f"Mean ± sample std over seeds ({'/'.join(map(str, seeds))} per row). **Bold**: best in the "
                       "column; ≈: within the seed spread of the best (|Δ| ≤ the larger std), not a reliable "
                       "difference."), ""]
        columns = _present_columns(records)
        table, notes = metric_table(rows, columns)
        lines += [*table, "", *_postprocessing_legend(columns)]
        lines += [("R@K in %, MdR = median rank (lower is better); order-pair acc = % of captions that score their "
                   "own clip strictly above its time-reversed twin (synthetic only; a tie is a miss, so a model blind to "
                   "order, whose twins tie, scores well below 50). Ties rank pessimistically everywhere: an order-blind "
                   "model cannot win R@1 on the order pairs. ckpt = trainable-only checkpoint; train s = wall time "
                   "of fit."), "", f"Parameter count rule: {PARAMETER_COUNT_RULE}.", ""]
        if notes:
            lines += ["Differences smaller than the seed spread:", "", *[f"- {n}" for n in notes], ""]
        method_notes = _method_notes({r.get("method") for r in records})
        if method_notes:
            lines += ["Notes on methods:", "", *[f"- `{m}`: {n}" for m, n in method_notes], ""]
        if plots:
            plot_r1_vs_trainable(rows, out_dir / PLOT_FILES[0], f"{name}: R@1 vs trainable parameters")
            plot_r1_per_method(rows, out_dir / PLOT_FILES[1], f"{name}: R@1 per method")
            lines += [f"![R@1 vs trainable parameters]({PLOT_FILES[0]})", "",
                      f"![T2V and V2T R@1 per method]({PLOT_FILES[1]})", ""]
    if records:  # issue 15: the papers' numbers (real datasets), the tested weights, the data manifest
        if not any((r.get("data") or {}).get("dataset") == "synthetic" for r in records):
            lines += paper_section(rows, name, human_count)
        lines += selection_section(rows)
        lines += manifest_section(records)
    if failures:
        lines += ["## Failed runs", "", "| run | reason | last line of stderr |", "|---|---|---|"]
        for f in failures:
            tail = [ln for ln in (f.get("stderr_tail") or "").splitlines() if ln.strip()]
            last = (tail[-1] if tail else "").replace("|", "\\|")[:160]
            lines.append(f"| {f['_file'].removesuffix('.failed.json')} | {f.get('reason', '?')} | `{last}` |")
        lines.append("")
    out = out_dir / "report.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def dataset_folders(results_root: Path) -> list[Path]:
    """Folders under results/ that hold run records or failures."""
    return sorted(p for p in Path(results_root).iterdir()
                  if p.is_dir() and (load_records(p) or any(p.glob("*.failed.json"))))


def write_index(results_root: Path, folders: Sequence[Path], plots: bool = True) -> Path:
    """``results/report.md``: T2V R@1 of every method on every dataset, with a plot per dataset."""
    results_root = Path(results_root)
    by_dataset = {f.name: aggregate(load_records(f)) for f in folders}
    labels = sorted({row.label for rows in by_dataset.values() for row in rows})
    lines = ["# Text-video retrieval: T2V R@1 per dataset", "",
             "Mean ± std over seeds; details, protocols and plots in each dataset's report.", "",
             "| method | " + " | ".join(f"[{d}]({d}/report.md)" for d in by_dataset) + " |",
             "|---|" + "---:|" * len(by_dataset)]
    for label in labels:
        cells = []
        for rows in by_dataset.values():
            row = next((r for r in rows if r.label == label), None)
            s = row.metric("t2v/R@1") if row else None
            cells.append("–" if s is None else s.text())
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    if plots and any(by_dataset.values()):
        shown = {d: rows for d, rows in by_dataset.items() if rows}
        fig = _figure(5.0 * len(shown), 1.2 + 0.38 * max(len(r) for r in shown.values()))
        axes = fig.subplots(1, len(shown), squeeze=False)[0]
        for ax, (dataset, rows) in zip(axes, shown.items()):
            _bars(ax, rows, dataset)
        axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.savefig(results_root / "r1_by_dataset.png")
        lines += ["![T2V / V2T R@1 per method per dataset](r1_by_dataset.png)", ""]
    out = results_root / "report.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def report_command(argv: list[str]) -> int:
    from rich.console import Console
    from rich.progress import track

    p = argparse.ArgumentParser(prog="petl-bench report", allow_abbrev=False,
                                description="Write results/<dataset>/report.md and its plots from the run records "
                                            "(every dataset under --results unless --dataset is given).")
    p.add_argument("--dataset", nargs="+", default=None, help="dataset folder(s) under --results (default: all)")
    p.add_argument("--results", default="results")
    p.add_argument("--out", default=None, help="write the report and plots here instead (one dataset only), e.g. to "
                                               "record it under experiments/")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    root = Path(a.results)
    if a.dataset:
        folders = [root / d for d in a.dataset]
        missing = [str(f) for f in folders if not f.is_dir()]
        if missing:
            p.error(f"no results folder {', '.join(missing)} (run `make bench DATASET=...` first)")
    else:
        folders = dataset_folders(root) if root.is_dir() else []
        if not folders:
            p.error(f"no run records under {root}/ (run `make bench` first)")
    if a.out and len(folders) != 1:
        p.error("--out takes a single --dataset")
    console = Console(stderr=True)
    written = []
    for folder in track(folders, description="report", console=console, transient=True,
                        disable=len(folders) < 2):
        written.append(write_report(folder, a.out, plots=not a.no_plots))
    if not a.dataset and len(folders) > 1:
        written.append(write_index(root, folders, plots=not a.no_plots))
    for path in written:
        print(path.read_text())
        console.print(f"wrote {path}")
    return 0
