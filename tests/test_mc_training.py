import ast
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext_jax.focus.allocator import refocus
from megacontext_jax.focus.rules import check
from megacontext_jax.focus.working_context import WorkingContext, entries, from_entries
from megacontext_jax.kernels.mixed_attention import Entries, MaskSpec
from megacontext_jax.megacontext import (
    MegaContext,
    gather_entries,
    lens_scores,
    node_layout,
    node_table,
)
from megacontext_jax.nets.gistnet import build_levels
from megacontext_jax.nets.lensnet import entry_features
from megacontext_jax.specs import AllocatorConfig, Layout, MCTraining, span_counts
from megacontext_jax.training import variants
from megacontext_jax.training.checkpoint import Checkpointer
from megacontext_jax.training.loop import mc_batch, train
from megacontext_jax.training.losses import (
    gap_weights,
    guided_contexts,
    mc_loss,
    preference_loss,
    reconstruction,
    span_kl,
)
from megacontext_jax.training.metrics import read_metrics
from megacontext_jax.training.restore import load_model
from megacontext_jax.training.sharding import make_mesh
from megacontext_jax.training.step import make_trainable
from tests.conftest import tiny_mc_config

LAYOUT = Layout(block_size=4, max_level=2, capacity=24, scored=4, recent_tail=4)

# The objective compiled (the spec is static): op by op, its first call in a process takes about
# 50 s on CPU, its compilation about 8 s.
objective = nnx.jit(mc_loss, static_argnums=4)


def _rows(arrays, b, v, key="context"):
    keep = arrays[key][b, v]
    return [
        (int(l), int(s))
        for l, s in zip(arrays["lod"][b, v][keep], arrays["start"][b, v][keep], strict=True)
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([2, 4, 8]),
    st.integers(1, 3),
    st.integers(0, 2**31 - 1),
    st.data(),
)
def test_training_contexts_keep_every_invariant(k, max_level, seed, data):
    capacity = data.draw(st.integers(4 * k + 8, 80))
    scored = data.draw(st.integers(1, 8))
    tail = data.draw(st.integers(0, capacity - scored - 2 * k))
    layout = Layout(k, max_level, capacity, scored, tail)
    cursors = data.draw(st.lists(st.integers(1, 3000), min_size=3, max_size=3))
    deep = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    arrays, expand_lod, from_pyramid = variants.training_contexts(
        cursors, 3, layout, np.random.default_rng(seed), deep
    )
    for b, cursor in enumerate(cursors):  # each example has its own cursor
        assert (_rows(arrays, b, 0) == variants.pyramid(cursor, layout)) == from_pyramid[b]
        assert from_pyramid[b] or deep > 0
        tail_starts = arrays["start"][b][arrays["valid"][b] & ~arrays["context"][b]]
        rows = arrays["start"].shape[1]
        np.testing.assert_array_equal(tail_starts, np.tile(np.arange(scored) + cursor, rows))
        for v in (0, 2, 3, 4):  # the window (1) drops history on purpose
            context = _rows(arrays, b, v)
            check(from_entries(context, layout.context_capacity), cursor, k, max_level, tail)
            whole = _rows(arrays, b, v, "valid")
            assert whole[len(context) :] == [(0, t) for t in range(cursor, cursor + scored)]
        assert _rows(arrays, b, 1) == [
            (0, t) for t in range(max(0, cursor - capacity + scored), cursor)
        ]
        for v, lod in zip((2, 3, 4), expand_lod[b], strict=True):
            if lod > 0:  # an expansion really happened, of a gist of that level
                assert any(l == lod - 1 for l, _ in _rows(arrays, b, v))


def _drawn_pyramid(k: int, max_level: int, data):
    """A layout with one scored token, a cursor and the recency pyramid there, drawn by ``data``."""
    capacity = data.draw(st.integers(4 * k + 8, 80))
    tail = data.draw(st.integers(0, capacity - 1 - 2 * k))
    layout = Layout(k, max_level, capacity, 1, tail)
    cursor = data.draw(st.integers(1, 3000))
    return layout, cursor, variants.pyramid(cursor, layout)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.integers(1, 3), st.integers(0, 2**31 - 1), st.data())
