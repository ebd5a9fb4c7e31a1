"""One benchmark run — fit, then test, then a record of everything needed to compare it — and `make bench`.

A run's record (``results/<dataset>/<method>.json``, written atomically by rank 0) holds the method, backbone,
pretrained source, dataset + split + frame protocol, seed, trainable and total parameters, checkpoint bytes (the
trainable-only checkpoint), train wall time, throughput, peak memory, the test metrics and the full config.
A record that exists means the run is finished: `bench` skips it unless told to redo it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from petl_bench.paths import REPO_DIR


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _peak_memory_mb() -> dict:
    out = {"peak_host_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def run_command(argv: list[str]) -> int:
    """``petl-bench run [--result FILE] [--run-dir DIR] <LightningCLI args>``: fit + test + record."""
    from petl_bench.cli import make_cli
    from petl_bench.metrics import RetrievalMetrics

    p = argparse.ArgumentParser(prog="petl-bench run", add_help=False)
    p.add_argument("--result", default=None, help="where to write the run's JSON record")
    p.add_argument("--method", default=None, help="method name recorded in the result (default: model class)")
    a, rest = p.parse_known_args(argv)
    cli = make_cli(rest, run=False)
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    metrics_cb = next(cb for cb in trainer.callbacks if isinstance(cb, RetrievalMetrics))
    counts = model.parameter_counts()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    record: dict = {"method": a.method or type(model).__name__, "backbone": model.hparams.backbone,
                    "pretrained": model.hparams.pretrained, "seed": cli.config.get("seed_everything"),
                    "params": counts, "trainable_percent": 100.0 * counts["trainable"] / counts["total"]}
    train_seconds, ckpt_bytes, samples = 0.0, 0, 0
    if counts["trainable"] > 0:
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        train_seconds = time.perf_counter() - start
        samples = trainer.global_step * dm.hparams.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        ckpt = Path(trainer.default_root_dir) / "checkpoints" / "trainable.ckpt"
        trainer.save_checkpoint(ckpt)
        ckpt_bytes = ckpt.stat().st_size if ckpt.exists() else 0
    trainer.test(model, datamodule=dm)
    record.update({
        "data": dm.summary(),
        "metrics": metrics_cb.last_metrics.get("test", {}),
        "efficiency": {"train_seconds": round(train_seconds, 2), "train_steps": trainer.global_step,
                       "train_samples_per_second": round(samples / train_seconds, 2) if train_seconds else None,
                       "checkpoint_bytes": ckpt_bytes, **_peak_memory_mb()},
        "environment": {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
                        or "cpu", "world_size": trainer.world_size, "torch": torch.__version__,
                        "precision": str(trainer.precision)},
        "config": _plain(cli.config),
    })
    if a.result and trainer.global_rank == 0:
        write_json_atomic(Path(a.result), record)
        print(f"wrote {a.result}")
    return 0


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


# ---------------------------------------------------------------------- the grid
def load_bench_spec(dataset: str) -> dict:
    path = REPO_DIR / "experiments" / f"{dataset}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark definition for {dataset!r}: expected {path}")
    with open(path, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    for key in ("configs", "methods"):
        if key not in spec:
            raise KeyError(f"{path}: missing key {key!r}")
    return spec


def run_commands(spec: dict, results_dir: Path, seeds: list[int]) -> list[tuple[str, int, Path, list[str]]]:
    from petl_bench.methods import method_names

    methods = method_names() if spec["methods"] == "all" else list(spec["methods"])
    runs = []
    for method in methods:
        for seed in seeds:
            name = method if len(seeds) == 1 else f"{method}-seed{seed}"
            result = results_dir / f"{name}.json"
            cmd = [sys.executable, "-m", "petl_bench.cli", "run", "--result", str(result), "--method", method,
                   f"--seed_everything={seed}"]
            for cfg in spec["configs"]:
                cmd += ["--config", str(REPO_DIR / cfg)]
            cmd += ["--config", str(REPO_DIR / "configs" / "model" / f"{method}.yaml")]
            for cfg in spec.get("model_configs", []):  # e.g. the backbone, after the method's own config
                cmd += ["--config", str(REPO_DIR / cfg)]
            for key, value in {**spec.get("overrides", {}).get("all", {}),
                               **spec.get("overrides", {}).get(method, {})}.items():
                cmd.append(f"--{key}={value}")
            cmd.append(f"--trainer.default_root_dir={results_dir / 'runs' / name}")
            runs.append((method, seed, result, cmd))
    return runs


def bench_command(argv: list[str]) -> int:
    """``petl-bench bench [--dataset D] [--seeds N] [--force] [--methods ...]``."""
    from petl_bench.bench.report import write_report

    p = argparse.ArgumentParser(prog="petl-bench bench", description="Fit and test every method on one dataset.")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (0..N-1)")
    p.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: the benchmark's list)")
    p.add_argument("--results", default="results", help="results folder (default: results/)")
    p.add_argument("--force", action="store_true", help="redo finished runs")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = p.parse_args(argv)
    spec = load_bench_spec(a.dataset)
    if a.methods:
        spec["methods"] = a.methods
    results_dir = Path(a.results) / a.dataset
    if spec.get("prepare") == "synthetic" and not a.dry_run:
        subprocess.run([sys.executable, "-m", "petl_bench.cli", "synth"], check=True)
    failures = []
    for method, seed, result, cmd in run_commands(spec, results_dir, list(range(a.seeds))):
        if a.dry_run:
            print(" ".join(cmd))
            continue
        if result.exists() and not a.force:
            print(f"[skip] {result} exists (FORCE=1 to redo)")
            continue
        print(f"[run] {method} seed {seed}", flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            failures.append(f"{method} seed {seed} (exit {proc.returncode})")
            print(f"[fail] {method} seed {seed}: exit code {proc.returncode}", file=sys.stderr)
    if a.dry_run:
        return 0
    report = write_report(results_dir)
    print(report.read_text())
    if failures:
        print("failed runs: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0
