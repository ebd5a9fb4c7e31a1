"""Stopping and resuming a run without changing its numbers.

- `ResumableLoader`: the training DataLoader. The order of epoch *e* is a permutation seeded by (seed, e), and every
  item reseeds Python's RNG from (seed, e, index) before it draws frames or a caption, so a batch is a function of
  (seed, epoch, step) alone: not of the worker that loads it, of how many workers there are, or of whether the process
  was restarted. It is *stateful* in Lightning's sense (``state_dict`` / ``load_state_dict``): Lightning stores how
  many batches of the epoch were consumed in the checkpoint and a resumed run skips exactly those, without loading
  them. Under DDP each rank takes its share of every global batch, so N processes see the batches of one process
  with N times the batch size.
- `RunCheckpoint`: a `ModelCheckpoint` keeping one file, ``<default_root_dir>/checkpoints/last.ckpt``, written every
  ``every_n_train_steps`` steps, at every epoch end, and when a run is stopped (SIGTERM, SIGUSR1, Ctrl-C or an error
  between batches). ``petl-bench run`` resumes from it; ``petl-bench fit --ckpt_path last`` finds it.
- `install_stop_signals`: SIGUSR1 (the preemption warning of SLURM and `--launcher slurm`) stops a run the way
  SIGTERM does; on SLURM with Lightning's auto-requeue, Lightning's own handler (checkpoint + requeue) is kept.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = ["NonFiniteLossError", "ResumableLoader", "RunCheckpoint", "RunStopped", "install_stop_signals"]

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: (seed, epoch) → well-spread generator seeds


def _mix(*values: int) -> int:
    out = 0
    for v in values:
        out = (out * _MIX + int(v) + 1) % (1 << 63)
    return out


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite training loss; raised by `RetrievalModule.training_step`, never checkpointed."""


class RunStopped(Exception):
    """A run stopped by a signal after saving its checkpoint; the exit status is 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: Path | None, loggers: list | None = None):
        self.signum, self.checkpoint, self.loggers = int(signum), checkpoint, list(loggers or [])
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        where = f"; rerun the same command to resume from {checkpoint}" if checkpoint else ""
        super().__init__(f"stopped by {name}{where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _KeyedItems(Dataset):
    """Items addressed by (seed, epoch, index) keys: the RNG the item draws with is seeded from the key."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):  # a plain index (inspection, tests): the item as the wrapped dataset gives it
            return self.dataset[key]
        seed, epoch, index = key
        random.seed(_mix(seed, epoch, index))  # frame draws (FrameLoader) and random captions use Python's RNG
        np.random.seed(_mix(seed, epoch, index) % (1 << 32))
        return self.dataset[index]

    def __getattr__(self, name):  # e.g. the datamodule reading attributes of its own dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class _EpochSampler(DistributedSampler):
    """Keys of one epoch: a (seed, epoch) permutation cut into global batches, this rank's share of each.

    A `DistributedSampler` for Lightning's sake only (so it is not replaced under DDP); it never calls its __init__:
    the world size is read when iterating, once the process group exists.
    """

    def __init__(self, size: int, batch_size: int, seed: int, drop_last: bool):
        self.size, self.batch_size, self.seed, self.drop_last = size, batch_size, seed, drop_last
        self.epoch, self.skip_batches = 0, 0

    @staticmethod
    def _world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _steps(self, world: int) -> int:
        per_step = self.batch_size * world
        return self.size // per_step if self.drop_last else -(-self.size // per_step)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at each epoch start, before the first batch
        self.epoch = epoch

    def __len__(self) -> int:
        world, _ = self._world()
        if world == 1 and not self.drop_last:
            return self.size  # one process: the last batch is simply short
        return self._steps(world) * self.batch_size

    def __iter__(self):
        world, rank = self._world()
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch)))
        order = order.tolist()
        steps = self._steps(world)
        per_step = self.batch_size * world
        # Several processes without drop_last: pad a short last batch by cycling, as DistributedSampler does, so that
        # every rank steps together. One process needs no padding: repeating items would put a pair into the same
        # contrastive batch twice (a false negative of itself) when the set is smaller than a batch.
        while world > 1 and len(order) < steps * per_step:
            order += order[:steps * per_step - len(order)]
        for step in range(self.skip_batches, steps):
            start = step * per_step + rank * self.batch_size
            for index in order[start:start + self.batch_size]:
                yield (self.seed, self.epoch, index)


