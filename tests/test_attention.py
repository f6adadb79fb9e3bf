import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megacontext_jax.kernels.attention import attention
from megacontext_jax.kernels.reference import attention_reference


def _naive(q, k, v, causal, kv_valid, q_offset):
    """Loop-per-query float64 attention with GQA, the reference's reference."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for bi, qi, h in itertools.product(range(b), range(tq), range(hq)):
        kh = h // (hq // hkv)
        visible = [
            j
            for j in range(tk)
            if (not causal or j <= qi + q_offset) and (kv_valid is None or kv_valid[bi, j])
        ]
        if not visible:
            continue
        s = np.array([q[bi, qi, h] @ k[bi, j, kh] for j in visible]) / np.sqrt(d)
        w = np.exp(s - s.max())
        w /= w.sum()
        out[bi, qi, h] = sum(wj * v[bi, j, kh] for wj, j in zip(w, visible, strict=True))
    return out


@pytest.mark.parametrize(
    "tq,tk,hq,hkv,causal,offset,padded",
    [
        (5, 5, 4, 4, True, 0, False),
        (5, 5, 4, 2, True, 0, True),
        (3, 9, 6, 2, True, 6, True),  # decode: newest 3 entries over a cache of 9
        (7, 7, 2, 1, False, 0, True),  # bidirectional with padding
    ],
)
def test_reference_matches_naive(tq, tk, hq, hkv, causal, offset, padded):
    kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (2, tq, hq, 8))
    k = jax.random.normal(kk, (2, tk, hkv, 8))
    v = jax.random.normal(kv, (2, tk, hkv, 8))
    valid = jax.random.bernoulli(km, 0.7, (2, tk)) if padded else None
    # Full float32 matmuls: a GPU's default (TF32) rounds to ~1e-3, beyond this float64 check.
    with jax.default_matmul_precision("float32"):
        got = attention(q, k, v, causal=causal, kv_valid=valid, q_offset=offset)
    want = _naive(q, k, v, causal, None if valid is None else np.asarray(valid), offset)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_fully_masked_rows_are_zero_with_finite_gradients():
    q = jnp.ones((1, 2, 1, 4))
    k = v = jnp.ones((1, 2, 1, 4))
    valid = jnp.array([[False, False]])
    out = attention_reference(q, k, v, kv_valid=valid)
    np.testing.assert_array_equal(out, 0.0)
    grads = jax.grad(lambda q: attention_reference(q, k, v, kv_valid=valid).sum())(q)
    assert np.isfinite(np.asarray(grads)).all()


def test_bf16_inputs_keep_dtype():
    q = jnp.ones((1, 3, 2, 8), jnp.bfloat16)
    assert attention(q, q, q).dtype == jnp.bfloat16


def test_bad_arguments():
    q = jnp.ones((1, 2, 3, 4))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, jnp.ones((1, 2, 2, 4)), jnp.ones((1, 2, 2, 4)))
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention(q, q, q, impl="magic")
