"""Checkpoints under faults: damaged steps are detected and skipped, bad records are one line,
and an interrupted run resumes to exactly the run that never stopped (params and metrics)."""

import gc
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from megacontext_jax.training import sharding
from megacontext_jax.training.checkpoint import (
    DIGESTS,
    Checkpointer,
    CheckpointError,
    damage,
    write_config,
)
from megacontext_jax.training.loop import train
from megacontext_jax.training.metrics import read_metrics
from megacontext_jax.training.restore import load, load_model
from megacontext_jax.training.step import make_trainable
from tests.conftest import signal_when, tiny_config, tiny_mc_config

ROOT = Path(__file__).resolve().parents[1]


def _config(workdir, corpus, steps=4):
    return tiny_config(workdir, corpus, steps=steps, checkpoint_every=2, eval_every=100)


def _params(workdir, corpus, step: int):
    """The parameters saved at ``step`` (whichever step is the newest)."""
    trainable = make_trainable(_config(workdir, corpus), sharding.make_mesh())
    with Checkpointer(workdir, create=False) as checkpointer:
        state = checkpointer._restore(step, trainable.abstract_state(), None)[0]
    return jax.tree.leaves(state.params)


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_dir):
    """A 4-step run with checkpoints at steps 2 and 4, and the parameters of each."""
    workdir = tmp_path_factory.mktemp("ckpt") / "run"
    train(_config(workdir, corpus_dir), progress=False)
    return workdir, {s: _params(workdir, corpus_dir, s) for s in (2, 4)}


def _copy(run, tmp_path) -> Path:
    shutil.copytree(run[0], tmp_path / "run")
    return tmp_path / "run"


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):  # 3 bytes, as the issue did
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {"altered": _flip, "truncated": _truncate, "missing": Path.unlink}


def test_every_finalized_step_has_digests_that_hold(run):
    for step in (2, 4):
        assert (run[0] / "checkpoints" / str(step) / DIGESTS).is_file()
        assert damage(run[0] / "checkpoints" / str(step)) is None


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_latest_step_is_skipped_for_the_newest_intact_one(
    run, tmp_path, corpus_dir, kind, capsys
):
    """Decode/evaluate (load_model) and resume alike restore step 2 with one line naming what is
    wrong with step 4; a resume moves step 4 aside (never overwritten, never deleted) and
    retrains it to the very same parameters."""
    workdir = _copy(run, tmp_path)
    victim = _largest_file(workdir / "checkpoints" / "4")
    DAMAGE[kind](victim)
    name = str(victim.relative_to(workdir / "checkpoints" / "4"))
    assert damage(workdir / "checkpoints" / "4") == f"{name} is {kind}"

    model, _, step = load(workdir)
    assert step == 2
    for a, b in zip(jax.tree.leaves(nnx.state(model)), run[1][2], strict=True):
        np.testing.assert_array_equal(a, b)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"checkpoint {workdir / 'checkpoints'}: step 4 ({name} is {kind}) damaged; "
        "restored step 2, the newest intact one"
    ]

    summary = train(_config(workdir, corpus_dir), progress=False)
    assert summary["step"] == 4
    assert f"({name} is {kind}) damaged (moved to {workdir / 'checkpoints.damaged'})" in (
        capsys.readouterr().out
    )
    assert (workdir / "checkpoints.damaged" / "4" / DIGESTS).is_file()  # kept for inspection
    for a, b in zip(_params(workdir, corpus_dir, 4), run[1][4], strict=True):
        np.testing.assert_array_equal(a, b)


