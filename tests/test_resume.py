"""Stopping, killing and resuming runs: the numbers of an interrupted run equal those of an uninterrupted one.

Faults are real: the training process sends itself SIGTERM / SIGUSR1 / SIGKILL at a chosen step (tests/faults.py);
sweeps are signalled from outside. Runs are tiny: the synthetic tiny CLIP, 48 training pairs, batches of 16, 2 epochs.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO

TINY_STEPS = 6  # 2 epochs x 3 batches


def trainer_config(tmp_path, every: int = 2, loggers: bool = False):
    """configs/trainer/cpu.yaml with a checkpoint every `every` steps and the fault injector."""
    cfg = yaml.safe_load((REPO / "configs/trainer/cpu.yaml").read_text())
    cfg["trainer"]["callbacks"] = [
        {"class_path": "petl_bench.resume.RunCheckpoint", "init_args": {"every_n_train_steps": every}},
        {"class_path": "tests.faults.Faults"},
    ]
    if not loggers:
        cfg["trainer"]["logger"] = False
    path = tmp_path / f"trainer_every{every}_{int(loggers)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_args(root, out, trainer_yaml, method="cross_modal_adapter"):
    return ["--config", str(trainer_yaml), "--config", str(REPO / "configs/data/synthetic.yaml"),
            "--config", str(REPO / f"configs/model/{method}.yaml"),
            "--config", str(REPO / "configs/backbone/tiny_synthetic.yaml"),
            f"--data.root={root}", "--data.num_frames=4", "--data.batch_size=16", "--data.num_workers=0",
            "--trainer.max_epochs=2", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1", "--model.init_args.lr=1e-2", "--seed_everything=3",
            f"--trainer.default_root_dir={out}", f"--metrics.save_dir={out}"]


def petl(args, fault: str | None = None, **env):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **env}
    full_env.pop("PETL_FAULT_SIGNAL", None)
    if fault:
        full_env["PETL_FAULT_SIGNAL"] = fault
    return subprocess.run([sys.executable, "-m", "petl_bench.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, check=False, timeout=300)


def trainable_state(out):
    return torch.load(out / "checkpoints" / "trainable.ckpt", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root, synthetic_backbone, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = tmp / "run"
    proc = petl(["run", "--result", str(tmp / "r.json"), *run_args(synthetic_root, out, trainer_config(tmp))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp / "r.json").read_text())
    assert record["efficiency"]["train_steps"] == TINY_STEPS
    return record, trainable_state(out)


def assert_same_run(resumed_record, resumed_state, uninterrupted):
    record, state = uninterrupted
    assert resumed_record["efficiency"]["train_steps"] == TINY_STEPS
    assert resumed_record["metrics"] == record["metrics"]
    assert resumed_state.keys() == state.keys()
    for key in state:
        assert torch.equal(resumed_state[key], state[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stopped_run_saves_exits_nonzero_and_resumes_to_the_same_numbers(synthetic_root, tmp_path, uninterrupted,
                                                                         signum):
    """Stopped after step 4 (mid second epoch, off the 5-step checkpoint grid): exit 128+n, no record, last.ckpt
    saved at step 4 by the stop itself; the rerun resumes there and ends bit-identical (weights and metrics)."""
    out, result = tmp_path / "run", tmp_path / "r.json"
    args = ["run", "--result", str(result), *run_args(synthetic_root, out, trainer_config(tmp_path, every=5))]
    stopped = petl(args, fault=f"4:{int(signum)}")
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    assert not result.exists(), "a stopped run must not be recorded"
    assert "rerun the same command to resume" in stopped.stderr
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4  # saved on the stop, not on the 5-step grid
    resumed = petl(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last} (step 4)" in resumed.stdout
    record = json.loads(result.read_text())
    assert record["resumed_steps"] == 4
    assert_same_run(record, trainable_state(out), uninterrupted)
    assert not last.exists(), "a finished, recorded run drops its resumable checkpoint"


@pytest.mark.slow
def test_sigkilled_run_resumes_from_its_last_periodic_checkpoint(synthetic_root, tmp_path, uninterrupted):
    """SIGKILL at step 5 (nothing can be saved): the step-4 checkpoint (mid-epoch) is resumed; same numbers."""
    out, result = tmp_path / "run", tmp_path / "r.json"
    args = ["run", "--result", str(result), *run_args(synthetic_root, out, trainer_config(tmp_path, every=2))]
    killed = petl(args, fault=f"5:{int(signal.SIGKILL)}")
    assert killed.returncode == -signal.SIGKILL
    assert not result.exists()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not list((out / "checkpoints").glob(".*.tmp")), "no half-written checkpoint is left behind"
    resumed = petl(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(json.loads(result.read_text()), trainable_state(out), uninterrupted)


@pytest.mark.slow
def test_stopped_run_keeps_its_logs_and_closes_wandb_as_failed(synthetic_root, synthetic_backbone, tmp_path):
    """With the shipped loggers: the CSV log of the stopped attempt survives the resume (a new version beside it),
    and the W&B run (offline) is closed with the stop's exit code, then continued under the same id."""
    out, result = tmp_path / "run", tmp_path / "r.json"
    args = ["run", "--result", str(result), *run_args(synthetic_root, out, trainer_config(tmp_path, loggers=True))]
    stopped = petl(args, fault=f"2:{int(signal.SIGTERM)}")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    first_log = (out / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in first_log
    run_id = (out / "wandb" / "run_id").read_text().strip()
    assert wandb_exit_codes(out, run_id) == [128 + signal.SIGTERM]
    assert petl(args).returncode == 0
    assert (out / "csv" / "version_0" / "metrics.csv").read_text() == first_log
    assert (out / "csv" / "version_1" / "metrics.csv").is_file()
    assert wandb_exit_codes(out, run_id) == [128 + signal.SIGTERM, 0]


def wandb_exit_codes(root, run_id):
    """Exit codes recorded by the offline W&B runs with this id, oldest first, read from their ``.wandb`` files (a
    LevelDB-style log of protobuf records: 32 KiB blocks, 7-byte chunk headers, after a 7-byte file header)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    codes = []
    for path in sorted(root.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, buf = 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or (length == 0 and kind == 0):
                pos += left
                continue
            chunk = data[pos + 7:pos + 7 + length]
            pos += 7 + length
            buf = chunk if kind in (1, 2) else buf + chunk  # full / first, or middle / last
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(buf)
                if record.WhichOneof("record_type") == "exit":
                    codes.append(record.exit.exit_code)
    return codes


# ------------------------------------------------------------------------------------------------ sweeps
def sweep_spec(tmp_path, trainer_yaml, root):
    spec = {"dataset": "synthetic", "configs": [str(trainer_yaml)], "backbones": ["tiny_synthetic"],
            "methods": ["cross_modal_adapter"], "seeds": 1,
            "overrides": {"all": {"data.root": str(root), "data.num_frames": 4, "data.batch_size": 16,
                                  "data.num_workers": 0, "trainer.max_epochs": 2, "trainer.limit_val_batches": 0,
                                  "trainer.enable_progress_bar": False}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"  # a zombie has exited


@pytest.mark.slow
def test_sigterm_to_a_sweep_stops_its_run_and_a_rerun_finishes_it(synthetic_root, synthetic_backbone, tmp_path):
    spec = sweep_spec(tmp_path, trainer_config(tmp_path, every=1), synthetic_root)
    results, pidfile = tmp_path / "results", tmp_path / "child.pid"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PETL_FAULT_SLEEP": "1",
           "PETL_FAULT_PIDFILE": str(pidfile)}
    sweep = subprocess.Popen([sys.executable, "-m", "petl_bench.cli", "sweep", str(spec), "--results", str(results),
                              "--no-report"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 300
    run_dir = results / "synthetic" / "runs" / "cross_modal_adapter"
    last = run_dir / "checkpoints" / "last.ckpt"
    while not last.exists() and sweep.poll() is None and time.monotonic() < deadline:  # wait until it trains
        time.sleep(0.2)
    assert sweep.poll() is None, sweep.communicate()[1][-3000:] + (run_dir / "stderr.log").read_text()[-3000:]
    assert last.exists(), (run_dir / "stderr.log").read_text()[-3000:]
    child = int(pidfile.read_text())
    sweep.send_signal(signal.SIGTERM)
    _, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert not _alive(child), "the sweep's run outlived the sweep"
    assert not (results / "synthetic" / "cross_modal_adapter.json").exists()
    assert not (results / "synthetic" / "cross_modal_adapter.failed.json").exists(), "a stop is not a failure"
    # rerun: resumes the run (its stdout says so) and finishes it; a third sweep skips it
    env.pop("PETL_FAULT_SLEEP")
    again = subprocess.run([sys.executable, "-m", "petl_bench.cli", "sweep", str(spec), "--results", str(results),
                            "--no-report"], cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in (results / "synthetic" / "runs" / "cross_modal_adapter" / "stdout.log").read_text()
    assert json.loads((results / "synthetic" / "cross_modal_adapter.json").read_text())["resumed_steps"] >= 1
    third = subprocess.run([sys.executable, "-m", "petl_bench.cli", "sweep", str(spec), "--results", str(results),
                            "--no-report"], cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert third.returncode == 0 and "[skip]" in third.stderr


@pytest.mark.slow
def test_submitit_job_preempted_mid_run_is_requeued_and_resumes(synthetic_root, synthetic_backbone, tmp_path,
                                                                monkeypatch):
    """`--launcher submitit-local`: the real submitit path (LocalExecutor). The job gets submitit's preemption signal
    (USR2, as SLURM sends it) mid-training: the run saves its checkpoint, submitit requeues the job, the requeued job
    resumes from the checkpoint and writes the record."""
    from petl_bench.bench.slurm import make_executor, wait_for
    from petl_bench.bench.sweep import SubmititRunner, SweepSpec

    monkeypatch.chdir(REPO)
    pidfile = tmp_path / "child.pid"
    for key, value in {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PETL_FAULT_SLEEP": "0.5",
                       "PETL_FAULT_PIDFILE": str(pidfile)}.items():
        monkeypatch.setenv(key, value)
    spec = SweepSpec.load(sweep_spec(tmp_path, trainer_config(tmp_path, every=1), synthetic_root))
    results = tmp_path / "results"
    runner = SubmititRunner(spec.runs(results), make_executor(results / "_submitit", cluster="local", timeout_min=10))
    runner.submit()
    (run, job), = runner.jobs.values()
    last = run.run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.exists(), job.stderr()
    child = int(pidfile.read_text())
    task = int(Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[1])  # the submitit job process
    os.kill(task, signal.SIGUSR2)
    (_, done), = list(wait_for(runner.jobs, poll_s=0.5))
    assert done.result() == str(run.result)
    assert "preempted" in (done.stderr() or "") + (done.stdout() or "")
    record = json.loads(run.result.read_text())
    assert record["resumed_steps"] >= 1 and record["efficiency"]["train_steps"] == TINY_STEPS
    assert "resuming from" in (run.run_dir / "stdout.log").read_text()
    assert not _alive(child)


@pytest.mark.slow
def test_a_corrupt_validation_video_keeps_the_trained_epoch(synthetic_root, synthetic_backbone, tmp_path):
    """The first validation hits an unreadable clip: the run fails, naming it, but the epoch it trained is saved."""
    import shutil

    from petl_bench.cli import main
    from petl_bench.data.datamodule import RetrievalDataModule

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns("frame_cache"))  # the clips, not their cache
    # validation is never the test split: 4 training clips held out (data.val_holdout), the first one corrupted
    held = RetrievalDataModule("synthetic", root=str(root), val_holdout=4, num_workers=0)
    first = held.table("val").video_ids[0]
    (root / "videos" / f"{first}.mp4").write_bytes(b"\x00not a video" * 10)
    out = tmp_path / "run"
    args = [a for a in run_args(root, out, trainer_config(tmp_path, every=50)) if "limit_val_batches" not in a]
    with pytest.raises(Exception, match=first):
        main(["run", "--result", str(tmp_path / "r.json"), *args, "--data.missing_videos=error",
              "--data.val_holdout=4"])
    steps = len(held.table("train").captions) // 16  # one epoch of the 20 clips left to train on
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps  # epoch 1
    assert not (tmp_path / "r.json").exists()
