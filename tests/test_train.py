import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megacontext_jax.training.checkpoint import Checkpointer, CheckpointError
from megacontext_jax.training.loop import train
from megacontext_jax.training.metrics import read_metrics
from megacontext_jax.training.restore import load_model
from tests.conftest import signal_when, tiny_config, tiny_mc_config, train_cli

ROOT = Path(__file__).resolve().parents[1]


def _losses(workdir):
    return {
        r["step"]: r["train/loss"]
        for r in read_metrics(workdir / "metrics.jsonl")
        if "train/loss" in r
    }


def test_resume_is_exact(tmp_path, corpus_dir):
    """2n steps in one run == n steps, a restart, and n more: params, optimizer and data round-trip."""
    straight = tmp_path / "straight"
    train(tiny_config(straight, corpus_dir, steps=8), progress=False)
    resumed = tmp_path / "resumed"
    first = train(tiny_config(resumed, corpus_dir, steps=8), stop_at=4, progress=False)
    assert first["step"] == 4
    second = train(tiny_config(resumed, corpus_dir, steps=8), progress=False)
    assert second["step"] == 8
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == list(range(1, 9))
    np.testing.assert_array_equal([b[s] for s in range(1, 9)], [a[s] for s in range(1, 9)])
    assert second["val/loss"] == _last_val(straight)


def _last_val(workdir):
    return [r["val/loss"] for r in read_metrics(workdir / "metrics.jsonl") if "val/loss" in r][-1]


def test_training_learns_and_writes_artifacts(tmp_path, corpus_dir):
    summary = train(
        tiny_config(tmp_path, corpus_dir, steps=40, lr=1e-2, eval_every=40), progress=False
    )
    losses = _losses(tmp_path)
    assert np.mean([losses[s] for s in range(36, 41)]) < 0.6 * losses[1]
    assert summary["val/bpb"] < summary["val/unigram_bpb"]
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert any((tmp_path / "tb").iterdir())
    assert (tmp_path / "checkpoints" / "40").is_dir()


def test_muon_optimizer_trains(tmp_path, corpus_dir):
    summary = train(tiny_config(tmp_path, corpus_dir, steps=3, optimizer="muon"), progress=False)
    assert np.isfinite(summary["train/loss"])


def test_checkpoint_errors(tmp_path, corpus_dir):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(tmp_path / "missing")
    train(tiny_config(tmp_path, corpus_dir, steps=1), progress=False)
    other = tiny_config(tmp_path, corpus_dir, steps=1)
    other.model.width = 64
    with pytest.raises(CheckpointError, match=r"holds a run with model\.width=32, not 64"):
        train(other, progress=False)


