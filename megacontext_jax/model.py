"""The nanochat-style GPT base model (DESIGN section 7a), in Flax NNX.

Parameter-free RMSNorm, QK-norm, Gaussian RoPE, grouped-query attention through ``kernels.attention``,
relu^2 MLP, untied embeddings and a tanh logit soft-cap. The model reads token ids *or* input
embeddings, each entry with a position ``mu`` and width ``sigma`` (DESIGN section 5), so a working
context of tokens and gists goes through the same code as plain text.

Optional smeared keys (``model.smear_keys``): each key mixes in the previous entry's key with a
learned per-head gate, so one attention layer can look up "the entry after an earlier copy of
this one" (induction), which otherwise needs two composed layers. ``python
benchmarks/induction.py --depth 2 --steps 500`` (a repeated random span, width 128, CPU): the
plain model's loss stays at chance (4.16) for all 500 steps; with smeared keys it is below half
of chance at step 220 and at 1.03 by step 500.
"""

from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from megacontext_jax.net_specs import BlockConfig, ModelConfig

Cache = list[dict[str, jax.Array]]  # per layer: {"k", "v"}: [B, S, Hkv, Dh]
LayerCache = dict[str, jax.Array] | None


class DecoderBlock(Protocol):
    """The calling convention of a base model's blocks (``Block``, ``llama.LlamaBlock``):
    ``x [B, T, D]``, the rotary tables of the entries, key padding ``kv_valid [B, S]``, the
    layer's KV cache written at slot ``index`` (None: no cache), and optionally ``entries``
    (``(kernels Entries, MaskSpec)``: a metadata mask). Returns the new ``x`` and cache."""

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        kv_valid: jax.Array | None,
        cache: LayerCache,
        index: jax.Array | int,
        entries: Any = None,
    ) -> tuple[jax.Array, LayerCache]: ...


def rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Parameter-free RMSNorm over the last axis, computed in float32."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _linear(d_in: int, d_out: int, std: float, cfg: BlockConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        kernel_init=nnx.initializers.normal(std),
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Grouped-query self-attention; ``causal=False`` for the bidirectional GistNet and LensNet."""

    def __init__(self, cfg: BlockConfig, rngs: nnx.Rngs, causal: bool = True):
        d, self.num_heads, self.num_kv_heads = cfg.width, cfg.num_heads, cfg.num_kv_heads
        self.causal = causal
        self.head_dim = d // cfg.num_heads
        self.impl = cfg.attention_impl
        std, out_std = d**-0.5, d**-0.5 / (2 * cfg.depth) ** 0.5
        self.q = _linear(d, self.num_heads * self.head_dim, std, cfg, rngs)
        self.k = _linear(d, self.num_kv_heads * self.head_dim, std, cfg, rngs)
        self.v = _linear(d, self.num_kv_heads * self.head_dim, std, cfg, rngs)
        self.o = _linear(self.num_heads * self.head_dim, d, out_std, cfg, rngs)
        # Learned QK-norm gains: without them |q.k| / sqrt(Dh) is capped at sqrt(Dh), too flat a
        # softmax to pick one key out of hundreds.
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.q_gain = nnx.Param(jnp.ones((self.head_dim,), param_dtype))
        self.k_gain = nnx.Param(jnp.ones((self.head_dim,), param_dtype))
        # Gate logits of smeared keys (sigmoid 0.5 at init); None: plain keys.
        self.smear = (
            nnx.Param(jnp.zeros((self.num_kv_heads,), param_dtype)) if cfg.smear_keys else None
        )

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        kv_valid: jax.Array | None,
        cache: dict[str, jax.Array] | None,
        index: jax.Array | int,
        entries=None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        # Norm before rotation, so a gist's Gaussian damping of high frequencies survives.
        q = kernels.apply_rotary(rms_norm(q) * self.q_gain.value.astype(q.dtype), cos, sin)
        k = kernels.apply_rotary(rms_norm(k) * self.k_gain.value.astype(k.dtype), cos, sin)
        smear = None if self.smear is None else self.smear.value
        y, cache = attend(
            q, k, v, cache, index, kv_valid, self.causal, self.impl, entries, smear=smear
        )
        return self.o(y.reshape(b, t, -1)), cache


def smear_keys(k: jax.Array, gate: jax.Array, entries=None) -> jax.Array:
    """``sigmoid(gate) * k[j] + (1 - sigmoid(gate)) * k[j - 1]`` for keys ``k [B, S, Hkv, Dh]``
    and gate logits ``gate [Hkv]``.

    Slot j - 1 holds the entry just before slot j in a working context or a KV cache. With
    ``entries`` (a metadata-masked pass, e.g. the level-major pyramid layout) only a previous
    row whose span ends where row j's begins is mixed in, so no key carries a later entry.
    """
    previous = jnp.pad(k, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]
    if entries is not None:
        meta = entries[0]
        adjacent = jnp.pad(meta.end[:, :-1] == meta.start[:, 1:], ((0, 0), (1, 0)))
        previous = jnp.where(adjacent[:, :, None, None], previous, 0)
    g = jax.nn.sigmoid(gate.astype(jnp.float32))[:, None]
    return (g * k.astype(jnp.float32) + (1 - g) * previous.astype(jnp.float32)).astype(k.dtype)


def attend(q, k, v, cache, index, kv_valid, causal: bool, impl: str, entries=None, smear=None):
    """Writes ``k, v [B, T, Hkv, Dh]`` into ``cache`` at slot ``index`` (when decoding) and
    attends with ``q [B, T, Hq, Dh]``; returns ``[B, T, Hq, Dh]`` and the cache.

    ``smear``: gate logits ``[Hkv]`` of smeared keys (``smear_keys``); the cache keeps plain
    keys, so rewriting it from any slot stays exact.
    """
    if cache is not None:
        k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, 1)
        v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, 1)
        cache = {"k": k, "v": v}
    if smear is not None:
        k = smear_keys(k, smear, entries)
    y = kernels.attention(
        q, k, v, causal=causal, kv_valid=kv_valid, q_offset=index, impl=impl, entries=entries
    )
    return y, cache


class MLP(nnx.Module):
    def __init__(self, cfg: BlockConfig, rngs: nnx.Rngs):
        d, hidden = cfg.width, cfg.mlp_ratio * cfg.width
        self.up = _linear(d, hidden, d**-0.5, cfg, rngs)
        self.down = _linear(hidden, d, hidden**-0.5 / (2 * cfg.depth) ** 0.5, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jnp.square(jax.nn.relu(self.up(x))))


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: BlockConfig, rngs: nnx.Rngs, causal: bool = True):
        self.attn = Attention(cfg, rngs, causal)
        self.mlp = MLP(cfg, rngs)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        kv_valid: jax.Array | None,
        cache: LayerCache,
        index: jax.Array | int,
        entries: Any = None,
    ) -> tuple[jax.Array, LayerCache]:
        y, cache = self.attn(rms_norm(x), cos, sin, kv_valid, cache, index, entries)
        x = x + y
        return x + self.mlp(rms_norm(x)), cache


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

    def _run(self, tokens, embeddings, mu, sigma, kv_valid, cache, index, entries=None):
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens or embeddings")
        x = self.embed(tokens) if embeddings is None else embeddings.astype(self.dtype)
        b, t = x.shape[:2]
        if mu is None:
            mu = jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32) + index, (b, t))
        cos, sin = self.rope(mu, sigma)
        x = self.inputs(x)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(
                x, cos, sin, kv_valid, None if cache is None else cache[i], index, entries
            )
            new_cache.append(layer_cache)
        return self.logits(x), new_cache

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
        self.lm_head = _linear(cfg.width, cfg.vocab_size, cfg.width**-0.5 * 0.1, cfg, rngs)

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


def count_params(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """NLL (nats) of each target: logits ``[..., V]`` float32, targets ``[...]`` int."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Sum of token NLL (nats) over ``mask`` and the number of counted tokens.

    logits ``[B, T, V]`` float32, targets ``[B, T]`` int, mask ``[B, T]`` bool.
    """
    return jnp.where(mask, token_nll(logits, targets), 0.0).sum(), mask.sum()
