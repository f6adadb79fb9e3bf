"""LensNet: scores every working-context entry for zooming (DESIGN section 7).

A small *bidirectional* transformer over the WC entries. Each entry's input is its embedding (as the
base model sees it) plus a projection of metadata features: level of detail, log span and log
distance from the cursor (in tokens, or in entries with bounded positions), each normalized to
[0, 1]. Positions are the entries' Gaussian RoPE
``(mu, sigma)``. Padding and entries outside the scored context are masked. Output: one score per
entry in [-1, 1] (``tanh``): positive = "expand me", negative = "collapse me".
"""

import jax
import jax.numpy as jnp
from flax import nnx

from megacontext_jax import kernels
from megacontext_jax.focus.working_context import WorkingContext
from megacontext_jax.nets.layers import Block, linear, rms_norm
from megacontext_jax.nets.specs import LensConfig

NUM_FEATURES = 3


def entry_features(
    wc: WorkingContext, cursor: jax.Array, block_size: int, max_level: int, slots: bool = False
) -> jax.Array:
    """``[..., W, 3]`` float32: lod / max_level, log span / log K^max, and the distance to the
    cursor: ``log1p(tokens) / log1p(cursor)``, or with ``slots`` (bounded positions)
    ``log1p(entries) / log1p(W)``, the entries between this one and the cursor."""
    lod = wc.lod.astype(jnp.float32)
    log_span = lod * jnp.log(float(block_size))
    if slots:
        after = wc.valid.sum(-1, keepdims=True) - 1 - jnp.arange(wc.capacity)
        distance = jnp.maximum(after, 0).astype(jnp.float32)
        scale = jnp.log1p(float(wc.capacity))
    else:
        distance = jnp.maximum(cursor[..., None] - wc.end(block_size), 0).astype(jnp.float32)
        scale = jnp.log1p(jnp.maximum(cursor, 1).astype(jnp.float32))[..., None]
    return jnp.stack(
        [
            lod / max_level,
            log_span / (max_level * jnp.log(float(block_size))),
            jnp.log1p(distance) / scale,
        ],
        axis=-1,
    )


class LensNet(nnx.Module):
    def __init__(self, lens: LensConfig, *, rngs: nnx.Rngs):
        cfg = lens.net
        d = cfg.width
        self.block_size, self.max_level = lens.block_size, lens.max_level
        self.slots = lens.position_mode == "slots"
        self.head_dim, self.rope_theta = d // cfg.num_heads, cfg.rope_theta
        self.features = linear(NUM_FEATURES, d, 1.0, cfg, rngs)
        self.blocks = nnx.List([Block(cfg, rngs, causal=False) for _ in range(cfg.depth)])
        self.head = linear(d, 1, d**-0.5, cfg, rngs)

    def __call__(
        self,
        embeddings: jax.Array,
        wc: WorkingContext,
        mu: jax.Array,
        sigma: jax.Array,
        mask: jax.Array,
        cursor: jax.Array,
    ) -> jax.Array:
        """Scores ``[B, W]`` in [-1, 1] (0 where ``mask`` is False).

        Args:
          embeddings: ``[B, W, D]`` entry embeddings; ``wc``: the entries (``[B, W]`` arrays).
          mu, sigma: ``[B, W]`` Gaussian-RoPE positions. mask: ``[B, W]`` entries to read and score.
          cursor: ``[B]`` the token position the context ends at (distances are measured to it).
        """
        feats = entry_features(wc, cursor, self.block_size, self.max_level, self.slots)
        x = rms_norm(embeddings.astype(self.features.dtype)) + self.features(feats)
        cos, sin = kernels.rope_tables(mu, sigma, self.head_dim, self.rope_theta)
        for block in self.blocks:
            x, _ = block(x, cos, sin, mask, None, 0)
        scores = jnp.tanh(self.head(rms_norm(x))[..., 0].astype(jnp.float32))
        return jnp.where(mask, scores, 0.0)
