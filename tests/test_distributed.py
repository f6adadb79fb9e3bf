"""A real two-process launch on CPU (gloo collectives), each process with two devices."""

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

from megacontext_jax.training.metrics import read_metrics
from tests.conftest import train_cli

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir: Path, corpus: Path, steps: int, *extra: str) -> list[subprocess.Popen]:
    port = _free_port()
    cmd = [
        *train_cli(workdir, corpus, steps),
        "--config.distributed=true",
        "--config.train.log_every=1",
        *extra,
    ]
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(rank),
        )
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def _results(procs: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def test_two_process_training_stops_together_on_sigterm_and_resumes(tmp_path, corpus_dir):
    """A preemption notice to one host: both stop before the same step (JAX's preemption sync
    point) and save it together; the resumed run picks up each process's own data shard."""
    workdir = tmp_path / "run"
    procs = _start(workdir, corpus_dir, 1000, "--config.train.checkpoint_every=100000")
    seen = ""
    while not re.search(r"\b([3-9]|\d\d+)/1000\b", seen):  # process 0's bar: a few steps
        char = procs[0].stderr.read(1)
        assert char, seen[-3000:]
        seen += char
    procs[1].send_signal(signal.SIGTERM)
    stopped = _results(procs)
    saved = []
    for result in stopped:
        assert result.returncode == 130, result.stderr[-3000:]
        saved += re.findall(r"interrupted: saving a checkpoint at step (\d+)", result.stdout)
    assert len(saved) == 2 and saved[0] == saved[1], [r.stdout[-500:] for r in stopped]
    step = int(saved[0])
    resumed = _results(_start(workdir, corpus_dir, step + 2))
    for result in resumed:
        assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"from step {step}" in resumed[0].stdout and f"done: step {step + 2}" in resumed[0].stdout
    )
    losses = {
        r["step"]: r["train/loss"]
        for r in read_metrics(workdir / "metrics.jsonl")
        if "train/loss" in r
    }
    assert sorted(losses) == list(range(1, step + 3))
    # Each process saved (and resumed) the iterator state of its own data shard.
    data_dir = workdir / "checkpoints" / str(step + 2) / "data"
    states = [json.loads((data_dir / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert states[0] == states[1] == {"next_index": step + 2}  # one local batch per step