def test_deep_variant_brings_k_tokens_to_lod0(k, max_level, seed, data):
    layout, cursor, ents = _drawn_pyramid(k, max_level, data)
    tail = layout.recent_tail
    out = variants.deep_variant(ents, cursor, layout, np.random.default_rng(seed))
    if out is None:
        return
    new, root_lod = out
    check(from_entries(new, layout.context_capacity), cursor, k, max_level, tail)
    # One or two whole blocks that were under gists, one after the other, are now tokens.
    fresh = [s for l, s in new if l == 0 and (0, s) not in ents]
    assert len(fresh) in (k, 2 * k) and fresh[0] % k == 0
    assert fresh == list(range(fresh[0], fresh[0] + len(fresh)))

    def covering(entries, s):
        return entries[max(i for i, (_, start) in enumerate(entries) if start <= s)]

    assert max(covering(ents, t)[0] for t in fresh) == root_lod
    roots = {covering(ents, t) for t in fresh}  # the pyramid's gists that were expanded

    def holds_fresh(lod, s):
        return any(s <= t < s + k**lod for t in fresh)

    for lod, s in new:
        if any(r <= s < r + k**rl for rl, r in roots):
            # Inside: the cover of the paths down to the blocks, each entry a child of a node
            # on a path and on a path itself only at LOD0.
            assert lod == 0 or not holds_fresh(lod, s)
            assert holds_fresh(lod + 1, s // k ** (lod + 1) * k ** (lod + 1))
        else:  # elsewhere entries only collapsed
            assert lod >= covering(ents, s)[0]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.integers(1, 3), st.integers(0, 2**31 - 1), st.data())
def test_bring_to_lod0_puts_the_tokens_at_lod0(k, max_level, seed, data):
    layout, cursor, ents = _drawn_pyramid(k, max_level, data)
    tail = layout.recent_tail
    first = data.draw(st.integers(0, cursor - 1))
    at = (first, data.draw(st.integers(first, min(first + 2 * k, cursor - 1))))
    out = variants.bring_to_lod0(ents, at, cursor, layout, np.random.default_rng(seed))
    if first < ents[0][1]:  # the pyramid dropped that history
        assert out is None
        return
    if all((0, t) in ents for t in at):
        assert out == (ents, 0)
    if out is None:  # no room: too few sibling groups to collapse
        return
    new, root_lod = out
    check(from_entries(new, layout.context_capacity), cursor, k, max_level, tail)
    assert {(0, t) for t in at} <= set(new)
    assert root_lod == max(l for l, s in ents if any(s <= t < s + k**l for t in at))


def test_needle_variants_bring_the_key_to_lod0_where_it_fits():
    layout = Layout(block_size=4, max_level=3, capacity=40, scored=4, recent_tail=4)
    cursors, sources = [200, 200, 160], [(10, 15), (-1, -1), (100, 105)]
    arrays, *_ = variants.training_contexts(
        cursors, 2, layout, np.random.default_rng(0), 0.0, sources
    )
    for b, (cursor, (first, stop)) in enumerate(zip(cursors, sources, strict=True)):
        needle = _rows(arrays, b, 2)  # the first random variant
        check(from_entries(needle, layout.context_capacity), cursor, 4, 3, 4)
        if first >= 0:
            assert {(0, t) for t in range(first, stop)} <= set(needle)
    # mc_batch reads the data's sources with mc.needle_variants on.
    config = tiny_mc_config("/unused", "/unused")
    config.unlock()
    config.mc.needle_variants = True
    seq = np.zeros((2, 65), np.int32)
    raw = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": np.ones((2, 64), bool)}
    batch = mc_batch({**raw, "source": np.array([[8, 13], [-1, -1]], np.int32)}, 0, config)
    assert "source" not in batch
    assert {(0, t) for t in range(8, 13)} <= set(_rows(batch, 0, 2))
    # Without a needle anywhere, the contexts are the ones made without sources.
    plain = variants.training_contexts([200] * 2, 2, layout, np.random.default_rng(1))[0]
    none = variants.training_contexts(
        [200] * 2, 2, layout, np.random.default_rng(1), 0.0, [(-1, -1)] * 2
    )[0]
    for name in plain:
        np.testing.assert_array_equal(plain[name], none[name])


def test_labels_are_the_first_token_after_each_span():
    cursor = 60
    arrays, *_ = variants.training_contexts([cursor] * 2, 2, LAYOUT, np.random.default_rng(0))
    tokens = jnp.broadcast_to(jnp.arange(65), (2, 65))  # token value == position
    wc = WorkingContext(*(jnp.asarray(arrays[n]) for n in ("lod", "start", "valid")))
    labels, mask = wc.labels(tokens, 4, (256, 257))
    lod, start, valid = arrays["lod"], arrays["start"], arrays["valid"]
    end = start + 4**lod
    np.testing.assert_array_equal(np.asarray(labels)[valid], end[valid])
    assert not ((np.asarray(labels) >= start) & (np.asarray(labels) < end) & valid).any()
    np.testing.assert_array_equal(np.asarray(mask), valid)


