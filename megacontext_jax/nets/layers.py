"""The layers every network here is built of (DESIGN section 7a): parameter-free RMSNorm,
grouped-query attention with QK-norm and Gaussian RoPE (through ``kernels.attention``), optional
smeared keys, the relu^2 MLP and the pre-norm block, in Flax NNX.

Optional smeared keys (``model.smear_keys``): each key mixes in the previous entry's key with a
learned per-head gate, so one attention layer can look up "the entry after an earlier copy of
this one" (induction), which otherwise needs two composed layers. ``python
benchmarks/induction.py --depth 2 --steps 500`` (a repeated random span, width 128, CPU): the
plain model's loss stays at chance (4.16) for all 500 steps; with smeared keys it is below half
of chance at step 220 and at 1.03 by step 500.
"""

from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from megacontext_jax import kernels
from megacontext_jax.nets.specs import BlockConfig

LayerCache = dict[str, jax.Array] | None


class DecoderBlock(Protocol):
    """The calling convention of a base model's blocks (``Block``, ``llama.LlamaBlock``):
    ``x [B, T, D]``, the rotary tables of the entries, key padding ``kv_valid [B, S]``, the
    layer's KV cache written at slot ``index`` (None: no cache), and optionally ``entries``
    (``(kernels Entries, MaskSpec)``: a metadata mask). Returns the new ``x`` and cache.
    ``query_key`` gives the rotated queries and keys its attention compares, ``[B, T, Hq, Dh]``
    and ``[B, T, Hkv, Dh]`` (what ``DecoderLM.attention_mass`` reads)."""

    def query_key(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array
    ) -> tuple[jax.Array, jax.Array]: ...

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


def linear(d_in: int, d_out: int, std: float, cfg: BlockConfig, rngs: nnx.Rngs) -> nnx.Linear:
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
        self.q = linear(d, self.num_heads * self.head_dim, std, cfg, rngs)
        self.k = linear(d, self.num_kv_heads * self.head_dim, std, cfg, rngs)
        self.v = linear(d, self.num_kv_heads * self.head_dim, std, cfg, rngs)
        self.o = linear(self.num_heads * self.head_dim, d, out_std, cfg, rngs)
        # Learned QK-norm gains: without them |q.k| / sqrt(Dh) is capped at sqrt(Dh), too flat a
        # softmax to pick one key out of hundreds.
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.q_gain = nnx.Param(jnp.ones((self.head_dim,), param_dtype))
        self.k_gain = nnx.Param(jnp.ones((self.head_dim,), param_dtype))
        # Gate logits of smeared keys (sigmoid 0.5 at init); None: plain keys.
        self.smear = (
            nnx.Param(jnp.zeros((self.num_kv_heads,), param_dtype)) if cfg.smear_keys else None
        )

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """Rotated, normed queries ``[B, T, Hq, Dh]`` and keys, and values ``[B, T, Hkv, Dh]``
        (keys before smearing, which ``attend`` applies after the cache)."""
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        # Norm before rotation, so a gist's Gaussian damping of high frequencies survives.
        q = kernels.apply_rotary(rms_norm(q) * self.q_gain.value.astype(q.dtype), cos, sin)
        k = kernels.apply_rotary(rms_norm(k) * self.k_gain.value.astype(k.dtype), cos, sin)
        return q, k, v

    @property
    def smear_gate(self) -> jax.Array | None:
        return None if self.smear is None else self.smear.value

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
        q, k, v = self.project(x, cos, sin)
        y, cache = attend(
            q, k, v, cache, index, kv_valid, self.causal, self.impl, entries, self.smear_gate
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


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: LayerCache,
    index: jax.Array | int,
    kv_valid: jax.Array | None,
    causal: bool,
    impl: str,
    entries: Any = None,
    smear: jax.Array | None = None,
) -> tuple[jax.Array, LayerCache]:
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
        self.up = linear(d, hidden, d**-0.5, cfg, rngs)
        self.down = linear(hidden, d, hidden**-0.5 / (2 * cfg.depth) ** 0.5, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jnp.square(jax.nn.relu(self.up(x))))


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: BlockConfig, rngs: nnx.Rngs, causal: bool = True):
        self.attn = Attention(cfg, rngs, causal)
        self.mlp = MLP(cfg, rngs)

    def query_key(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        q, k, _ = self.attn.project(rms_norm(x), cos, sin)
        gate = self.attn.smear_gate
        return q, k if gate is None else smear_keys(k, gate)

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
