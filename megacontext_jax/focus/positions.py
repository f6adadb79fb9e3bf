"""Gaussian-RoPE positions of working-context entries (DESIGN section 5): the position modes.

* ``absolute``: an entry sits where its span is in time. A token at t has ``mu = t, sigma = 0``; a
  gist of level l over ``[s, s + K^l)`` sits at its span's centre ``mu = s + (K^l - 1) / 2`` with
  width ``sigma = sigma_scale * K^l`` (the formula lives in ``kernels.rope.span_positions``,
  shared with the kernels' entry metadata). A query-to-gist distance grows with the history, so a
  history longer than training covered is out of distribution.
* ``slots``: an entry sits at its slot in the working context, ``mu = slot, sigma = 0``, whatever
  its span: every distance the base model and LensNet see is below W, however long the history.
  Tokens in consecutive slots are one step apart, so a context of tokens alone is a plain LM's
  input (a window sits at positions 0 .. W-1). Gists say their level through their embedding,
  not their position.

An entry's slot is its index in the WC, so an edit moves every entry after it; those entries'
cached keys are recomputed anyway (an edit invalidates the cache from its first changed entry
on: ``runtime.cached_context``), and an appended token leaves every cached key valid in both
modes.
"""

import dataclasses

import jax
import jax.numpy as jnp

from megacontext_jax.kernels.rope import span_positions

MODES = ("absolute", "slots")


@dataclasses.dataclass(frozen=True)
class Positions:
    """How entries ``(lod, start)`` get their ``(mu, sigma)``: the mode, K and the gist width."""

    mode: str = "absolute"
    block_size: int = 2
    sigma_scale: float = 12**-0.5

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown position mode {self.mode!r}; expected one of {MODES}")

    def __call__(
        self, lod: jax.Array, start: jax.Array, first_slot: int | jax.Array = 0
    ) -> tuple[jax.Array, jax.Array]:
        """``(mu, sigma)`` float32 of entries ``[..., W]`` that fill slots ``first_slot ..
        first_slot + W - 1`` (the slots matter in ``slots`` mode only)."""
        if self.mode == "absolute":
            return span_positions(lod, start, self.block_size, self.sigma_scale)
        first = jnp.asarray(first_slot, jnp.float32)
        mu = first + jnp.arange(lod.shape[-1], dtype=jnp.float32)
        return jnp.broadcast_to(mu, lod.shape), jnp.zeros(lod.shape, jnp.float32)