def test_gathered_entries_are_tree_nodes():
    config = tiny_mc_config("/unused", "/unused")
    model = MegaContext(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, 256)
    emb = model.base.embed(tokens)
    table, offsets = node_table(model, tokens, 4, 2)
    levels = build_levels(model.gistnet, emb[1], emb[1], 4, 2)
    lod = jnp.array([[[0, 1, 2, 0]]] * 2)
    start = jnp.array([[[5, 8, 16, 63]]] * 2)
    valid = jnp.array([[[True, True, True, False]]] * 2)
    got = gather_entries(table, offsets, WorkingContext(lod, start, valid), 4)
    np.testing.assert_allclose(got[1, 0, 0], emb[1, 5])
    np.testing.assert_allclose(got[1, 0, 1], levels[1][2], atol=1e-5)
    np.testing.assert_allclose(got[1, 0, 2], levels[2][1], atol=1e-5)
    np.testing.assert_array_equal(got[:, 0, 3], 0.0)


def _batch(config, step=0, seed=0):
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, 256, (2, config.data.seq_len + 1)).astype(np.int32)
    raw = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": np.ones_like(seq[:, 1:], bool)}
    return {k: jnp.asarray(v) for k, v in mc_batch(raw, step, config).items()}


def test_a_stop_inside_the_sequence_is_the_sequence_cut_there():
    """A sequence read up to its ``stop`` (``mc.min_history``: a random cursor) gives the
    objective's scored terms of the sequence cut at the stop: the teacher, every variant, the
    KL and LensNet read nothing after it."""
    config = tiny_mc_config("/unused", "/unused")  # T = 64, S = 4
    model = MegaContext(config, rngs=nnx.Rngs(0))
    spec = MCTraining.from_config(config)
    seq = np.random.default_rng(0).integers(0, 256, (2, 65)).astype(np.int32)
    stop = 44

    def batch_of(tokens, stops=None):
        raw = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        raw["mask"] = np.ones_like(raw["targets"], bool)
        if stops is not None:
            raw["stop"] = np.full(2, stops, np.int32)
        return {k: jnp.asarray(v) for k, v in mc_batch(raw, 0, config).items()}

    metrics = nnx.jit(lambda m, b: mc_loss(m, b, jnp.int32(0), jax.random.key(0), spec)[1])
    inside, cut = metrics(model, batch_of(seq, stop)), metrics(model, batch_of(seq[:, : stop + 1]))
    assert batch_of(seq, stop)["cursor"].tolist() == [40, 40]
    names = ("loss/full", "loss/window", "loss/mc_static", "loss/random", "loss/mc_focus")
    for name in (*names, "kl", "lm_wc", "lens"):
        np.testing.assert_allclose(inside[name], cut[name], rtol=2e-5, atol=1e-6, err_msg=name)
    assert abs(float(inside["lm_tokens"]) - float(cut["lm_tokens"])) > 1e-3  # reads everything


@pytest.mark.parametrize("rounds", [1, 3])
def test_guided_variant_is_rounds_of_lensnet_and_allocator(rounds):
    config = tiny_mc_config("/unused", "/unused")
    config.unlock()
    config.mc.train_refocus_steps, config.mc.train_temperature = rounds, 0.0
    config.mc.allocator.max_edits = 1  # so that every round has edits left to make
    model = MegaContext(config, rngs=nnx.Rngs(0))
    batch = _batch(config)
    table, offsets = node_table(model, batch["tokens"][:, :64], 4, 2)
    host = {n: batch[n] for n in ("lod", "start", "valid", "context")}
    baseline = jax.tree.map(lambda a: a[:, 0], WorkingContext.from_batch(batch))
    spec = MCTraining.from_config(config)
    guided, scores, edits, first = guided_contexts(
        model, table, offsets, baseline, 60, spec, jax.random.key(1)
    )
    assert scores.shape == (2, 24) and float(jnp.abs(scores).max()) <= 1.0
    arrays = {k: np.asarray(v)[:, None] for k, v in guided.as_batch().items()}
    cfg = AllocatorConfig.from_config(config)
    for b in range(2):
        check(from_entries(_rows(arrays, b, 0), 20), 60, 4, 2, 4)
        check(from_entries(_rows(arrays, b, 0, "valid"), 24), 64, 4, 2, 4)
        # The same rounds by hand: score, refocus, carry the cooldown.
        wc = from_entries(_rows(host, b, 0), 20)
        cooldown, made = jnp.zeros(20, jnp.int32), 0
        for r in range(rounds):
            s = (
                scores[b, :20]
                if r == 0
                else lens_scores(
                    model,
                    table[b : b + 1],
                    offsets,
                    jax.tree.map(lambda a: a[None], wc),
                    60,
                    Layout.from_config(config),
                )[0]
            )
            out = refocus(wc, s, cooldown, 60, cfg)
            wc, cooldown = out.wc, out.cooldown
            made += int(out.expands + out.collapses)
            if r == 0:  # the context the second round scores
                assert entries(wc) == entries(jax.tree.map(lambda a, b=b: a[b], first))
        assert entries(wc) == _rows(arrays, b, 0)
        assert int(edits[b]) == made == rounds


