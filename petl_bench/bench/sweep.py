"""Sweeps: a grid declared in ``experiments/<name>.yaml`` becomes one ``petl-bench run`` per point.

A sweep file names the axes of the grid; each point is a LightningCLI command line built from configs in a fixed
order (later ones win), then ``--key=value`` overrides::

    configs:   [configs/trainer/cpu.yaml]          # 1. LightningCLI configs every run starts from
    datasets:  [synthetic]                         # 2. configs/data/<dataset>.yaml (or a path)
    methods:   all                                 # 3. configs/model/<method>.yaml; "all" or a list
    exclude:   [cross_modal_adapter_msvd]          #    left out of "all"
    backbones: [tiny_synthetic]                    # 4. configs/backbone/<backbone>.yaml, after the method's config
    seeds:     3                                   # 5. --seed_everything=k for k in 0..2 (or a list of seeds)
    seedless:  [zero_shot]                         #    methods that train nothing: the first seed only
    grid:      {model.init_args.lr: [1.0e-3, 1.0e-4]}  # 6. any LightningCLI key, one run per value
    overrides:                                     # 7. fixed --key=value: "all", then a dataset's, then a method's
      all: {trainer.max_epochs: 4}
      full_finetune: {model.init_args.backbone_lr: 1.0e-4}
    prepare:   synthetic                           # generate the synthetic clips + backbone once, before any run

Names and files (``R`` is the results folder, default ``results/``): a run is named by its method, then the
backbone when the sweep has several, then ``key=value`` for every grid key with several values, then ``.seed<k>``
for seeds other than 0 — so ``make bench`` (seed 0) writes ``R/<dataset>/<method>.json`` as it always has, and a
later ``SEEDS=3`` adds ``<method>.seed1.json`` and ``<method>.seed2.json`` beside it instead of redoing seed 0.
A run works in ``R/<dataset>/runs/<name>/`` (its ``default_root_dir``: logs, W&B folder, trainable checkpoint,
``stdout.log`` / ``stderr.log``). A result file that exists means the run is finished and is skipped; a failed run
leaves ``R/<dataset>/<name>.failed.json`` (exit code, the tail of stderr, the command) and is retried next time.

The same grid can be exported as a W&B sweep (``--export-wandb-sweep``): its agents call
``petl-bench run --sweep FILE --method=... --seed_everything=...``, which rebuilds exactly the command above.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from petl_bench.bench.launcher import ForkedRun, ForkServer, LauncherError
from petl_bench.paths import CONFIG_DIR, REPO_DIR

SPEC_KEYS = {"name", "description", "configs", "datasets", "dataset", "methods", "exclude", "backbones", "seeds",
             "seedless", "grid", "overrides", "prepare"}
PREPARE_STEPS = {"synthetic": ["synth"]}
STDERR_TAIL_LINES = 40
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]")


class SweepSpecError(ValueError):
    """A sweep file that cannot be expanded; the message names the file and the key."""


class SweepInterrupted(KeyboardInterrupt):
    """SIGTERM / SIGINT / SIGHUP to the sweep: its runs are stopped (they save a checkpoint) and it exits 128 + n."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(f"signal {signum}")
        self.signum = int(signum)


STOP_GRACE_SECONDS = 60  # a stopped run saves its checkpoint first; SIGKILL only after this


