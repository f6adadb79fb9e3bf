"""Split-KV decode attention (``kernels.decode``) against the jnp reference, under the interpreter."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megacontext_jax import kernels
from megacontext_jax.kernels import decode
from megacontext_jax.kernels.decode import MAX_ROWS, decode_attention, merge
from megacontext_jax.kernels.mask import Entries, MaskSpec
from megacontext_jax.kernels.mixed_attention import mixed_attention_reference


def _cache(batch: int, capacity: int, length: int, tq: int):
    """Keys of a KV cache holding ``length`` tokens of ``capacity`` slots, and the metadata of the
    ``tq`` newest of them as queries."""
    k_meta = Entries.tokens(batch, capacity)
    k_meta.valid = jnp.broadcast_to(jnp.arange(capacity) < length, (batch, capacity))
    return Entries.tokens(batch, tq, length - tq), k_meta


def _wc(rng, length: int, tq: int):
    """A working context of tokens and gists (K = 4) in order, some invalid: the keys a cached WC
    decodes over, and its ``tq`` newest entries as queries."""
    lods = rng.integers(0, 3, length)
    starts = np.concatenate([[0], np.cumsum(4**lods)[:-1]])
    valid = rng.random(length) > 0.1
    meta = Entries.make(lods[None], starts[None], valid[None], 4)
    q_meta = jax.tree.map(lambda a: a[:, length - tq :], meta)
    return q_meta, meta


def _qkv(rng, b, tq, tk, hq, hkv, dh, dtype=jnp.float32):
    def draw(t, h):
        return jnp.asarray(rng.standard_normal((b, t, h, dh)), dtype)

    return draw(tq, hq), draw(tk, hkv), draw(tk, hkv)


CASES = [
    # (batch, tq, hq, hkv, dh, splits): GQA and MHA, odd head dims, one and several queries
    (2, 1, 4, 2, 8, None),
    (1, 3, 4, 1, 12, 3),
    (2, 1, 2, 2, 16, 1),
    (1, 5, 8, 2, 8, 7),
]


@pytest.mark.parametrize("b,tq,hq,hkv,dh,splits", CASES)
def test_decode_over_a_cache_matches_the_reference(b, tq, hq, hkv, dh, splits):
    rng = np.random.default_rng(0)
    q_meta, k_meta = _cache(b, capacity=150, length=97, tq=tq)
    q, k, v = _qkv(rng, b, tq, 150, hq, hkv, dh)
    spec = MaskSpec("decode")
    got = jax.jit(
        lambda q, k, v: decode_attention(q, k, v, q_meta, k_meta, spec, block_k=32, splits=splits)
    )(q, k, v)
    want = mixed_attention_reference(q, k, v, q_meta, k_meta, spec, rope=False)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_decode_over_a_working_context_of_gists_matches_the_reference(splits):
    rng = np.random.default_rng(1)
    q_meta, k_meta = _wc(rng, length=90, tq=2)
    q, k, v = _qkv(rng, 1, 2, 90, 4, 2, 8)
    got = jax.jit(
        lambda q, k, v: decode_attention(
            q, k, v, q_meta, k_meta, MaskSpec("wc_causal"), block_k=16, splits=splits
        )
    )(q, k, v)
    want = mixed_attention_reference(q, k, v, q_meta, k_meta, MaskSpec("wc_causal"), rope=False)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_bf16_and_a_query_that_sees_nothing():
    rng = np.random.default_rng(2)
    q_meta, k_meta = _cache(1, capacity=64, length=40, tq=2)
    q_meta.end = jnp.array([[0, 40]], jnp.int32)  # the first query ends before every key
    q, k, v = _qkv(rng, 1, 2, 64, 4, 2, 16, jnp.bfloat16)
    got = decode_attention(q, k, v, q_meta, k_meta, block_k=16, splits=2)
    want = mixed_attention_reference(q, k, v, q_meta, k_meta, MaskSpec("decode"), rope=False)
    assert got.dtype == jnp.bfloat16
    assert np.all(np.asarray(got[:, 0]) == 0)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2
    )


def test_gradients_are_the_references():
    rng = np.random.default_rng(3)
    q_meta, k_meta = _cache(1, capacity=48, length=30, tq=1)
    q, k, v = _qkv(rng, 1, 1, 48, 2, 1, 8)
    spec = MaskSpec("decode")

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    kernel = lambda q, k, v: decode_attention(q, k, v, q_meta, k_meta, spec, block_k=16)
    ref = lambda q, k, v: mixed_attention_reference(q, k, v, q_meta, k_meta, spec, rope=False)
    got = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_merge_is_one_softmax_over_the_parts():
    rng = np.random.default_rng(4)
    logits, values = rng.standard_normal((3, 10)), rng.standard_normal((10, 4))
    logits[2, 6:] = -np.inf  # the last part sees nothing
    parts = [(0, 4), (4, 6), (6, 10)]
    o, lse = [], []
    for row, (lo, hi) in zip(logits, parts, strict=True):
        s = row[lo:hi]
        m = np.max(s)
        seen = np.isfinite(m)
        p = np.exp(s - m) if seen else np.zeros_like(s)
        o.append(p @ values[lo:hi] / (p.sum() if seen else 1.0))
        lse.append((m + np.log(p.sum())) / np.log(2) if seen else -np.inf)  # base 2
    whole = np.concatenate([logits[0, :4], logits[1, 4:6], logits[2, 6:]])
    weights = np.exp(whole - whole.max())
    want = (weights / weights.sum()) @ values
    got = merge(jnp.asarray(np.array(o)[:, None]), jnp.asarray(np.array(lse)[:, None]))
    np.testing.assert_allclose(got[0], want, atol=1e-6)  # float32 merge
    nothing = merge(jnp.zeros((2, 1, 3)), jnp.full((2, 1), -jnp.inf))
    assert np.all(np.asarray(nothing) == 0)


def test_the_kernel_lowers_for_a_gpu():
    """Pallas's Triton lowering builds the kernel's Triton IR here; only the GPU compile is left."""
    q = jax.ShapeDtypeStruct((2, 1, 16, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 4096, 4, 128), jnp.bfloat16)
    q_meta, k_meta = _cache(2, capacity=4096, length=3000, tq=1)

    def fn(q, k, v):
        return decode_attention(q, k, v, q_meta, k_meta, interpret=False)

    text = jax.jit(fn).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1


def test_too_many_rows_is_one_line():
    q = jnp.zeros((1, MAX_ROWS // 4 + 1, 8, 16))
    kv = jnp.zeros((1, 256, 2, 16))
    with pytest.raises(ValueError, match=r"^4 query heads per KV head x 17 queries = 68 rows"):
        decode_attention(q, kv, kv, Entries.tokens(1, 17), Entries.tokens(1, 256))


def test_the_dispatcher_decodes_a_cache_with_the_split_kv_kernel(monkeypatch):
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, 2, 1, 80, 4, 2, 8)
    valid = jnp.broadcast_to(jnp.arange(80) < 51, (2, 80))
    calls = []
    real = decode.decode_attention
    dispatcher = importlib.import_module("megacontext_jax.kernels.attention")
    monkeypatch.setattr(
        dispatcher, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    got = kernels.attention(q, k, v, kv_valid=valid, q_offset=50, impl="pallas")
    want = kernels.attention(q, k, v, kv_valid=valid, q_offset=50, impl="reference")
    assert calls == [1]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
