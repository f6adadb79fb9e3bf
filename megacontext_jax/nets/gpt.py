"""The nanochat-style GPT base model (DESIGN section 7a), in Flax NNX.

Parameter-free RMSNorm, QK-norm, Gaussian RoPE, grouped-query attention, relu^2 MLP, untied
embeddings and a tanh logit soft-cap (the layers: ``nets.layers``), behind ``DecoderLM``.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from megacontext_jax import kernels
from megacontext_jax.nets.decoder import DecoderLM
from megacontext_jax.nets.layers import Block, linear, rms_norm
from megacontext_jax.nets.specs import ModelConfig


class GPT(DecoderLM):
    """Decoder-only transformer over token ids or input embeddings with per-entry (mu, sigma)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        self.num_kv_heads = cfg.num_kv_heads
        self.wte = nnx.Embed(
            cfg.vocab_size,
            cfg.width,
            embedding_init=nnx.initializers.normal(1.0),
            dtype=self.dtype,
            param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.depth)])
        self.lm_head = linear(cfg.width, cfg.vocab_size, cfg.width**-0.5 * 0.1, cfg, rngs)

    @property
    def head_dim(self) -> int:
        return self.cfg.width // self.cfg.num_heads

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Input embeddings of token ids: ``[B, T]`` -> ``[B, T, D]``."""
        return self.wte(tokens)

    def rope(self, mu: jax.Array, sigma: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        return kernels.rope_tables(mu, sigma, self.head_dim, self.cfg.rope_theta)

    def inputs(self, x: jax.Array) -> jax.Array:
        return rms_norm(x)

    def logits(self, x: jax.Array) -> jax.Array:
        logits = self.lm_head(rms_norm(x)).astype(jnp.float32)
        if self.cfg.logit_soft_cap > 0:
            cap = self.cfg.logit_soft_cap
            logits = cap * jnp.tanh(logits / cap)
        return logits