@contextlib.contextmanager
def _signals_interrupt():
    """In the main thread: SIGTERM and SIGHUP raise `SweepInterrupted` like Ctrl-C does (previous handlers restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise SweepInterrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------- values
def format_value(value: Any) -> str:
    """A YAML value as LightningCLI reads it back from ``--key=value`` (jsonargparse parses the text as YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _resolve_config(kind: str, name_or_path: str, where: str) -> Path:
    """``configs/<kind>/<name>.yaml`` for a bare name, else the path (relative to the repository)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / kind / f"{name_or_path}.yaml"
    elif not path.is_absolute():
        path = REPO_DIR / path
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))
        raise SweepSpecError(f"{where}: {name_or_path!r} has no config {path}; known {kind} configs: "
                             f"{', '.join(known) or 'none'}")
    return path


def _display_path(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_DIR))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class Run:
    """One point of a sweep: what it runs and where it writes."""

    name: str  # file stem: label, then ".seed<k>" unless k == 0
    label: str  # the run's name without its seed: a report row, the W&B run name
    dataset: str
    method: str
    backbone: str | None
    seed: int
    grid: tuple[tuple[str, Any], ...]  # this point's value of every grid key
    cli_args: tuple[str, ...]  # LightningCLI arguments (configs, seed, overrides, default_root_dir)
    results_dir: Path  # R/<dataset>

    @property
    def result(self) -> Path:
        return self.results_dir / f"{self.name}.json"

    @property
    def failed(self) -> Path:
        return self.results_dir / f"{self.name}.failed.json"

    @property
    def run_dir(self) -> Path:
        return self.results_dir / "runs" / self.name

    def run_args(self) -> list[str]:
        """Arguments of ``petl-bench run`` (after the command word)."""
        args = ["--result", str(self.result), "--method", self.method, "--dataset", self.dataset]
        if self.label != self.method:
            args += ["--label", self.label]
        return [*args, *self.cli_args]

    def command(self) -> list[str]:
        return [sys.executable, "-m", "petl_bench.cli", "run", *self.run_args()]

    def wandb_args(self) -> dict[str, Any]:
        """This point as W&B sweep parameters (what an agent passes to ``petl-bench run --sweep``)."""
        params: dict[str, Any] = {"dataset": self.dataset, "method": self.method, "seed_everything": self.seed}
        if self.backbone is not None:
            params["backbone"] = self.backbone
        params.update(dict(self.grid))
        return params


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated sweep file."""

    path: Path
    name: str
    configs: tuple[Path, ...]
    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    backbones: tuple[str | None, ...]
    seeds: tuple[int, ...]
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    seedless: tuple[str, ...] = ()
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    prepare: str | None = None
    description: str = ""

    # -- loading
    @classmethod
    def load(cls, path: str | Path) -> SweepSpec:
        from petl_bench.methods import method_names

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sweep file {path}")
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise SweepSpecError(f"{path}: expected a mapping of sweep keys, got {type(raw).__name__}")
        unknown = set(raw) - SPEC_KEYS
        if unknown:
            raise SweepSpecError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; a sweep file has "
                                 f"{', '.join(sorted(SPEC_KEYS - {'dataset'}))}")

        def as_list(key: str, default: Any = ()) -> list:
            value = raw.get(key, default)
            if value is None:
                return []
            return list(value) if isinstance(value, (list, tuple)) else [value]

        if "dataset" in raw and "datasets" in raw:
            raise SweepSpecError(f"{path}: give either 'dataset' or 'datasets', not both")
        datasets = as_list("datasets") or as_list("dataset")
        if not datasets:
            raise SweepSpecError(f"{path}: 'datasets' is missing: list the datasets (configs/data/<name>.yaml)")
        for d in datasets:
            _resolve_config("data", d, f"{path}: datasets")

        known_methods = method_names()
        methods = raw.get("methods", "all")
        methods = list(known_methods) if methods == "all" else as_list("methods")
        exclude = as_list("exclude")
        seedless = as_list("seedless")
        for key, names in (("methods", methods), ("exclude", exclude), ("seedless", seedless)):
            for m in names:
                if m not in known_methods:
                    raise SweepSpecError(f"{path}: {key}: unknown method {m!r} (no configs/model/{m}.yaml); known "
                                         f"methods: {', '.join(known_methods)}")
        methods = [m for m in methods if m not in exclude]
        if not methods:
            raise SweepSpecError(f"{path}: no method left to run (methods minus exclude is empty)")

        backbones = as_list("backbones") or [None]  # None: the method config's own backbone
        for b in backbones:
            if b is not None:
                _resolve_config("backbone", b, f"{path}: backbones")

        seeds = raw.get("seeds", 1)
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if seeds < 1:
                raise SweepSpecError(f"{path}: seeds: {seeds} must be >= 1 (a count) or a list of seeds")
            seeds = list(range(seeds))
        seeds = list(seeds) if isinstance(seeds, (list, tuple)) else None
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise SweepSpecError(f"{path}: seeds must be a count (3) or a list of integers ([0, 1, 2])")

        grid = raw.get("grid") or {}
        if not isinstance(grid, dict):
            raise SweepSpecError(f"{path}: grid must map LightningCLI keys to lists of values")
        grid_items = []
        for key, values in grid.items():
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if not values:
                raise SweepSpecError(f"{path}: grid.{key} has no values")
            grid_items.append((str(key), tuple(values)))

        overrides = raw.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise SweepSpecError(f"{path}: overrides must map 'all', a dataset or a method to {{key: value}}")
        for section, values in overrides.items():
            if section != "all" and section not in known_methods and section not in datasets:
                raise SweepSpecError(f"{path}: overrides.{section}: not 'all', a dataset of this sweep or a method")
            if not isinstance(values, dict):
                raise SweepSpecError(f"{path}: overrides.{section} must map LightningCLI keys to values")

        prepare = raw.get("prepare")
        if prepare is not None and prepare not in PREPARE_STEPS:
            raise SweepSpecError(f"{path}: prepare: {prepare!r} is not one of {', '.join(PREPARE_STEPS)}")
        configs = []
        for c in as_list("configs"):
            p = Path(c) if Path(c).is_absolute() else REPO_DIR / c
            if not p.is_file():
                raise SweepSpecError(f"{path}: configs: {c} does not exist")
            configs.append(p)
        return cls(path=path, name=str(raw.get("name") or path.stem), configs=tuple(configs),
                   datasets=tuple(datasets), methods=tuple(methods), backbones=tuple(backbones), seeds=tuple(seeds),
                   grid=tuple(grid_items), seedless=tuple(seedless), overrides={k: dict(v) for k, v in overrides.items()}, prepare=prepare,
                   description=str(raw.get("description") or ""))

    def narrowed(self, datasets: Sequence[str] | None = None, methods: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None) -> SweepSpec:
        """The same sweep restricted to some datasets / methods, or with other seeds."""
        spec = self
        if datasets:
            missing = [d for d in datasets if d not in self.datasets]
            if missing:
                raise SweepSpecError(f"{self.path}: dataset(s) {', '.join(missing)} not in this sweep "
                                     f"({', '.join(self.datasets)})")
            spec = replace(spec, datasets=tuple(datasets))
        if methods:
            from petl_bench.methods import method_names

            unknown = [m for m in methods if m not in method_names()]
            if unknown:
                raise SweepSpecError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(method_names())}")
            spec = replace(spec, methods=tuple(methods))
        if seeds is not None:
            spec = replace(spec, seeds=tuple(seeds))
        return spec

    # -- expansion
    def _grid_tags(self) -> dict[str, str]:
        """Short name of each grid key with several values (its last component unless that is ambiguous)."""
        varying = [k for k, values in self.grid if len(values) > 1]
        last = [k.rsplit(".", 1)[-1] for k in varying]
        return {k: (short if last.count(short) == 1 else k) for k, short in zip(varying, last)}

    def build_run(self, results: Path, dataset: str, method: str, backbone: str | None, seed: int,
                  grid: dict[str, Any] | None = None) -> Run:
        """The run at one point of the grid (also what ``petl-bench run --sweep`` rebuilds)."""
        grid = dict(grid or {})
        keys = [k for k, _ in self.grid]
        unknown = set(grid) - set(keys)
        if unknown:
            raise SweepSpecError(f"{self.path}: {', '.join(sorted(unknown))} is not a grid key of this sweep "
                                 f"(grid: {', '.join(keys) or 'none'})")
        point = tuple((k, grid.get(k, values[0])) for k, values in self.grid)
        parts = [method]
        if len(self.backbones) > 1 and backbone is not None:
            parts.append(backbone)
        tags = self._grid_tags()
        parts += [f"{tags[k]}={format_value(v)}" for k, v in point if k in tags]
        label = _NAME_UNSAFE.sub("-", ".".join(parts))
        name = label if seed == 0 else f"{label}.seed{seed}"
        results_dir = Path(results) / dataset
        args: list[str] = []
        for cfg in self.configs:
            args += ["--config", str(cfg)]
        args += ["--config", str(_resolve_config("data", dataset, str(self.path)))]
        args += ["--config", str(_resolve_config("model", method, str(self.path)))]
        if backbone is not None:
            args += ["--config", str(_resolve_config("backbone", backbone, str(self.path)))]
        args.append(f"--seed_everything={seed}")
        for section in ("all", dataset, method):
            for key, value in self.overrides.get(section, {}).items():
                args.append(f"--{key}={format_value(value)}")
        args += [f"--{k}={format_value(v)}" for k, v in point]
        args.append(f"--trainer.default_root_dir={results_dir / 'runs' / name}")
        return Run(name=name, label=label, dataset=dataset, method=method, backbone=backbone, seed=seed, grid=point,
                   cli_args=tuple(args), results_dir=results_dir)

    def runs(self, results: str | Path = "results") -> list[Run]:
        """Every point of the grid: dataset-major, then method, backbone, grid values, seed."""
        out = []
        grid_values = list(itertools.product(*[values for _, values in self.grid])) or [()]
        grid_keys = [k for k, _ in self.grid]
        for dataset, method, backbone, values, seed in itertools.product(
                self.datasets, self.methods, self.backbones, grid_values, self.seeds):
            if method in self.seedless and seed != self.seeds[0]:
                continue  # nothing trains: every seed gives the same numbers
            out.append(self.build_run(Path(results), dataset, method, backbone, seed, dict(zip(grid_keys, values))))
        names = [(r.dataset, r.name) for r in out]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise SweepSpecError(f"{self.path}: several grid points share the run name(s) "
                                 f"{', '.join('/'.join(c) for c in clashes)}; make the grid values distinct")
        return out

    # -- W&B
    def wandb_sweep_config(self, results: str = "results") -> dict:
        """The grid as a W&B sweep configuration whose agents run ``petl-bench run --sweep <this file>``."""
        params: dict[str, dict] = {"dataset": {"values": list(self.datasets)},
                                   "method": {"values": list(self.methods)},
                                   "seed_everything": {"values": list(self.seeds)}}
        if self.backbones != (None,):
            params["backbone"] = {"values": list(self.backbones)}
        for key, values in self.grid:
            params[key] = {"values": list(values)}
        command = ["${env}", "petl-bench", "run", f"--sweep={_display_path(self.path)}"]
        if results != "results":
            command.append(f"--results={results}")
        return {
            "program": "petl-bench",
            "name": self.name,
            "description": self.description or f"petl-bench sweep {_display_path(self.path)}",
            "method": "grid",
            "metric": {"name": "test/t2v/R@1", "goal": "maximize"},
            "parameters": params,
            "command": [*command, "${args}"],
        }


