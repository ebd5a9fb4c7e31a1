"""The fork server a local sweep starts its runs from (petl_bench/bench/launcher.py): each child must be the process a
fresh ``python -m petl_bench.cli`` would be — its own session, argv, environment, working directory, output files and
exit status — and must not break the server or the runs after it."""

import json
import os
import signal
import subprocess
import time

import pytest

from petl_bench.bench.launcher import PRELOAD, START_ENV, ForkServer
from petl_bench.bench.sweep import _signal_group

PROBE = "tests.launcher_probe:main"


@pytest.fixture(scope="module")
def server():
    with ForkServer(preload=(*PRELOAD, "tests.launcher_probe")) as s:
        yield s


def probe(server, tmp_path, *args, env=None, cwd=None, name="probe"):
    out = tmp_path / f"{name}.json"
    run = server.launch([str(out), *args], tmp_path / f"{name}.out", tmp_path / f"{name}.err", env=env, cwd=cwd,
                        entry=PROBE)
    return run, out


def test_a_child_is_a_fresh_run_in_all_that_matters(server, tmp_path):
    env = {**os.environ, "PETL_PROBE_VALUE": "from-the-request"}
    run, out = probe(server, tmp_path, "exit", "3", env=env, cwd=str(tmp_path))
    assert run.wait(timeout=60) == 3
    seen = json.loads(out.read_text())
    assert seen["env"]["PETL_PROBE_VALUE"] == "from-the-request"  # the request's environment, not the server's
    assert seen["env"][START_ENV] == "fork"
    assert seen["cwd"] == str(tmp_path)
    assert seen["argv"][1:] == [str(out), "exit", "3"] and seen["argv"][0].endswith("launcher_probe.py")
    assert seen["session_leader"] and seen["pid"] == run.pid
    assert seen["torch_preloaded"]  # what the server imported once
    assert "default_int_handler" in seen["sigint_handler"]  # the server ignores ^C; a run must not
    assert (tmp_path / "probe.out").read_text() == "probe stdout\n"
    assert (tmp_path / "probe.err").read_text() == "probe stderr\n"


def test_server_folders_outlive_each_child(server, tmp_path):
    """W&B makes its media folder at import and removes it at exit: the first run to exit once removed it for all."""
    for i in range(2):
        run, out = probe(server, tmp_path, name=f"run{i}")
        assert run.wait(timeout=60) == 0
        seen = json.loads(out.read_text())
        assert seen["wandb_media"] is not None and seen["wandb_media_exists"], f"run {i}"


def test_a_stopped_child_reports_the_signal(server, tmp_path):
    run, out = probe(server, tmp_path, "sleep", "60")
    deadline = time.monotonic() + 30
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_group(run.pid, signal.SIGTERM)
    assert run.wait(timeout=30) == -signal.SIGTERM
    slow, _ = probe(server, tmp_path, "sleep", "60", name="slow")
    with pytest.raises(subprocess.TimeoutExpired):
        slow.wait(timeout=0.1)
    _signal_group(slow.pid, signal.SIGKILL)
    assert slow.wait(timeout=30) == -signal.SIGKILL


def test_an_unknown_command_fails_like_the_cli(server, tmp_path):
    run = server.launch(["no-such-command"], tmp_path / "o", tmp_path / "e")
    assert run.wait(timeout=60) == 2
    assert "unknown command" in (tmp_path / "e").read_text()
