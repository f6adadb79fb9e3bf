import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from megacontext_jax import data
from megacontext_jax.evaluate import _paired, condition_arrays, evaluate, score_full, score_wc
from megacontext_jax.megacontext import MegaContext
from megacontext_jax.trainer import train
from megacontext_jax.variants import Layout
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
    frozen = ml_collections.FrozenConfigDict(config)
    full_nll, full_pred = score_full(model, tokens, 4)
    for name in ("window", "mc_static"):
        nll, pred = score_wc(model, tokens, condition_arrays(name, 16, layout, 2), frozen)
        np.testing.assert_allclose(nll, full_nll, atol=1e-4)
        np.testing.assert_array_equal(pred, full_pred)


def test_evaluate_reports_every_condition(trained, corpus_dir):
    workdir, config = trained
    from megacontext_jax.restore import load_model

    model, _ = load_model(workdir)
    docs = data.load_documents(str(corpus_dir))
    results = evaluate(model, config, docs, [4], num_docs=4, batch=2, refocus_steps=2, num_probes=4)
    row = results["conditions"]["4W"]
    assert set(row) >= {"full", "window", "mc_static", "mc_focus", "gap_recovered"}
    for c in ("full", "window", "mc_static", "mc_focus"):
        assert row[c]["bpb"] == pytest.approx(row[c]["nll"] / np.log(2))
        assert 0.0 <= results["passkey"]["4W"][c] <= 1.0
    gap = row["window"]["nll"] - row["full"]["nll"]
    recovered = row["gap_recovered"]["mc_static"]
    if gap > 0:
        assert recovered == pytest.approx((row["window"]["nll"] - row["mc_static"]["nll"]) / gap)
    else:  # full context does not beat the window: nothing to recover
        assert np.isnan(recovered)
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


def test_paired_difference_and_standard_error():
    d = _paired(np.array([1.0, 2.0, 6.0]), np.array([0.0, 0.0, 3.0]))  # differences 1, 2, 3
    assert d["mean"] == pytest.approx(2.0)
    assert d["se"] == pytest.approx(1.0 / np.sqrt(3))


def test_evaluate_cli(trained, tmp_path):
    workdir, _ = trained
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "megacontext_jax.evaluate", "--checkpoint", str(workdir)]
    args = ["--lengths", "4", "--docs", "2", "--probes", "2", "--batch", "2", "--out", str(out)]
    result = subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mc_focus" in result.stdout
    assert json.loads(out.read_text())["conditions"]["4W"]["full"]["nll"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    missing = subprocess.run(
        [sys.executable, "-m", "megacontext_jax.evaluate", "--checkpoint", str(tmp_path / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"error: no checkpoint at {tmp_path / 'nope'}: config.json not found"
    ]