def test_lens_features_measure_distance_in_tokens_or_in_slots():
    k = 4
    wc = from_entries([(2, 0), (1, 16), (0, 20), (0, 21)], 6)
    cursor = jnp.array(22)
    tokens = entry_features(wc, cursor, k, 2)
    np.testing.assert_allclose(tokens[:4, 2], np.log1p([6, 2, 1, 0]) / np.log1p(22), rtol=1e-6)
    slots = entry_features(wc, cursor, k, 2, slots=True)
    np.testing.assert_allclose(slots[:4, 2], np.log1p([3, 2, 1, 0]) / np.log1p(6), rtol=1e-6)
    np.testing.assert_array_equal(slots[:, :2], tokens[:, :2])  # lod and span alike


@pytest.mark.parametrize(
    "lens_start,lens_grads,positions,read_layer",
    [
        (0, True, "absolute", 0),
        (10, False, "absolute", 0),
        (0, True, "slots", 0),
        (0, True, "absolute", 1),  # a contextual GistNet
    ],
)
def test_gradients_reach_every_part(lens_start, lens_grads, positions, read_layer):
    config = tiny_mc_config("/unused", "/unused")
    config.unlock()
    config.mc.lens_start = lens_start
    config.mc.positions = positions
    config.mc.gist.read_layer = read_layer
    model = MegaContext(config, rngs=nnx.Rngs(0))
    batch = _batch(config)
    # Jitted: op by op, the eager gradient of the whole objective took over a minute on CPU.
    grad = nnx.jit(
        nnx.grad(
            lambda m: mc_loss(
                m, batch, jnp.int32(0), jax.random.key(0), MCTraining.from_config(config)
            )[0]
        )
    )
    grads = grad(model)

    def norm(part):
        return sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(part))

    assert norm(grads.base) > 0
    assert norm(grads.gistnet) > 0
    assert (norm(grads.lensnet) > 0) == lens_grads


def test_gap_weights_follow_what_full_context_gains_on_each_token():
    window = jnp.array([[2.0, 1.0, 5.0, 9.0]])
    full = jnp.array([[1.0, 1.5, 2.0, 0.0]])
    mask = jnp.array([[True, True, True, False]])
    # Gaps 1, 0 (full worse), 3 and a masked token: mean 4/3 over the three scored tokens.
    np.testing.assert_allclose(gap_weights(window, full, mask), [[0.75, 0.0, 2.25, 0.0]])
    np.testing.assert_array_equal(gap_weights(full, full, mask), mask)  # no gap: alike


def test_kl_weighting_changes_the_kl_term_alone():
    metrics = {}
    for weighting in ("uniform", "gap"):
        config = tiny_mc_config("/unused", "/unused")
        config.unlock()
        config.mc.loss.kl_weighting = weighting
        spec = MCTraining.from_config(config)
        model = MegaContext(config, rngs=nnx.Rngs(0))
        run = nnx.jit(lambda m, b, s=spec: mc_loss(m, b, jnp.int32(0), jax.random.key(0), s)[1])
        metrics[weighting] = run(model, _batch(config))
    gap, uniform = metrics["gap"], metrics["uniform"]
    same = {k for k in gap if np.isclose(gap[k], uniform[k], rtol=1e-6, atol=0, equal_nan=True)}
    assert set(gap) - same - {"loss"} == {"kl"}  # the total moves by the KL's change


def test_condition_metrics_average_the_pyramid_baselines_only():
    """With ``deep_fraction`` some baselines are deep expansions: ``loss/mc_static`` and
    ``loss/mc_focus`` average the examples whose baseline is the pyramid, and nothing else."""
    config = tiny_mc_config("/unused", "/unused")
    config.unlock()
    config.mc.deep_fraction = 1.0
    model = MegaContext(config, rngs=nnx.Rngs(0))
    batch = _batch(config)
    assert not batch["from_pyramid"].all()  # the deep baselines are in use
    metrics = {}
    for which in ((True, True), (True, False), (False, True), (False, False)):
        b = {**batch, "from_pyramid": jnp.array(which)}
        metrics[which] = objective(
            model, b, jnp.int32(0), jax.random.key(0), MCTraining.from_config(config)
        )[1]
    for name in ("loss/mc_static", "loss/mc_focus"):
        both, first, second = (float(metrics[w][name]) for w in list(metrics)[:3])
        np.testing.assert_allclose(both, (first + second) / 2, rtol=1e-5)
        assert first != second
        assert np.isnan(float(metrics[False, False][name]))
    np.testing.assert_array_equal(metrics[True, True]["lens"], metrics[False, False]["lens"])


