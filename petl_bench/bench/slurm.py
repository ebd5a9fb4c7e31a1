"""``--launcher slurm``: each run of a sweep as a SLURM job, through submitit, requeued when preempted or timed out.

A job runs the same ``petl-bench run`` command as the local launcher, in its run folder (logs appended to
``stdout.log`` / ``stderr.log``). When SLURM warns the job (submitit asks for ``USR2`` ``slurm_signal_delay_s``
seconds before the time limit; preemption sends it too), submitit calls `RunJob.checkpoint`: the run is sent SIGTERM,
saves ``last.ckpt`` and exits, and the job is requeued; the requeued job resumes from that checkpoint
(`petl_bench.resume`). SIGTERM from SLURM itself (scancel, preemption without warning) reaches the run directly and
has the same effect. ``--launcher submitit-local`` runs the same jobs through submitit's LocalExecutor (no SLURM).
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import time
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

STOP_GRACE_SECONDS = 60


class RunJob(Checkpointable):
    """One ``petl-bench run`` command as a submitit job; returns the result file's path."""

    def __init__(self, command: list[str], result: str, run_dir: str):
        self.command, self.result, self.run_dir = list(command), str(result), str(run_dir)
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> str:
        run_dir = Path(self.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "stdout.log", "a", encoding="utf-8") as out, \
                open(run_dir / "stderr.log", "a", encoding="utf-8") as err:
            self._proc = subprocess.Popen(self.command, stdout=out, stderr=err)
            code = self._proc.wait()
        if code != 0 or not Path(self.result).is_file():
            raise RuntimeError(f"{shlex.join(self.command)} exited with {code} (see {run_dir / 'stderr.log'})")
        return self.result

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """Preempted or timing out: the run saves its checkpoint (SIGTERM) before the same job is requeued."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
        return DelayedSubmission(type(self)(self.command, self.result, self.run_dir))

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._proc = None


def make_executor(folder: str | Path, cluster: str = "slurm", timeout_min: int = 24 * 60,
                  partition: str | None = None, gpus: int | None = None, cpus: int | None = None,
                  mem_gb: int | None = None, signal_delay_s: int = 120, max_num_timeout: int = 10):
    """A submitit executor for runs: ``cluster`` is ``slurm`` or ``local`` (submitit's LocalExecutor)."""
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster, slurm_max_num_timeout=max_num_timeout,
                                     local_max_num_timeout=max_num_timeout)
    params = {"timeout_min": timeout_min}
    if cluster == "slurm":
        params["slurm_signal_delay_s"] = signal_delay_s
        params.update({k: v for k, v in {"slurm_partition": partition, "gpus_per_node": gpus,
                                          "cpus_per_task": cpus, "mem_gb": mem_gb}.items() if v is not None})
    elif gpus:
        params["gpus_per_node"] = gpus
    executor.update_parameters(**params)
    return executor


def submit_run(executor, run) -> submitit.Job:
    executor.update_parameters(name=f"petl-{run.dataset}-{run.name}")
    return executor.submit(RunJob(run.command(), str(run.result), str(run.run_dir)))


def wait_for(jobs: dict, poll_s: float = 5.0):
    """Yield (run, job) as each job ends (finished, failed or cancelled)."""
    pending = dict(jobs)
    while pending:
        for key, (run, job) in list(pending.items()):
            if job.done():
                del pending[key]
                yield run, job
        if pending:
            time.sleep(poll_s)
