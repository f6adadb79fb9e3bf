import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from megacontext_jax.config import base_config
from megacontext_jax.kernels.mixed_attention import Entries
from megacontext_jax.nets.gpt import GPT
from megacontext_jax.nets.layers import smear_keys
from megacontext_jax.nets.losses import cross_entropy
from megacontext_jax.nets.specs import ModelConfig


def _model(**overrides):
    cfg = base_config().model
    cfg.width, cfg.depth, cfg.num_heads, cfg.num_kv_heads = 32, 2, 4, 2
    for k, v in overrides.items():
        cfg[k] = v
    return GPT(ModelConfig.from_config(cfg), rngs=nnx.Rngs(0))


def _tokens(shape=(2, 12), seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, 256)


def test_sigma_zero_with_token_positions_is_ordinary_rope():
    model, tokens = _model(), _tokens()
    mu = jnp.broadcast_to(jnp.arange(12.0), (2, 12))
    np.testing.assert_array_equal(model(tokens, mu=mu, sigma=jnp.zeros((2, 12))), model(tokens))


def test_positions_are_relative():
    """Shifting every mu by a constant leaves the logits unchanged: positions act only via RoPE."""
    model, tokens = _model(), _tokens()
    mu = jnp.broadcast_to(jnp.arange(12.0), (2, 12))
    sigma = jnp.full((2, 12), 0.5)
    base = model(tokens, mu=mu, sigma=sigma)
    np.testing.assert_allclose(model(tokens, mu=mu + 64.0, sigma=sigma), base, atol=1e-4)
    assert not np.allclose(model(tokens, mu=mu * 2.0, sigma=sigma), base, atol=1e-3)


SMEAR = pytest.mark.parametrize("smear", [False, True], ids=["plain_keys", "smeared_keys"])


@SMEAR
def test_causality(smear):
    model, tokens = _model(smear_keys=smear), _tokens()
    logits = model(tokens)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 256)
    logits2 = model(changed)
    np.testing.assert_array_equal(logits2[:, :7], logits[:, :7])
    assert not np.allclose(logits2[:, 7:], logits[:, 7:])


def test_embeddings_input_equals_ids():
    model, tokens = _model(), _tokens()
    np.testing.assert_array_equal(model(embeddings=model.embed(tokens)), model(tokens))
    with pytest.raises(ValueError, match="exactly one"):
        model(tokens, embeddings=model.embed(tokens))


@SMEAR
def test_padding_is_never_attended(smear):
    model, tokens = _model(smear_keys=smear), _tokens((1, 10))
    valid = jnp.arange(10)[None] < 6
    garbage = tokens.at[:, 6:].set(3)
    a = model(tokens, kv_valid=valid)[:, :6]
    b = model(garbage, kv_valid=valid)[:, :6]
    np.testing.assert_array_equal(a, b)


@SMEAR
@pytest.mark.parametrize("num_kv_heads", [1, 4])
def test_kv_cache_decode_matches_full_forward(num_kv_heads, smear):
    model, tokens = _model(num_kv_heads=num_kv_heads, smear_keys=smear), _tokens((2, 10))
    full = model(tokens)
    cache = model.init_cache(2, 16)
    prefix_logits, cache = model.decode(cache, 0, tokens[:, :6])
    steps = [prefix_logits]
    for t in range(6, 10):
        logits, cache = model.decode(cache, t, tokens[:, t : t + 1])
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


@SMEAR
def test_cache_rewrite_from_any_slot(smear):
    """Rewriting slots [4, 10) after an edit gives the logits of the edited sequence."""
    model, tokens = _model(smear_keys=smear), _tokens((1, 10))
    edited = tokens.at[:, 4:].set(_tokens((1, 6), seed=1))
    cache = model.init_cache(1, 12)
    _, cache = model.decode(cache, 0, tokens)
    logits, _ = model.decode(cache, 4, edited[:, 4:])
    np.testing.assert_allclose(logits, model(edited)[:, 4:], atol=1e-5)