def test_lens_prior_adds_the_mean_squared_score():
    """The prior term is exactly ``lens_prior * score_rms**2``, and only once LensNet is on."""
    config = tiny_mc_config("/unused", "/unused")
    model = MegaContext(config, rngs=nnx.Rngs(0))
    batch = _batch(config)
    totals = {}
    for prior in (0.0, 3.0):
        for step in (0, 10):
            c = config.copy_and_resolve_references()
            c.mc.loss.lens_prior, c.mc.lens_start = prior, 5
            totals[prior, step], metrics = objective(
                model, batch, jnp.int32(step), jax.random.key(0), MCTraining.from_config(c)
            )
    assert 0 < float(metrics["lens/score_rms"]) <= 1
    expected = 3.0 * float(metrics["lens/score_rms"]) ** 2
    np.testing.assert_allclose(totals[3.0, 10] - totals[0.0, 10], expected, rtol=1e-4)
    np.testing.assert_allclose(totals[3.0, 0], totals[0.0, 0], rtol=1e-6)


@pytest.mark.parametrize("gap_weighted", [False, True])
def test_preference_loss_is_the_weighted_bradley_terry_mean(gap_weighted):
    """Pairs closer than the margin are not preferences; the rest are weighed by 1 or the gap."""
    losses = np.array([[1.0, 1.5, 1.001, 3.0], [2.0, 2.0, 2.0, 2.0]], np.float32)
    u = np.array([[0.3, -0.2, 0.9, 0.1], [0.5, 0.0, -0.5, 1.0]], np.float32)
    margin = 0.01
    num = den = 0.0
    for b in range(2):
        for i in range(4):
            for j in range(4):
                gap = float(losses[b, j]) - float(losses[b, i])
                if gap > margin:
                    weight = gap if gap_weighted else 1.0
                    num += weight * np.log1p(np.exp(-(float(u[b, i]) - float(u[b, j]))))
                    den += weight
    loss, prefer, du = preference_loss(jnp.asarray(losses), jnp.asarray(u), margin, gap_weighted)
    np.testing.assert_allclose(float(loss), num / den, rtol=1e-5)
    # Example 0: (0, 1), (0, 3), (1, 3), (2, 1), (2, 3); the tie (0, 2) and example 1 give none.
    assert float(prefer.sum()) == 5 and float(prefer[1].sum()) == 0
    np.testing.assert_allclose(du[0, 2, 1], u[0, 2] - u[0, 1], rtol=1e-6)


def test_preference_loss_without_pairs_is_zero():
    losses = jnp.ones((2, 3))
    for gap_weighted in (False, True):
        loss, prefer, _ = preference_loss(losses, jnp.zeros((2, 3)), 0.002, gap_weighted)
        assert float(loss) == 0.0 and float(prefer.sum()) == 0.0


@pytest.mark.parametrize(
    "k,num_tokens,fractions,counts",
    [
        (2, 40, (0.2, 0.2, 0.25), (4, 2, 1)),
        (4, 64, (0.25, 0.25), (4, 1)),
        (8, 512, (0.25, 0.25), (16, 2)),
    ],
)
def test_span_layout_tiles_each_sequence_with_the_asked_gists(k, num_tokens, fractions, counts):
    horizon = 2 * k
    assert span_counts(num_tokens, fractions, k) == counts
    arrays = variants.span_layout(3, num_tokens, fractions, k, horizon, np.random.default_rng(0))
    width = num_tokens - sum(n * (k ** (level + 1) - 1) for level, n in enumerate(counts))
    assert all(a.shape == (3, width) for a in arrays.values())
    for lod, start, scored in zip(arrays["lod"], arrays["start"], arrays["scored"], strict=True):
        ents = list(zip(lod.tolist(), start.tolist(), strict=True))
        check(from_entries(ents, width), num_tokens, k, len(counts), 0)
        assert [int((lod == level).sum()) for level in range(1, len(counts) + 1)] == list(counts)
        last_block = num_tokens // k * k - k
        assert all(s + k**l <= last_block for l, s in ents if l > 0)
        last_gist_end = None
        for (l, s), got in zip(ents, scored.tolist(), strict=True):
            if l > 0:
                last_gist_end = s + k**l
            want = l == 0 and last_gist_end is not None and s - last_gist_end < horizon
            assert got == want, (l, s)


def test_span_counts_refuse_more_gists_than_fit():
    # 36 tokens, K = 4: the last block stays, so [0, 32) holds two level-2 nodes; with both taken
    # no level-1 node is left for the 0.5 x 9 = 4 asked.
    assert span_counts(36, (0.0, 1.0), 4) == (0, 2)
    with pytest.raises(ValueError, match="hold only 0 free level-1 nodes, 4 asked for"):
        span_counts(36, (0.5, 1.0), 4)


