import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import megacontext_jax as mcj
from megacontext_jax import evaluation
from megacontext_jax.api import load
from megacontext_jax.data import pipeline as data
from megacontext_jax.evaluation import _paired, config_hash, evaluate, gap_recovered
from megacontext_jax.megacontext import MegaContext
from megacontext_jax.scoring import Setting, condition_arrays, run_conditions, score_full, score_wc
from megacontext_jax.specs import Layout, ignored
from megacontext_jax.training.loop import train
from tests.conftest import tiny_mc_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir):
    workdir = tmp_path_factory.mktemp("mc_run")
    config = tiny_mc_config(workdir, corpus_dir, steps=3)
    config.unlock()
    config.mc.scored_tokens = 12  # room for the retrieval answers (passkey 5, MQAR 10 tokens)
    config.lock()
    train(config, progress=False)
    return workdir, config


def test_all_token_context_equals_full_attention():
    """When the history fits in W, every MC condition is the full context: same NLL."""
    config = tiny_mc_config("/unused", "/unused")
    model = MegaContext(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 21)), jnp.int32)
    layout = Layout.from_config(config)
    full_nll, full_pred = score_full(model, tokens, 4)
    for name in ("window", "mc_static"):
        wc = condition_arrays(name, 16, layout, 2)
        nll, pred = score_wc(model, tokens, wc, layout, ignored(config))
        np.testing.assert_allclose(nll, full_nll, atol=1e-4)
        np.testing.assert_array_equal(pred, full_pred)


def test_a_field_the_scorers_do_not_read_never_retraces_them():
    """The jitted scorers take small typed configs: a run whose config differs only in a field
    they do not read (``train.log_every``) reuses their compiled code; one they read does not."""
    config = tiny_mc_config("/unused", "/unused")
    model = MegaContext(config, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 256, (2, 41)).astype(np.int32)
    traces = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(event)

    def traced_by(edit) -> int:
        c = config.copy_and_resolve_references()
        edit(c)
        traces.clear()
        run_conditions(model, Setting.from_config(c), tokens, refocus_steps=1)
        return len(traces)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        traced_by(lambda c: None)  # compile once
        assert traced_by(lambda c: c.train.update(log_every=3)) == 0
        assert traced_by(lambda c: c.mc.allocator.update(max_edits=3)) > 0
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_evaluate_reports_every_condition(trained, corpus_dir):
    workdir, config = trained
    from megacontext_jax.training.restore import load_model

    model, _ = load_model(workdir)
    docs = data.load_documents(str(corpus_dir))
    results = evaluate(model, config, docs, [4], num_docs=4, batch=2, refocus_steps=2, num_probes=4)
    row = results["conditions"]["4W"]
    assert set(row) >= {"full", "window", "mc_static", "mc_focus", "gap_recovered"}
    for c in ("full", "window", "mc_static", "mc_focus"):
        assert row[c]["bpb"] == pytest.approx(row[c]["nll"] / np.log(2))
        assert 0.0 <= results["passkey"]["4W"][c] <= 1.0
    np.testing.assert_equal(row["gap_recovered"], gap_recovered(row))  # NaN equals NaN here
    assert row["documents"] == 4
    assert set(row["differences"]) == {
        "mc_static - window",
        "mc_focus - mc_static",
        "full - window",
    }
    for name, d in row["differences"].items():
        a, b = name.split(" - ")
        assert d["mean"] == pytest.approx(row[a]["nll"] - row[b]["nll"], abs=1e-6)
        assert np.isfinite(d["se"]) and d["se"] >= 0
    assert results["passkey_by_lod"]["4W"]["mc_static"]
    oracle = results["passkey_oracle"]["4W"]
    assert 0.0 <= oracle["accuracy"] <= oracle["fits_budget"] <= 1.0
    sub = results["substitutability"]
    assert set(sub) == {
        "lod1_gist",
        "lod1_dropped",
        "lod2_gist",
        "lod2_dropped",
        "tokens_nll",
        "documents",
    }
    assert all(np.isfinite(v) for v in sub.values())


