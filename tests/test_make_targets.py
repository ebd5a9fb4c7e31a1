"""`make bench` writes only under results/ (ignored by git); refreshing the committed record is `make record`."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def dry_run(target: str) -> str:
    return subprocess.run(["make", "-n", target], cwd=REPO, check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_bench_and_report_never_write_the_committed_record():
    for target in ("bench", "report"):
        commands = dry_run(target)
        assert "experiments/" not in commands.replace("experiments/synthetic.yaml", ""), commands
        assert "--out" not in commands
    assert "--out experiments/synthetic" in dry_run("record")


def test_results_are_ignored_by_git():
    ignored = subprocess.run(["git", "check-ignore", "results/synthetic/report.md"], cwd=REPO, capture_output=True,
                             check=False)
    assert ignored.returncode == 0, "results/ must be git-ignored so that a user's bench leaves git status clean"