def test_span_kl_is_zero_over_tokens_alone_and_trains_gistnet():
    """Over an all-token layout the student is the teacher (KL and added NLL 0); with gists the
    KL is positive, reaches GistNet and the base, and adds exactly ``span_kl`` x KL to the loss."""
    config = tiny_mc_config("/unused", "/unused")
    config.unlock()
    config.mc.loss.span_kl = 1.0
    model = MegaContext(config, rngs=nnx.Rngs(0))
    batch = _batch(config)
    tokens = batch["tokens"]
    t = tokens.shape[1] - 1
    table, offsets = node_table(model, tokens[:, :t], 4, 2)
    full_logits = model.base(tokens[:, :t])
    spec = MCTraining.from_config(config)
    plain = {
        "span_lod": jnp.zeros((2, t), jnp.int32),
        "span_start": jnp.broadcast_to(jnp.arange(t), (2, t)),
        "span_scored": jnp.ones((2, t), bool),
    }
    kl_of = nnx.jit(lambda m, layout: span_kl(m, table, offsets, full_logits, tokens, layout, spec))
    kl, added = kl_of(model, plain)
    assert abs(float(kl)) < 1e-5 and abs(float(added)) < 1e-4
    kl, added = kl_of(model, {k: batch[k] for k in plain})
    assert float(kl) > 1e-4 and np.isfinite(float(added))

    def loss(m):
        table, offsets = node_table(m, tokens[:, :t], 4, 2)
        return span_kl(m, table, offsets, full_logits, tokens, batch, spec)[0]

    grads = nnx.jit(nnx.grad(loss))(model)
    for part in (grads.base, grads.gistnet):
        assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(part)) > 0
    totals = {}
    for weight in (0.0, 1000.0):  # KL ~ 1e-4 at initialization: big enough to see in float32
        c = config.copy_and_resolve_references()
        c.mc.loss.span_kl = weight
        totals[weight], metrics = objective(
            model, batch, jnp.int32(0), jax.random.key(0), MCTraining.from_config(c)
        )
    # The KL (~2e-4) is a mean of differences of log-sum-exps near 5: two compiled programs
    # round it apart by a few float32 ulps of those (~4e-8), x 1000 in the objective.
    np.testing.assert_allclose(float(metrics["span_kl"]), float(kl), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
        totals[1000.0] - totals[0.0], 1000.0 * float(kl), rtol=1e-4, atol=1e-4
    )


def test_reconstruction_reads_each_gist_then_its_span_after_it():
    """The autoencoding term by hand (K = 4): the base reads each block's gist at the centre of a
    span [0, 4), then the block's first 3 tokens at positions 4, 5, 6, and is scored on all 4;
    blocks past a sequence's end (cursor + S) are not scored."""
    config = tiny_mc_config("/unused", "/unused")  # K = 4, T = 64, S = 4
    model = MegaContext(config, rngs=nnx.Rngs(0))
    spec = MCTraining.from_config(config)
    tokens = jnp.asarray(np.random.default_rng(3).integers(3, 256, (2, 65)), jnp.int32)
    table, offsets = node_table(model, tokens[:, :64], 4, 2)
    cursor = jnp.array([60, 8])  # sequence 1 ends at token 12: its blocks 0, 1 and 2
    got = reconstruction(model, table, offsets, tokens, cursor, spec)

    def by_hand(row, block):
        span = tokens[row, 4 * block : 4 * block + 4]
        gist = table[row, offsets[1] + block]
        inputs = jnp.concatenate([gist[None], model.base.embed(span[None, :3])[0]])[None]
        mu = jnp.array([[1.5, 4.0, 5.0, 6.0]])
        sigma = jnp.array([[config.mc.sigma_scale * 4, 0.0, 0.0, 0.0]])
        logits = model.base(embeddings=inputs, mu=mu, sigma=sigma)
        return jax.nn.logsumexp(logits[0], -1) - logits[0, jnp.arange(4), span]

    nll = jnp.concatenate([by_hand(0, b) for b in range(16)] + [by_hand(1, b) for b in range(3)])
    np.testing.assert_allclose(float(got), float(nll.mean()), rtol=1e-5)

    grads = nnx.jit(
        nnx.grad(
            lambda m: reconstruction(m, *node_table(m, tokens[:, :64], 4, 2), tokens, cursor, spec)
        )
    )(model)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads.gistnet)) > 0


def test_reconstruct_weight_adds_its_term_alone():
    config = tiny_mc_config("/unused", "/unused")
    model = MegaContext(config, rngs=nnx.Rngs(0))
    batch = _batch(config)
    totals = {}
    for weight in (0.0, 0.5):
        c = config.copy_and_resolve_references()
        c.mc.loss.reconstruct = weight
        totals[weight], metrics = objective(
            model, batch, jnp.int32(0), jax.random.key(0), MCTraining.from_config(c)
        )
    assert "loss/reconstruct" in metrics and float(metrics["loss/reconstruct"]) > 0
    np.testing.assert_allclose(
        totals[0.5] - totals[0.0], 0.5 * float(metrics["loss/reconstruct"]), rtol=1e-4
    )


