"""Pure-jnp attention, the reference every kernel is tested against (DESIGN section 6).

``masked_attention`` is softmax attention under a dense ``[B, Tq, Tk]`` mask, shared by
``attention_reference`` (the index masks of ``kernels.attention``: ``causal``, ``kv_valid``,
``q_offset``) and ``kernels.mixed_attention``'s reference (the metadata masks of ``kernels.mask``).
Logits and softmax are float32; GQA maps query head h to key head ``h // (Hq // Hkv)``; a query
that sees no key returns zeros.
"""

import jax
import jax.numpy as jnp


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    kv_valid: jax.Array | None = None,
    q_offset: jax.Array | int = 0,
) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads.

    Args:
      q: ``[B, Tq, Hq, Dh]``; k, v: ``[B, Tk, Hkv, Dh]`` with ``Hq % Hkv == 0``.
      causal: the WC-causal mask, query i sees key j iff ``j <= i + q_offset``; else
        bidirectional.
      kv_valid: ``[B, Tk]`` bool, False for padded keys.
      q_offset: key index of query 0 (scalar, may be traced).
    Returns:
      ``[B, Tq, Hq, Dh]`` in q.dtype. Logits and softmax in float32. A query that sees no key
      returns zeros.
    """
    b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    mask = jnp.ones((b, tq, tk), dtype=bool)
    if causal:
        q_idx = jnp.arange(tq)[:, None] + q_offset
        mask = mask & (jnp.arange(tk)[None, :] <= q_idx)[None]
    if kv_valid is not None:
        mask = mask & kv_valid[:, None, :]
    return masked_attention(q, k, v, mask)


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Float32 softmax weights ``[B, Hkv, Hq // Hkv, Tq, Tk]`` of ``q [B, Tq, Hq, Dh]`` over
    ``k [B, Tk, Hkv, Dh]`` where ``mask [B, Tq, Tk]`` allows (GQA: query head ``h`` is group
    ``h % (Hq // Hkv)`` of key head ``h // (Hq // Hkv)``); a query that sees nothing weighs 0."""
    b, tq, hq, dh = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {hkv}")
    qg = q.reshape(b, tq, hkv, hq // hkv, dh)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (dh**-0.5)
    mask = mask[:, None, None]  # [B, 1, 1, Tq, Tk]
    # A finite fill keeps fully masked rows (and their gradients) free of NaN; they are zeroed after.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention of ``q [B, Tq, Hq, Dh]`` over ``k, v [B, Tk, Hkv, Dh]`` where ``mask
    [B, Tq, Tk]`` allows; GQA, float32 logits and softmax, zeros for a query that sees nothing."""
    b, tq, hq, dh = q.shape
    weights = attention_weights(q, k, mask)
    out = jnp.einsum(
        "bhgqk,bkhd->bqhgd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out.reshape(b, tq, hq, dh).astype(q.dtype)