class ResumableLoader(DataLoader):
    """The training DataLoader: seeded per (epoch, item), and resumable mid-epoch (see the module docstring).

    Args: as `DataLoader` (``shuffle`` is implied), plus ``seed`` (default: Lightning's ``PL_GLOBAL_SEED``, else 0).
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, drop_last: bool = False, seed: int | None = None,
                 **kwargs):
        import os

        kwargs.pop("shuffle", None)
        kwargs.pop("sampler", None)
        seed = int(os.environ.get("PL_GLOBAL_SEED", "0")) if seed is None else int(seed)
        items = dataset if isinstance(dataset, _KeyedItems) else _KeyedItems(dataset)
        super().__init__(items, batch_size=batch_size, drop_last=False,
                         sampler=_EpochSampler(len(items), batch_size, seed, drop_last), **kwargs)
        self._consumed = 0          # batches of the current epoch handed out
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches) from a checkpoint, applied once

    @classmethod
    def like(cls, loader: DataLoader, seed: int | None = None) -> ResumableLoader:
        """The same loader (dataset, batch size, workers, ...) made resumable."""
        return cls(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, seed=seed,
                   num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                   persistent_workers=loader.persistent_workers, worker_init_fn=loader.worker_init_fn)

    def __iter__(self):
        # a generator: nothing happens until the first batch is asked for, after Lightning's `set_epoch`
        sampler: _EpochSampler = self.sampler
        skip = 0
        if self._resume_at is not None and self._resume_at[0] == sampler.epoch:
            skip = self._resume_at[1]
        self._resume_at = None
        sampler.skip_batches = skip
        self._consumed = skip
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    # Lightning's `_Stateful` protocol: saved in the checkpoint's fit-loop state, restored before iterating
    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = (int(state["epoch"]), int(state["batches"]))


class RunCheckpoint(ModelCheckpoint):
    """One resumable checkpoint, ``last.ckpt``, in ``dirpath`` (default ``<default_root_dir>/checkpoints``).

    Written every ``every_n_train_steps`` optimizer steps, at every training epoch end, and when fit stops on an
    exception between two batches (SIGTERM / SIGUSR1 / Ctrl-C, a crash in validation) — never for a NaN loss, whose
    weights are not worth resuming. Trainable-only, like every checkpoint (`RetrievalModule.on_save_checkpoint`).
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 50):
        if every_n_train_steps < 1:
            raise ValueError(f"RunCheckpoint: every_n_train_steps must be >= 1, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps,
                         save_on_train_epoch_end=True, enable_version_counter=False)
        self.saved_on_stop: Path | None = None

    def bind(self, root: str | Path) -> None:
        """Place ``last.ckpt`` under ``root/checkpoints`` unless a folder was configured."""
        if self.dirpath is None:
            self.dirpath = str(Path(root) / "checkpoints")

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.bind(trainer.default_root_dir)
        super().setup(trainer, pl_module, stage)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        self._loader_states = (fit_loop.get("state_dict") or {}).get("combined_loader") or []

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning restores a stateful loader only when it builds the loader after the checkpoint is loaded; a
        # `configure_optimizers` that reads `estimated_stepping_batches` builds it earlier, so it is done here (before
        # the first batch is drawn; applying it twice is harmless)
        states, self._loader_states = getattr(self, "_loader_states", []), []
        loader = trainer.train_dataloader
        if states and isinstance(loader, ResumableLoader):
            loader.load_state_dict(states[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteLossError) or trainer.state.fn != "fit":
            return  # (validation inside fit counts: a crash there keeps the epoch just trained)
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if progress.ready != progress.completed:
            return  # a batch was half done: its state is not one an uninterrupted run ever had
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self.last_path.is_file():
            self.saved_on_stop = self.last_path


def install_stop_signals(trainer) -> None:
    """SIGUSR1 stops a run like SIGTERM (Lightning's flag, checked after each batch), except where Lightning's SLURM
    auto-requeue owns it. Call before `trainer.fit`; Lightning restores the previous handlers when fit ends."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment
    if isinstance(env, SLURMEnvironment) and env.auto_requeue:
        return

    def stop(signum, frame):
        trainer._signal_connector.received_sigterm = True
        trainer._stop_signal = signum

    signal.signal(signal.SIGUSR1, stop)
