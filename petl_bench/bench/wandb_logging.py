"""Weights & Biases for benchmark runs: a WandbLogger that never blocks on the network, and a run's final record.

The trainer configs (``configs/trainer/*.yaml``) put `BenchWandbLogger` beside a CSVLogger, so every run logs to W&B:

* mode: ``WANDB_MODE`` when set (``online``, ``offline``, ``disabled``); otherwise online when the user is logged in
  (``WANDB_API_KEY`` or a netrc entry for the W&B host) and offline when not. An online start that fails or times out
  (``init_timeout``, 30 s) falls back to offline with a warning, so a run never waits on a dead network; offline
  folders upload later with ``wandb sync``.
* ``petl-bench run`` binds the logger to its run before anything is logged (`BenchWandbLogger.bind_run`): the W&B
  folder goes under the run's ``default_root_dir`` (``<root>/wandb/offline-run-*``), runs are grouped by dataset,
  named by method (or sweep label) and tagged with backbone and seed.
* At the end, `publish_record` writes the record into the run summary under stable keys (``test/t2v/R@1``,
  ``params/trainable``, ``params/total``, ``efficiency/train_seconds``, ...; see `petl_bench.bench.records`), the
  run's axes into its config, and the results row as a ``wandb.Table`` (key ``results``).
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_warn

from petl_bench.bench.records import RESULT_COLUMNS, result_row, summary_from_record

DEFAULT_PROJECT = "petl-bench"
WANDB_MODES = ("online", "offline", "disabled")


def wandb_logged_in() -> bool:
    """True when W&B credentials are present (env or netrc). Reads files only; never touches the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else [Path.home() / ".netrc", Path.home() / "_netrc"]
    for path in candidates:
        try:
            if netrc.netrc(path).authenticators(host):
                return True
        except (FileNotFoundError, netrc.NetrcParseError, OSError):
            continue
    return False


def resolve_wandb_mode(mode: str | None = None) -> str:
    """The mode a run uses: an explicit `mode`, else ``WANDB_MODE``, else online only when logged in."""
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in WANDB_MODES:
        raise ValueError(f"W&B mode {mode!r} (WANDB_MODE or the logger's mode) is not one of {', '.join(WANDB_MODES)}")
    return mode


class BenchWandbLogger(WandbLogger):
    """`WandbLogger` with the benchmark's defaults; see the module docstring.

    Args:
        project: W&B project (default ``WANDB_PROJECT``, else ``petl-bench``).
        save_dir: folder that receives ``wandb/`` when the logger is used outside ``petl-bench run`` (which moves it to
            the run's ``default_root_dir``).
        mode: ``online`` / ``offline`` / ``disabled``; None picks as described above.
        init_timeout: seconds an online start may take before falling back to offline.
        name, group, job_type, tags, notes, entity: as in ``wandb.init``.
    """

    def __init__(self, project: str | None = None, save_dir: str = "logs", name: str | None = None,
                 group: str | None = None, job_type: str | None = None, tags: list[str] | None = None,
                 notes: str | None = None, entity: str | None = None, mode: str | None = None,
                 init_timeout: float = 30.0, log_model: bool = False, prefix: str = "") -> None:
        extra: dict[str, Any] = {k: v for k, v in {"group": group, "job_type": job_type, "tags": tags, "notes": notes,
                                                    "entity": entity}.items() if v is not None}
        super().__init__(name=name, save_dir=save_dir, project=project or os.environ.get("WANDB_PROJECT")
                         or DEFAULT_PROJECT, log_model=log_model, prefix=prefix, **extra)
        self._wandb_init.pop("anonymous", None)  # deprecated in wandb; passing it only prints a warning
        self._requested_mode = mode
        self._init_timeout = init_timeout

    def bind_run(self, save_dir: str | Path, name: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, config: dict | None = None) -> None:
        """Set where and under which name the W&B run is created; only before the run has started.

        The run id is kept in ``<save_dir>/wandb/run_id``: a resumed run continues the same W&B run.
        """
        if self._experiment is not None:
            raise RuntimeError("BenchWandbLogger.bind_run: the W&B run has already started; bind before fit/test")
        self._save_dir = os.fspath(save_dir)
        self._wandb_init["dir"] = self._save_dir
        id_file = Path(save_dir) / "wandb" / "run_id"
        if id_file.is_file() and id_file.read_text().strip():
            run_id = id_file.read_text().strip()
        else:
            import secrets

            from petl_bench.atomic import write_text_atomic

            run_id = secrets.token_hex(4)  # W&B's own ids are 8 lower-case characters too

            write_text_atomic(id_file, run_id + "\n")
        self._wandb_init.update(id=run_id, resume="allow")
        for key, value in (("name", name), ("group", group), ("tags", tags), ("config", config)):
            if value is not None:
                self._wandb_init[key] = value
        if name is not None:
            self._name = name

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            import wandb

            Path(self._save_dir).mkdir(parents=True, exist_ok=True)
            mode = resolve_wandb_mode(self._requested_mode)
            self._wandb_init.update(mode=mode, settings=wandb.Settings(init_timeout=self._init_timeout,
                                                                       silent=True))
            if mode == "online":
                try:
                    return WandbLogger.experiment.fget(self)
                except Exception as err:  # noqa: BLE001 - network error, timeout, rejected key: never stop the run
                    rank_zero_warn(f"W&B online start failed ({type(err).__name__}: {err}); logging offline under "
                                   f"{self._save_dir}/wandb (upload later with `wandb sync`)")
                    self._experiment = None
                    self._wandb_init["mode"] = "offline"
        return WandbLogger.experiment.fget(self)

    @property
    def active_run(self):
        """The W&B run once started and until `finish`; None otherwise (unlike ``experiment``, never starts one)."""
        return self._experiment

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run (flushes the offline files); a no-op when it never started. A non-zero `exit_code`
        marks the run failed (a stopped or crashed run is never reported as finished)."""
        if self._experiment is not None:
            self._experiment.finish(exit_code=exit_code)
            self._experiment = None

    @property
    def mode(self) -> str:
        """The mode this logger's run uses (or will use)."""
        return self._wandb_init.get("mode") or resolve_wandb_mode(self._requested_mode)


def publish_record(logger: WandbLogger, record: dict) -> None:
    """Put a finished run's record into its W&B run: axes into the config, numbers into the summary, a table row."""
    import wandb

    run = logger.experiment
    axes = {k: record.get(k) for k in ("method", "label", "dataset", "backbone", "pretrained", "seed")}
    run.config.update({**axes, "data": record.get("data"), "cli": record.get("config")}, allow_val_change=True)
    for key, value in summary_from_record(record).items():
        run.summary[key] = value
    run.log({"results": wandb.Table(columns=list(RESULT_COLUMNS), data=[result_row(record)])})
