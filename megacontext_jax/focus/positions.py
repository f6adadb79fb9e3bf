"""Gaussian-RoPE positions of working-context entries (DESIGN section 5).

The home of the positions *modes*, i.e. how an entry's ``(mu, sigma)`` is assigned; today the one
mode is absolute positions. Their formula (a token at t has ``mu = t, sigma = 0``; a gist of level l
over ``[s, s + K^l)`` sits at the span's centre ``mu = s + (K^l - 1) / 2`` with width
``sigma = sigma_scale * K^l``) lives in ``kernels.rope.span_positions``, beside the rotary math and
shared with the kernels' entry metadata.
"""

import jax

from kernels.rope import span_positions


def entry_positions(
    lod: jax.Array, start: jax.Array, block_size: int, sigma_scale: float
) -> tuple[jax.Array, jax.Array]:
    """``(mu, sigma)`` float32, same shape as ``lod`` and ``start`` (``[..., W]``)."""
    return span_positions(lod, start, block_size, sigma_scale)
