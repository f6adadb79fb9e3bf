import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import megacontext_jax as mcj
from megacontext_jax.api import load
from megacontext_jax.data import pipeline as data
from megacontext_jax.data.tokenizer import ByteTokenizer
from megacontext_jax.evaluation import Protocol, config_hash, stats, windows
from megacontext_jax.evaluation.retrieval import TASKS, make_probes
from megacontext_jax.evaluation.scoring import (
    ORACLE,
    SINKS,
    Setting,
    condition_entries,
    contexts,
    run_conditions,
    score_full,
    score_wc,
    table_offsets,
    tree_table,
)
from megacontext_jax.evaluation.text import text_row
from megacontext_jax.focus.rules import check
from megacontext_jax.focus.working_context import WorkingContext, entries, from_entries
from megacontext_jax.megacontext import MegaContext, node_table
from megacontext_jax.specs import Layout
from megacontext_jax.training import variants
from megacontext_jax.training.loop import train
from tests.conftest import tiny_mc_config

ROOT = Path(__file__).resolve().parents[1]
BYTES = ByteTokenizer()
SMALL = dict(
    lengths=(4,),
    windows=4,
    budgets=(32, 20, 24),
    budget_length=4,
    retrieval_lengths=(4,),
    probes=2,
    batch=2,
    refocus_steps=2,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir):
    workdir = tmp_path_factory.mktemp("mc_run")
    config = tiny_mc_config(workdir, corpus_dir, steps=3)
    config.unlock()
    config.mc.scored_tokens = 12  # room for the retrieval answers (passkey 5, MQAR 10 tokens)
    config.lock()
    train(config, progress=False)
    return workdir, config


@pytest.fixture(scope="module")
def model_and_setting():
    config = tiny_mc_config("/unused", "/unused")
    return MegaContext(config, rngs=nnx.Rngs(0)), Setting.from_config(config)


def test_all_token_context_equals_full_attention(model_and_setting):
    """When the history fits in W, every MC condition is the full context: same NLL."""
    model, setting = model_and_setting
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 21)), jnp.int32)
    layout = setting.layout
    full_nll, full_pred = score_full(model, tokens, 4)
    table = tree_table(model, tokens[:, :20], layout)
    for name in ("window", "sinks", "mc_static"):
        wc = contexts([condition_entries(name, 16, layout)] * 2, 16, layout)
        nll, pred = score_wc(model, table, table_offsets(20, layout, True), tokens, wc, layout, ())
        np.testing.assert_allclose(nll, full_nll, atol=1e-4)
        np.testing.assert_array_equal(pred, full_pred)


def test_slot_positions_make_the_window_a_plain_lm_over_the_last_w_tokens(model_and_setting):
    """With bounded positions a window far into a long history sits at slots 0 .. W-1: the
    plain LM over those W tokens alone."""
    model, setting = model_and_setting
    layout = dataclasses.replace(setting.layout, position_mode="slots")
    n, w, s = 200, layout.capacity, layout.scored
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, n + 1)), jnp.int32)
    table = tree_table(model, tokens[:, :n], layout)
    wc = contexts([condition_entries("window", n - s, layout)] * 2, n - s, layout)
    nll, pred = score_wc(model, table, table_offsets(n, layout, True), tokens, wc, layout, ())
    plain_nll, plain_pred = score_full(model, tokens[:, n - w :], s)
    np.testing.assert_allclose(nll, plain_nll, atol=1e-5)
    np.testing.assert_array_equal(pred, plain_pred)


def test_static_table_offsets_are_the_node_tables(model_and_setting):
    model, setting = model_and_setting
    layout = setting.layout
    for n in (3, 16, 37, 64):
        tokens = jnp.zeros((1, n), jnp.int32)
        _, offsets = node_table(model, tokens, layout.block_size, layout.max_level)
        assert table_offsets(n, layout, True) == offsets, n


