import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from megacontext_jax.focus.positions import Positions
from megacontext_jax.focus.rules import collapse, expand, recency_pyramid
from megacontext_jax.focus.working_context import entries, from_entries
from megacontext_jax.nets.gpt import GPT
from megacontext_jax.nets.specs import ModelConfig
from megacontext_jax.runtime.cached_context import CachedContext
from tests.conftest import mc_config

K, W = 4, 32


def _embedder(table, asked=None):
    """Embeddings: a fixed random vector per node; records the entries asked for."""

    def embed(ents):
        if asked is not None:
            asked.append(list(ents))
        lod, start = np.array(ents).T
        return table[(lod * 10_000 + start) % table.shape[0]]

    return embed


@nnx.jit
def _forward(model: GPT, embeddings, mu, sigma):
    """The whole context from scratch (jitted: op by op it took most of the test's time)."""
    return model(embeddings=embeddings, mu=mu, sigma=sigma)


@pytest.mark.parametrize("mode", ["absolute", "slots"])
def test_cache_across_edits_matches_recomputing_from_scratch(mode):
    config = mc_config(block_size=K, max_level=2)
    model = GPT(ModelConfig.from_config(config.model), rngs=nnx.Rngs(0))
    table = np.asarray(jax.random.normal(jax.random.key(1), (997, config.model.width)))
    positions = Positions(mode, K)
    cached = CachedContext(model, W, positions)
    embed = _embedder(table)
    rng = np.random.default_rng(0)
    n_tokens = 60
    ents = entries(recency_pyramid(n_tokens, W - 8, K, 2, 4))
    recomputed = []
    for step in range(30):
        kind = rng.choice(["append", "expand", "collapse"])
        wc = from_entries(ents, W)
        if kind == "append" and len(ents) < W:
            ents = [*ents, (0, n_tokens)]
            n_tokens += 1
        elif kind == "expand":
            gists = [i for i, (l, _) in enumerate(ents) if l > 0]
            if gists and len(ents) + K - 1 <= W:
                ents = entries(expand(wc, int(rng.choice(gists)), K))
        else:
            groups = [
                i
                for i in range(len(ents) - K + 1)
                if len({l for l, _ in ents[i : i + K]}) == 1
                and ents[i][0] < 2
                and ents[i][1] % K ** (ents[i][0] + 1) == 0
            ]
            if groups:
                ents = entries(collapse(wc, int(rng.choice(groups)), K))
        logits, count = cached.update(ents, embed)
        recomputed.append(count)
        lod, start = (jnp.asarray(a) for a in np.array(ents).T)
        mu, sigma = positions(lod, start)
        full = _forward(model, jnp.asarray(embed(ents))[None], mu[None], sigma[None])
        np.testing.assert_allclose(logits, full[0, -1], atol=2e-4, err_msg=f"step {step} ({kind})")
    # Appends recompute one entry; edits recompute only from the first changed entry on.
    assert min(recomputed) <= 1 and max(recomputed) < W


def test_unchanged_context_is_free_and_errors():
    config = mc_config(block_size=K, max_level=2)
    model = GPT(ModelConfig.from_config(config.model), rngs=nnx.Rngs(0))
    table = np.ones((997, config.model.width), np.float32)
    cached = CachedContext(model, W, Positions("absolute", K))
    asked = []
    embed = _embedder(table, asked)
    ents = [(0, t) for t in range(5)]
    first, count = cached.update(ents, embed)
    assert count == 5
    again, count = cached.update(ents, embed)
    assert count == 0 and again is first
    _, count = cached.update([*ents, (0, 5)], embed)
    assert count == 1 and asked == [ents, [(0, 5)]]  # only the changed suffix is embedded
    too_many = [(0, t) for t in range(W + 1)]
    with pytest.raises(ValueError, match="33 entries does not fit capacity 32"):
        cached.update(too_many, embed)
