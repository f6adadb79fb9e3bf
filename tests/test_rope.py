import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megacontext_jax.kernels.rope import apply_rotary, gaussian_rope, rope_frequencies, rope_tables


def _plain_rope_numpy(x, positions, theta=10000.0):
    """Ordinary RoPE, written independently in float64 with complex numbers (half-split pairs)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-np.arange(0, x.shape[-1], 2) / x.shape[-1])
    z = x[..., :half] + 1j * x[..., half:]
    z = z * np.exp(1j * positions[..., None, None] * freqs)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_sigma_zero_is_ordinary_rope_exactly():
    x = jax.random.normal(jax.random.key(0), (2, 7, 3, 16))
    mu = jnp.broadcast_to(jnp.arange(7.0), (2, 7))
    plain = gaussian_rope(x, mu, None)
    np.testing.assert_array_equal(gaussian_rope(x, mu, jnp.zeros((2, 7))), plain)
    np.testing.assert_allclose(plain, _plain_rope_numpy(np.asarray(x), np.asarray(mu)), atol=2e-5)


def test_relative_positions():
    """<rope(q, m), rope(k, n)> depends on m - n only, for tokens and for gists alike."""
    q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 1, 32))
    sigma = jnp.array([[3.0]])

    def score(m, n):
        rq = gaussian_rope(q, jnp.array([[m]]), sigma)
        rk = gaussian_rope(k, jnp.array([[n]]), sigma)
        return float(jnp.sum(rq * rk))

    assert score(10.0, 4.0) == pytest.approx(score(106.0, 100.0), rel=1e-4, abs=1e-5)


def test_gaussian_rope_is_expected_rotation():
    """Scaling by exp(-(sigma w)^2 / 2) equals E[rotation by p], p ~ N(mu, sigma^2)."""
    x = np.asarray(jax.random.normal(jax.random.key(2), (1, 1, 1, 8)), np.float64)
    mu, sigma = 40.5, 9.2
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)  # probabilists' Gauss-Hermite
    expected = sum(
        w * _plain_rope_numpy(x, np.array([[mu + sigma * z]]))
        for z, w in zip(nodes, weights, strict=True)
    ) / np.sqrt(2 * np.pi)
    got = gaussian_rope(jnp.asarray(x, jnp.float32), jnp.array([[mu]]), jnp.array([[sigma]]))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_coarse_entries_keep_low_frequencies_only():
    cos, _ = rope_tables(jnp.array([0.0]), jnp.array([1024 / 12**0.5]), 64)
    damp = np.asarray(cos[0])
    assert damp[-1] > 0.95  # lowest frequency survives
    assert damp[0] < 1e-6  # highest frequency is averaged away


def test_frequencies_and_dtype():
    np.testing.assert_allclose(rope_frequencies(4), [1.0, 0.01])
    with pytest.raises(ValueError, match="even"):
        rope_frequencies(5)
    x = jnp.ones((1, 2, 1, 4), jnp.bfloat16)
    cos, sin = rope_tables(jnp.zeros((1, 2)), None, 4)
    assert apply_rotary(x, cos, sin).dtype == jnp.bfloat16
