"""W&B: a run's summary under the stable keys (read from the live run), the mode rules, the offline fallback, and the
dashboard definition."""

import json
import warnings

import pytest

from petl_bench.bench.records import EFFICIENCY_KEYS
from petl_bench.bench.run import execute_run
from petl_bench.bench.sweep import SweepSpec
from petl_bench.bench.wandb_logging import BenchWandbLogger, resolve_wandb_mode, wandb_logged_in
from tests.conftest import REPO


def tiny_run_args(root, out, method="cross_modal_adapter"):
    return ["--result", str(out / "record.json"), "--method", method,
            "--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / "configs/data/synthetic.yaml"),
            "--config", str(REPO / f"configs/model/{method}.yaml"),
            "--config", str(REPO / "configs/backbone/tiny_synthetic.yaml"),
            f"--data.root={root}", "--data.num_frames=4", "--data.batch_size=8", "--data.num_workers=0",
            "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--seed_everything=3", f"--trainer.default_root_dir={out}"]


def test_run_summary_holds_the_record_under_stable_keys(synthetic_root, synthetic_backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    result = execute_run(tiny_run_args(synthetic_root, out))
    try:
        run = result.wandb_run
        record = result.record
        summary = run.summary
        assert summary["test/t2v/R@1"] == pytest.approx(record["metrics"]["t2v/R@1"])
        assert summary["test/v2t/R@1"] == pytest.approx(record["metrics"]["v2t/R@1"])
        assert summary["test/order_pairs/accuracy"] == pytest.approx(record["metrics"]["order_pairs/accuracy"])
        assert summary["params/trainable"] == record["params"]["trainable"] > 0
        assert summary["params/total"] == record["params"]["total"] > summary["params/trainable"]
        assert summary["efficiency/train_seconds"] == record["efficiency"]["train_seconds"] > 0
        assert summary["efficiency/train_steps"] == 2
        assert summary["efficiency/checkpoint_bytes"] == record["efficiency"]["checkpoint_bytes"] > 0
        assert set(EFFICIENCY_KEYS) - {"efficiency/peak_gpu_allocated_mb"} <= set(summary.keys())
        assert "results" in set(summary.keys())  # the results row, a wandb.Table
        # grouped by dataset, named by method, tagged with backbone and seed
        assert run.group == "synthetic" and run.name == "cross_modal_adapter"
        assert set(run.tags) == {"petl-tiny-vit", "seed3"}
        assert run.config["method"] == "cross_modal_adapter" and run.config["seed"] == 3
        assert run.config["cli"]["data"]["num_frames"] == 4
        assert run.settings.mode == "offline"
        # the W&B folder is under the run's default_root_dir, beside its metrics file
        assert str(out / "wandb") in run.dir
        assert (out / "test_metrics.json").is_file()
    finally:
        result.close()
    assert result.wandb_run is None
    offline = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    assert json.loads((out / "record.json").read_text())["label"] == "cross_modal_adapter"


def test_mode_follows_wandb_mode_then_login(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not wandb_logged_in() and resolve_wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_logged_in() and resolve_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_wandb_mode() == "offline"
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="'sometimes'"):
        resolve_wandb_mode()


def test_unreachable_server_falls_back_to_offline(tmp_path, monkeypatch):
    """Logged in, online, but nothing answers: the run goes on offline after init_timeout instead of hanging."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: connection refused
    logger = BenchWandbLogger(save_dir=str(tmp_path), init_timeout=5)
    assert logger.mode == "online"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = logger.experiment
    try:
        assert run.settings.mode == "offline" and logger.mode == "offline"
        assert any("logging offline" in str(w.message) for w in caught)
        assert str(tmp_path / "wandb") in run.dir
    finally:
        run.finish()


def test_bind_after_start_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = BenchWandbLogger(save_dir=str(tmp_path))
    run = logger.experiment
    try:
        with pytest.raises(RuntimeError, match="already started"):
            logger.bind_run(tmp_path / "elsewhere", name="x")
    finally:
        run.finish()


def test_dashboard_definition_lists_every_method_without_network(tmp_path, monkeypatch, capsys):
    from petl_bench.bench.dashboard import dashboard_command

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "dashboard.json"
    sweep = REPO / "experiments" / "synthetic.yaml"
    assert dashboard_command(["--entity", "E", "--project", "P", "--sweep", str(sweep), "--results",
                              str(tmp_path / "no_results"), "--output", str(out)]) == 0
    assert "not saved to W&B" in capsys.readouterr().out
    definition = json.loads(out.read_text())
    methods = list(SweepSpec.load(sweep).methods)
    assert definition["datasets"] == {"synthetic": methods}
    report = definition["report"]
    assert report["type"] == "Report" and report["entity"] == "E" and report["project"] == "P"
    grids = [b for b in report["blocks"] if b["type"] == "PanelGrid"]
    assert len(grids) == 1
    runset_filter = grids[0]["runsets"][0]["filters"]
    markdown = next(b["text"] for b in report["blocks"] if b["type"] == "MarkdownBlock")
    for method in methods:
        assert f"'{method}'" in runset_filter and f"`{method}`" in markdown
    panels = grids[0]["panels"]
    scatter = next(p for p in panels if p["type"] == "ScatterPlot")
    assert scatter["x"]["name"] == "params/trainable" and scatter["y"]["name"] == "test/t2v/R@1"
    assert scatter["log_x"] is True
    bars = {p["metrics"][0]["name"] for p in panels if p["type"] == "BarPlot"}
    assert {"test/t2v/R@1", "test/v2t/R@1", "test/t2v/R@5", "test/order_pairs/accuracy"} <= bars
    assert any(p["type"] == "RunComparer" for p in panels)


def test_dashboard_adds_methods_found_in_results(tmp_path, monkeypatch):
    from petl_bench.bench.dashboard import collect_methods

    folder = tmp_path / "results" / "msrvtt"
    folder.mkdir(parents=True)
    (folder / "vop.json").write_text(json.dumps({"method": "vop", "dataset": "msrvtt", "metrics": {}, "params": {}}))
    found = collect_methods([str(REPO / "experiments" / "synthetic.yaml")], tmp_path / "results")
    assert found["msrvtt"] == ["vop"] and "zero_shot" in found["synthetic"]
