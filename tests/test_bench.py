"""End-to-end sweeps on the small synthetic set: real `petl-bench run` processes, W&B offline, the report after.

Each run is a process (~10 s on 2 cores, most of it start-up), so these are marked slow.
"""

import json

import pytest
import yaml

from petl_bench.bench.sweep import SweepRunner, SweepSpec, run_sweep

TINY = {"data.num_frames": 4, "data.batch_size": 8, "data.num_workers": 0, "trainer.max_steps": 2,
        "trainer.limit_val_batches": 0, "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False}


def tiny_spec(tmp_path, root, methods, seeds, **overrides):
    spec = {"dataset": "synthetic", "configs": ["configs/trainer/cpu.yaml"], "backbones": ["tiny_synthetic"],
            "methods": methods, "seeds": seeds,
            "overrides": {"all": {**TINY, "data.root": str(root)}, **overrides}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return SweepSpec.load(path)


@pytest.mark.slow
def test_two_methods_two_seeds_then_everything_is_skipped(synthetic_root, synthetic_backbone, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    results = tmp_path / "results"
    spec = tiny_spec(tmp_path, synthetic_root, ["zero_shot", "cross_modal_adapter"], 2)
    assert run_sweep(spec, results) == 0
    folder = results / "synthetic"
    names = ["zero_shot", "zero_shot.seed1", "cross_modal_adapter", "cross_modal_adapter.seed1"]
    for name in names:
        rec = json.loads((folder / f"{name}.json").read_text())
        assert rec["seed"] == (1 if name.endswith("seed1") else 0)
        assert rec["dataset"] == "synthetic" and rec["label"] == name.split(".")[0]
        assert rec["data"]["test_videos"] == 18 and 0 <= rec["metrics"]["t2v/R@1"] <= 100
        # the run's W&B folder is under its default_root_dir, offline, one per run
        offline = list((folder / "runs" / name / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(offline) == 1 and offline[0].stat().st_size > 0
        assert (folder / "runs" / name / "csv" / "version_0" / "metrics.csv").is_file()
    assert json.loads((folder / "cross_modal_adapter.json").read_text())["efficiency"]["train_steps"] == 2
    report = (folder / "report.md").read_text()
    assert "| cross_modal_adapter |" in report and " ± " in report
    assert (folder / "r1_vs_trainable.png").stat().st_size > 0

    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    outcomes = SweepRunner(spec.runs(results)).run()
    assert [o.status for o in outcomes] == ["skipped"] * 4
    assert run_sweep(spec, results, report=False) == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")} == stamps


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_rest_complete(synthetic_root, synthetic_backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    results = tmp_path / "results"
    # cross_modal_adapter gets an init argument it does not have: its process fails, zero_shot's does not
    spec = tiny_spec(tmp_path, synthetic_root, ["cross_modal_adapter", "zero_shot"], 1,
                     cross_modal_adapter={"model.init_args.bogus_width": 3})
    assert run_sweep(spec, results) == 1
    folder = results / "synthetic"
    assert (folder / "zero_shot.json").is_file()
    assert not (folder / "cross_modal_adapter.json").exists()
    failure = json.loads((folder / "cross_modal_adapter.failed.json").read_text())
    assert failure["returncode"] not in (0, None) and "bogus_width" in failure["stderr_tail"]
    assert (folder / "runs" / "cross_modal_adapter" / "stderr.log").stat().st_size > 0
    report = (folder / "report.md").read_text()
    assert "## Failed runs" in report and "| cross_modal_adapter |" in report.split("## Failed runs")[1]
    # the failure is not "finished": the next sweep tries it again, the finished run is skipped
    pending = SweepRunner(spec.runs(results)).pending()
    assert [r.name for r in pending] == ["cross_modal_adapter"]


@pytest.mark.slow
def test_a_forked_run_records_what_a_fresh_interpreter_records(synthetic_root, synthetic_backbone, tmp_path,
                                                                monkeypatch):
    """The sweep forks its runs from one process that imported everything once (bench/launcher.py); that must not
    move a single metric against `python -m petl_bench.cli run` started fresh."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = tiny_spec(tmp_path, synthetic_root, ["cross_modal_adapter"], 1)
    records = {}
    for start in ("fresh", "fork"):
        assert run_sweep(spec, tmp_path / start, report=False, start=start) == 0
        records[start] = json.loads((tmp_path / start / "synthetic" / "cross_modal_adapter.json").read_text())
        assert records[start]["environment"]["process_start"] == start
    assert records["fork"]["metrics"] == records["fresh"]["metrics"]
    assert records["fork"]["params"] == records["fresh"]["params"]
