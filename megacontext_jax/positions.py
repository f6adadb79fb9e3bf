"""Gaussian-RoPE positions of working-context entries (DESIGN section 5).

A token at t has ``mu = t, sigma = 0``. A gist of level l over ``[s, s + K^l)`` sits at the span's
centre ``mu = s + (K^l - 1) / 2`` with width ``sigma = sigma_scale * K^l``. The rotary math itself
lives in ``kernels.rope``.
"""

import jax
import jax.numpy as jnp


def entry_positions(
    lod: jax.Array, start: jax.Array, block_size: int, sigma_scale: float
) -> tuple[jax.Array, jax.Array]:
    """``(mu, sigma)`` float32, same shape as ``lod`` and ``start`` (``[..., W]``)."""
    span = jnp.power(float(block_size), lod.astype(jnp.float32))
    mu = start.astype(jnp.float32) + (span - 1.0) / 2.0
    sigma = jnp.where(lod > 0, sigma_scale * span, 0.0)
    return mu, sigma
