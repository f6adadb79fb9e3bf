"""Split-KV decode attention (DESIGN section 6; issue 25, Deliver 5).

Decoding asks a few new queries (one token, or a short chunk) to attend over a long KV cache or
working context. ``kernels.mixed_attention`` would give each query head one program that walks
every key tile in turn: a serial loop over the whole cache, a 64-row query tile holding one real
row, and B x Hq programs to fill the GPU. Here instead:

* the query heads of a GQA group and the new tokens are stacked as the rows of one query block
  (``group x Tq`` rows per KV head), so K and V are read once per KV head, not once per query head;
* the key tiles the rows may see (``kernels.tiles``'s lists, so a cache's empty tail is never
  read) are split evenly across ``splits`` programs per (batch row, KV head); each returns its
  normalised partial output and log-sum-exp, and a log-sum-exp merge in jnp combines them.

The mask is any ``kernels.mask`` rule (``decode`` / ``wc_causal`` over entry metadata); q and k
come rotated. Logits, softmax and accumulation are float32. Interpreted on CPU, compiled for
Triton elsewhere. Decoding is inference; the gradient, for completeness, is the reference's.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from megacontext_jax.kernels.mask import FAR, Entries, MaskSpec, visible
from megacontext_jax.kernels.reference import masked_attention
from megacontext_jax.kernels.tiles import pass_lists

# The most stacked query rows (GQA group x new tokens) one program holds; more rows are a prefill,
# which ``mixed_attention``'s query tiles already parallelise.
MAX_ROWS = 64
NEG_INF = float("-inf")
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Static parameters of the kernel: mask, key tile, programs per (row, KV head), query rows
    per program (a power of two >= 16), logit scale, matmul operand dtype, Triton warps."""

    spec: MaskSpec
    block_k: int
    splits: int
    rows: int
    scale: float
    dtype: jnp.dtype
    num_warps: int = 4


def decode_applies(q: jax.Array, k: jax.Array) -> bool:
    """Whether ``decode_attention`` suits ``q [B, Tq, Hq, .]`` over ``k [B, Tk, Hkv, .]``: few
    stacked rows over a longer key side."""
    tq, hq, hkv = q.shape[1], q.shape[2], k.shape[2]
    return (hq // hkv) * tq <= MAX_ROWS and k.shape[1] > tq


def _kernel(
    q_ref, qe_ref, k_ref, v_ref, kl_ref, ks_ref, ke_ref, kv_ref, list_ref, count_ref, o_ref,
    lse_ref, *, cfg: DecodeConfig,
):  # fmt: skip
    """Partial output ``o [rows, Dv]`` and base-2 log-sum-exp ``lse [rows]`` (``-inf`` where no
    key was seen) of this program's share of the listed key tiles (refs: the stacked query rows
    and their ends; all keys, values and key metadata of one KV head; the batch row's tile list
    and counts)."""
    bk, splits = cfg.block_k, cfg.splits
    n_partial, n_listed = count_ref[0, 0], count_ref[1, 0]
    share = (n_listed + splits - 1) // splits
    lo = pl.program_id(2) * share
    hi = jnp.minimum(lo + share, n_listed)
    q = q_ref[...]
    q_end = qe_ref[...]

    def visit(masked):
        def body(n, carry):
            o, m, l = carry
            cols = pl.ds(list_ref[n] * bk, bk)
            s = jax.lax.dot_general(
                q.astype(cfg.dtype),
                k_ref[cols, :].astype(cfg.dtype),
                (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
            )
            s = s * (cfg.scale * LOG2E)  # base 2: softmax on exp2, the GPU's native exponential
            if masked:
                keys = (kl_ref[cols], ks_ref[cols], ke_ref[cols], kv_ref[cols] > 0)
                s = jnp.where(visible(q_end, *keys, cfg.spec), s, NEG_INF)
            m_next = jnp.maximum(m, jnp.max(s, axis=1))
            m_safe = jnp.where(m_next == NEG_INF, 0.0, m_next) if masked else m_next
            correction = jnp.exp2(m - m_safe)
            p = jnp.exp2(s - m_safe[:, None])
            pv = jnp.dot(
                p.astype(cfg.dtype),
                v_ref[cols, :].astype(cfg.dtype),
                preferred_element_type=jnp.float32,
            )
            return o * correction[:, None] + pv, m_next, l * correction + jnp.sum(p, axis=1)

        return body

    init = (
        jnp.zeros((cfg.rows, v_ref.shape[-1]), jnp.float32),
        jnp.full((cfg.rows,), NEG_INF, jnp.float32),
        jnp.zeros((cfg.rows,), jnp.float32),
    )
    # The partial tiles of the share with the mask, then its full tiles without.
    carry = jax.lax.fori_loop(lo, jnp.minimum(hi, n_partial), visit(True), init)
    o, m, l = jax.lax.fori_loop(jnp.maximum(lo, n_partial), hi, visit(False), carry)
    seen = l > 0
    o_ref[...] = o / jnp.where(seen, l, 1.0)[:, None]
    lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), NEG_INF)


