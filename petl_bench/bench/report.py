"""The comparison report: ``results/<dataset>/report.md`` from the run records beside it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [("T2V R@1", ("t2v", "R@1")), ("T2V R@5", ("t2v", "R@5")), ("T2V R@10", ("t2v", "R@10")),
           ("T2V MdR", ("t2v", "MdR")), ("V2T R@1", ("v2t", "R@1")), ("V2T R@5", ("v2t", "R@5"))]


def load_records(results_dir: Path) -> list[dict]:
    records = []
    for path in sorted(Path(results_dir).glob("*.json")):
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        rec["_file"] = path.name
        records.append(rec)
    return records


def metric(rec: dict, *keys: str):
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


def write_report(results_dir: Path) -> Path:
    results_dir = Path(results_dir)
    records = load_records(results_dir)
    lines = [f"# {results_dir.name}: text-video retrieval", ""]
    if records:
        d = records[0].get("data", {})
        lines += [f"Test split `{d.get('test_split')}` ({d.get('test_videos')} videos, {d.get('test_captions')} "
                  f"captions), {d.get('num_frames')} frames ({d.get('frame_protocol')}), {d.get('max_words')} words; "
                  f"backbone `{records[0].get('backbone')}` (pretrained: `{records[0].get('pretrained')}`).", ""]
    head = ["method", *[c for c, _ in COLUMNS], "order-pair acc", "trainable", "trainable %", "ckpt MB", "train s"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for rec in records:
        eff = rec.get("efficiency", {})
        cells = [rec.get("method", rec["_file"])]
        for _, keys in COLUMNS:
            v = metric(rec, *keys)
            cells.append("–" if v is None else f"{v:.1f}")
        acc = metric(rec, "order_pairs", "accuracy")
        cells.append("–" if acc is None else f"{acc:.1f}")
        cells += [f"{rec['params']['trainable']:,}", f"{rec['trainable_percent']:.3f}",
                  f"{eff.get('checkpoint_bytes', 0) / 1e6:.2f}", f"{eff.get('train_seconds', 0):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    out = results_dir / "report.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def report_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="petl-bench report", description="Write results/<dataset>/report.md.")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--results", default="results")
    a = p.parse_args(argv)
    print(write_report(Path(a.results) / a.dataset).read_text())
    return 0
