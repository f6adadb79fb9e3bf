"""``DecoderLM``: what every base model shares (the GPT here, imported Llamas): token ids or
input embeddings in, per-entry Gaussian RoPE (DESIGN section 5), a KV cache that can be rewritten
from any slot (DESIGN section 8), so a working context of tokens and gists goes through the same
code as plain text.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from megacontext_jax import kernels
from megacontext_jax.nets.layers import DecoderBlock

Cache = list[dict[str, jax.Array]]  # per layer: {"k", "v"}: [B, S, Hkv, Dh]


class DecoderLM(nnx.Module):
    """What every base model shares: token ids or input embeddings in, per-entry Gaussian RoPE,
    a KV cache that can be rewritten from any slot. Subclasses (``GPT``, ``llama.Llama``) define
    the members declared here: ``blocks`` (``DecoderBlock``s), ``embed``, ``rope(mu, sigma)``,
    ``inputs(x)`` / ``logits(x)`` around the blocks, and ``dtype``, ``num_kv_heads``, ``head_dim``.
    """

    blocks: Sequence[DecoderBlock]
    dtype: jnp.dtype
    num_kv_heads: int
    head_dim: int

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Input embeddings of token ids: ``[B, T]`` -> ``[B, T, D]``."""
        raise NotImplementedError

    def rope(self, mu: jax.Array, sigma: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """The rotary tables ``cos``, ``sin`` of entries at ``mu`` with widths ``sigma``."""
        raise NotImplementedError

    def inputs(self, x: jax.Array) -> jax.Array:
        """The embeddings as the first block reads them."""
        raise NotImplementedError

    def logits(self, x: jax.Array) -> jax.Array:
        """float32 logits ``[B, T, V]`` of the last block's output."""
        raise NotImplementedError

    def _trunk(self, tokens, embeddings, mu, sigma, kv_valid, cache, index, entries, layers):
        # The residual stream after the first ``layers`` blocks, and their caches.
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens or embeddings")
        x = self.embed(tokens) if embeddings is None else embeddings.astype(self.dtype)
        b, t = x.shape[:2]
        if mu is None:
            mu = jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32) + index, (b, t))
        cos, sin = self.rope(mu, sigma)
        x = self.inputs(x)
        new_cache = []
        for i in range(layers):
            x, layer_cache = self.blocks[i](
                x, cos, sin, kv_valid, None if cache is None else cache[i], index, entries
            )
            new_cache.append(layer_cache)
        return x, new_cache

    def _run(self, tokens, embeddings, mu, sigma, kv_valid, cache, index, entries=None):
        x, new_cache = self._trunk(
            tokens, embeddings, mu, sigma, kv_valid, cache, index, entries, len(self.blocks)
        )
        return self.logits(x), new_cache

    def hidden(self, tokens: jax.Array, layers: int) -> jax.Array:
        """The residual stream after the first ``layers`` blocks of a causal pass with ordinary
        RoPE: ``[B, T]`` ids -> ``[B, T, D]`` (what a contextual GistNet reads)."""
        return self._trunk(tokens, None, None, None, None, None, 0, None, layers)[0]

    def __call__(
        self,
        tokens: jax.Array | None = None,
        *,
        embeddings: jax.Array | None = None,
        mu: jax.Array | None = None,
        sigma: jax.Array | None = None,
        kv_valid: jax.Array | None = None,
        entries=None,
    ) -> jax.Array:
        """Logits ``[B, T, V]`` (float32) under the WC-causal mask.

        Args:
          tokens: ``[B, T]`` int ids, or
          embeddings: ``[B, T, D]`` input embeddings (e.g. ``embed(ids)`` or gists).
          mu, sigma: ``[B, T]`` Gaussian-RoPE position and width; default ``mu = arange(T)``,
            ``sigma = 0`` (ordinary RoPE).
          kv_valid: ``[B, T]`` bool, False for padding entries (never attended to).
          entries: ``(Entries, MaskSpec)`` of ``kernels.mixed_attention``: a metadata-driven
            mask (the pyramid pass) instead of the WC-causal one.
        """
        logits, _ = self._run(tokens, embeddings, mu, sigma, kv_valid, None, 0, entries)
        return logits

    def attention_mass(
        self,
        embeddings: jax.Array,
        mu: jax.Array,
        sigma: jax.Array,
        kv_valid: jax.Array,
        queries: jax.Array,
    ) -> jax.Array:
        """``[B, T]``: the attention that the entries at ``queries [B, Q]`` (slot indices) pay
        each entry of ``embeddings [B, T, D]`` under the WC-causal mask (``kv_valid`` as in
        ``__call__``), averaged over those queries and every head of every layer: the share of
        the model's reading that goes to each entry (rows sum to 1)."""
        x = self.inputs(embeddings.astype(self.dtype))
        cos, sin = self.rope(mu, sigma)
        t = x.shape[1]
        mask = (jnp.arange(t) <= queries[..., None]) & kv_valid[:, None, :]  # [B, Q, T]
        mass = jnp.zeros(kv_valid.shape, jnp.float32)
        for block in self.blocks:
            q, k = block.query_key(x, cos, sin)
            q = jnp.take_along_axis(q, queries[:, :, None, None], axis=1)
            mass = mass + kernels.attention_weights(q, k, mask).mean(axis=(1, 2, 3))
            x, _ = block(x, cos, sin, kv_valid, None, 0)
        return mass / len(self.blocks)

    def init_cache(self, batch: int, capacity: int, dtype: Any = None) -> Cache:
        """An empty KV cache of ``capacity`` entries per sequence."""
        shape = (batch, capacity, self.num_kv_heads, self.head_dim)
        dtype = dtype or self.dtype
        return [
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(len(self.blocks))
        ]

    def decode(
        self,
        cache: Cache,
        index: jax.Array | int,
        tokens: jax.Array | None = None,
        *,
        embeddings: jax.Array | None = None,
        mu: jax.Array | None = None,
        sigma: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache]:
        """Runs ``T`` new entries at cache slots ``[index, index + T)`` against the cache.

        Entries at slots ``>= index + T`` are ignored, so a cache can be rewritten from any slot on
        (the refocus path keeps the prefix before the first changed entry). Returns logits
        ``[B, T, V]`` and the updated cache.
        """
        x = tokens if tokens is not None else embeddings
        capacity = cache[0]["k"].shape[1]
        kv_valid = jnp.broadcast_to(
            jnp.arange(capacity) < index + x.shape[1], (x.shape[0], capacity)
        )
        return self._run(tokens, embeddings, mu, sigma, kv_valid, cache, index)


def count_params(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