def parse_grid_args(spec: SweepSpec, args: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``--key=value`` arguments into this sweep's grid values (YAML-parsed) and the rest (passed through)."""
    keys = {k for k, _ in spec.grid}
    grid, rest = {}, []
    for arg in args:
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if sep and key in keys:
            grid[key] = yaml.safe_load(value)
        else:
            rest.append(arg)
    return grid, rest


# ------------------------------------------------------------------------------------------------------- execution
@dataclass
class RunOutcome:
    run: Run
    status: str  # "done" | "skipped" | "failed" | "interrupted"
    seconds: float = 0.0
    returncode: int | None = None
    detail: str = ""


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


RUN_STARTS = ("fork", "fresh")


def default_start() -> str:
    """``fork`` where the OS forks (Linux, macOS), else ``fresh``."""
    return "fork" if hasattr(os, "fork") else "fresh"


def _signal_group(pid: int, sig: int) -> None:
    """Signal a run's process group (the run and its data-loader workers); the run alone if it has no group yet."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:  # exited already, or a forked run that has not called setsid yet
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def auto_parallel() -> int:
    """``--parallel auto``: on a machine without a GPU, one run per core (a CPU run uses one intra-op thread, see
    cli.py; with the synthetic frame cache its loader workers are nearly idle); with GPUs one run at a time, which
    takes the GPUs its config asks for."""
    if _visible_gpus():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def parse_parallel(value: str) -> int | str:
    """``--parallel``: a count of runs at once, or ``auto`` (resolved by `SweepRunner` with `auto_parallel`, so that a
    dry run or a SLURM launch never queries the local GPUs)."""
    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of runs or 'auto', got {value!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {count}")
    return count


def _gpu_slots(parallel: int) -> list[dict[str, str]]:
    """Environment of each of `parallel` concurrent runs: disjoint GPU sets when there are GPUs, else nothing."""
    if parallel <= 1:
        return [{}]
    gpus = _visible_gpus()
    if not gpus:
        return [{} for _ in range(parallel)]  # CPU runs share the cores (one intra-op thread each, see cli.py)
    if len(gpus) < parallel:
        raise ValueError(f"--parallel {parallel} needs at least {parallel} GPUs, one set per run; {len(gpus)} visible")
    share = len(gpus) // parallel
    return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * share:(i + 1) * share])} for i in range(parallel)]


class SweepRunner:
    """Runs a list of `Run` as processes, ``parallel`` at a time, recording results and failures.

    ``start``: ``fork`` (default where the OS can fork): each run is forked from one `ForkServer` that has imported the
    run's modules once (``server``, or one this runner starts for its `run`); ``fresh``: each run a new interpreter.
    """

    def __init__(self, runs: Sequence[Run], parallel: int | str = 1, force: bool = False, console=None,
                 start: str | None = None, server: ForkServer | None = None):
        from rich.console import Console

        parallel = auto_parallel() if parallel == "auto" else parallel
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        start = start or default_start()
        if start not in RUN_STARTS:
            raise ValueError(f"start must be one of {', '.join(RUN_STARTS)}, got {start!r}")
        self.runs = list(runs)
        self.parallel = parallel
        self.force = force
        self.start = start
        self.console = console or Console(stderr=True)
        self._server = server
        self._procs: dict[int, subprocess.Popen | ForkedRun] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # set on interrupt: runs stopped by us are not failures

    def pending(self) -> list[Run]:
        return [r for r in self.runs if self.force or not r.result.exists()]

    def _execute(self, run: Run, env_extra: dict[str, str]) -> RunOutcome:
        try:
            return self._execute_run(run, env_extra)
        except Exception as error:  # noqa: BLE001 - e.g. a full disk while opening the logs: the sweep goes on
            return RunOutcome(run, "failed", 0.0, None, f"could not run: {type(error).__name__}: {error}")

    def _execute_run(self, run: Run, env_extra: dict[str, str]) -> RunOutcome:
        from petl_bench.atomic import write_json_atomic

        def stamp():  # a forced redo must write the record anew, not leave the old one standing
            return run.result.stat().st_mtime_ns if run.result.exists() else None

        run.run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **env_extra}
        before = stamp()
        start = time.perf_counter()
        stdout, stderr = run.run_dir / "stdout.log", run.run_dir / "stderr.log"
        with open(stdout, "w", encoding="utf-8") as out, open(stderr, "w", encoding="utf-8") as err:
            try:
                if self._server is not None:  # forked from the server that has imported everything once
                    proc = self._server.launch(["run", *run.run_args()], stdout, stderr, env=env, cwd=os.getcwd())
                else:
                    # a new session: an interrupted sweep can stop a run together with its data-loader workers
                    proc = subprocess.Popen(run.command(), stdout=out, stderr=err, env=env, cwd=os.getcwd(),
                                            start_new_session=True)
            except (OSError, LauncherError) as error:  # e.g. the interpreter vanished: record it like any failure
                err.write(f"could not start {shlex.join(run.command())}: {error}\n")
                proc = None
                returncode = 127
        if proc is not None:
            with self._lock:
                self._procs[proc.pid] = proc
            try:
                returncode = proc.wait()
            finally:
                with self._lock:
                    self._procs.pop(proc.pid, None)
            if returncode is None:  # only a forked run whose server died reports nothing
                with open(stderr, "a", encoding="utf-8") as err:
                    err.write("petl-bench sweep: the fork server died while this run was going; its status is unknown\n")
                returncode = 1
        seconds = time.perf_counter() - start
        written = stamp() not in (None, before)
        if self._stopping.is_set() and not written:
            return RunOutcome(run, "interrupted", seconds, returncode)
        if returncode == 0 and written:
            run.failed.unlink(missing_ok=True)
            return RunOutcome(run, "done", seconds, returncode)
        reason = f"exit code {returncode}" if returncode != 0 else "exit code 0 but no result file written"
        if returncode < 0:
            reason = f"killed by signal {signal.Signals(-returncode).name}"
        tail = _tail(run.run_dir / "stderr.log")
        failure = {
            "name": run.name, "label": run.label, "dataset": run.dataset, "method": run.method,
            "backbone": run.backbone, "seed": run.seed, "grid": dict(run.grid), "returncode": returncode,
            "reason": reason, "seconds": round(seconds, 1), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": shlex.join(run.command()), "stderr_log": str(run.run_dir / "stderr.log"),
            "stderr_tail": tail,
        }
        try:  # best effort: a failure record that cannot be written (full disk) must not stop the sweep
            write_json_atomic(run.failed, failure)
        except OSError as error:
            self.console.print(f"[red]could not write {run.failed}: {error}[/red]")
        last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
        return RunOutcome(run, "failed", seconds, returncode, f"{reason}: {last[:200]}")

    def stop_all(self) -> None:
        """Terminate every running run's process group (SIGTERM: each saves its checkpoint; SIGKILL after
        `STOP_GRACE_SECONDS`)."""
        self._stopping.set()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)

    def run(self) -> list[RunOutcome]:
        outcomes = [RunOutcome(r, "skipped") for r in self.runs if not self.force and r.result.exists()]
        todo = self.pending()
        for o in outcomes:
            self.console.print(f"[dim]\\[skip] {o.run.dataset}/{o.run.name}: {o.run.result} exists[/dim]")
        if not todo:
            return outcomes
        slots = _gpu_slots(self.parallel)
        free = list(range(len(slots)))
        with contextlib.ExitStack() as stack:
            if self._server is None and self.start == "fork":
                self._server = stack.enter_context(ForkServer())
                stack.callback(setattr, self, "_server", None)
            return self._run_all(todo, slots, free, outcomes)

    def _run_all(self, todo: list[Run], slots: list[dict[str, str]], free: list[int],
                 outcomes: list[RunOutcome]) -> list[RunOutcome]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"))
        with Progress(*columns, console=self.console, transient=False) as progress, \
                ThreadPoolExecutor(max_workers=len(slots)) as pool:
            task = progress.add_task("", total=len(todo))
            queue, running = list(todo), {}
            try:
                while queue or running:
                    while queue and free:
                        run, slot = queue.pop(0), free.pop(0)
                        running[pool.submit(self._execute, run, slots[slot])] = (run, slot)
                    progress.update(task, description=", ".join(f"{r.dataset}/{r.name}"
                                                                for r, _ in running.values()))
                    finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for fut in finished:
                        run, slot = running.pop(fut)
                        free.append(slot)
                        outcome = fut.result()
                        outcomes.append(outcome)
                        progress.advance(task)
                        self._announce(progress.console, outcome)
            except KeyboardInterrupt:
                progress.console.print("[yellow]interrupted: stopping the running runs[/yellow]")
                if threading.current_thread() is threading.main_thread():
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut this
                        signal.signal(sig, signal.SIG_IGN)
                self.stop_all()
                raise
        return outcomes

    @staticmethod
    def _announce(console, outcome: RunOutcome) -> None:
        from rich.markup import escape

        run = outcome.run
        if outcome.status == "done":
            metric = ""
            try:
                metrics = json.loads(run.result.read_text()).get("metrics", {})
                if "t2v/R@1" in metrics:
                    metric = f"  T2V R@1 {metrics['t2v/R@1']:.1f}"
            except (OSError, ValueError):
                pass
            console.print(f"[green]\\[done][/green] {run.dataset}/{run.name} in {outcome.seconds:.0f} s{metric}")
        else:
            console.print(f"[red]\\[fail][/red] {run.dataset}/{run.name} after {outcome.seconds:.0f} s: "
                          f"{escape(outcome.detail)} (see {run.failed})")


class SubmititRunner(SweepRunner):
    """Runs each pending `Run` as a submitit job (SLURM, or submitit's local executor) and waits for them all.

    A job is requeued by submitit when preempted or timed out, and resumes from its checkpoint (bench/slurm.py). A
    signal to the sweep cancels its jobs (SLURM sends them SIGTERM: they save a checkpoint); a rerun resumes them.
    """

    def __init__(self, runs: Sequence[Run], executor, force: bool = False, console=None, poll_s: float = 5.0):
        super().__init__(runs, parallel=1, force=force, console=console)
        self.executor, self.poll_s = executor, poll_s
        self.jobs: dict[str, tuple[Run, Any]] = {}

    def submit(self) -> None:
        from petl_bench.bench.slurm import submit_run

        for run in self.pending():
            run.run_dir.mkdir(parents=True, exist_ok=True)
            job = submit_run(self.executor, run)
            (run.run_dir / "job_id").write_text(f"{job.job_id}\n")
            self.jobs[f"{run.dataset}/{run.name}"] = (run, job)
            self.console.print(f"[dim]submitted {run.dataset}/{run.name}: job {job.job_id}[/dim]")

    def stop_all(self) -> None:
        self._stopping.set()
        for run, job in self.jobs.values():
            with contextlib.suppress(Exception):  # already finished, or the scheduler is unreachable
                job.cancel(check=False)
                self.console.print(f"cancelled job {job.job_id} ({run.dataset}/{run.name})")

    def run(self) -> list[RunOutcome]:
        from petl_bench.bench.slurm import wait_for

        outcomes = [RunOutcome(r, "skipped") for r in self.runs if not self.force and r.result.exists()]
        try:
            self.submit()
            for run, job in wait_for(self.jobs, self.poll_s):
                outcome = self._job_outcome(run, job)
                outcomes.append(outcome)
                self._announce(self.console, outcome)
        except KeyboardInterrupt:
            self.console.print("[yellow]interrupted: cancelling the submitted jobs[/yellow]")
            self.stop_all()
            raise
        return outcomes

    def _job_outcome(self, run: Run, job) -> RunOutcome:
        from petl_bench.atomic import write_json_atomic

        try:
            job.result()
        except Exception as error:  # noqa: BLE001 - the job failed or was cancelled: record it, go on
            detail = str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__
            try:
                write_json_atomic(run.failed, {"name": run.name, "dataset": run.dataset, "method": run.method,
                                               "seed": run.seed, "job_id": job.job_id, "reason": detail,
                                               "command": shlex.join(run.command()),
                                               "stderr_log": str(run.run_dir / "stderr.log"),
                                               "stderr_tail": _tail(run.run_dir / "stderr.log")})
            except OSError as err:
                self.console.print(f"[red]could not write {run.failed}: {err}[/red]")
            return RunOutcome(run, "failed", 0.0, None, f"job {job.job_id}: {detail}")
        run.failed.unlink(missing_ok=True)
        return RunOutcome(run, "done", 0.0, 0)


def prepare(spec: SweepSpec, server: ForkServer | None = None) -> None:
    """Run the sweep's preparation step once (e.g. generate the synthetic clips, their frame cache and backbone)."""
    if not spec.prepare:
        return
    argv = PREPARE_STEPS[spec.prepare]
    if server is None:
        subprocess.run([sys.executable, "-m", "petl_bench.cli", *argv], check=True)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="petl-bench-prepare-") as tmp:
        out, err = Path(tmp) / "stdout.log", Path(tmp) / "stderr.log"
        returncode = server.launch(argv, out, err).wait()
        sys.stdout.write(out.read_text(encoding="utf-8", errors="replace"))
        sys.stderr.write(err.read_text(encoding="utf-8", errors="replace"))
    if returncode != 0:
        raise subprocess.CalledProcessError(returncode, ["petl-bench", *argv])


