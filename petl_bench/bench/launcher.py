"""Starting a sweep's runs without paying Python's imports for each one.

A ``petl-bench run`` process spends about 6.4 s importing torch, Lightning, open_clip, W&B and the suite before it
builds anything (measured on the 2-core CPU machine: ``import petl_bench.cli, petl_bench.bench.run``), a fifth of a
synthetic run. A local sweep therefore starts one *fork server* — ``python -m petl_bench.bench.launcher``, a fresh
interpreter started with the sweep's environment — which imports those modules once and then forks one child per run.
Each run is still a process of its own: its own memory, seed, signals, session and exit status; a crash stays in it.
What it shares with a fresh ``python -m petl_bench.cli run`` is everything that matters to the run: the same
arguments (``sys.argv`` too, so Lightning's DDP launcher re-executes the same command), environment, working
directory and modules; it only skips re-importing them. ``--start fresh`` (sweeps, ``make bench``) goes back to one
new interpreter per run.

Protocol (one JSON object per line): the sweep writes ``{"id", "argv", "stdout", "stderr", "env", "cwd"}`` to the
server's stdin; the server answers ``{"id", "pid"}`` once it has forked, and ``{"pid", "returncode"}`` when that child
has ended (a negative code: killed by that signal, like `subprocess.Popen.returncode`). Closing stdin stops the
server; its running children go on, as a sweep's subprocesses would.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Self

# What every run imports anyway (the difference of sys.modules before and after a run): W&B's launch package alone
# costs 0.9 s at each run's wandb.init. Method-specific libraries (peft for LoRA) stay out, so that a run's recorded
# peak memory counts only what that run loads.
PRELOAD = ("petl_bench.cli", "petl_bench.bench.run", "petl_bench.bench.wandb_logging", "petl_bench.metrics",
           "petl_bench.data.datamodule", "petl_bench.data.synthetic", "petl_bench.data.datasets", "petl_bench.module",
           "petl_bench.methods", "petl_bench.checkpoint", "petl_bench.pretrain", "decord", "av", "wandb.sdk.launch")
CLI_ENTRY = "petl_bench.cli:main"
START_ENV = "PETL_BENCH_PROCESS_START"
READY_TIMEOUT_S = 300.0
POLL_S = 0.2


class LauncherError(RuntimeError):
    """The fork server could not be started or has died."""


# ------------------------------------------------------------------------------------------------- sweep side
class ForkedRun:
    """A run forked by the server: the part of `subprocess.Popen` a sweep uses (pid, wait, poll, returncode)."""

    def __init__(self):
        self.pid: int | None = None
        self.returncode: int | None = None
        self._started = threading.Event()
        self._ended = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"run pid {self.pid}", timeout)
        return self.returncode


class ForkServer:
    """One fork server for the runs of a sweep (see the module docstring); a context manager."""

    def __init__(self, env: dict[str, str] | None = None, preload: tuple[str, ...] = PRELOAD):
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "petl_bench.bench.launcher", *preload],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ if env is None else env),
        )
        self._lock = threading.Lock()
        self._pending: dict[int, ForkedRun] = {}  # request id -> run not yet forked
        self._running: dict[int, ForkedRun] = {}  # pid -> run not yet ended
        self._next_id = 0
        ready = threading.Event()
        self._ready_error: str | None = None

        def read() -> None:
            for raw in self._proc.stdout:
                msg = json.loads(raw)
                if "ready" in msg:
                    ready.set()
                elif "id" in msg:
                    with self._lock:
                        run = self._pending.pop(msg["id"])
                        if msg.get("pid") is None:  # the fork itself failed
                            run.returncode = 127
                            run._started.set()
                            run._ended.set()
                            continue
                        run.pid = msg["pid"]
                        self._running[run.pid] = run
                    run._started.set()
                elif "returncode" in msg:
                    with self._lock:
                        run = self._running.pop(msg["pid"])
                    run.returncode = msg["returncode"]
                    run._ended.set()
            # the server is gone: nothing will report on the runs it still had
            self._ready_error = f"the fork server exited with status {self._proc.wait()}"
            ready.set()
            with self._lock:
                orphans = [*self._pending.values(), *self._running.values()]
                self._pending.clear()
                self._running.clear()
            for run in orphans:
                run._started.set()
                run._ended.set()

        self._reader = threading.Thread(target=read, name="petl-bench-fork-server", daemon=True)
        self._reader.start()
        if not ready.wait(READY_TIMEOUT_S) or self._ready_error:
            self.close()
            raise LauncherError(f"{self._ready_error or 'the fork server did not start'}; its errors are above "
                                "(run with --start fresh to start each run as a new interpreter)")

    def launch(self, argv: list[str], stdout: Path, stderr: Path, env: dict[str, str] | None = None,
               cwd: str | None = None, entry: str = CLI_ENTRY) -> ForkedRun:
        """Fork ``petl-bench <argv>`` with its output in the two files; returns once it runs (its pid is known).

        ``entry``: the ``module:function(argv) -> exit status`` the child calls (``petl_bench.cli:main``).
        """
        run = ForkedRun()
        with self._lock:
            if self._proc.poll() is not None:
                raise LauncherError(f"the fork server has exited (status {self._proc.returncode})")
            request_id, self._next_id = self._next_id, self._next_id + 1
            self._pending[request_id] = run
            request = {"id": request_id, "argv": list(argv), "stdout": str(stdout), "stderr": str(stderr),
                       "env": dict(os.environ if env is None else env), "cwd": cwd or os.getcwd(), "entry": entry}
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            self._proc.stdin.flush()
        run._started.wait()
        if run.pid is None and run.returncode is None:
            raise LauncherError(self._ready_error or "the fork server died before starting the run")
        return run

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ server side
def _send(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())  # small lines: one write each, never interleaved


def _leave_server_resources() -> None:
    """Temporary folders the server made while importing are the server's: a child's exit must not delete them.

    W&B creates its media folder at import and registers its removal with `atexit`; run in the first child to exit,
    that removal broke every later run's W&B logging (measured: FileNotFoundError on ``...wandb-media/*.table.json``).
    The same holds for any `weakref.finalize` (e.g. `tempfile.TemporaryDirectory`) made before the fork.
    """
    import atexit

    media = sys.modules.get("wandb.sdk.data_types._private")
    if media is not None and hasattr(media, "MEDIA_TMP"):
        atexit.unregister(media.MEDIA_TMP.cleanup)
    for finalizer in list(getattr(weakref.finalize, "_registry", {})):
        finalizer.atexit = False


def _child(request: dict) -> None:
    """In the forked child: become the run's own process (session, files, environment, argv), run it, exit."""
    code = 1
    try:
        os.setsid()  # a session of its own, as the sweep gives its subprocesses: stop_all signals the whole group
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(target, fd)
            os.close(target)
        # new file objects: the server's may hold locks or buffered bytes of its own
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - fd 0 lives as long as the process
        sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
        _leave_server_resources()
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[START_ENV] = "fork"  # the run record says how its process started (see `petl_bench.bench.run`)
        os.chdir(request["cwd"])
        import importlib
        import random

        import __main__

        random.seed()  # a fresh interpreter's python RNG is seeded from the OS; runs seed everything they use anyway
        module_name, _, function = request.get("entry", CLI_ENTRY).partition(":")
        module = importlib.import_module(module_name)
        sys.argv = [module.__file__, *request["argv"]]
        __main__.__spec__ = module.__spec__  # Lightning's DDP launcher re-runs `python -m <module> <argv>`
        code = getattr(module, function)(list(request["argv"]))
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | type(None)):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the child must reach os._exit, with the traceback in its stderr
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        import atexit

        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # what a normal interpreter exit does (W&B, logging)
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def serve(preload: list[str]) -> None:
    """The server loop: import ``preload``, then fork a child per request line until stdin closes."""
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C is the sweep's to handle: it stops the runs itself
    for module in preload:
        importlib.import_module(module)
    if threading.active_count() != 1:
        # forking a process with threads could copy a held lock into the child; refuse rather than risk a hang
        raise SystemExit(f"fork server: importing {preload} started threads {threading.enumerate()}; use --start "
                         "fresh")
    _send({"ready": True})
    buffer, open_input, children = b"", True, 0
    while open_input or children:
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children -= 1
            _send({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)})
        if not open_input:
            if children:
                select.select([], [], [], POLL_S)
            continue
        readable, _, _ = select.select([0], [], [], POLL_S)
        if not readable:
            continue
        chunk = os.read(0, 1 << 20)
        if not chunk:
            open_input = False
            continue
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            try:
                pid = os.fork()
            except OSError as error:
                print(f"fork server: cannot fork run {request['argv']}: {error}", file=sys.stderr)
                _send({"id": request["id"], "pid": None})
                continue
            if pid == 0:
                _child(request)  # never returns
            children += 1
            _send({"id": request["id"], "pid": pid})


if __name__ == "__main__":
    serve(sys.argv[1:])
