"""One benchmark run — fit, then test, then a record of everything needed to compare it — and `make bench`.

A run's record (``results/<dataset>/<name>.json``, written atomically by rank 0) holds the method, its label (the
method, plus the sweep's backbone / grid values when it has several), backbone, pretrained source, dataset + split +
frame protocol, seed, trainable and total parameters, checkpoint bytes (the trainable-only checkpoint), train wall
time, throughput, peak memory, the test metrics and the full config. A record that exists means the run is finished:
sweeps skip it unless told to redo it. The same record goes into the run's W&B summary (`publish_record`).

``petl-bench run`` takes plain LightningCLI arguments, or ``--sweep FILE --method M [--dataset D] [--backbone B]
[--seed_everything S] [--<grid key>=v ...]`` to rebuild one point of a sweep (what W&B sweep agents call).
"""

from __future__ import annotations

import argparse
import errno
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from petl_bench.atomic import write_json_atomic
from petl_bench.bench.records import parameter_share
from petl_bench.resume import RunCheckpoint, RunStopped, install_stop_signals
from petl_bench.selection import select_tested_weights

__all__ = ["RunResult", "bench_command", "execute_run", "run_command"]


def _peak_memory_mb() -> dict:
    out = {"peak_host_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


class _SampleCounter(Callback):
    """Counts the training samples this process saw (each batch at its real size), for the recorded throughput."""

    samples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += len(batch["text"])


@dataclass
class RunResult:
    """What `execute_run` leaves behind: the record, the trainer, and its still-open loggers (`close` finishes them)."""

    record: dict
    trainer: object
    wandb_loggers: list = field(default_factory=list)

    @property
    def wandb_run(self):
        """The live W&B run of the first W&B logger (None without one, or once closed)."""
        return self.wandb_loggers[0].active_run if self.wandb_loggers else None

    def close(self, exit_code: int = 0) -> None:
        for logger in self.wandb_loggers:
            logger.finish(exit_code=exit_code)


def _bind_loggers(trainer, method: str, label: str, dataset: str, backbone: str, seed) -> list:
    """Point the run's loggers at its ``default_root_dir`` and name its W&B run; returns the W&B loggers.

    Without this, every run of a sweep would share ``logs/`` (CSV versions racing between parallel runs, W&B folders
    mixed together). The CSV logger is re-created there; the W&B logger is bound before its run starts.
    """
    from lightning.pytorch.loggers import CSVLogger

    from petl_bench.bench.wandb_logging import BenchWandbLogger

    root = Path(trainer.default_root_dir)
    loggers, wandb_loggers = [], []
    for logger in trainer.loggers:
        if isinstance(logger, BenchWandbLogger):
            logger.bind_run(root, name=label, group=dataset, tags=[str(backbone), f"seed{seed}"],
                            config={"method": method, "label": label, "dataset": dataset,
                                    "backbone": backbone, "seed": seed})
            wandb_loggers.append(logger)
        elif isinstance(logger, CSVLogger):
            # the next free version: a resumed (or redone) run adds csv/version_<k+1> beside the earlier log
            logger = CSVLogger(save_dir=root, name="csv")
        loggers.append(logger)
    # W&B first: Trainer.log_dir (where RetrievalMetrics writes test_metrics.json) is then the run's root itself
    trainer.loggers = sorted(loggers, key=lambda lg: not isinstance(lg, BenchWandbLogger))
    return wandb_loggers


def _run_checkpoint(trainer, every_n_steps: int | None) -> RunCheckpoint:
    """The run's `RunCheckpoint` (added when the trainer config has none), bound to its ``default_root_dir``."""
    run_ckpt = next((cb for cb in trainer.callbacks if isinstance(cb, RunCheckpoint)), None)
    if run_ckpt is None:
        run_ckpt = RunCheckpoint()
        trainer.callbacks.append(run_ckpt)
    run_ckpt.bind(trainer.default_root_dir)
    if every_n_steps is not None:
        if every_n_steps < 1:
            raise ValueError(f"--checkpoint_every must be >= 1, got {every_n_steps}")
        run_ckpt._every_n_train_steps = every_n_steps
    return run_ckpt


def _resume_path(trainer, run_ckpt: RunCheckpoint) -> Path | None:
    """The newest of ``last.ckpt`` and the ``hpc_ckpt_*.ckpt`` that Lightning's SLURM auto-requeue saves on SIGUSR1."""
    candidates = [run_ckpt.last_path, *Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")]
    candidates = [c for c in candidates if c.is_file()]
    return max(candidates, key=lambda c: c.stat().st_mtime_ns) if candidates else None


def _resumed_steps(resume: Path | None) -> int:
    if resume is None:
        return 0
    from petl_bench.checkpoint import read_checkpoint

    return int(read_checkpoint(resume, weights_only=False, mmap=True).get("global_step", 0))


def _check_writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".petl-write-check."):
            pass
    except OSError as err:
        raise OSError(err.errno, f"{what} {folder} is not writable ({err.strerror}); fix it before training: "
                                 "the run would be lost at its end") from err


def check_outputs(trainer, model, result: str | None) -> None:
    """Before any work: the run folder and the result's folder are writable, and the run folder's disk holds the
    checkpoints (last.ckpt while writing its successor, plus trainable.ckpt: 3 x trainable weights and Adam's two
    moments) with 64 MiB to spare."""
    root = Path(trainer.default_root_dir)
    _check_writable(root, "the run folder (trainer.default_root_dir)")
    if result:
        _check_writable(Path(result).resolve().parent, "the results folder")
    params = [p for p in model.parameters() if p.requires_grad]
    ckpt = sum(p.numel() * p.element_size() for p in params) * 3
    need = 3 * ckpt + 64 * 2**20
    free = shutil.disk_usage(root).free
    if free < need:
        raise OSError(errno.ENOSPC, f"{root} has {free / 2**20:.0f} MiB free; this run's checkpoints need about "
                                    f"{need / 2**20:.0f} MiB (checkpoint ~{ckpt / 2**20:.0f} MiB). Free space or "
                                    "point --trainer.default_root_dir elsewhere")


def execute_run(argv: list[str]) -> RunResult:
    """Fit (when something trains), test, write the record; loggers stay open until `RunResult.close`.

    ``argv``: ``[--result FILE] [--method NAME] [--label NAME] [--dataset NAME] <LightningCLI args>``.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from petl_bench.bench.wandb_logging import publish_record
    from petl_bench.cli import make_cli
    from petl_bench.metrics import RetrievalMetrics

    p = argparse.ArgumentParser(prog="petl-bench run", add_help=False, allow_abbrev=False)
    p.add_argument("--result", default=None, help="where to write the run's JSON record")
    p.add_argument("--method", default=None, help="method name recorded in the result (default: model class)")
    p.add_argument("--label", default=None, help="the run's row / W&B name (default: the method)")
    p.add_argument("--dataset", default=None,
                   help="the benchmark's name for this data: the record's dataset and the W&B group (default: "
                        "data.dataset; sweeps pass their dataset, e.g. msrvtt_7k for the 7k-train MSR-VTT config)")
    p.add_argument("--checkpoint_every", type=int, default=None,
                   help="steps between resumable checkpoints (<run>/checkpoints/last.ckpt; default: the trainer "
                        "config's RunCheckpoint, 50)")
    a, rest = p.parse_known_args(argv)
    cli = make_cli(rest, run=False)
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    metrics_cb = next(cb for cb in trainer.callbacks if isinstance(cb, RetrievalMetrics))
    method = a.method or type(model).__name__
    label = a.label or method
    seed = cli.config.get("seed_everything")
    dataset = a.dataset or dm.hparams.dataset
    counts = model.parameter_counts()
    run_ckpt = _run_checkpoint(trainer, a.checkpoint_every)
    resume = _resume_path(trainer, run_ckpt) if counts["trainable"] > 0 else None
    check_outputs(trainer, model, a.result)  # fail before any work, not after it
    wandb_loggers = _bind_loggers(trainer, method, label, dataset, model.hparams.backbone, seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    record: dict = {"method": method, "label": label, "dataset": dataset,
                    "backbone": model.hparams.backbone, "pretrained": model.hparams.pretrained,
                    "open_clip_model": model.clip.open_clip_model, "quick_gelu": model.clip.quick_gelu, "seed": seed,
                    "params": counts, **parameter_share(model, counts)}
    train_seconds, ckpt_bytes, samples = 0.0, 0, 0
    if counts["trainable"] > 0:
        record["resumed_steps"] = _resumed_steps(resume)
        if resume is not None:
            print(f"resuming from {resume} (step {record['resumed_steps']})")
            record["resumed_from"] = str(resume)
        install_stop_signals(trainer)
        sample_counter = _SampleCounter()
        trainer.callbacks.append(sample_counter)
        start = time.perf_counter()
        try:
            trainer.fit(model, datamodule=dm, ckpt_path=resume)
        except SIGTERMException as stop:
            signum = getattr(trainer, "_stop_signal", signal.SIGTERM)
            raise RunStopped(signum, run_ckpt.saved_on_stop, wandb_loggers) from stop
        train_seconds = time.perf_counter() - start
        # samples actually trained on: a batch smaller than batch_size (a training set smaller than one batch) counts
        # as its size; DDP shards are padded to equal length, so every process saw as many as this one
        samples = sample_counter.samples * trainer.world_size
        # the weights tested: the best validation epoch's when there is a validation split (never the test split)
        record["checkpoint_selection"] = select_tested_weights(trainer, model)
        ckpt = Path(trainer.default_root_dir) / "checkpoints" / "trainable.ckpt"
        trainer.save_checkpoint(ckpt)
        ckpt_bytes = ckpt.stat().st_size if ckpt.exists() else 0
    try:
        trainer.test(model, datamodule=dm)
    except SIGTERMException as stop:
        raise RunStopped(getattr(trainer, "_stop_signal", signal.SIGTERM), None, wandb_loggers) from stop
    record.update({
        "data": dm.summary(),
        "checkpoint_selection": record.get("checkpoint_selection") or select_tested_weights(trainer, model, False),
        "manifest": dm.manifest(),
        "metrics": metrics_cb.last_metrics.get("test", {}),
        "efficiency": {"train_seconds": round(train_seconds, 2), "train_steps": trainer.global_step,
                       "train_samples": samples,
                       "train_samples_per_second": round(samples / train_seconds, 2) if train_seconds else None,
                       "checkpoint_bytes": ckpt_bytes, **_peak_memory_mb()},
        "environment": {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
                        or "cpu", "world_size": trainer.world_size, "torch": torch.__version__,
                        "precision": str(trainer.precision),
                        # forked from a sweep's fork server, or a fresh interpreter: a forked run's peak RSS leaves
                        # out the library pages only the import touched (~270 MB less on the synthetic set)
                        "process_start": os.environ.get("PETL_BENCH_PROCESS_START", "fresh")},
        "config": _plain(cli.config),
    })
    if trainer.global_rank == 0:
        for logger in wandb_loggers:
            publish_record(logger, record)
        if a.result:
            write_json_atomic(Path(a.result), record)
            print(f"wrote {a.result}")
        write_json_atomic(Path(trainer.default_root_dir) / "manifest.json", record["manifest"])
        # finished and recorded: the resumable checkpoint has done its job (trainable.ckpt stays)
        run_ckpt.last_path.unlink(missing_ok=True)
    return RunResult(record, trainer, wandb_loggers)


def run_command(argv: list[str]) -> int:
    """``petl-bench run [--result FILE] [--method M] [--label L] <LightningCLI args>`` or ``run --sweep FILE ...``."""
    if any(arg == "--sweep" or arg.startswith("--sweep=") for arg in argv):
        argv = _sweep_point_args(argv)
        if argv is None:
            return 0
    try:
        result = execute_run(argv)
    except RunStopped as stop:
        # not finished: no record, W&B closed as failed; the exit status says which signal (128 + n)
        for logger in stop.loggers:
            logger.finish(exit_code=stop.exit_code)
        print(f"petl-bench run: {stop}", file=sys.stderr)
        return stop.exit_code
    result.close()
    return 0


def _sweep_point_args(argv: list[str]) -> list[str] | None:
    """``--sweep FILE --method M ...`` → the arguments the sweep itself would give this point (None: finished)."""
    from petl_bench.bench.sweep import SweepSpec, SweepSpecError, parse_grid_args

    p = argparse.ArgumentParser(prog="petl-bench run --sweep", allow_abbrev=False)
    p.add_argument("--sweep", required=True, help="the sweep file (experiments/<name>.yaml)")
    p.add_argument("--method", required=True)
    p.add_argument("--dataset", default=None, help="default: the sweep's only dataset")
    p.add_argument("--backbone", default=None, help="default: the sweep's only backbone")
    p.add_argument("--seed_everything", type=int, default=None, help="default: the sweep's first seed")
    p.add_argument("--results", default="results")
    p.add_argument("--force", action="store_true", help="run even when the result file exists")
    a, rest = p.parse_known_args(argv)
    spec = SweepSpec.load(a.sweep)

    def only(values, what: str, given):
        if given is not None:
            if given not in values:
                raise SweepSpecError(f"{a.sweep}: {what} {given!r} is not in the sweep ({', '.join(map(str, values))})")
            return given
        if len(values) != 1:
            raise SweepSpecError(f"{a.sweep} has several {what}s ({', '.join(map(str, values))}): pass --{what}")
        return values[0]

    dataset = only(spec.datasets, "dataset", a.dataset)
    backbone = only(spec.backbones, "backbone", a.backbone)
    if a.method not in spec.methods:
        raise SweepSpecError(f"{a.sweep}: method {a.method!r} is not in the sweep ({', '.join(spec.methods)})")
    seed = spec.seeds[0] if a.seed_everything is None else a.seed_everything
    if a.method in spec.seedless and seed != spec.seeds[0]:
        print(f"[skip] {a.method} is seedless in {a.sweep}: only seed {spec.seeds[0]} runs")
        return None
    grid, extra = parse_grid_args(spec, rest)
    run = spec.build_run(Path(a.results), dataset, a.method, backbone, seed, grid)
    if run.result.exists() and not a.force:
        print(f"[skip] {run.result} exists (--force to redo)")
        return None
    return [*run.run_args(), *extra]


def _plain(config) -> dict:
    """The parsed LightningCLI namespace as plain JSON-able data."""
    from jsonargparse import Namespace

    def conv(x):
        if isinstance(x, Namespace):
            return {k: conv(v) for k, v in vars(x).items()}
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return x if isinstance(x, (str, int, float, bool, type(None))) else str(x)

    return conv(config)


# ---------------------------------------------------------------------- make bench
def bench_command(argv: list[str]) -> int:
    """``petl-bench bench [--dataset D] [--seeds N] [--methods ...]``: the sweep experiments/<D>.yaml for one dataset."""
    from petl_bench.bench.sweep import SweepSpec, add_execution_args, bench_spec_path, run_sweep, slurm_options

    p = argparse.ArgumentParser(prog="petl-bench bench", allow_abbrev=False,
                                description="Fit and test every method of experiments/<dataset>.yaml on that dataset "
                                            "(a sweep; finished runs are skipped, failed ones recorded).")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--seeds", type=int, default=1,
                   help="seeds 0..N-1 (default 1: results/<dataset>/<method>.json; seed k>0 adds <method>.seed<k>.json)")
    p.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: the sweep's list)")
    add_execution_args(p)
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    spec = SweepSpec.load(bench_spec_path(a.dataset))
    datasets = [a.dataset] if a.dataset in spec.datasets else None
    spec = spec.narrowed(datasets, a.methods or None, range(a.seeds))
    return run_sweep(spec, a.results, parallel=a.parallel, force=a.force, dry_run=a.dry_run, report=not a.no_report,
                     launcher=a.launcher, slurm=slurm_options(a), start=a.start)
