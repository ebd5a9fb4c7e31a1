"""Sweep files → runs: expansion order and names, bad files, dry runs, skipping, and the W&B sweep export.

Nothing here starts a training process; the end-to-end sweeps are in test_bench.py.
"""

import json
import shlex

import pytest
import yaml

from petl_bench.bench.run import _sweep_point_args
from petl_bench.bench.sweep import SweepRunner, SweepSpec, SweepSpecError, export_wandb_sweep, run_sweep, sweep_command
from petl_bench.methods import method_names
from tests.conftest import REPO


def write_spec(tmp_path, **fields):
    spec = {"dataset": "synthetic", "configs": ["configs/trainer/cpu.yaml"], "backbones": ["tiny_synthetic"],
            "methods": ["zero_shot", "cross_modal_adapter"], "seeds": 2,
            "overrides": {"all": {"trainer.max_steps": 2}, "cross_modal_adapter": {"model.init_args.lr": 1.0e-3}}}
    spec.update(fields)
    spec = {k: v for k, v in spec.items() if v is not None}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_expansion_names_seeds_and_orders_configs_then_overrides(tmp_path):
    runs = SweepSpec.load(write_spec(tmp_path)).runs(tmp_path / "results")
    assert [(r.method, r.seed, r.name) for r in runs] == [
        ("zero_shot", 0, "zero_shot"), ("zero_shot", 1, "zero_shot.seed1"),
        ("cross_modal_adapter", 0, "cross_modal_adapter"), ("cross_modal_adapter", 1, "cross_modal_adapter.seed1")]
    run = runs[3]
    assert run.result == tmp_path / "results" / "synthetic" / "cross_modal_adapter.seed1.json"
    assert run.failed.name == "cross_modal_adapter.seed1.failed.json"
    configs = [run.cli_args[i + 1] for i, a in enumerate(run.cli_args) if a == "--config"]
    assert configs == [str(REPO / "configs/trainer/cpu.yaml"), str(REPO / "configs/data/synthetic.yaml"),
                       str(REPO / "configs/model/cross_modal_adapter.yaml"),
                       str(REPO / "configs/backbone/tiny_synthetic.yaml")]
    flags = [a for a in run.cli_args if a.startswith("--") and a != "--config"]
    assert flags == ["--seed_everything=1", "--trainer.max_steps=2", "--model.init_args.lr=0.001",
                     f"--trainer.default_root_dir={run.run_dir}"]
    # the per-method override stays with its method
    assert "--model.init_args.lr=0.001" not in runs[0].cli_args
    cmd = run.command()
    assert cmd[1:4] == ["-m", "petl_bench.cli", "run"] and cmd[cmd.index("--method") + 1] == "cross_modal_adapter"


def test_grid_values_name_runs_and_seedless_methods_run_once(tmp_path):
    spec = SweepSpec.load(write_spec(tmp_path, grid={"model.init_args.lr": [1.0e-3, 1.0e-4], "data.num_frames": [4]},
                                     seeds=[0, 5], seedless=["zero_shot"]))
    names = [r.name for r in spec.runs(tmp_path)]
    # one value: not part of the name; several: key=value; zero_shot trains nothing, so seed 0 only
    assert names == ["zero_shot.lr=0.001", "zero_shot.lr=0.0001",
                     "cross_modal_adapter.lr=0.001", "cross_modal_adapter.lr=0.001.seed5",
                     "cross_modal_adapter.lr=0.0001", "cross_modal_adapter.lr=0.0001.seed5"]
    run = spec.runs(tmp_path)[-1]
    assert run.label == "cross_modal_adapter.lr=0.0001" and dict(run.grid)["data.num_frames"] == 4
    assert run.cli_args[-3:-1] == ("--model.init_args.lr=0.0001", "--data.num_frames=4")
    assert run.command()[run.command().index("--label") + 1] == run.label


def test_all_methods_minus_exclude(tmp_path):
    spec = SweepSpec.load(write_spec(tmp_path, methods="all", exclude=["cross_modal_adapter_msvd"]))
    assert list(spec.methods) == [m for m in method_names() if m != "cross_modal_adapter_msvd"]