def run_sweep(spec: SweepSpec, results: str | Path = "results", parallel: int | str = 1, force: bool = False,
              dry_run: bool = False, report: bool = True, out=None, launcher: str = "local",
              slurm: dict | None = None, start: str | None = None) -> int:
    """Expand, (print or) run, then write each dataset's report. Returns 0, or 1 when a run failed.

    ``start`` (local launcher): ``fork`` runs from one fork server (`petl_bench.bench.launcher`), ``fresh`` a new
    interpreter per run; default `default_start`.
    """
    out = out or sys.stdout
    runs = spec.runs(results)
    if dry_run:
        for run in runs:
            finished = run.result.exists() and not force
            print(("# [done] " if finished else "") + shlex.join(run.command()), file=out)
        return 0
    start = start or default_start()
    stack = contextlib.ExitStack()
    server = None
    if launcher == "local" and start == "fork" and any(force or not r.result.exists() for r in runs):
        server = stack.enter_context(ForkServer())
    with stack:
        return _run_sweep(spec, runs, results, parallel, force, report, out, launcher, slurm, start, server)


def _run_sweep(spec: SweepSpec, runs: list[Run], results: str | Path, parallel: int | str, force: bool, report: bool,
               out, launcher: str, slurm: dict | None, start: str, server: ForkServer | None) -> int:
    if any(force or not r.result.exists() for r in runs):
        prepare(spec, server)
    if launcher == "local":
        runner = SweepRunner(runs, parallel=parallel, force=force, start=start, server=server)
    else:
        from petl_bench.bench.slurm import make_executor

        cluster = {"slurm": "slurm", "submitit-local": "local"}[launcher]
        executor = make_executor(Path(results) / "_submitit", cluster=cluster, **(slurm or {}))
        runner = SubmititRunner(runs, executor, force=force)
    try:
        with _signals_interrupt():
            outcomes = runner.run()
    except KeyboardInterrupt as stop:
        runner.console.print("sweep interrupted; finished runs are kept, stopped ones saved a checkpoint: the next "
                             "sweep resumes them")
        return 128 + getattr(stop, "signum", signal.SIGINT)
    failed = [o for o in outcomes if o.status == "failed"]
    if report:
        from petl_bench.bench.report import write_report

        for dataset in spec.datasets:
            folder = Path(results) / dataset
            if any(folder.glob("*.json")):
                path = write_report(folder)
                print(path.read_text(), file=out)
                runner.console.print(f"report: {path}")
    from rich.markup import escape

    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    runner.console.print(f"sweep {spec.name}: {counts['done']} done, {counts['skipped']} skipped, "
                         f"{counts['failed']} failed")
    for o in failed:
        runner.console.print(f"[red]failed[/red] {o.run.dataset}/{o.run.name}: {escape(o.detail)} -> {o.run.failed}")
    return 1 if failed else 0