SHARDING_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from megacontext_jax.training import sharding
    from megacontext_jax.training.step import make_trainable, make_train_step
    from tests.conftest import tiny_config

    assert jax.device_count() == 4
    config = tiny_config("/unused", {corpus!r})
    rng = np.random.default_rng(0)
    batches = [
        {{"inputs": rng.integers(0, 256, (4, 32)).astype(np.int32),
          "targets": rng.integers(0, 256, (4, 32)).astype(np.int32),
          "mask": np.ones((4, 32), bool)}}
        for _ in range(3)
    ]

    def run(mesh):
        t = make_trainable(config, mesh)
        step, state = make_train_step(t), t.init()
        losses = []
        for b in batches:
            state, m = step(state, sharding.global_batch(b, mesh))
            losses.append(float(m["loss"]))
        return losses, state

    one, _ = run(sharding.make_mesh(devices=jax.devices()[:1]))
    dp, state_dp = run(sharding.make_mesh(data=4))
    fsdp, state_fsdp = run(sharding.make_mesh(data=2, fsdp=2))
    np.testing.assert_allclose(dp, one, rtol=1e-5)
    np.testing.assert_allclose(fsdp, one, rtol=1e-5)
    kernel = state_fsdp.params["blocks"][0]["mlp"]["up"]["kernel"].value
    assert "fsdp" in str(kernel.sharding.spec), kernel.sharding
    shards = kernel.addressable_shards
    assert len(shards) == 4 and shards[0].data.shape != kernel.shape
    print("losses", one, dp, fsdp)
    """
)


def test_sharded_step_matches_single_device(corpus_dir):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    script = SHARDING_SCRIPT.format(root=str(ROOT), corpus=str(corpus_dir))
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "losses" in result.stdout


@pytest.mark.slow
def test_cli_train_then_decode(tmp_path, corpus_dir):
    workdir = tmp_path / "run"
    train_cmd = train_cli(workdir, corpus_dir, steps=3)
    result = subprocess.run(train_cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: step 3" in result.stdout
    decode_cmd = [sys.executable, "decode.py", "--checkpoint", str(workdir), "--prompt", "the qu"]
    result = subprocess.run(
        [*decode_cmd, "--max-new-tokens", "20", "--temperature", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("the qu") and len(result.stdout) > len("the qu\n")
    missing = subprocess.run(
        [sys.executable, "decode.py", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1
    assert (
        missing.stderr.strip()
        == f"error: no checkpoint at {tmp_path / 'nope'}: config.json not found"
    )


@pytest.mark.slow
def test_sigterm_checkpoints_between_steps_and_resumes(tmp_path, corpus_dir):
    """A preemption notice stops the run after a whole step, with a checkpoint to resume from."""
    workdir = tmp_path / "run"
    every = ["--config.train.log_every=1", "--config.train.checkpoint_every=100000"]
    process = subprocess.Popen(
        [*train_cli(workdir, corpus_dir, steps=100000), *every],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    status, seen = signal_when(process, r"\b([5-9]|\d\d+)/100000", signal.SIGTERM)  # a few steps
    assert status == 130, seen[-2000:]
    saved = re.search(r"interrupted: saving a checkpoint at step (\d+)", process.stdout.read())
    assert saved, seen[-2000:]
    step = int(saved.group(1))
    assert Checkpointer(workdir).latest_step() == step
    result = subprocess.run(
        [*train_cli(workdir, corpus_dir, steps=step + 2), *every],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"workdir   {workdir} (resuming from step {step};" in result.stdout
    assert f"done: step {step + 2}" in result.stdout


@pytest.mark.slow
def test_sigterm_during_start_up_stops_before_any_step(tmp_path, corpus_dir):
    """A preemption notice during start-up (here: once the start-up block is out, while the
    step compiles) ends the run at once: no step runs, nothing is saved, one line. Before, the
    run compiled and ran a step and saved it first (67-72 s with the default config)."""
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        train_cli(workdir, corpus_dir, steps=1000),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = ""
    while "\nconfig " not in seen:  # the start-up block's last line, on stdout
        char = process.stdout.read(1)
        assert char, seen[-2000:]
        seen += char
    process.send_signal(signal.SIGTERM)
    seen += process.stdout.read()
    status = process.wait(timeout=120)
    assert status == 130, seen[-2000:]
    assert seen.rstrip().endswith("interrupted; rerun the same command to resume"), seen[-2000:]
    assert "Traceback" not in seen and "FATAL" not in seen, seen[-2000:]
    assert not any((workdir / "checkpoints").iterdir())
    assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl")] == [0]


def test_resume_with_a_changed_shape_fails_before_writing(tmp_path, corpus_dir):
    """A resume whose config changes what the checkpoints hold stops with one line naming the
    field and both values, and leaves config.json as it was (decode still opens the run)."""
    train(tiny_mc_config(tmp_path, corpus_dir, steps=1), progress=False)
    before = (tmp_path / "config.json").read_text()
    for field, value in (("mc.gist.depth", 3), ("mc.block_size", 8), ("model.width", 64)):
        other = tiny_mc_config(tmp_path, corpus_dir, steps=2)
        other.unlock()
        group, _, leaf = field.rpartition(".")
        node = other
        for part in group.split("."):
            node = node[part]
        old = node[leaf]
        node[leaf] = value
        with pytest.raises(CheckpointError, match=rf"holds a run with {field}={old}, not {value}"):
            train(other, progress=False)
        assert (tmp_path / "config.json").read_text() == before
    load_model(tmp_path)  # the intact checkpoint still opens


def test_resuming_a_finished_run_says_so(tmp_path, corpus_dir, capsys):
    train(tiny_config(tmp_path, corpus_dir, steps=3), progress=False)
    capsys.readouterr()
    summary = train(tiny_config(tmp_path, corpus_dir, steps=3), progress=False)
    assert summary["finished"] and summary["step"] == 3
    assert np.isfinite(summary["val/bpb"])
    assert "is a finished run (step 3 of train.steps=3)" in capsys.readouterr().out


def _rows(workdir):
    """metrics.jsonl without the timing series (tokens/s differ from run to run)."""
    return [
        {k: v for k, v in r.items() if not k.endswith("tokens_per_s")}
        for r in read_metrics(workdir / "metrics.jsonl")
    ]


def test_a_resumed_run_logs_the_rows_of_one_that_never_stopped(tmp_path, corpus_dir):
    """Stopped between log records (the steps since the last record travel in the checkpoint),
    or killed after logging past its last checkpoint (those rows are dropped and logged again):
    either way metrics.jsonl ends up row for row that of an uninterrupted run."""

    def config(workdir):
        return tiny_config(workdir, corpus_dir, steps=9, log_every=3, checkpoint_every=4)

    train(config(tmp_path / "straight"), progress=False)
    stopped = tmp_path / "stopped"
    train(config(stopped), stop_at=5, progress=False)  # steps 4-5 unlogged at the stop
    train(config(stopped), progress=False)
    assert _rows(stopped) == _rows(tmp_path / "straight")

    killed = tmp_path / "killed"
    train(config(killed), stop_at=7, progress=False)  # logs step 6, checkpoints 4 and 7
    shutil.rmtree(killed / "checkpoints" / "7")  # as if killed before step 7's save landed
    train(config(killed), progress=False)
    assert _rows(killed) == _rows(tmp_path / "straight")


def test_a_fresh_start_never_appends_to_an_earlier_runs_metrics(tmp_path, corpus_dir, capsys):
    train(tiny_config(tmp_path, corpus_dir, steps=2), progress=False)
    first = _rows(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "checkpoints").mkdir()  # an empty checkpoints/ folder
    capsys.readouterr()
    train(tiny_config(tmp_path, corpus_dir, steps=2), progress=False)
    assert "has metrics but no checkpoint; they are kept as metrics.previous.jsonl" in (
        capsys.readouterr().out
    )
    previous = [
        {k: v for k, v in r.items() if not k.endswith("tokens_per_s")}
        for r in read_metrics(tmp_path / "metrics.previous.jsonl")
    ]
    assert previous == first and (tmp_path / "tb.previous").is_dir()
    steps = [r["step"] for r in _rows(tmp_path)]
    assert steps == sorted(steps) and steps.count(0) == 1  # one run in the file