def test_a_field_the_scorers_do_not_read_never_retraces_them(model_and_setting):
    """The jitted scorers take small typed configs: a run whose config differs only in a field
    they do not read (``train.log_every``) reuses their compiled code; one they read does not."""
    model, _ = model_and_setting
    config = tiny_mc_config("/unused", "/unused")
    tokens = np.random.default_rng(0).integers(0, 256, (2, 41)).astype(np.int32)
    traces = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(event)

    def traced_by(edit) -> int:
        c = config.copy_and_resolve_references()
        edit(c)
        traces.clear()
        run_conditions(model, Setting.from_config(c), tokens, 1, np.random.default_rng(0))
        return len(traces)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        traced_by(lambda c: None)  # compile once
        assert traced_by(lambda c: c.train.update(log_every=3)) == 0
        assert traced_by(lambda c: c.mc.allocator.update(max_edits=3)) > 0
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _context(wc: WorkingContext, row: int) -> WorkingContext:
    """Row ``row``'s context entries alone, as one WC."""
    return WorkingContext(wc.lod[row], wc.start[row], wc.context_mask[row])


def test_baselines_keep_the_invariants_and_the_budget(model_and_setting):
    """``mc_random``, ``mc_attn`` and ``mc_oracle`` are legal WCs over the whole history within
    the budget; ``sinks`` holds the first SINKS tokens and the newest ones; ``mc_random`` makes
    edits where focus does."""
    model, setting = model_and_setting
    layout = setting.layout
    k, n = layout.block_size, 96
    cursor = n - layout.scored
    tokens = np.random.default_rng(1).integers(0, 256, (4, n + 1)).astype(np.int32)
    sources = [(8, 13), (40, 45), (2, 3), (70, 75)]
    outs = run_conditions(model, setting, tokens, 2, np.random.default_rng(0), sources=sources)
    for row in range(4):
        for name in ("mc_static", "mc_random", "mc_focus", "mc_attn", ORACLE):
            ctx = _context(outs[name].wc, row)
            check(ctx, cursor, k, layout.max_level, layout.recent_tail)
            assert int(np.asarray(ctx.valid).sum()) <= layout.context_capacity
        sink = entries(_context(outs["sinks"].wc, row))
        c = layout.context_capacity
        assert sink == [(0, t) for t in range(SINKS)] + [
            (0, t) for t in range(cursor - c + SINKS, cursor)
        ]
        if outs[ORACLE].fits[row]:  # the answer's tokens are all at LOD0
            ents = entries(_context(outs[ORACLE].wc, row))
            at0 = {s for l, s in ents if l == 0}
            assert set(range(*sources[row])) <= at0
    static = entries(_context(outs["mc_static"].wc, 0))
    assert any(entries(_context(outs["mc_random"].wc, r)) != static for r in range(4))


def test_random_edits_make_exactly_the_edits_asked_where_they_can():
    """``mc_random``'s contexts: legal, and the allocator's count of elementary edits (an
    expansion adds K - 1 entries, a collapse removes K - 1) equals the count asked."""
    layout = Layout(8, 3, 64, 16, 32, "recent")
    k, cursor = layout.block_size, 8 * 64 - 16
    pyramid = variants.pyramid(cursor, layout)
    for seed in range(20):
        for edits in (1, 3, 8):
            rng = np.random.default_rng(seed)
            ents, made = pyramid, 0
            for _ in range(edits):  # one edit at a time, to count them
                new = variants.random_edits(ents, cursor, layout, 1, rng)
                made += new != ents
                ents = new
            assert made == edits, (seed, edits)
            many = variants.random_edits(
                pyramid, cursor, layout, edits, np.random.default_rng(seed)
            )
            ctx = from_entries(many, layout.context_capacity)
            check(ctx, cursor, k, layout.max_level, layout.recent_tail)


def test_sinks_keep_the_first_tokens_once_the_window_has_moved():
    layout = Layout(4, 2, 24, 4, 4)
    assert variants.sinks(20, layout, 4) == variants.window(20, layout)  # starts at token 0
    moved = variants.sinks(22, layout, 4)  # the window would start at token 2
    assert moved == [(0, t) for t in range(4)] + [(0, t) for t in range(6, 22)]


