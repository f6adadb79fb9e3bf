"""A few trials of the crash benchmark: SIGKILL mid-ingest, then reopen, deep-verify, compare."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tree_survives_sigkill_during_ingest(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/crash_ingest.py", "--trials", "3", "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "survived 3/3"