def test_gap_recovered_needs_a_gap_the_sample_resolves():
    def row(gap, se):
        nll = {"window": {"nll": 2.0}, "full": {"nll": 2.0 + gap}, "mc_static": {"nll": 1.99}}
        return nll | {"differences": {"full - window": {"mean": gap, "se": se}}}

    assert gap_recovered(row(-0.1, 0.01))["mc_static"] == pytest.approx(0.1)
    for gap, se in ((-0.0003, 0.0002), (0.0, 0.01), (0.05, 0.01), (-0.1, float("nan"))):
        assert np.isnan(gap_recovered(row(gap, se))["mc_static"]), (gap, se)


def test_paired_difference_and_standard_error():
    d = _paired(np.array([1.0, 2.0, 6.0]), np.array([0.0, 0.0, 3.0]))  # differences 1, 2, 3
    assert d["mean"] == pytest.approx(2.0)
    assert d["se"] == pytest.approx(1.0 / np.sqrt(3))


def test_evaluate_cli(trained, tmp_path):
    workdir, _ = trained
    out = tmp_path / "does" / "not" / "exist" / "eval.json"  # the parents are created
    cmd = [sys.executable, "-m", "megacontext_jax.evaluation", "--checkpoint", str(workdir)]
    args = ["--lengths", "4", "--docs", "2", "--probes", "2", "--batch", "2", "--out", str(out)]
    result = subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mc_focus" in result.stdout
    results = json.loads(out.read_text())
    assert results["conditions"]["4W"]["full"]["nll"] > 0
    run = results["run"]
    assert run["step"] == 3 and run["checkpoint"] == str(workdir)
    assert run["argv"] == ["--checkpoint", str(workdir), *args]
    assert run["config_hash"] == config_hash(load(workdir).config)
    assert out.with_suffix(".png").stat().st_size > 0
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "megacontext_jax.evaluation",
            "--checkpoint",
            str(tmp_path / "nope"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"error: no checkpoint at {tmp_path / 'nope'}: config.json not found"
    ]


def test_evaluate_cli_checks_its_output_before_computing(trained, tmp_path):
    """An output that cannot be written is one line before any compute, not a traceback after."""
    workdir, _ = trained
    blocker = tmp_path / "file"
    blocker.write_text("")
    taken = tmp_path / "taken.json"
    taken.mkdir()
    for out, message in (
        (blocker / "x.json", f"error: cannot create the output directory {blocker}"),
        (taken, f"error: the output {taken} is a directory"),
    ):
        cmd = [sys.executable, "-m", "megacontext_jax.evaluation", "--checkpoint", str(workdir)]
        result = subprocess.run(
            [*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]


def test_python_evaluate_returns_what_the_cli_writes(trained, monkeypatch):
    """``mcj.evaluate`` (what the CLI calls, above) passes its arguments on and records the run;
    the evaluation itself is stubbed here, the CLI test runs it."""
    workdir, _ = trained
    model = load(workdir)
    seen = {}

    def fake(module, cfg, docs, lengths, num_docs, batch, refocus_steps, num_probes, seed, **kw):
        seen.update(lengths=lengths, docs=num_docs, batch=batch, probes=num_probes, seed=seed)
        return {"conditions": {}}

    monkeypatch.setattr(evaluation, "evaluate", fake)
    results = mcj.evaluate(model, lengths=(4, 8), docs=2, probes=3, batch=2, seed=5)
    assert seen == {"lengths": [4, 8], "docs": 2, "batch": 2, "probes": 3, "seed": 5}
    assert results == {
        "run": {
            "checkpoint": str(workdir),
            "step": 3,
            "config_hash": config_hash(model.config),
            "arguments": {
                "data": None,
                "lengths": [4, 8],
                "docs": 2,
                "probes": 3,
                "batch": 2,
                "refocus_steps": 4,
                "seed": 5,
            },
        },
        "conditions": {},
    }
    other = model.config.copy_and_resolve_references()
    other.unlock()
    other.mc.wc_size += 1
    assert config_hash(other) != config_hash(model.config)
