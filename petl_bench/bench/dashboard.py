"""``petl-bench dashboard``: a W&B Report comparing every method on every dataset, built with wandb-workspaces.

Per dataset, one panel grid over the project's runs of that dataset (runs carry ``dataset``, ``method`` and ``label``
in their config, see `petl_bench.bench.wandb_logging`):

* a scatter of T2V R@1 against trainable parameters (log x),
* a bar chart per metric (T2V / V2T R@1, R@5, R@10, MdR; order-pair accuracy on synthetic), runs grouped by label
  (mean with a std band over seeds),
* a run comparer (config and summary side by side, differences only).

The methods come from the sweep files (default: every ``experiments/*.yaml``) and from the records under
``--results``. The report's definition is always written to ``--output`` (JSON: the wandb-workspaces objects as
data); it is saved to W&B only when W&B is reachable and the user is logged in — otherwise the command says so and
succeeds, and the definition can be published later from a connected machine by re-running the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from petl_bench.bench.records import REPORT_METRICS

DEFAULT_OUTPUT = "results/dashboard.json"


def collect_methods(sweeps: list[str] | None, results: str | Path | None) -> dict[str, list[str]]:
    """dataset → methods, from sweep files and from the run records under `results`."""
    from petl_bench.bench.report import load_records
    from petl_bench.bench.sweep import iter_specs

    found: dict[str, list[str]] = {}

    def add(dataset: str, method: str) -> None:
        methods = found.setdefault(dataset, [])
        if method not in methods:
            methods.append(method)

    for spec in iter_specs(sweeps):
        for dataset in spec.datasets:
            for method in spec.methods:
                add(dataset, method)
    if results and Path(results).is_dir():
        for folder in sorted(p for p in Path(results).iterdir() if p.is_dir()):
            for rec in load_records(folder):
                add(rec.get("dataset") or folder.name, rec["method"])
    return found


def _quote_list(values: list[str]) -> str:
    return "[" + ", ".join(repr(v) for v in values) + "]"


def build_report(entity: str, project: str, methods: dict[str, list[str]], title: str | None = None):
    """The `wandb_workspaces.reports.v2.Report` (not saved)."""
    import wandb_workspaces.reports.v2 as wr

    blocks = [
        wr.P(text="Parameter-efficient CLIP adaptation for text-video retrieval, method by method. Runs are grouped by "
                  "dataset, named by method and tagged with backbone and seed; the numbers are the run summaries "
                  "written by `petl-bench run` (test/t2v/R@1, params/trainable, efficiency/train_seconds, ...)."),
        wr.TableOfContents(),
    ]
    for dataset, names in methods.items():
        metrics = [(title_, key) for title_, key, _ in REPORT_METRICS
                   if dataset == "synthetic" or not key.startswith("order_pairs")]
        runset = wr.Runset(entity=entity, project=project, name=f"{dataset} runs",
                           filters=f"Config('dataset') = {dataset!r} and Config('method') in {_quote_list(names)}")
        panels = [wr.ScatterPlot(title=f"{dataset}: T2V R@1 vs trainable parameters",
                                 x=wr.SummaryMetric("params/trainable"), y=wr.SummaryMetric("test/t2v/R@1"),
                                 log_x=True)]
        panels += [wr.BarPlot(title=f"{dataset}: {title_}", metrics=[wr.SummaryMetric(f"test/{key}")],
                              groupby=wr.Config("label"), groupby_aggfunc="mean", groupby_rangefunc="stddev")
                   for title_, key in metrics]
        panels += [wr.BarPlot(title=f"{dataset}: trainable parameters", metrics=[wr.SummaryMetric("params/trainable")],
                              groupby=wr.Config("label"), groupby_aggfunc="mean"),
                   wr.RunComparer(diff_only="split")]
        blocks += [wr.H2(text=dataset),
                   wr.MarkdownBlock(text=f"Methods ({len(names)}): " + ", ".join(f"`{m}`" for m in names)),
                   wr.PanelGrid(runsets=[runset], panels=panels)]
    return wr.Report(entity=entity, project=project, title=title or f"{project}: methods compared",
                     description="T2V / V2T retrieval vs trainable parameters, per dataset (petl-bench dashboard).",
                     blocks=blocks)


def _as_data(obj):
    """A wandb-workspaces object as plain data: each block / panel / runset with its ``type`` and the fields that are
    set (internals such as random ids, and empty fields, left out)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"type": type(obj).__name__}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            empty = value is None or (isinstance(value, (list, tuple, dict, str)) and not value)
            unset_range = isinstance(value, tuple) and all(v is None for v in value)
            if f.name.startswith("_") or empty or unset_range:
                continue
            out[f.name] = _as_data(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [_as_data(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _as_data(v) for k, v in obj.items()}
    return obj if obj is None or isinstance(obj, (str, int, float, bool)) else str(obj)


def report_definition(report, methods: dict[str, list[str]]) -> dict:
    """The report as plain data (what would be saved), plus the datasets and methods it covers."""
    return {"kind": "wandb-workspaces Report", "datasets": methods, "report": _as_data(report)}


def wandb_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether saving to W&B can work now: not offline/disabled, logged in, and the host answers (a TCP connect)."""
    from petl_bench.bench.wandb_logging import resolve_wandb_mode, wandb_logged_in

    mode = resolve_wandb_mode()
    if mode != "online":
        return False, f"W&B mode is {mode} (WANDB_MODE, or not logged in)"
    if not wandb_logged_in():
        return False, "not logged in to W&B (`wandb login`)"
    url = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True, ""
    except OSError as err:
        return False, f"{url.hostname}:{port} unreachable ({err})"


def dashboard_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="petl-bench dashboard", allow_abbrev=False,
                                description="Build the W&B comparison report (wandb-workspaces); without network, "
                                            "write its definition to --output only.")
    p.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"), help="W&B entity (default: WANDB_ENTITY)")
    p.add_argument("--project", default=os.environ.get("WANDB_PROJECT", "petl-bench"))
    p.add_argument("--title", default=None)
    p.add_argument("--sweep", nargs="+", default=None, help="sweep files naming the methods (default: experiments/*)")
    p.add_argument("--results", default="results", help="also include the methods of the records found here")
    p.add_argument("--datasets", nargs="+", default=None, help="only these datasets")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help=f"definition file (default: {DEFAULT_OUTPUT})")
    a = p.parse_args(argv)
    if not a.entity:
        p.error("--entity is required (or set WANDB_ENTITY)")
    methods = collect_methods(a.sweep, a.results)
    if a.datasets:
        unknown = [d for d in a.datasets if d not in methods]
        if unknown:
            p.error(f"no sweep or result names dataset(s) {', '.join(unknown)}; known: {', '.join(methods)}")
        methods = {d: methods[d] for d in a.datasets}
    report = build_report(a.entity, a.project, methods, a.title)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report_definition(report, methods), indent=2) + "\n", encoding="utf-8")
    print(f"wrote the report definition to {out} ({len(methods)} datasets, "
          f"{sum(len(m) for m in methods.values())} dataset x method pairs)")
    ok, why = wandb_reachable()
    if not ok:
        print(f"not saved to W&B: {why}. Re-run with network to publish it.")
        return 0
    try:
        report.save()
    except Exception as err:  # noqa: BLE001 - network or permission trouble: the definition is on disk already
        print(f"saving to W&B failed ({type(err).__name__}: {err}); the definition is in {out}")
        return 0
    print(f"W&B report: {report.url}")
    return 0