def _unraisable(monkeypatch) -> list:
    """What is reported as "Exception ignored in ..." from here on (a list to inspect)."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    return seen


def test_a_step_without_digests_that_fails_to_restore_is_skipped(
    run, tmp_path, capsys, monkeypatch
):
    """A step saved before digests existed is vouched for by its restore alone (whose reads,
    failed midway, Orbax leaves to the garbage collector: collected here, not in the next test)."""
    workdir = _copy(run, tmp_path)
    (workdir / "checkpoints" / "4" / DIGESTS).unlink()
    _truncate(_largest_file(workdir / "checkpoints" / "4"))
    _unraisable(monkeypatch)
    assert load(workdir)[2] == 2
    gc.collect()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"checkpoint {workdir / 'checkpoints'}: step 4 (cannot be restored: ")


def test_no_intact_step_is_one_line(run, tmp_path):
    workdir = _copy(run, tmp_path)
    for step in (2, 4):
        _flip(_largest_file(workdir / "checkpoints" / str(step)))
    with pytest.raises(CheckpointError, match=r"^no intact checkpoint under .*: step 4 \(.* is "):
        load_model(workdir)


def test_a_checkpoint_of_another_shape_is_one_line_and_no_tracebacks(run, tmp_path, monkeypatch):
    """Shapes are compared before any read: a restore that failed midway printed ~60 "Event loop
    is closed" tracebacks from TensorStore's callbacks."""
    workdir = _copy(run, tmp_path)
    gc.collect()
    unraisable = _unraisable(monkeypatch)
    config = json.loads((workdir / "config.json").read_text())
    config["model"]["width"] = 64
    (workdir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_model(workdir)
    assert str(error.value) == (
        f"checkpoint {workdir / 'checkpoints'}/4 does not match this model: "
        "params.blocks.0.attn.k.kernel is float32[32, 16] there, float32[64, 32] here"
    )
    gc.collect()
    assert not unraisable


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"model": {"width": "abc"}}, "config.model.width: expected int, got 'abc'"),
        ({"model": {"width": []}}, "config.model.width: expected int, got []"),
        ({"model": {"width": None}}, "config.model.width: expected int, got None"),
        ({"model": {"width": -3}}, "config.model.width: must be positive, got -3"),
        ({"model": 3}, "config.model must be a JSON object, got 3"),
        ([], "the config must be a JSON object, got []"),
    ],
)
def test_a_config_json_of_wrong_types_is_one_line(run, tmp_path, edit, message):
    workdir = _copy(run, tmp_path)
    saved = json.loads((workdir / "config.json").read_text())
    if isinstance(edit, dict):
        for group, fields in edit.items():
            saved[group] = {**saved[group], **fields} if isinstance(fields, dict) else fields
    else:
        saved = edit
    (workdir / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError) as error:
        load_model(workdir)
    assert str(error.value) == f"{workdir / 'config.json'} is not a valid config ({message})"


def test_a_base_checkpoint_cycle_is_refused_before_any_restore(tmp_path, corpus_dir):
    """A frozen-base run whose mc.base_checkpoint chain leads back to itself recursed without
    end in decode; the chain is followed through the configs alone."""
    a, b = (tmp_path / "a").resolve(), (tmp_path / "b").resolve()
    for workdir, base in ((a, b), (b, a)):
        config = tiny_mc_config(workdir, corpus_dir, steps=1)
        config.unlock()
        config.mc.mode, config.mc.base_checkpoint = "frozen_base", str(base)
        write_config(workdir, config)
    with pytest.raises(
        CheckpointError, match=rf"^config.mc.base_checkpoint makes a cycle: {a} -> {b} -> {a}$"
    ):
        load_model(a)
    config = tiny_mc_config(a, corpus_dir, steps=1)
    config.unlock()
    config.mc.mode, config.mc.base_checkpoint = "frozen_base", str(a)  # its own workdir
    with pytest.raises(
        CheckpointError, match=rf"^config.mc.base_checkpoint makes a cycle: {a} -> {a}$"
    ):
        train(config, progress=False)


INTERRUPTED = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from megacontext_jax.training.loop import train
    from tests.conftest import tiny_config
    try:
        train(tiny_config({workdir!r}, {corpus!r}, steps=12, checkpoint_every=3, eval_every=4))
    except KeyboardInterrupt:
        sys.exit(130)
    """
)


def _rows(workdir):
    return [
        {k: v for k, v in r.items() if not k.endswith("tokens_per_s")}
        for r in read_metrics(workdir / "metrics.jsonl")
    ]


@pytest.mark.slow
def test_resume_after_sigterm_sigkill_and_a_kill_at_a_save_is_the_uninterrupted_run(
    tmp_path, corpus_dir
):
    """One run stopped by SIGTERM after a few steps, then SIGKILLed mid-interval, then SIGKILLed
    at a checkpoint step (its save in flight), then resumed to the end: bitwise the parameters
    and row for row the metrics of a run that never stopped."""
    straight = tmp_path / "straight"
    train(
        tiny_config(straight, corpus_dir, steps=12, checkpoint_every=3, eval_every=4),
        progress=False,
    )
    workdir = tmp_path / "interrupted"
    script = INTERRUPTED.format(root=str(ROOT), workdir=str(workdir), corpus=str(corpus_dir))
    for pattern, sig in (
        (r"\b[2-9]/12\b", signal.SIGTERM),
        (r"\b(5|7|8|10|11)/12\b", signal.SIGKILL),
        (r"\b(6|9)/12\b", signal.SIGKILL),
    ):
        process = subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True
        )
        status, seen = signal_when(process, pattern, sig)
        assert status == (130 if sig == signal.SIGTERM else -signal.SIGKILL), seen[-2000:]
    assert (
        train(
            tiny_config(workdir, corpus_dir, steps=12, checkpoint_every=3, eval_every=4),
            progress=False,
        )["step"]
        == 12
    )
    assert _rows(workdir) == _rows(straight)
    for a, b in zip(
        jax.tree.leaves(nnx.state(load_model(workdir)[0])),
        jax.tree.leaves(nnx.state(load_model(straight)[0])),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
