"""Checkpoints that survive faults and cannot be mistaken for another run's.

- `AtomicCheckpointIO`: Lightning's `TorchCheckpointIO`, but a checkpoint is written beside its destination and moved
  over it (as `petl_bench.atomic` does for records), so a full disk or a kill mid-write leaves the previous checkpoint
  whole; reading names the file when it is not a checkpoint (random bytes, empty, truncated).
- `read_checkpoint`: the same readable error for callers outside the Trainer (``petl-bench test --ckpt_path``).
- `check_identity`: a checkpoint is only loaded into the method, backbone and frame count that wrote it.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "CheckpointError", "check_identity", "checkpoint_identity", "read_checkpoint"]

# what must agree between a checkpoint and the module it is loaded into (the rest: the config given wins)
IDENTITY_KEYS = ("method", "backbone", "num_frames")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that belongs to another method / backbone / frame count."""


def read_checkpoint(path: str | Path, map_location: Any = "cpu", weights_only: bool | None = True,
                    mmap: bool = False) -> dict:
    """`torch.load` with an error naming the file when it is missing, empty or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted write? Delete it and resume from "
                              "another checkpoint, or retrain")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except (EOFError, IndexError, KeyError, ValueError, RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError,
            UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} ({path.stat().st_size} bytes) is not a readable PyTorch checkpoint "
                              f"(truncated or corrupt?): {type(err).__name__}: {err}") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` with atomic saves (temp file + rename) and loads that name the file on failure."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # the bytes are on disk before the name points at them
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        # Lightning's checkpoints hold a few plain objects (hyper-parameters, loop state); they are trusted because
        # they are this run's own files, as in TorchCheckpointIO's default
        return read_checkpoint(path, map_location=map_location or "cpu",
                               weights_only=False if weights_only is None else weights_only)


def checkpoint_identity(checkpoint: dict) -> dict:
    """The method (class path), backbone and frame count a checkpoint was written by, from what it records."""
    meta = dict(checkpoint.get("petl_bench") or {})
    hparams = checkpoint.get("hyper_parameters") or {}
    meta.setdefault("method", hparams.get("_class_path"))
    meta.setdefault("backbone", hparams.get("backbone"))
    meta.setdefault("num_frames", hparams.get("num_frames"))
    return {k: meta.get(k) for k in IDENTITY_KEYS}


def check_identity(checkpoint: dict, expected: dict, path: str | Path | None = None) -> None:
    """Refuse a checkpoint whose method, backbone or frame count differs from `expected` (None values: unknown)."""
    saved = checkpoint_identity(checkpoint)
    clashes = [f"{k}: checkpoint {saved[k]!r}, configured {expected[k]!r}" for k in IDENTITY_KEYS
               if saved.get(k) is not None and expected.get(k) is not None and saved[k] != expected[k]]
    if clashes:
        where = f"checkpoint {path}" if path else "the checkpoint"
        raise CheckpointError(f"{where} does not belong to the configured model ({'; '.join(clashes)}). Pass the "
                              "config it was trained with, or the checkpoint of the configured method")