def test_results_are_written_as_strict_json():
    from megacontext_jax.evaluation.cli import json_safe

    safe = json_safe({"a": [1.0, float("nan")], "b": (float("inf"), "x"), "c": {"d": 2}})
    assert json.loads(json.dumps(safe, allow_nan=False)) == {
        "a": [1.0, None],
        "b": [None, "x"],
        "c": {"d": 2},
    }


def test_windows_are_drawn_deterministically_from_the_seed():
    lengths = [50, 300, 1000, 120, 999]
    a = windows.draw(lengths, 100, 12, 16, seed=3)
    assert a == windows.draw(lengths, 100, 12, 16, seed=3)
    assert a != windows.draw(lengths, 100, 12, 16, seed=4)
    assert len(a) == 12 and a == sorted(a, key=lambda w: (w.doc, w.start))
    for w in a:
        assert lengths[w.doc] >= 100 and w.start % 16 == 0 and w.start + 101 <= lengths[w.doc] + 1
    every = windows.draw(lengths, 100, 10**6, 16, seed=0)  # all candidates, each once
    assert len(every) == len(set(every)) == sum((n - 100) // 16 + 1 for n in lengths if n >= 100)
    docs = [data.Document(str(i), np.arange(n, dtype=np.int32) + 7) for i, n in enumerate(lengths)]
    for w in a:
        seq = windows.tokens(docs, w, 100, bos=1)
        assert len(seq) == 101
        if w.start == 0:
            assert seq[0] == 1 and (seq[1:] == docs[w.doc].data[:100]).all()
        else:
            assert (seq == docs[w.doc].data[w.start - 1 : w.start + 100]).all()


def test_key_tokens_are_where_full_beats_window_by_the_threshold():
    rng = np.random.default_rng(0)
    window = rng.uniform(1, 3, (6, 4))
    full = window - rng.uniform(0, 1, (6, 4))
    nll = {"full": full, "window": window, "mc_static": window - 0.1}
    doc_of = np.array([0, 0, 1, 1, 2, 3])
    row = text_row(nll, doc_of, per_token=1.0, threshold=0.5, seed=0)
    key = window - full > 0.5
    assert row["key_tokens"] == key.sum() and row["tokens"] == 24
    assert row["windows"] == 6 and row["documents"] == 4
    for c, values in nll.items():
        assert row["conditions"][c]["nll"]["mean"] == pytest.approx(values.mean())
        assert row["conditions"][c]["key_nll"]["mean"] == pytest.approx(values[key].mean())
        assert row["conditions"][c]["bpb"] == pytest.approx(values.mean() / math.log(2))
    d = row["differences"]["mc_static - window"]
    assert d["all"]["mean"] == pytest.approx(-0.1) and d["key"]["n"] == key.sum()
    gap = (window[key] - full[key]).mean()
    assert row["gap_recovered"]["key"]["mc_static"] == pytest.approx(0.1 / gap)


def test_clustered_standard_error_and_interval():
    x = np.array([1.0, 2.0, 6.0, 3.0])
    one_each = stats.clustered_mean(x, np.arange(4))  # one value per cluster: the plain SE
    assert one_each["mean"] == pytest.approx(3.0)
    assert one_each["se"] == pytest.approx(x.std(ddof=1) / 2)
    lo, hi = one_each["ci95"]
    assert 1.0 <= lo <= 3.0 <= hi <= 6.0
    paired = stats.clustered_mean(x, np.array([0, 0, 1, 1]))  # cluster sums 3 and 9
    assert paired["se"] == pytest.approx(math.sqrt(2 * ((3 - 6) ** 2 + (9 - 6) ** 2)) / 4)
    assert math.isnan(stats.clustered_mean(x, np.zeros(4))["se"])  # one cluster: no SE
    assert stats.clustered_mean(np.array([]), np.array([]))["n"] == 0


def test_gap_recovered_needs_a_gap_the_sample_resolves():
    nll = {"window": 2.0, "mc_static": 1.99}
    assert stats.gap_recovered(nll, {"mean": -0.1, "se": 0.01}, ("mc_static",))[
        "mc_static"
    ] == pytest.approx(0.1)
    for gap, se in ((-0.0003, 0.0002), (0.0, 0.01), (0.05, 0.01), (-0.1, float("nan"))):
        got = stats.gap_recovered(nll, {"mean": gap, "se": se}, ("mc_static",))
        assert np.isnan(got["mc_static"]), (gap, se)


def test_gap_recovered_interval_resamples_documents():
    rng = np.random.default_rng(0)
    gap = rng.uniform(0.5, 1.5, 200)
    docs = np.repeat(np.arange(20), 10)
    # The same share of the gap in every document: every resample gives it.
    np.testing.assert_allclose(stats.ratio_interval(0.25 * gap, gap, docs), [0.25, 0.25])
    # Documents that disagree: an interval around the pooled ratio.
    share = np.where(docs < 10, 0.0, 0.5)
    lo, hi = stats.ratio_interval(share * gap, gap, docs)
    pooled = (share * gap).sum() / gap.sum()
    assert lo < pooled < hi and hi - lo > 0.1
    assert np.isnan(stats.ratio_interval(gap[:10], gap[:10], docs[:10])).all()


def test_effective_window_interpolates_in_log_budget():
    budgets, nll = [32, 64, 128, 256], [2.0, 1.8, 1.7, 1.65]
    assert stats.effective_window(budgets, nll, 1.8)["value"] == pytest.approx(64)
    assert stats.effective_window(budgets, nll, 1.75)["value"] == pytest.approx(2**6.5)
    assert stats.effective_window(budgets, nll, 2.1) == {"value": None, "bound": "below"}
    assert stats.effective_window(budgets, nll, 1.6) == {"value": None, "bound": "above"}


def test_a_budget_keeps_the_scored_tokens_and_the_tails_share():
    layout = Layout(8, 3, 64, 16, 32)
    assert layout.with_capacity(64) == layout
    assert (layout.with_capacity(128).recent_tail, layout.with_capacity(32).recent_tail) == (75, 0)
    assert layout.with_capacity(256).scored == 16
    with pytest.raises(ValueError, match="a budget of 24 leaves 8 context entries"):
        layout.with_capacity(24)


def test_probes_have_stratified_depths_and_held_out_text():
    setting = Setting(Layout(4, 2, 24, 12, 4), None, (), 1)
    filler = np.frombuffer(b"def f(x):\n    return x\n" * 40, np.uint8).astype(np.int32)
    for name, task in TASKS.items():
        probes, depths = make_probes(task, filler, 200, 5, setting, BYTES, np.random.default_rng(0))
        assert all(len(p.tokens) == 201 and p.tokens[0] == 1 for p in probes)
        if task.depth:
            assert [int(d * 5) for d in depths] == [0, 1, 2, 3, 4]
            starts = [p.needle[0] for p in probes]
            assert starts == sorted(starts) and starts[0] < 40 < 100 < starts[-1], (name, starts)
        else:
            assert depths == [None] * 5
        if name == "mqar":
            assert all(p.needle[1] <= 201 - 24 for p in probes)  # beyond the window
    prose, _ = make_probes(
        TASKS["passkey_prose"], filler, 200, 2, setting, BYTES, np.random.default_rng(0)
    )
    assert all(b"return" not in bytes(p.tokens[1:].astype(np.uint8)) for p in prose)


def test_evaluate_cli_reports_every_condition(trained, tmp_path, capsys):
    """The CLI (in this process, so that it shares the compiled scorers; the entry point below
    runs it as ``python -m``) evaluates every condition and writes what produced it."""
    from megacontext_jax.evaluation import cli

    workdir, _ = trained
    out = tmp_path / "does" / "not" / "exist" / "eval.json"  # the parents are created
    args = ["--checkpoint", str(workdir), "--lengths", "4", "--windows", "4"]
    args += ["--budgets", "32,20,24", "--budget-length", "4", "--retrieval-lengths", "4"]
    args += ["--probes", "2", "--batch", "2", "--refocus-steps", "2", "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "mc_focus" in printed and "effective window" in printed
    results = json.loads(out.read_text())
    row = results["text"]["4W"]
    assert set(row["conditions"]) == {
        "full",
        "window",
        "sinks",
        "mc_static",
        "mc_random",
        "mc_focus",
        "mc_attn",
    }
    assert row["windows"] == 4 and row["tokens"] == 4 * 12
    for name, d in row["differences"].items():
        a, b = name.split(" - ")
        assert d["all"]["mean"] == pytest.approx(
            row["conditions"][a]["nll"]["mean"] - row["conditions"][b]["nll"]["mean"], abs=1e-6
        )
        assert np.isfinite(d["all"]["se"]) and d["all"]["se"] >= 0
    budget = results["budget"]
    assert budget["budgets"] == [20, 24, 32] and budget["length"] == "4W"  # sorted
    assert budget["nll"]["mc_focus"][1] == pytest.approx(
        row["conditions"]["mc_focus"]["nll"]["mean"]
    )
    effective = {"sinks", "mc_static", "mc_random", "mc_focus", "mc_attn"}
    assert set(budget["effective_window"]) == effective
    assert set(results["retrieval"]) == set(TASKS)
    passkey = results["retrieval"]["passkey"]["4W"]
    assert passkey["probes"] == 2 and set(passkey["accuracy"]) >= {"full", "window", ORACLE}
    assert all(0 <= a["mean"] <= 1 for a in passkey["accuracy"].values())
    assert sum(n for _, n in passkey["by_depth"]["mc_focus"]) == 2
    assert passkey["accuracy"][ORACLE]["mean"] <= passkey["oracle_fits"]
    assert set(results["substitutability"]) == {
        "lod1_gist",
        "lod1_dropped",
        "lod2_gist",
        "lod2_dropped",
        "tokens_nll",
        "documents",
    }
    run = results["run"]
    assert run["step"] == 3 and run["checkpoint"] == str(workdir)
    assert run["argv"] == args
    assert run["config_hash"] == config_hash(load(workdir).config)
    assert run["arguments"]["windows"] == 4 and run["arguments"]["tasks"] == list(TASKS)
    assert set(run["versions"]) >= {"jax", "flax", "python"}
    for suffix in ("", "_budget", "_depth"):
        assert out.with_name(f"eval{suffix}.png").stat().st_size > 0
    quick = cli.build_parser().parse_args(["--checkpoint", "x", "--quick", "--windows", "2"])
    assert cli.protocol_of(quick) == Protocol.quick(windows=2)


def test_evaluate_entry_point_is_one_line_on_a_missing_checkpoint(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "megacontext_jax.evaluation", "--checkpoint", str(tmp_path / "no")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"error: no checkpoint at {tmp_path / 'no'}: config.json not found"
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
    """``mcj.evaluate`` (what the CLI calls, above) passes its arguments on as a ``Protocol``
    and records the run; the evaluation itself is stubbed here, the CLI test runs it."""
    from megacontext_jax.evaluation import protocol

    workdir, _ = trained
    model = load(workdir)
    seen = []
    monkeypatch.setattr(
        protocol, "evaluate", lambda module, cfg, docs, p, **kw: seen.append(p) or {"text": {}}
    )
    results = mcj.evaluate(model, lengths=[4, 8], windows=2, probes=3, seed=5)
    assert seen == [Protocol(lengths=(4, 8), windows=2, probes=3, seed=5)]
    assert mcj.evaluate(model, quick=True, probes=3) and seen[-1] == Protocol.quick(probes=3)
    run = results["run"]
    assert (run["checkpoint"], run["step"], run["data"]) == (str(workdir), 3, None)
    assert run["config_hash"] == config_hash(model.config)
    assert run["arguments"]["lengths"] == (4, 8) and run["arguments"]["seed"] == 5
    assert results["text"] == {}
    with pytest.raises(ValueError, match="windows must be at least 2"):
        mcj.evaluate(model, windows=1)
    with pytest.raises(ValueError, match="unexpected keyword argument 'docs'"):
        mcj.evaluate(model, docs=3)
    other = model.config.copy_and_resolve_references()
    other.unlock()
    other.mc.wc_size += 1
    assert config_hash(other) != config_hash(model.config)
