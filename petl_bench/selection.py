"""Which weights a run tests, and why: the best validation epoch when there is a validation split, else the last.

- `BestCheckpoint`: a `ModelCheckpoint` keeping ``<default_root_dir>/checkpoints/best.ckpt``, the weights of the
  validation with the best ``monitor`` (default ``val/t2v/R@1``, higher is better), saved after each validation
  (never at a training epoch end, so a run without validation writes nothing). Trainable-only, like every checkpoint.
  The validation split is never the test split (`petl_bench.data.protocol`), so this choice cannot see the test set.
- `select_tested_weights`: after fit, loads the best weights into the model when a best checkpoint exists, and says
  what is tested: ``{"tested": "best" | "last" | "frozen", "reason": ..., "epoch", "global_step", "monitor",
  "score", "path"}``. The run then tests once, at the end (`petl_bench.bench.run`).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["BestCheckpoint", "select_tested_weights"]


class BestCheckpoint(ModelCheckpoint):
    """``best.ckpt`` in ``dirpath`` (default ``<default_root_dir>/checkpoints``): the best validation so far."""

    def __init__(self, monitor: str = "val/t2v/R@1", mode: str = "max", dirpath: str | None = None):
        super().__init__(dirpath=dirpath, filename="best", monitor=monitor, mode=mode, save_top_k=1, save_last=False,
                         save_on_train_epoch_end=False, enable_version_counter=False, auto_insert_metric_name=False)

    def bind(self, root: str | Path) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(root) / "checkpoints")

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.bind(trainer.default_root_dir)
        super().setup(trainer, pl_module, stage)


def _describe_monitor(monitor: str) -> str:
    parts = monitor.split("/")
    if len(parts) == 3 and parts[0] == "val":
        return f"val {parts[1].upper()} {parts[2]}"
    return monitor


def select_tested_weights(trainer, model, trained: bool = True) -> dict:
    """Load the best validation weights into ``model`` when the trainer kept some; describe what will be tested."""
    if not trained:
        return {"tested": "frozen", "reason": "nothing trains: the pretrained weights are tested"}
    best = next((cb for cb in trainer.callbacks if isinstance(cb, BestCheckpoint)), None)
    path = Path(best.best_model_path) if best is not None and best.best_model_path else None
    if path is None or not path.is_file():
        why = ("no validation ran (no validation split, or trainer.limit_val_batches=0)" if best is not None
               else "no BestCheckpoint callback in the trainer config")
        return {"tested": "last", "reason": f"last epoch (epoch {trainer.current_epoch - 1}, step "
                                            f"{trainer.global_step}): {why}",
                "epoch": trainer.current_epoch - 1, "global_step": trainer.global_step}
    from petl_bench.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path, weights_only=False)
    model.on_load_checkpoint(ckpt)  # checks the checkpoint belongs to this method, backbone and frame count
    model.load_state_dict(ckpt["state_dict"], strict=False)
    score = float(best.best_model_score) if best.best_model_score is not None else None
    epoch, step = int(ckpt.get("epoch", -1)), int(ckpt.get("global_step", -1))
    return {"tested": "best", "reason": f"best {_describe_monitor(best.monitor)} ({score:.2f}) at epoch {epoch}, "
                                        f"step {step}, of {trainer.current_epoch} epochs",
            "epoch": epoch, "global_step": step, "monitor": best.monitor, "score": score, "path": str(path)}