def test_smeared_keys_mix_in_the_adjacent_previous_entry():
    k = jax.random.normal(jax.random.key(0), (1, 5, 2, 4))
    gate = jnp.array([0.0, 1.5])  # per key/value head
    g = jax.nn.sigmoid(gate)[:, None]
    previous = jnp.concatenate([jnp.zeros_like(k[:, :1]), k[:, :-1]], axis=1)
    np.testing.assert_allclose(smear_keys(k, gate), g * k + (1 - g) * previous, atol=1e-6)
    # Level-major rows: tokens [0, 4), then LOD1 gists of [0, 2) and [2, 4) (K=2): the first gist
    # follows the last token in the layout but not in time, so nothing is mixed into it.
    meta = Entries.make(jnp.array([[0, 0, 0, 0, 1]]), jnp.array([[0, 1, 2, 3, 0]]), True, 2)
    smeared = smear_keys(k, gate, (meta, None))
    np.testing.assert_allclose(smeared[:, 4], g * k[:, 4], atol=1e-6)
    np.testing.assert_allclose(smeared[:, 1:4], smear_keys(k, gate)[:, 1:4], atol=1e-6)
    # A very open gate gives plain keys back.
    np.testing.assert_allclose(smear_keys(k, jnp.full(2, 30.0)), k, atol=1e-6)


def test_bf16_compute_and_soft_cap():
    model = _model(dtype="bfloat16", logit_soft_cap=2.0)
    logits = model(_tokens())
    assert logits.dtype == jnp.float32
    assert float(jnp.abs(logits).max()) <= 2.0


def test_cross_entropy_counts_only_masked_targets():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
    nll, n = cross_entropy(logits, jnp.array([[0, 1]]), jnp.array([[True, False]]))
    assert int(n) == 1
    assert float(nll) == pytest.approx(np.log(2), rel=1e-6)


@SMEAR
def test_attention_mass_is_the_blocks_own_reading(smear):
    """``query_key`` gives the queries and keys a block's attention compares: their weights
    times the block's values reproduce its attention output. ``attention_mass`` averages those
    weights: each row sums to 1, and no query pays anything to padding or to a later entry."""
    from megacontext_jax.kernels import attention_weights
    from megacontext_jax.nets.layers import rms_norm

    model, tokens = _model(smear_keys=smear), _tokens()
    valid = jnp.arange(12)[None] < jnp.array([[12], [9]])
    x = model.inputs(model.embed(tokens))
    mu = jnp.broadcast_to(jnp.arange(12.0), (2, 12))
    cos, sin = model.rope(mu, jnp.zeros((2, 12)))
    block = model.blocks[0]
    y, _ = block.attn(rms_norm(x), cos, sin, valid, None, 0)
    q, k = block.query_key(x, cos, sin)
    v = block.attn.project(rms_norm(x), cos, sin)[2]
    mask = (jnp.arange(12)[None, :, None] >= jnp.arange(12)[None, None, :]) & valid[:, None, :]
    w = attention_weights(q, k, mask)  # [B, Hkv, G, T, T]
    out = jnp.einsum("bhgqk,bkhd->bqhgd", w, v).reshape(2, 12, -1)
    np.testing.assert_allclose(block.attn.o(out), y, atol=1e-5)

    queries = jnp.array([[11, 5], [8, 8]])
    mass = model.attention_mass(model.embed(tokens), mu, jnp.zeros((2, 12)), valid, queries)
    np.testing.assert_allclose(mass.sum(-1), 1.0, rtol=1e-5)
    assert (mass[1, 9:] == 0).all()  # padding
    assert (mass > 0)[0].all() and (mass[1, :9] > 0).all()
    one = model.attention_mass(model.embed(tokens), mu, jnp.zeros((2, 12)), valid, queries[:, 1:])
    assert (one[0, 6:] == 0).all()  # query 5 sees entries 0..5 only