def test_checkpoint_restores_all_three_parts(tmp_path, corpus_dir):
    config = tiny_mc_config(tmp_path, corpus_dir, steps=2)
    summary = train(config, progress=False)
    assert np.isfinite(summary["mc/lens"]) and "mc/loss/mc_focus" in summary
    model, restored_config = load_model(tmp_path)
    assert isinstance(model, MegaContext) and restored_config.mc.enabled
    trainable = make_trainable(config, make_mesh())
    checkpointer = Checkpointer(tmp_path, create=False)
    state, step, _, _ = checkpointer.restore(trainable.abstract_state())
    checkpointer.close()
    assert step == 2
    fresh = trainable.init()
    for part in ("base", "gistnet", "lensnet"):
        saved = jax.tree.leaves(nnx.state(getattr(model, part)))
        assert saved, part
        for a, b in zip(saved, jax.tree.leaves(state.params[part]), strict=True):
            np.testing.assert_array_equal(a, b)
        # Training moved every part away from its initialization.
        moved = [
            not np.array_equal(a, b)
            for a, b in zip(
                jax.tree.leaves(state.params[part]),
                jax.tree.leaves(fresh.params[part]),
                strict=True,
            )
        ]
        assert any(moved), part


def test_mc_resume_is_exact(tmp_path, corpus_dir):
    def config(workdir):  # with random stops and bounded positions: their draws resume too
        c = tiny_mc_config(workdir, corpus_dir, steps=4)
        c.unlock()
        c.mc.min_history, c.mc.positions = 20, "slots"
        c.lock()
        return c

    straight = train(config(tmp_path / "a"), progress=False)
    train(config(tmp_path / "b"), stop_at=2, progress=False)
    resumed = train(config(tmp_path / "b"), progress=False)
    for key in ("mc/objective", "mc/lens", "mc/loss/mc_focus", "val/loss"):
        assert resumed[key] == straight[key], key


def _curriculum_config(workdir, corpus_dir):
    c = tiny_mc_config(workdir, corpus_dir, steps=4)
    c.unlock()
    c.curriculum.steps, c.curriculum.seq_len, c.curriculum.batch_size = 2, 16, 8
    c.lock()
    return c


def test_curriculum_trains_the_base_alone_then_every_part(tmp_path, corpus_dir):
    """Curriculum steps move the base model only; a run stopped inside the curriculum and at its
    end resumes exactly (each checkpoint records the iterator of the stage that comes next)."""
    straight = train(_curriculum_config(tmp_path / "a", corpus_dir), progress=False)
    resumed = tmp_path / "b"
    train(_curriculum_config(resumed, corpus_dir), stop_at=1, progress=False)
    train(_curriculum_config(resumed, corpus_dir), stop_at=2, progress=False)
    config = _curriculum_config(resumed, corpus_dir)
    trainable = make_trainable(config, make_mesh())
    checkpointer = Checkpointer(resumed, create=False)
    state, step, _, _ = checkpointer.restore(trainable.abstract_state())
    checkpointer.close()
    fresh = trainable.init()
    assert step == 2
    for part, moved in (("base", True), ("gistnet", False), ("lensnet", False)):
        pairs = zip(
            jax.tree.leaves(state.params[part]), jax.tree.leaves(fresh.params[part]), strict=True
        )
        assert any(not np.array_equal(a, b) for a, b in pairs) == moved, part
    summary = train(config, progress=False)
    assert summary["step"] == 4
    for key in ("curriculum/loss", "mc/objective", "mc/lens", "mc/loss/mc_focus", "val/loss"):
        assert summary[key] == straight[key], key
    # Each objective is its own series: the curriculum's plain LM loss, then the MC objective.
    records = read_metrics(resumed / "metrics.jsonl")

    def steps(key):
        return sorted(r["step"] for r in records if key in r)

    assert steps("curriculum/loss") == [1, 2] and steps("mc/objective") == [3, 4]
    assert steps("mc/lens") == [3, 4] and steps("train/loss") == []