def merge(o: jax.Array, lse: jax.Array) -> jax.Array:
    """Combines partial outputs ``o [..., S, R, D]`` with base-2 log-sum-exps ``lse [..., S, R]``
    (``-inf`` for a part that saw nothing) into ``[..., R, D]``; rows no part saw are 0."""
    top = jnp.max(lse, axis=-2, keepdims=True)
    weight = jnp.exp2(lse - jnp.where(top == NEG_INF, 0.0, top))  # 0 for a part that saw nothing
    total = jnp.sum(weight, axis=-2)
    out = jnp.sum(weight[..., None] * o, axis=-3)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def _stacked(q, k, v, q_meta: Entries, k_meta: Entries, cfg: DecodeConfig, interpret: bool):
    """The kernel's launch: ``q [B, Tq, Hq, Dh]`` stacked into rows per KV head, keys padded to
    whole tiles, the partial outputs merged and unstacked to ``[B, Tq, Hq, Dh]``."""
    b, tq, hq, dh = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group, rows, bk = hq // hkv, cfg.rows, cfg.block_k
    dp = max(16, pl.next_power_of_2(dh))
    real = group * tq
    # Rows: for each KV head its group's query heads, each with its Tq queries. Padding rows
    # repeat the last real row, so they neither loosen the tile bounds nor add tiles to the lists.
    qs = q.reshape(b, tq, hkv, group, dh).transpose(0, 2, 3, 1, 4).reshape(b, hkv, real, dh)
    qs = jnp.pad(qs, ((0, 0), (0, 0), (0, 0), (0, dp - dh)))
    qs = jnp.pad(qs, ((0, 0), (0, 0), (0, rows - real), (0, 0)), mode="edge")
    ends = jnp.broadcast_to(q_meta.end[:, None], (b, group, tq)).reshape(b, real)
    ends = jnp.pad(ends, ((0, 0), (0, rows - real)), mode="edge")
    tk_p = -(-tk // bk) * bk
    pad_keys = ((0, 0), (0, tk_p - tk), (0, 0), (0, dp - dh))
    kp, vp = jnp.pad(k, pad_keys), jnp.pad(v, pad_keys)
    k_meta = k_meta.padded(tk_p, FAR)
    lists = pass_lists(ends, k_meta, rows, bk, cfg.spec)[0]
    nk = lists.lists.shape[-1]
    compiler_params = None
    if not interpret:
        # Imported here: the Triton backend is needed (and may only exist) where it compiles.
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=2)
    o, lse = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(b, hkv, cfg.splits),
        in_specs=[
            pl.BlockSpec((None, None, rows, dp), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, rows), lambda i, h, s: (i, 0)),
            pl.BlockSpec((None, tk_p, None, dp), lambda i, h, s: (i, 0, h, 0)),
            pl.BlockSpec((None, tk_p, None, dp), lambda i, h, s: (i, 0, h, 0)),
            *[pl.BlockSpec((None, tk_p), lambda i, h, s: (i, 0))] * 4,
            pl.BlockSpec((None, None, nk), lambda i, h, s: (i, 0, 0)),
            pl.BlockSpec((None, 2, 1), lambda i, h, s: (i, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, dp), lambda i, h, s: (i, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, s: (i, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, cfg.splits, rows, dp), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, cfg.splits, rows), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params,
        name="decode_attention",
    )(
        qs, ends, kp, vp, k_meta.lod, k_meta.start, k_meta.end, k_meta.valid.astype(jnp.int32),
        lists.lists, lists.counts,
    )  # fmt: skip
    out = merge(o, lse)[:, :, :real, :dh].reshape(b, hkv, group, tq, dh)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, hq, dh).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _decode(q, k, v, q_meta, k_meta, cfg, interpret):
    return _stacked(q, k, v, q_meta, k_meta, cfg, interpret)


def _decode_fwd(q, k, v, q_meta, k_meta, cfg, interpret):
    return _stacked(q, k, v, q_meta, k_meta, cfg, interpret), (q, k, v, q_meta, k_meta)


def _decode_bwd(cfg, interpret, residuals, do):
    q, k, v, q_meta, k_meta = residuals
    mask = visible(q_meta.end, k_meta.lod, k_meta.start, k_meta.end, k_meta.valid, cfg.spec)
    _, pull = jax.vjp(lambda q, k, v: masked_attention(q, k, v, mask), q, k, v)
    return *pull(do), q_meta.zero_cotangent(), k_meta.zero_cotangent()


_decode.defvjp(_decode_fwd, _decode_bwd)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_meta: Entries,
    k_meta: Entries,
    spec: MaskSpec = MaskSpec("decode"),
    *,
    block_k: int = 64,
    splits: int | None = None,
    num_warps: int = 4,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of a few rotated queries ``q [B, Tq, Hq, Dh]`` over ``k, v [B, Tk, Hkv, Dh]``.

    The same function as ``mixed_attention(..., rope=False)`` (metadata ``[B, T]`` or ``[1, T]``),
    for at most ``MAX_ROWS`` query heads per KV head x queries. ``splits``: programs per (batch
    row, KV head), each taking an even share of the listed key tiles; ``None`` aims at about 256
    programs in all and at least one tile each. ``interpret=None`` interprets on CPU.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    b, tq, hq, dh = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {hkv}")
    group = hq // hkv
    if group * tq > MAX_ROWS:
        raise ValueError(
            f"{group} query heads per KV head x {tq} queries = {group * tq} rows; "
            f"decode_attention stacks at most {MAX_ROWS} (use mixed_attention)"
        )
    q_meta, k_meta = q_meta.fit(b, tq, "query"), k_meta.fit(b, tk, "key")
    if splits is None:
        splits = max(1, min(-(-tk // block_k), -(-256 // (b * hkv))))
    rows = max(16, pl.next_power_of_2(group * tq))
    cfg = DecodeConfig(spec, block_k, splits, rows, dh**-0.5, jnp.dtype(q.dtype), num_warps)
    return _decode(q, k, v, q_meta, k_meta, cfg, interpret)
