"""The report from run records: mean ± std over seeds, best marked, close calls flagged, plots written."""

import json
import statistics

import pytest

from petl_bench.atomic import write_json_atomic
from petl_bench.bench.report import aggregate, load_records, report_command, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(method, seed, t2v, v2t, trainable, *, frames=8, order=None, label=None):
    metrics = {"t2v/R@1": t2v, "t2v/R@5": t2v + 20, "t2v/MdR": 100 / t2v, "v2t/R@1": v2t}
    if order is not None:
        metrics["order_pairs/accuracy"] = order
    return {"method": method, "label": label or method, "dataset": "synthetic", "backbone": "petl-tiny-vit",
            "pretrained": "synthetic", "seed": seed, "params": {"trainable": trainable, "total": 1_000_000},
            "trainable_percent": trainable / 1e4, "metrics": metrics,
            "efficiency": {"train_seconds": 10.0 + seed, "checkpoint_bytes": 4 * trainable},
            "data": {"test_split": "test", "test_videos": 128, "test_captions": 128, "num_frames": frames,
                     "frame_protocol": "uniform", "max_words": 16},
            "config": {"trainer": {"max_epochs": 4, "max_steps": -1, "precision": "32-true"},
                       "metrics": {"v2t_protocol": "group"}}}


def write_records(folder, records):
    for rec in records:
        name = rec["label"] + ("" if rec["seed"] == 0 else f".seed{rec['seed']}")
        write_json_atomic(folder / f"{name}.json", rec)


@pytest.fixture
def three_seeds(tmp_path):
    folder = tmp_path / "results" / "synthetic"
    # adapter: T2V 40, 42, 44 (mean 42, std 2); prompts: 41.5 ± 0.5 — within adapter's spread; zero_shot: 30, no spread
    recs = [record("adapter", s, t, 50 + s, 20_000, order=60 + s) for s, t in enumerate((40.0, 42.0, 44.0))]
    recs += [record("prompts", s, t, 45.0, 5_000, order=52.0) for s, t in enumerate((41.0, 41.5, 42.0))]
    recs += [record("zero_shot", 0, 30.0, 31.0, 0, order=50.0)]
    write_records(folder, recs)
    return folder


def table_rows(report):
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in report.splitlines() if line.startswith("| ") and not line.startswith("| method")}


def test_mean_std_best_and_close_calls(three_seeds):
    report = write_report(three_seeds).read_text()
    head = next(line for line in report.splitlines() if line.startswith("| method"))
    columns = [c.strip() for c in head.split("|")[2:-1]]
    rows = table_rows(report)
    t2v = columns.index("T2V R@1")
    std = statistics.stdev([40.0, 42.0, 44.0])
    assert rows["adapter"][t2v] == f"**42.0 ± {std:.1f}**"
    # 41.5 is within the adapter's seed spread (2.0) of the best: flagged, and explained under the table
    assert rows["prompts"][t2v] == "41.5 ± 0.5 ≈"
    assert rows["zero_shot"][t2v] == "30.0"  # one seed: no ±, and far from the best: no flag
    assert "T2V R@1: prompts (41.5 ± 0.5) vs the best, adapter" in report
    # lower is better for the median rank: the adapter's 100/t2v is smallest
    assert rows["adapter"][columns.index("T2V MdR")].startswith("**")
    # the order-pair column (synthetic) is there, its best bold
    assert rows["adapter"][columns.index("order-pair acc")] == "**61.0 ± 1.0**"
    # efficiency beside each row; rows ordered by trainable parameters
    assert list(rows) == ["zero_shot", "prompts", "adapter"]
    assert rows["adapter"][columns.index("seeds")] == "3"
    assert rows["adapter"][columns.index("trainable")] == "20.0K"
    assert rows["adapter"][columns.index("trainable %")] == "2.000"
    assert rows["adapter"][columns.index("ckpt MB")] == "0.08"
    assert rows["adapter"][columns.index("train s")] == "11"
    # what the numbers were measured on
    assert "test split `test` (128 videos, 128 captions), 8 frames (`uniform`), 16 words" in report
    assert "V2T protocol `group`" in report and "4 epochs" in report