def export_wandb_sweep(spec: SweepSpec, path: str | Path, results: str = "results") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# W&B sweep generated from {_display_path(spec.path)} ({len(spec.runs(results))} runs).\n"
              f"# wandb sweep {path.name}  then, on each machine:  wandb agent <entity>/<project>/<sweep id>\n")
    path.write_text(header + yaml.safe_dump(spec.wandb_sweep_config(results), sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------- command
def add_execution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results", help="results folder (default: results/)")
    p.add_argument("--parallel", type=parse_parallel, default="auto",
                   help="runs at once, or auto (default): one per core on a machine without a GPU, else 1; with "
                        "N > 1 and GPUs each run gets its own share of the visible GPUs")
    p.add_argument("--force", action="store_true", help="redo finished runs")
    p.add_argument("--dry-run", action="store_true", help="print the commands (finished ones commented) and stop")
    p.add_argument("--no-report", action="store_true", help="do not rewrite the reports after the runs")
    p.add_argument("--start", choices=RUN_STARTS, default=None,
                   help="local runs: fork each from one process that has imported torch, Lightning and the suite "
                        "once (default; saves ~6 s per run), or start each as a fresh interpreter")
    p.add_argument("--launcher", choices=("local", "slurm", "submitit-local"), default="local",
                   help="local: subprocesses here (default); slurm: one SLURM job per run through submitit, requeued "
                        "on preemption/timeout and resumed from its checkpoint; submitit-local: the same jobs through "
                        "submitit's local executor")
    g = p.add_argument_group("slurm (--launcher slurm)")
    g.add_argument("--slurm-partition", default=None)
    g.add_argument("--slurm-time-min", type=int, default=24 * 60, help="job time limit in minutes (default 1440)")
    g.add_argument("--slurm-gpus", type=int, default=None, help="GPUs per job")
    g.add_argument("--slurm-cpus", type=int, default=None, help="CPUs per job")
    g.add_argument("--slurm-mem-gb", type=int, default=None)
    g.add_argument("--slurm-signal-delay-s", type=int, default=120,
                   help="seconds before the time limit at which the job checkpoints and requeues (default 120)")


def slurm_options(a: argparse.Namespace) -> dict:
    return {"timeout_min": a.slurm_time_min, "partition": a.slurm_partition, "gpus": a.slurm_gpus,
            "cpus": a.slurm_cpus, "mem_gb": a.slurm_mem_gb, "signal_delay_s": a.slurm_signal_delay_s}


def sweep_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="petl-bench sweep", allow_abbrev=False,
                                description="Run the grid of a sweep file (experiments/<name>.yaml), skipping finished "
                                            "runs, recording failed ones; see petl_bench/bench/sweep.py.")
    p.add_argument("file", help="sweep file, e.g. experiments/synthetic.yaml")
    p.add_argument("--datasets", nargs="+", default=None, help="only these datasets of the sweep")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 instead of the file's")
    p.add_argument("--export-wandb-sweep", metavar="OUT.yaml", default=None,
                   help="write the grid as a W&B sweep config (agents call `petl-bench run --sweep FILE`) and stop")
    add_execution_args(p)
    a = p.parse_args(argv)
    spec = SweepSpec.load(a.file).narrowed(a.datasets, a.methods, None if a.seeds is None else range(a.seeds))
    if a.export_wandb_sweep:
        path = export_wandb_sweep(spec, a.export_wandb_sweep, a.results)
        print(f"wrote {path}: wandb sweep {path}  then  wandb agent <entity>/<project>/<sweep id>")
        return 0
    return run_sweep(spec, a.results, parallel=a.parallel, force=a.force, dry_run=a.dry_run, report=not a.no_report,
                     launcher=a.launcher, slurm=slurm_options(a), start=a.start)


def bench_spec_path(dataset: str) -> Path:
    path = REPO_DIR / "experiments" / f"{dataset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (REPO_DIR / "experiments").glob("*.yaml"))
        raise FileNotFoundError(f"no benchmark sweep for {dataset!r}: expected {path}; sweeps: {', '.join(known)}")
    return path


def iter_specs(paths: Iterable[str | Path] | None = None) -> list[SweepSpec]:
    """The given sweep files, or every experiments/*.yaml."""
    paths = list(paths or sorted((REPO_DIR / "experiments").glob("*.yaml")))
    return [SweepSpec.load(p) for p in paths]
