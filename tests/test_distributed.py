"""A real two-process launch on CPU (gloo collectives), each process with two devices."""

import json
import os
import socket
import subprocess
from pathlib import Path

from megacontext_jax.metrics import read_metrics
from tests.conftest import train_cli

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, corpus: Path, steps: int) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    cmd = [
        *train_cli(workdir, corpus, steps),
        "--config.distributed=true",
        "--config.train.log_every=1",
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
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    return results


def test_two_process_training_and_resume(tmp_path, corpus_dir):
    workdir = tmp_path / "run"
    for result in _launch(workdir, corpus_dir, steps=3):
        assert result.returncode == 0, result.stderr[-3000:]
    resumed = _launch(workdir, corpus_dir, steps=5)
    for result in resumed:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "from step 3" in resumed[0].stdout and "done: step 5" in resumed[0].stdout
    losses = {
        r["step"]: r["train/loss"]
        for r in read_metrics(workdir / "metrics.jsonl")
        if "train/loss" in r
    }
    assert sorted(losses) == [1, 2, 3, 4, 5]
    # Each process saved (and resumed) the iterator state of its own data shard.
    data_dir = workdir / "checkpoints" / "5" / "data"
    states = [json.loads((data_dir / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert states[0] == states[1] == {"next_index": 5}  # one local batch per step
