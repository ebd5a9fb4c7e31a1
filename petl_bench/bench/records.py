"""Run records on disk and the stable names their numbers go by everywhere else (W&B summary, dashboards).

A record is ``<results>/<dataset>/<name>.json`` (see `petl_bench.bench.run`); this module needs neither torch nor
Lightning, so the sweep driver and the report stay quick to start.
"""

from __future__ import annotations

# Keys of a run's W&B summary besides the test metrics (``test/<metric>``, e.g. ``test/t2v/R@1``).
PARAMS_KEYS = ("params/trainable", "params/total", "params/trainable_percent")
EFFICIENCY_KEYS = ("efficiency/train_seconds", "efficiency/train_steps", "efficiency/train_samples_per_second",
                   "efficiency/checkpoint_bytes", "efficiency/peak_host_rss_mb", "efficiency/peak_gpu_allocated_mb")
# The metrics the report and the dashboard show, as (column title, record key, higher is better).
REPORT_METRICS = (("T2V R@1", "t2v/R@1", True), ("T2V R@5", "t2v/R@5", True), ("T2V R@10", "t2v/R@10", True),
                  ("T2V MdR", "t2v/MdR", False), ("V2T R@1", "v2t/R@1", True), ("V2T R@5", "v2t/R@5", True),
                  ("V2T R@10", "v2t/R@10", True), ("V2T MdR", "v2t/MdR", False),
                  ("order-pair acc", "order_pairs/accuracy", True))


def summary_from_record(record: dict) -> dict:
    """The flat W&B summary of a run record: ``test/<metric>``, ``params/*``, ``efficiency/*`` and the run's axes."""
    out: dict = {f"test/{k}": v for k, v in (record.get("metrics") or {}).items()}
    params = record.get("params") or {}
    out["params/trainable"] = params.get("trainable")
    out["params/total"] = params.get("total")
    out["params/trainable_percent"] = record.get("trainable_percent")
    for key, value in (record.get("efficiency") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"efficiency/{key}"] = value
    for key in ("method", "label", "dataset", "backbone", "seed"):
        if record.get(key) is not None:
            out[f"run/{key}"] = record[key]
    return {k: v for k, v in out.items() if v is not None}


RESULT_COLUMNS = ("label", "method", "dataset", "backbone", "seed", "trainable", "total", "trainable %",
                  *[title for title, _, _ in REPORT_METRICS], "train s", "checkpoint MB")


def result_row(record: dict) -> list:
    """One row of the results table (`RESULT_COLUMNS`), as logged to W&B."""
    metrics = record.get("metrics") or {}
    eff = record.get("efficiency") or {}
    params = record.get("params") or {}
    return [record.get("label") or record.get("method"), record.get("method"), record.get("dataset"),
            record.get("backbone"), record.get("seed"), params.get("trainable"), params.get("total"),
            record.get("trainable_percent"), *[metrics.get(key) for _, key, _ in REPORT_METRICS],
            eff.get("train_seconds"), (eff.get("checkpoint_bytes") or 0) / 1e6]