def test_plots_are_written_and_linked(three_seeds):
    report = write_report(three_seeds).read_text()
    for name in ("r1_vs_trainable.png", "r1_per_method.png"):
        path = three_seeds / name
        assert path.stat().st_size > 5_000 and path.read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in report


def test_single_seed_says_no_spread_is_known(tmp_path):
    folder = tmp_path / "synthetic"
    write_records(folder, [record("adapter", 0, 40.0, 41.0, 100), record("prompts", 0, 39.9, 41.0, 10)])
    report = write_report(folder, plots=False).read_text()
    assert "One seed per row" in report and "≈" not in report.split("One seed per row")[1].split("R@K")[0]
    assert not (folder / "r1_vs_trainable.png").exists()


def test_mixed_protocols_are_called_out(tmp_path):
    folder = tmp_path / "synthetic"
    write_records(folder, [record("adapter", 0, 40.0, 41.0, 100), record("prompts", 0, 39.0, 41.0, 10, frames=12)])
    report = write_report(folder, plots=False).read_text()
    assert "not all evaluated the same way" in report and "12 frames" in report and "8 frames" in report


def test_failures_are_listed_and_not_read_as_records(tmp_path):
    folder = tmp_path / "synthetic"
    write_records(folder, [record("adapter", 0, 40.0, 41.0, 100)])
    write_json_atomic(folder / "prompts.seed1.failed.json",
                      {"reason": "exit code 1", "returncode": 1, "stderr_tail": "Traceback\nValueError: bad | width"})
    assert [r["method"] for r in load_records(folder)] == ["adapter"]
    report = write_report(folder, plots=False).read_text()
    assert "## Failed runs" in report
    assert "| prompts.seed1 | exit code 1 | `ValueError: bad \\| width` |" in report


def test_report_command_writes_every_dataset_and_an_index(three_seeds, tmp_path, capsys):
    other = three_seeds.parent / "msrvtt"
    write_records(other, [record("adapter", 0, 20.0, 21.0, 20_000)])
    assert report_command(["--results", str(three_seeds.parent)]) == 0
    index = (three_seeds.parent / "report.md").read_text()
    assert "[synthetic](synthetic/report.md)" in index and "[msrvtt](msrvtt/report.md)" in index
    assert "| adapter | 20.0 | 42.0 ± 2.0 |" in index
    assert (three_seeds.parent / "r1_by_dataset.png").read_bytes()[:8] == PNG_MAGIC
    assert (other / "report.md").is_file() and (three_seeds / "report.md").is_file()
    out = tmp_path / "recorded"
    assert report_command(["--results", str(three_seeds.parent), "--dataset", "synthetic", "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "r1_vs_trainable.png").is_file()
    with pytest.raises(SystemExit):
        report_command(["--results", str(three_seeds.parent), "--dataset", "vatex"])
    assert "no results folder" in capsys.readouterr().err


def test_labels_group_seeds_and_backbones_split_rows(tmp_path):
    recs = [record("adapter", 0, 40.0, 41.0, 100), record("adapter", 1, 42.0, 41.0, 100)]
    other = record("adapter", 0, 50.0, 51.0, 100)
    other["backbone"] = "ViT-B-16"
    for rec in (*recs, other):
        rec["_file"] = "x.json"
    rows = aggregate([*recs, other])
    assert sorted((r.label, len(r.records)) for r in rows) == [("adapter (ViT-B-16)", 1), ("adapter (petl-tiny-vit)", 2)]
    assert json.dumps([r.label for r in rows])  # labels are plain strings


def test_reconstructions_and_frame_dependent_counts_are_noted(tmp_path):
    folder = tmp_path / "results" / "synthetic"
    write_records(folder, [record("mv_adapter", 0, 40.0, 41.0, 1000), record("vop_p", 0, 30.0, 31.0, 100),
                           record("adapter", 0, 35.0, 36.0, 100)])
    text = write_report(folder).read_text()
    notes = text[text.index("Notes on methods:"):]
    assert "`mv_adapter`: Kronecker cross-modality tying is the suite's reconstruction" in notes
    assert "2,445,312 at 64" in notes and "`adapter`" not in notes
    assert "open_clip config `petl-tiny-vit`" in text  # records without the field fall back to the model name
