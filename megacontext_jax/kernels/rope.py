"""Gaussian rotary position embedding (DESIGN section 5).

An entry has a position ``mu`` and a width ``sigma``. Rotary pair j with frequency w_j is rotated by
``mu * w_j`` and scaled by ``exp(-(sigma * w_j)^2 / 2)``, the expectation of ``e^{i w p}`` for
``p ~ N(mu, sigma^2)``. With ``sigma = 0`` the scale is exactly 1, so a token entry gets ordinary RoPE
bit for bit; a coarse gist keeps only the low frequencies.

``span_positions`` is the one home of the absolute-position formula: a tree node of level l over
``[s, s + K^l)`` sits at its span's centre. The model's entry positions
(``megacontext_jax.focus.positions``) and the kernels' entry metadata (``kernels.mask.Entries``) both call
it, so the two agree bit for bit.

Pairs use the "half split" layout: element i pairs with element i + head_dim // 2.
"""

import jax
import jax.numpy as jnp


def span_positions(
    lod: jax.Array, start: jax.Array, block_size: int, sigma_scale: float
) -> tuple[jax.Array, jax.Array]:
    """``(mu, sigma)`` of the tree nodes of level ``lod`` over ``[start, start + K^lod)``.

    A token (lod 0) at t has ``mu = t, sigma = 0``; a gist ``mu = start + (K^lod - 1) / 2`` and
    ``sigma = sigma_scale * K^lod``, with K = ``block_size``. Float32, the shape of ``lod`` and
    ``start`` (any int dtypes).
    """
    # K^lod as a float power: exact for a power-of-two K, and unlike an int32 power it does not
    # wrap past 2^31 (K = 64 at level 6).
    span = jnp.power(float(block_size), lod.astype(jnp.float32))
    mu = start.astype(jnp.float32) + (span - 1.0) / 2.0
    sigma = jnp.where(lod > 0, sigma_scale * span, 0.0)
    return mu, sigma


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
    """Angular frequencies ``w_j = theta^(-2j / head_dim)``, shape ``[head_dim // 2]`` (float32)."""
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def rope_tables(
    mu: jax.Array,
    sigma: jax.Array | None,
    head_dim: int,
    theta: float = 10000.0,
    freqs: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Damped cos/sin tables for positions ``mu`` and widths ``sigma``.

    Args:
      mu: ``[..., T]`` positions (any float or int dtype; computed in float32).
      sigma: ``[..., T]`` widths, or None for plain RoPE.
      freqs: ``[head_dim // 2]`` frequencies that replace ``theta``'s (scaled RoPE variants).
    Returns:
      ``(cos, sin)``, each ``[..., T, head_dim // 2]`` float32.
    """
    if freqs is None:
        freqs = rope_frequencies(head_dim, theta)
    angles = mu.astype(jnp.float32)[..., None] * freqs
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if sigma is not None:
        damp = jnp.exp(-0.5 * jnp.square(sigma.astype(jnp.float32)[..., None] * freqs))
        cos, sin = cos * damp, sin * damp
    return cos, sin


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [B, T, H, Dh]`` by tables ``[B, T, Dh/2]``; math in float32, result in x.dtype."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    c, s = cos[..., None, :], sin[..., None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.astype(x.dtype)


def gaussian_rope(
    x: jax.Array, mu: jax.Array, sigma: jax.Array | None = None, theta: float = 10000.0
) -> jax.Array:
    """Applies Gaussian RoPE to ``x [B, T, H, Dh]`` with ``mu, sigma [B, T]``."""
    cos, sin = rope_tables(mu, sigma, x.shape[-1], theta)
    return apply_rotary(x, cos, sin)
