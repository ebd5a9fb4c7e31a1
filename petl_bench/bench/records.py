"""Run records on disk and the stable names their numbers go by everywhere else (W&B summary, dashboards).

A record is ``<results>/<dataset>/<name>.json`` (see `petl_bench.bench.run`); this module needs neither torch nor
Lightning, so the sweep driver and the report stay quick to start.
"""

from __future__ import annotations

# Keys of a run's W&B summary besides the test metrics (``test/<metric>``, e.g. ``test/t2v/R@1``).
PARAMS_KEYS = ("params/trainable", "params/total", "params/clip", "params/trainable_percent")
EFFICIENCY_KEYS = ("efficiency/train_seconds", "efficiency/train_steps", "efficiency/train_samples_per_second",
                   "efficiency/checkpoint_bytes", "efficiency/peak_host_rss_mb", "efficiency/peak_gpu_allocated_mb")
# The metrics the report and the dashboard show, as (column title, record key, higher is better).
REPORT_METRICS = (("T2V R@1", "t2v/R@1", True), ("T2V R@5", "t2v/R@5", True), ("T2V R@10", "t2v/R@10", True),
                  ("T2V MdR", "t2v/MdR", False), ("V2T R@1", "v2t/R@1", True), ("V2T R@5", "v2t/R@5", True),
                  ("V2T R@10", "v2t/R@10", True), ("V2T MdR", "v2t/MdR", False),
                  ("order-pair acc", "order_pairs/accuracy", True))
# Post-processed numbers (petl_bench.metrics: DSL, QB-Norm, Sinkhorn), shown beside the plain ones and only when a run
# recorded them; never the headline.
POSTPROCESSING_LABELS = {"dsl": "DSL", "qb_norm": "QB-Norm", "sinkhorn": "Sinkhorn"}
POSTPROCESSED_METRICS = tuple((f"{direction} R@1 ({label})", f"{name}/{direction.lower()}/R@1", True)
                              for name, label in POSTPROCESSING_LABELS.items() for direction in ("T2V", "V2T"))


# One denominator for every method's trainable share (issue 15): CLIP's own parameters, as open_clip builds the
# backbone, without anything a method adds (151,277,313 for ViT-B/32, 149,620,737 for ViT-B/16). Dividing by the
# method's total instead would give each method its own denominator.
PARAMETER_COUNT_RULE = ("trainable % = trainable parameters (every tensor with requires_grad, a method's additions "
                        "included) / CLIP's own parameters (the open_clip backbone as built, without any method's "
                        "additions: 151,277,313 for ViT-B/32, 149,620,737 for ViT-B/16), the same denominator for "
                        "every method on a backbone")


def parameter_share(model, counts: dict) -> dict:
    """``{"trainable_percent", "params_denominator", "params_count_rule"}`` of a run: the trainable share against
    CLIP's own parameter count (``model.clip.model``), added to ``counts`` as ``counts["clip"]``."""
    clip = sum(p.numel() for p in model.clip.model.parameters())
    counts["clip"] = clip
    return {"trainable_percent": 100.0 * counts["trainable"] / clip, "params_denominator": "clip",
            "params_count_rule": PARAMETER_COUNT_RULE}


def trainable_percent(record: dict) -> float | None:
    """A record's trainable share against CLIP's parameters; None for a record that lacks CLIP's count (written
    before the rule: its ``trainable_percent`` divided by the method's own total)."""
    params = record.get("params") or {}
    if params.get("clip"):
        return 100.0 * params["trainable"] / params["clip"]
    return None


def summary_from_record(record: dict) -> dict:
    """The flat W&B summary of a run record: ``test/<metric>``, ``params/*``, ``efficiency/*`` and the run's axes."""
    out: dict = {f"test/{k}": v for k, v in (record.get("metrics") or {}).items()}
    params = record.get("params") or {}
    out["params/trainable"] = params.get("trainable")
    out["params/total"] = params.get("total")
    out["params/clip"] = params.get("clip")
    out["params/trainable_percent"] = trainable_percent(record)
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
            trainable_percent(record), *[metrics.get(key) for _, key, _ in REPORT_METRICS],
            eff.get("train_seconds"), (eff.get("checkpoint_bytes") or 0) / 1e6]
