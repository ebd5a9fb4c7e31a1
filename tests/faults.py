"""A callback that injects real faults into a training process (tests only), steered by environment variables.

- ``PETL_FAULT_SIGNAL=<step>:<signal number>``: the process sends itself that signal once ``global_step`` reaches
  ``step`` (SIGTERM, SIGUSR1, SIGKILL: exactly what a scheduler or the OOM killer would deliver).
- ``PETL_FAULT_SLEEP=<seconds>``: sleep after every training batch (keeps a run alive while a test signals it).
- ``PETL_FAULT_PIDFILE=<path>``: write the training process's pid there at fit start.
- ``PETL_FAULT_TRACE=<path>``: append ``step epoch batch_idx loss item-indices`` for every training batch.
"""

import os
import time

from lightning.pytorch.callbacks import Callback


class Faults(Callback):
    def on_fit_start(self, trainer, pl_module) -> None:
        if os.environ.get("PETL_FAULT_PIDFILE"):
            with open(os.environ["PETL_FAULT_PIDFILE"], "w") as file:
                file.write(str(os.getpid()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if os.environ.get("PETL_FAULT_TRACE"):
            with open(os.environ["PETL_FAULT_TRACE"], "a") as file:
                loss = outputs["loss"].item() if isinstance(outputs, dict) else float(outputs)
                file.write(f"{trainer.global_step} {trainer.current_epoch} {batch_idx} {loss!r} "
                           f"{batch['index'].tolist()}\n")
        if os.environ.get("PETL_FAULT_SLEEP"):
            time.sleep(float(os.environ["PETL_FAULT_SLEEP"]))
        spec = os.environ.get("PETL_FAULT_SIGNAL")
        if spec:
            step, signum = (int(v) for v in spec.split(":"))
            if trainer.global_step == step:
                os.kill(os.getpid(), signum)