@pytest.mark.parametrize("fields, message", [
    ({"colour": "blue"}, "unknown key(s) colour"),
    ({"methods": ["zero_shot", "no_such_method"]}, "methods: unknown method 'no_such_method'"),
    ({"exclude": ["nope"]}, "exclude: unknown method 'nope'"),
    ({"dataset": None}, "'datasets' is missing"),
    ({"dataset": "no_such_data"}, "datasets: 'no_such_data' has no config"),
    ({"backbones": ["ViT-Z"]}, "backbones: 'ViT-Z' has no config"),
    ({"seeds": 0}, "seeds: 0 must be >= 1"),
    ({"seeds": ["a"]}, "seeds must be a count"),
    ({"grid": {"model.init_args.lr": []}}, "grid.model.init_args.lr has no values"),
    ({"overrides": {"vop_z": {"a": 1}}}, "overrides.vop_z: not 'all'"),
    ({"prepare": "everything"}, "prepare: 'everything' is not one of"),
])
def test_bad_sweep_files_are_refused_naming_file_and_key(tmp_path, fields, message):
    path = write_spec(tmp_path, **fields)
    with pytest.raises(SweepSpecError) as err:
        SweepSpec.load(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_dry_run_prints_every_command_and_comments_finished_ones(tmp_path, capsys):
    spec = SweepSpec.load(write_spec(tmp_path))
    finished = spec.runs(tmp_path)[1]
    finished.result.parent.mkdir(parents=True)
    finished.result.write_text("{}")
    assert sweep_command([str(spec.path), "--results", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert lines[1].startswith("# [done] ") and "zero_shot.seed1.json" in lines[1]
    args = shlex.split(lines[2])
    assert args[args.index("--result") + 1] == str(tmp_path / "synthetic" / "cross_modal_adapter.json")
    assert not (tmp_path / "synthetic" / "runs").exists(), "a dry run starts nothing"


def test_finished_runs_are_skipped_without_starting_a_process(tmp_path):
    runs = SweepSpec.load(write_spec(tmp_path)).runs(tmp_path)
    for run in runs:
        run.result.parent.mkdir(parents=True, exist_ok=True)
        run.result.write_text("{}")
    outcomes = SweepRunner(runs).run()
    assert [o.status for o in outcomes] == ["skipped"] * 4
    assert not (tmp_path / "synthetic" / "runs").exists()
    assert SweepRunner(runs, force=True).pending() == runs


def test_wandb_sweep_export_describes_the_same_grid(tmp_path):
    spec = SweepSpec.load(write_spec(tmp_path, grid={"model.init_args.lr": [1.0e-3, 1.0e-4]}))
    out = export_wandb_sweep(spec, tmp_path / "wandb_sweep.yaml", results=str(tmp_path))
    config = yaml.safe_load(out.read_text())
    assert config["program"] == "petl-bench" and config["method"] == "grid"
    assert config["metric"] == {"name": "test/t2v/R@1", "goal": "maximize"}
    params = config["parameters"]
    assert params["method"]["values"] == ["zero_shot", "cross_modal_adapter"]
    assert params["seed_everything"]["values"] == [0, 1]
    assert params["model.init_args.lr"]["values"] == [1.0e-3, 1.0e-4]
    assert config["command"][:3] == ["${env}", "petl-bench", "run"] and config["command"][-1] == "${args}"
    grid_size = 1
    for p in params.values():
        grid_size *= len(p["values"])
    assert grid_size == len(spec.runs(tmp_path))
    # What an agent would run for each point is what the sweep itself runs there.
    fixed = [a for a in config["command"][3:-1]]
    for run in spec.runs(tmp_path):
        agent_args = [*fixed, *[f"--{k}={v}" for k, v in run.wandb_args().items()]]
        assert _sweep_point_args(agent_args) == run.run_args()


def test_agent_point_of_a_finished_or_seedless_run_is_skipped(tmp_path, capsys):
    spec_path = write_spec(tmp_path, seedless=["zero_shot"])
    base = [f"--sweep={spec_path}", f"--results={tmp_path}"]
    assert _sweep_point_args([*base, "--method=zero_shot", "--seed_everything=1"]) is None
    assert "seedless" in capsys.readouterr().out
    run = SweepSpec.load(spec_path).runs(tmp_path)[0]
    run.result.parent.mkdir(parents=True)
    run.result.write_text("{}")
    assert _sweep_point_args([*base, "--method=zero_shot"]) is None
    with pytest.raises(SweepSpecError, match="method 'vop' is not in the sweep"):
        _sweep_point_args([*base, "--method=vop"])


def test_bench_dry_run_keeps_the_result_paths_of_make_bench(tmp_path, capsys):
    from petl_bench.bench.run import bench_command

    assert bench_command(["--dry-run", "--results", str(tmp_path), "--seeds", "2"]) == 0
    results = [shlex.split(line)[shlex.split(line).index("--result") + 1]
               for line in capsys.readouterr().out.splitlines()]
    synthetic = SweepSpec.load(REPO / "experiments/synthetic.yaml")
    assert "cross_modal_adapter_msvd" not in synthetic.methods
    expected = []
    for method in synthetic.methods:
        expected.append(str(tmp_path / "synthetic" / f"{method}.json"))
        if method not in synthetic.seedless:
            expected.append(str(tmp_path / "synthetic" / f"{method}.seed1.json"))
    assert results == expected


def test_failed_run_is_recorded_and_the_sweep_exits_nonzero(tmp_path):
    """A run whose command cannot even parse its arguments (the cheapest real failure) leaves a .failed.json; so does
    a forced redo of a finished run, whose old record must not pass for the new one."""
    spec = SweepSpec.load(write_spec(tmp_path, methods=["zero_shot"], seeds=2,
                                     overrides={"all": {"trainer.no_such_option": 1}}))
    fresh, redone = spec.runs(tmp_path)
    redone.result.parent.mkdir(parents=True)
    redone.result.write_text("{}")
    assert run_sweep(spec, tmp_path, force=True, report=False) == 1
    for run in (fresh, redone):
        failure = json.loads(run.failed.read_text())
        assert failure["returncode"] != 0 and failure["method"] == "zero_shot" and failure["seed"] == run.seed
        assert "no_such_option" in failure["stderr_tail"]
        assert "trainer.no_such_option" in failure["command"]
    assert not fresh.result.exists()
