"""The fault-injection benchmark in small: one trial of each in-process fault class."""

import importlib
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def faults(monkeypatch):
    """``benchmarks/faults.py`` as a module. The benchmarks are scripts, not a package: faults.py
    imports its sibling ``crash_ingest`` from its own directory, put on the path for this test."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("faults")


def test_every_tree_fault_is_clean_or_detected_in_one_line(faults, tmp_path):
    table = faults.tree_trials(tmp_path, 0, np.random.default_rng(0), quick=True)
    assert set(table) == {*faults.FILE_FAULTS, "lock removed, two writers", "lock is a directory"}
    for kind, counts in table.items():
        assert sum(counts.values()) == 1, kind
        assert counts["traceback"] == counts["lost"] == 0, (kind, counts)
    # Every fault in committed data is an error, never data: these cannot be harmless.
    for kind in (
        "manifest deleted",
        "manifest garbage",
        "chunk deleted",
        "lock removed, two writers",
    ):
        assert table[kind]["detected"] == 1, kind


def test_every_checkpoint_fault_is_clean_or_detected(faults, tmp_path):
    table = faults.checkpoint_trials(tmp_path, 0, np.random.default_rng(0), quick=True)
    assert set(table) == {"step file flipped", "step file truncated", "step file deleted"}
    for kind, counts in table.items():
        assert sum(counts.values()) == 1, kind
        assert counts["traceback"] == counts["lost"] == 0, (kind, counts)