def test_frozen_base_trains_only_gistnet_and_lensnet(tmp_path, corpus_dir):
    base_dir = tmp_path / "base"
    base_cfg = tiny_mc_config(base_dir, corpus_dir, steps=1)
    base_cfg.unlock()
    base_cfg.mc.enabled = False
    train(base_cfg, progress=False)
    config = tiny_mc_config(tmp_path / "mc", corpus_dir, steps=2)
    config.unlock()
    config.mc.mode = "frozen_base"
    config.mc.base_checkpoint = str(base_dir)
    train(config, stop_at=1, progress=False)
    train(config, progress=False)  # resumes: the base comes back from its reference
    # Checkpoints hold the trained parts only; the config names where the base comes from.
    saved = json.loads((tmp_path / "mc" / "checkpoints" / "2" / "state" / "_METADATA").read_text())
    keys = [ast.literal_eval(k) for k in saved["tree_metadata"]]
    params = [k[1] for k in keys if k[0] == "params"]
    assert set(params) == {"gistnet", "lensnet"}
    base, _ = load_model(base_dir)
    mc, _ = load_model(tmp_path / "mc")
    for a, b in zip(
        jax.tree.leaves(nnx.state(base)), jax.tree.leaves(nnx.state(mc.base)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_pyramid_pass_over_tokens_alone_is_the_causal_model():
    """With a band wider than the sequence, the pyramid mask over tokens is the causal mask."""
    config = tiny_mc_config("/unused", "/unused")
    model = MegaContext(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 13)), jnp.int32)
    meta = Entries.tokens(2, 13)
    spec = MaskSpec("pyramid", window=13, block_size=4, max_level=2)
    pyramid = model.base(embeddings=model.base.embed(tokens), entries=(meta, spec))
    np.testing.assert_allclose(pyramid, model.base(tokens), atol=1e-5)


def test_pyramid_pass_never_reads_later_tokens():
    """Every node's logits depend only on tokens before its span's end, smeared keys included
    (level-major rows: the first gist of a level follows the last row of the level below)."""
    config = tiny_mc_config("/unused", "/unused")
    assert config.model.smear_keys
    model = MegaContext(config, rngs=nnx.Rngs(0))
    k, levels = config.mc.block_size, config.mc.max_level
    lod, start = node_layout(32, k, levels)
    meta = Entries.make(lod[None], start[None], np.ones((1, len(lod)), bool), k)
    spec = MaskSpec("pyramid", window=4, block_size=k, max_level=levels)

    def logits(tokens):
        table, _ = node_table(model, tokens, k, levels)
        return model.base(embeddings=table, mu=meta.mu, sigma=meta.sigma, entries=(meta, spec))

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 32)), jnp.int32)
    before = logits(tokens)
    after = logits(tokens.at[:, 24:].set((tokens[:, 24:] + 1) % 256))
    earlier = np.asarray(meta.end[0] <= 24)
    assert earlier.sum() == 24 + 6 + 1  # tokens 0..23, LOD1 gists of [0, 24), LOD2 gist [0, 16)
    np.testing.assert_array_equal(after[0, earlier], before[0, earlier])
    assert not np.allclose(after[0, ~earlier], before[0, ~earlier])


def test_pyramid_pass_trains_base_and_gistnet():
    config = tiny_mc_config("/unused", "/unused")
    config.unlock()
    for name in ("lm_tokens", "lm_wc", "kl", "lens"):
        config.mc.loss[name] = 0.0
    config.mc.loss.pyramid = 1.0
    model = MegaContext(config, rngs=nnx.Rngs(0))
    batch = _batch(config)
    spec = MCTraining.from_config(config)
    # Jitted: op by op, the eager gradient of the whole objective took over a minute on CPU.
    (loss, metrics), grads = nnx.jit(
        nnx.value_and_grad(
            lambda m: mc_loss(m, batch, jnp.int32(0), jax.random.key(0), spec), has_aux=True
        )
    )(model)
    assert float(loss) == pytest.approx(float(metrics["loss/pyramid"]))
    assert 0 < float(loss) < 10
    for part in (grads.base, grads.gistnet):
        assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(part)) > 0
    # The pass reads every node: 64 tokens, 16 LOD1 and 4 LOD2 gists, each with its own label.
    lod, start = node_layout(64, 4, 2)
    assert len(lod) == 84 and (start[lod == 2] == [0, 16, 32, 48]).all()


def test_lens_rounds_adds_the_preference_loss_on_the_first_rounds_contexts():
    """``mc.loss.lens_rounds``: LensNet's scores of the context after the first refocus round
    (``guided_contexts`` returns it; tested with the rounds above) get the same preference loss
    over the same variants, weighted."""
    config = tiny_mc_config("/unused", "/unused")
    config.mc.lens_start, config.mc.train_refocus_steps = 0, 2
    model = MegaContext(config, rngs=nnx.Rngs(0))
    batch = _batch(config)
    totals = {}
    for weight in (0.0, 0.5):
        c = config.copy_and_resolve_references()
        c.mc.loss.lens_rounds = weight
        totals[weight], metrics = objective(
            model, batch, jnp.int32(0), jax.random.key(0), MCTraining.from_config(c)
        )
    term = float(metrics["lens_rounds"])
    assert term > 0 and float(metrics["lens_rounds/pairs"]) > 0
    prior = config.mc.loss.lens_prior * float(metrics["lens_rounds/score_rms"]) ** 2
    np.testing.assert_allclose(totals[0.5] - totals[0.0], 0.5 * (term + prior), rtol=1e-4)
