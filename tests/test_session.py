import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from megacontext_jax.focus.rules import check, recency_pyramid
from megacontext_jax.focus.working_context import entries, from_entries
from megacontext_jax.megacontext import MegaContext
from megacontext_jax.memory.tree import Tree
from megacontext_jax.runtime.session import Session, SessionError, gister_for
from megacontext_jax.runtime.telemetry import Telemetry, lod_grid, plot_lod_map
from tests.conftest import tiny_mc_config

K, L, R = 4, 2, 4


def _config(positions="absolute", read_layer=0, **allocator):
    """W=24, K=4, R=4: a refocus every 4 tokens keeps 20 entries; low thresholds force edits."""
    c = tiny_mc_config("/unused", "/unused")
    c.unlock()
    c.mc.positions = positions
    c.mc.gist.read_layer = read_layer
    c.mc.allocator.tau_expand = c.mc.allocator.tau_collapse = 0.005
    for key, value in allocator.items():
        c.mc.allocator[key] = value
    c.lock()
    return c


def _model(config):
    return MegaContext(config, rngs=nnx.Rngs(0))


def _history(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.int32)


@nnx.jit
def _forward(base, embeddings, mu, sigma):
    return base(embeddings=embeddings, mu=mu, sigma=sigma)


def _recompute(model, session):
    """Next-token logits from scratch: the whole WC through the base model, no cache (jitted:
    op by op it took most of the test's time)."""
    lod, start = (jnp.asarray(a)[None] for a in np.array(session.entries).T)
    mu, sigma = session.layout.positions(lod, start)
    emb = jnp.asarray(session._embed(session.entries))[None]
    return _forward(model.base, emb, mu, sigma)[0, -1]


@pytest.mark.parametrize(
    "use_lens, positions, read_layer",
    [(True, "absolute", 0), (False, "absolute", 0), (True, "slots", 0), (True, "absolute", 1)],
)
def test_decoding_keeps_invariants_and_matches_recomputation(
    use_lens, positions, read_layer, tmp_path
):
    config = _config(positions, read_layer)
    model = _model(config)
    tree = Tree.in_memory(gister_for(model, config), L, config.model.vocab_size)
    telemetry = Telemetry(tmp_path / "t.jsonl")
    session = Session(model, config, tree, use_lens=use_lens, telemetry=telemetry)
    session.ingest(_history(150))
    edits = 0
    for step in range(60):
        np.testing.assert_allclose(
            session.logits(), _recompute(model, session), atol=2e-4, err_msg=f"step {step}"
        )
        before = session.refocus_count
        token = next(session.generate(1, temperature=1.0, seed=step))
        assert 0 <= token < 256 or token == 258  # bytes or EOS, never PAD/BOS/padding rows
        if session.refocus_count > before:
            record = telemetry.records[-1]
            edits += record["expands"] + record["collapses"]
            assert record["count"] <= session.budget
            horizon = check(from_entries(session.entries, session.budget), 150 + step + 1, K, L, R)
            assert horizon == record["horizon"]
        else:  # between refocus steps the new tokens join the WC as tokens, within W
            assert session.entries[-1] == (0, 150 + step) and len(session.entries) <= 24
    assert session.num_tokens == tree.num_tokens == 210  # generate() commits what it decoded
    assert tree.uncommitted == 0
    tree.verify(deep=True)  # gists made a block at a time are the tree's rebuilt from tokens
    assert session.refocus_count == 1 + 60 // 4
    assert (edits > 0) == use_lens  # the pyramid fallback never edits by score
    records = telemetry.records
    assert all(sum(r["lod_hist"]) == r["count"] for r in records)
    assert all(0.0 <= r["swap_rate"] <= 1.0 and r["residency"] >= 0 for r in records)


def test_memory_reopens_and_continues(tmp_path):
    config = _config()
    model = _model(config)
    gister = gister_for(model, config)
    memory = tmp_path / "memory"
    first = Session(model, config, Tree.create(memory, gister, L, config.model.vocab_size))
    first.ingest(_history(90))
    decoded = list(first.generate(10))
    first.close()
    tree = Tree.open(memory, gister)
    np.testing.assert_array_equal(tree.tokens(0, 100), np.concatenate([_history(90), decoded]))
    second = Session(model, config, tree)
    assert second.num_tokens == 100 and second.entries[-1] == (0, 99)
    second.ingest(_history(5, seed=1))
    assert second.num_tokens == 105
    second.close()
    tree = Tree.open(memory, gister)
    tree.verify(deep=True)  # gists of decoded tokens equal a rebuild of the same stream
    assert tree.num_tokens == 105
    tree.close()


@pytest.mark.parametrize("shape", ["recent", "proportional"])
def test_fresh_session_assembles_the_pyramid_and_ages_it(shape):
    config = _config()
    config.unlock()
    config.mc.pyramid = shape
    model = _model(config)
    tree = Tree.in_memory(gister_for(model, config), L, config.model.vocab_size)
    session = Session(model, config, tree, use_lens=False)
    with pytest.raises(SessionError, match="the memory is empty: give a prompt"):
        session.logits()
    session.ingest(_history(64))
    assert session.entries == entries(recency_pyramid(64, session.budget, K, L, R, shape))
    for n in range(68, 100, 4):  # short inputs join as tokens; the refocus ages the WC
        session.ingest(_history(4, seed=n))
        check(from_entries(session.entries, session.budget), n, K, L, R)
        # Aging collapses in the inverse of the pyramid's expansion order, so the WC stays the
        # pyramid of the longer history.
        assert session.entries == entries(recency_pyramid(n, session.budget, K, L, R, shape))


def test_lod_map(tmp_path):
    records = [
        {"step": 0, "num_tokens": 6, "entries": [[1, 0], [0, 4], [0, 5]], "lod_hist": [2, 1]},
        {"step": 4, "num_tokens": 8, "entries": [[0, 4], [0, 5], [0, 6], [0, 7]], "lod_hist": [4]},
    ]
    grid, span = lod_grid(records, block_size=4, rows=8)
    assert span == (0, 8)
    np.testing.assert_array_equal(grid[:, 0], [1, 1, 1, 1, 0, 0, np.nan, np.nan])
    np.testing.assert_array_equal(grid[:, 1], [np.nan] * 4 + [0] * 4)  # horizon at 4
    plot_lod_map(records, 4, tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
