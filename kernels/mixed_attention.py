"""Mixed-resolution attention (DESIGN section 6): Pallas kernels, ``custom_vjp`` and reference.

Every entry (a token or a gist) carries metadata: ``lod``, ``start``, ``end`` (= start + K^lod),
``valid``, and its Gaussian-RoPE ``mu`` / ``sigma``. The metadata alone decides who sees whom:

* ``wc_causal``: key k is visible to query q iff k is valid and ``end_k <= end_q``. WC entries
  tile time in order, so this is the causal mask of the working context.
* ``decode``: the same rule with queries that are the newest entries and keys from a KV cache
  (``q_len != kv_len``).
* ``pyramid``: every token and gist of a sequence at once; query q sees exactly one
  representation of each past region: LOD0 within ``window`` tokens (back to a K-aligned bound),
  then ``window`` LOD1 gists (back to a K^2-aligned bound), and so on; the coarsest level covers
  the rest. Never a key whose span ends after ``end_q``.

With ``rope=True`` the kernels rotate q and k themselves (Gaussian RoPE from ``mu`` / ``sigma``,
half-split pairs as ``kernels.rope``), else q and k come rotated. Logits, softmax and
accumulation are float32; GQA maps query head h to key head ``h // (Hq // Hkv)``. A query that
sees no key returns zeros.

Tiles with no visible pair are skipped: each key tile's ``min end``, ``max start`` and lod range
and each query tile's end range bound the mask; each program loops over the range of tiles that
may see anything (a prefix for the causal masks) and skips the empty tiles inside it, so the
pyramid's cost follows its visible pairs (in a level-major layout, each band is a few contiguous
tiles), not N^2.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels.attention import masked_attention
from kernels.rope import gaussian_rope

MASKS = ("wc_causal", "decode", "pyramid")
NEG_INF = float("-inf")
_FAR = 1 << 30  # a bound no position reaches


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two) for the forward and the two backward kernels, and the Triton
    launch parameters used when compiled."""

    block_q: int = 64
    block_k: int = 64
    block_q_bwd: int = 32
    block_k_bwd: int = 32
    num_warps: int = 4
    num_stages: int = 2


def _compiler_params(blocks: BlockSizes, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static mask parameters: kind, and for ``pyramid`` the band width, K and top level."""

    kind: str = "wc_causal"
    window: int = 0
    block_size: int = 2
    max_level: int = 0

    def __post_init__(self):
        if self.kind not in MASKS:
            raise ValueError(f"unknown mask {self.kind!r}; expected one of {MASKS}")
        if self.kind == "pyramid" and (self.window < 1 or self.block_size < 2):
            raise ValueError("the pyramid mask needs window >= 1 and block_size >= 2")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Entries:
    """Per-entry metadata, each ``[B, T]``: int32 lod/start/end, bool valid, float32 mu/sigma."""

    lod: jax.Array
    start: jax.Array
    end: jax.Array
    valid: jax.Array
    mu: jax.Array
    sigma: jax.Array

    @classmethod
    def make(cls, lod, start, valid, block_size: int, sigma_scale: float = 12**-0.5) -> "Entries":
        """Metadata of tree nodes ``(lod, start)`` with their DESIGN section 5 positions."""
        lod, start = jnp.asarray(lod, jnp.int32), jnp.asarray(start, jnp.int32)
        span = jnp.power(block_size, lod)
        spanf = span.astype(jnp.float32)
        mu = start.astype(jnp.float32) + (spanf - 1.0) / 2.0
        sigma = jnp.where(lod > 0, sigma_scale * spanf, 0.0)
        return cls(lod, start, start + span, jnp.asarray(valid, bool), mu, sigma)

    @classmethod
    def tokens(cls, batch: int, length: int, offset: int = 0) -> "Entries":
        """Plain tokens at positions ``offset .. offset + length - 1`` (all valid)."""
        start = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + offset, (batch, length))
        return cls.make(jnp.zeros_like(start), start, jnp.ones_like(start, bool), 2)


# -- the mask, shared by the kernels and the reference -----------------------------------------
def _bands(end, spec: MaskSpec) -> list[tuple[jax.Array, jax.Array]]:
    """``(lower, upper)`` token bounds of each level's band for queries ending at ``end``."""
    k, bands, upper = spec.block_size, [], end
    for level in range(spec.max_level + 1):
        if level == spec.max_level:
            lower = jnp.zeros_like(end)
        else:
            align = k ** (level + 1)
            lower = jnp.maximum(upper - spec.window * k**level, 0) // align * align
        bands.append((lower, upper))
        upper = lower
    return bands


def visible(q_end, k_lod, k_start, k_end, k_valid, spec: MaskSpec) -> jax.Array:
    """``[..., Tq, Tk]`` bool from query ends ``[..., Tq]`` and key metadata ``[..., Tk]``."""
    q_end = q_end[..., :, None]
    k_lod, k_start, k_end = k_lod[..., None, :], k_start[..., None, :], k_end[..., None, :]
    mask = k_valid[..., None, :] & (k_end <= q_end)
    if spec.kind == "pyramid":
        lower, upper = jnp.full(mask.shape, _FAR, jnp.int32), jnp.full(mask.shape, -1, jnp.int32)
        for level, (lo, hi) in enumerate(_bands(q_end, spec)):
            lower = jnp.where(k_lod == level, lo, lower)
            upper = jnp.where(k_lod == level, hi, upper)
        mask = mask & (k_start >= lower) & (k_end <= upper)
    return mask


def _tile_may_see(q_min_end, q_max_end, kt, spec: MaskSpec):
    """Scalar bool: may any query of a tile (ends in [min, max]) see any key of tile ``kt``?"""
    k_min_end, k_max_start, k_min_lod, k_max_lod, k_any = kt
    ok = (k_any > 0) & (k_min_end <= q_max_end)
    if spec.kind == "pyramid":
        lows, highs = _bands(q_min_end, spec), _bands(q_max_end, spec)
        some = False
        for level in range(spec.max_level + 1):
            some = some | (
                (k_min_lod <= level)
                & (level <= k_max_lod)
                & (k_max_start >= lows[level][0])
                & (k_min_end <= highs[level][1])
            )
        ok = ok & some
    return ok


# -- pure-jnp reference ------------------------------------------------------------------------
def mixed_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_meta: Entries,
    k_meta: Entries,
    spec: MaskSpec = MaskSpec(),
    *,
    rope: bool = True,
    theta: float = 10000.0,
) -> jax.Array:
    """The same function as ``mixed_attention``, in plain jnp (float32 logits and softmax).

    Args:
      q: ``[B, Tq, Hq, Dh]``; k, v: ``[B, Tk, Hkv, Dh]``; metadata ``[B, Tq]`` / ``[B, Tk]``.
    Returns:
      ``[B, Tq, Hq, Dh]`` in q.dtype.
    """
    if rope:
        q = gaussian_rope(q, q_meta.mu, q_meta.sigma, theta)
        k = gaussian_rope(k, k_meta.mu, k_meta.sigma, theta)
    mask = visible(q_meta.end, k_meta.lod, k_meta.start, k_meta.end, k_meta.valid, spec)
    return masked_attention(q, k, v, mask)


# -- kernels -----------------------------------------------------------------------------------
def _rope_tables(mu, sigma, half: int, head_dim: int, theta: float):
    """Damped ``cos, sin [n, half]`` (padded frequencies beyond ``head_dim // 2`` are unused)."""
    j = jax.lax.broadcasted_iota(jnp.int32, (1, half), 1).astype(jnp.float32)
    freqs = jnp.exp(j * (-2.0 * math.log(theta) / head_dim))
    angles = mu[:, None] * freqs
    damp = jnp.exp(-0.5 * jnp.square(sigma[:, None] * freqs))
    return jnp.cos(angles) * damp, jnp.sin(angles) * damp


def _load(ref, rows, meta_refs, cfg):
    """Rows of ``ref`` as a list of column parts, and the rotary tables.

    With ``cfg.rope``: the two rotated halves ``[n, half]`` (so no lane shuffles: logits are a
    sum of two dots); else the whole rows ``[n, Dh]`` in one part.
    """
    if not cfg.rope:
        return [ref[rows, :]], None
    half = ref.shape[-1] // 2
    x1 = ref[rows, pl.ds(0, half)].astype(jnp.float32)
    x2 = ref[rows, pl.ds(half, half)].astype(jnp.float32)
    mu_ref, sigma_ref = meta_refs
    cos, sin = _rope_tables(mu_ref[rows], sigma_ref[rows], half, cfg.head_dim, cfg.theta)
    return [x1 * cos - x2 * sin, x1 * sin + x2 * cos], (cos, sin)


def _unrotate(parts, tables):
    """The transpose of the rotation: gradients w.r.t. the unrotated parts."""
    if tables is None:
        return parts
    (d1, d2), (cos, sin) = parts, tables
    return [d1 * cos + d2 * sin, d2 * cos - d1 * sin]


def _store(ref, parts):
    width = parts[0].shape[-1]
    for index, part in enumerate(parts):
        ref[:, pl.ds(index * width, width)] = part.astype(ref.dtype)


def _dot(a, b, dtype):
    """``a @ b.T`` with operands in ``dtype`` (bf16 feeds the matrix units), float32 result."""
    return jax.lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
    )


def _dot_nn(a, b, dtype):
    """``a @ b`` with operands in ``dtype``, float32 result."""
    return jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _logits(qs, ks, cfg):
    return sum(_dot(a, b, cfg.dtype) for a, b in zip(qs, ks, strict=True)) * cfg.scale


def _key_mask(q_end, k_meta_refs, cols, spec):
    lod_ref, start_ref, end_ref, valid_ref = k_meta_refs
    return visible(q_end, lod_ref[cols], start_ref[cols], end_ref[cols], valid_ref[cols] > 0, spec)


def _tile(kt_ref, j):
    return tuple(kt_ref[f, j] for f in range(5))


@dataclasses.dataclass(frozen=True)
class _Cfg:
    spec: MaskSpec
    blocks: BlockSizes
    rope: bool
    theta: float
    head_dim: int
    scale: float
    dtype: jnp.dtype


def _fwd_kernel(
    q_ref, k_ref, v_ref, qe_ref, qmu_ref, qsig_ref, kl_ref, ks_ref, ke_ref, kv_ref, kmu_ref,
    ksig_ref, kt_ref, range_ref, o_ref, lse_ref, *, cfg: _Cfg
):  # fmt: skip
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    rows = pl.ds(0, bq)
    qs, _ = _load(q_ref, rows, (qmu_ref, qsig_ref), cfg)
    q_end = qe_ref[rows]
    q_min, q_max = jnp.min(q_end), jnp.max(q_end)
    dv = v_ref.shape[-1]

    def body(j, carry):
        def visit(carry):
            o, m, l = carry
            cols = pl.ds(j * bk, bk)
            ks, _ = _load(k_ref, cols, (kmu_ref, ksig_ref), cfg)
            mask = _key_mask(q_end, (kl_ref, ks_ref, ke_ref, kv_ref), cols, cfg.spec)
            s = jnp.where(mask, _logits(qs, ks, cfg), NEG_INF)
            m_next = jnp.maximum(m, jnp.max(s, axis=1))
            m_safe = jnp.where(m_next == NEG_INF, 0.0, m_next)
            correction = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[:, None])
            v = v_ref[cols, :]
            o = o * correction[:, None] + _dot_nn(p, v, cfg.dtype)
            return o, m_next, l * correction + jnp.sum(p, axis=1)

        may = _tile_may_see(q_min, q_max, _tile(kt_ref, j), cfg.spec)
        return jax.lax.cond(may, visit, lambda c: c, carry)

    init = (
        jnp.zeros((bq, dv), jnp.float32),
        jnp.full((bq,), NEG_INF, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    i = pl.program_id(0)
    o, m, l = jax.lax.fori_loop(range_ref[0, i], range_ref[1, i], body, init)
    seen = l > 0
    o_ref[...] = (o / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _bwd_dkdv_kernel(
    q_ref, k_ref, v_ref, qe_ref, qmu_ref, qsig_ref, kl_ref, ks_ref, ke_ref, kv_ref, kmu_ref,
    ksig_ref, kt_ref, qt_ref, range_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _Cfg
):  # fmt: skip
    bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
    j = pl.program_id(0)
    cols = pl.ds(0, bk)
    ks, k_tables = _load(k_ref, cols, (kmu_ref, ksig_ref), cfg)
    v = v_ref[cols, :].astype(jnp.float32)
    kt = _tile(kt_ref, j)

    def body(i, carry):
        def visit(carry):
            dks, dv = carry
            rows = pl.ds(i * bq, bq)
            qs, _ = _load(q_ref, rows, (qmu_ref, qsig_ref), cfg)
            mask = _key_mask(qe_ref[rows], (kl_ref, ks_ref, ke_ref, kv_ref), cols, cfg.spec)
            s = jnp.where(mask, _logits(qs, ks, cfg), NEG_INF)
            p = jnp.exp(s - lse_ref[rows][:, None])  # [bq, bk]
            do = do_ref[rows, :].astype(jnp.float32)
            dv = dv + _dot_nn(p.T, do, cfg.dtype)
            ds = p * (_dot(do, v, cfg.dtype) - delta_ref[rows][:, None]) * cfg.scale
            return [dk + _dot_nn(ds.T, x, cfg.dtype) for dk, x in zip(dks, qs, strict=True)], dv

        may = _tile_may_see(qt_ref[0, i], qt_ref[1, i], kt, cfg.spec)
        return jax.lax.cond(may, visit, lambda c: c, carry)

    init = (
        [jnp.zeros(x.shape, jnp.float32) for x in ks],
        jnp.zeros((bk, v_ref.shape[-1]), jnp.float32),
    )
    dks, dv = jax.lax.fori_loop(range_ref[0, j], range_ref[1, j], body, init)
    _store(dk_ref, _unrotate(dks, k_tables))
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_dq_kernel(
    q_ref, k_ref, v_ref, qe_ref, qmu_ref, qsig_ref, kl_ref, ks_ref, ke_ref, kv_ref, kmu_ref,
    ksig_ref, kt_ref, range_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Cfg
):  # fmt: skip
    bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
    rows = pl.ds(0, bq)
    qs, q_tables = _load(q_ref, rows, (qmu_ref, qsig_ref), cfg)
    q_end = qe_ref[rows]
    q_min, q_max = jnp.min(q_end), jnp.max(q_end)
    do = do_ref[rows, :].astype(jnp.float32)
    lse, delta = lse_ref[rows], delta_ref[rows]

    def body(j, dqs):
        def visit(dqs):
            cols = pl.ds(j * bk, bk)
            ks, _ = _load(k_ref, cols, (kmu_ref, ksig_ref), cfg)
            mask = _key_mask(q_end, (kl_ref, ks_ref, ke_ref, kv_ref), cols, cfg.spec)
            s = jnp.where(mask, _logits(qs, ks, cfg), NEG_INF)
            p = jnp.exp(s - lse[:, None])
            v = v_ref[cols, :]
            ds = p * (_dot(do, v, cfg.dtype) - delta[:, None]) * cfg.scale
            return [dq + _dot_nn(ds, x, cfg.dtype) for dq, x in zip(dqs, ks, strict=True)]

        may = _tile_may_see(q_min, q_max, _tile(kt_ref, j), cfg.spec)
        return jax.lax.cond(may, visit, lambda c: c, dqs)

    init = [jnp.zeros(x.shape, jnp.float32) for x in qs]
    i = pl.program_id(0)
    dqs = jax.lax.fori_loop(range_ref[0, i], range_ref[1, i], body, init)
    _store(dq_ref, _unrotate(dqs, q_tables))


# -- wrappers ----------------------------------------------------------------------------------
def _pad_to(x, axis: int, size: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value) if size > x.shape[axis] else x


def _pad_halves(x, half: int):
    """``[..., Dh]`` -> ``[..., 2 * half]``: each rotary half zero-padded on its own."""
    h = x.shape[-1] // 2
    return jnp.concatenate([_pad_to(x[..., :h], -1, half), _pad_to(x[..., h:], -1, half)], -1)


def _pow2_tiles(summary: jax.Array, rows: int) -> jax.Array:
    """Pads ``[B, r, n]`` to ``[B, rows, 2^k >= n]`` (zeros: padding tiles hold no valid key), so
    every block the kernels see has power-of-two dimensions."""
    r, n = summary.shape[1:]
    return jnp.pad(summary, ((0, 0), (0, rows - r), (0, pl.next_power_of_2(n) - n)))


def _tile_summaries(meta: Entries, block: int) -> jax.Array:
    """``[B, 8, n]`` int32 per key tile (rows: min end, max start, min lod, max lod, any valid;
    tiles past ``T / block`` are padding)."""
    b, t = meta.lod.shape
    shape = (b, t // block, block)
    valid = meta.valid.reshape(shape)
    big = jnp.int32(_FAR)

    def masked(x, fill):
        return jnp.where(valid, x.reshape(shape), fill)

    summary = jnp.stack(
        [
            masked(meta.end, big).min(-1),
            masked(meta.start, -big).max(-1),
            masked(meta.lod, big).min(-1),
            masked(meta.lod, -1).max(-1),
            valid.any(-1).astype(jnp.int32),
        ],
        axis=1,
    )
    return _pow2_tiles(summary, 8)


def _query_summaries(q_end: jax.Array, block: int) -> jax.Array:
    """``[B, 2, n]`` min and max query end per query tile (tiles past ``Tq / block``: padding)."""
    b, t = q_end.shape
    tiles = q_end.reshape(b, t // block, block)
    return _pow2_tiles(jnp.stack([tiles.min(-1), tiles.max(-1)], axis=1), 2)


def _visit_ranges(qt: jax.Array, kt: jax.Array, spec: MaskSpec) -> tuple[jax.Array, jax.Array]:
    """``[B, 2, nq]`` first and past-last key tile each query tile may see, and ``[B, 2, nk]``
    the same for the query tiles of each key tile (empty ranges are ``[0, 0)``). The kernels
    loop over these ranges only (and still skip the tiles inside them that see nothing)."""
    rows = tuple(kt[:, f, None, :] for f in range(5))
    may = _tile_may_see(qt[:, 0, :, None], qt[:, 1, :, None], rows, spec)  # [B, nq, nk]

    def ranges(m):
        n = m.shape[-1]
        first, last = jnp.argmax(m, -1), n - jnp.argmax(m[..., ::-1], -1)
        some = m.any(-1)
        return jnp.stack([jnp.where(some, first, 0), jnp.where(some, last, 0)], 1)

    return ranges(may).astype(jnp.int32), ranges(jnp.swapaxes(may, 1, 2)).astype(jnp.int32)


def _meta_arrays(meta: Entries) -> list[jax.Array]:
    return [
        meta.lod,
        meta.start,
        meta.end,
        meta.valid.astype(jnp.int32),
        meta.mu.astype(jnp.float32),
        meta.sigma.astype(jnp.float32),
    ]


def _specs(cfg: _Cfg, tq: int, tk: int, dp: int, dvp: int, group: int, block_q: int, grid_q: bool):
    """BlockSpecs of q, k, v and the metadata for a grid ``(tiles, B, Hq)``.

    ``grid_q``: the first grid axis walks query tiles (forward, dq) or key tiles (dk/dv).
    """
    bk = cfg.blocks.block_k_bwd if not grid_q else cfg.blocks.block_k

    def rows(block, length, use_tile):
        if use_tile:
            return pl.BlockSpec((None, block, None, dp), lambda i, b, h: (b, i, h, 0))
        return pl.BlockSpec((None, length, None, dp), lambda i, b, h: (b, 0, h, 0))

    def kv_rows(block, length, width, use_tile):
        if use_tile:
            return pl.BlockSpec((None, block, None, width), lambda i, b, h: (b, i, h // group, 0))
        return pl.BlockSpec((None, length, None, width), lambda i, b, h: (b, 0, h // group, 0))

    def meta(block, length, use_tile):
        if use_tile:
            return pl.BlockSpec((None, block), lambda i, b, h: (b, i))
        return pl.BlockSpec((None, length), lambda i, b, h: (b, 0))

    q_tile, k_tile = grid_q, not grid_q
    return [
        rows(block_q, tq, q_tile),
        kv_rows(bk, tk, dp, k_tile),
        kv_rows(bk, tk, dvp, k_tile),
        *[meta(block_q, tq, q_tile)] * 3,
        *[meta(bk, tk, k_tile)] * 6,
    ]


def _forward(q, k, v, q_meta, k_meta, cfg: _Cfg, interpret: bool):
    b, tq, hq, dp = q.shape
    tk, hkv, dvp = k.shape[1], k.shape[2], v.shape[-1]
    bq = cfg.blocks.block_q
    kt = _tile_summaries(k_meta, cfg.blocks.block_k)
    q_ranges, _ = _visit_ranges(_query_summaries(q_meta.end, bq), kt, cfg.spec)
    nk, nq = kt.shape[-1], q_ranges.shape[-1]
    q_arrays = [q_meta.end, q_meta.mu.astype(jnp.float32), q_meta.sigma.astype(jnp.float32)]
    in_specs = [
        *_specs(cfg, tq, tk, dp, dvp, hq // hkv, bq, grid_q=True),
        pl.BlockSpec((None, 8, nk), lambda i, b, h: (b, 0, 0)),
        pl.BlockSpec((None, 2, nq), lambda i, b, h: (b, 0, 0)),
    ]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(tq // bq, b, hq),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, dvp), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, tq, hq, dvp), q.dtype),
            jax.ShapeDtypeStruct((b, hq, tq), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=_compiler_params(cfg.blocks, interpret),
        name="mixed_attention_fwd",
    )(q, k, v, *q_arrays, *_meta_arrays(k_meta), kt, q_ranges)


def _backward(q, k, v, q_meta, k_meta, out, lse, do, cfg: _Cfg, interpret: bool):
    b, tq, hq, dp = q.shape
    tk, hkv, dvp = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
    kt = _tile_summaries(k_meta, bk)
    qt = _query_summaries(q_meta.end, bq)
    q_ranges, k_ranges = _visit_ranges(qt, kt, cfg.spec)
    q_arrays = [q_meta.end, q_meta.mu.astype(jnp.float32), q_meta.sigma.astype(jnp.float32)]
    k_arrays = _meta_arrays(k_meta)
    nk, nq = kt.shape[-1], qt.shape[-1]

    # dk, dv: one program per key tile and query head; GQA groups are summed afterwards.
    specs = _specs(cfg, tq, tk, dp, dvp, group, bq, grid_q=False)
    specs[0] = pl.BlockSpec((None, tq, None, dp), lambda j, b, h: (b, 0, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_bwd_dkdv_kernel, cfg=cfg),
        grid=(tk // bk, b, hq),
        in_specs=[
            *specs,
            pl.BlockSpec((None, 8, nk), lambda j, b, h: (b, 0, 0)),
            pl.BlockSpec((None, 2, nq), lambda j, b, h: (b, 0, 0)),
            pl.BlockSpec((None, 2, nk), lambda j, b, h: (b, 0, 0)),
            pl.BlockSpec((None, tq, None, dvp), lambda j, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, None, tq), lambda j, b, h: (b, h, 0)),
            pl.BlockSpec((None, None, tq), lambda j, b, h: (b, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bk, None, dp), lambda j, b, h: (b, j, h, 0)),
            pl.BlockSpec((None, bk, None, dvp), lambda j, b, h: (b, j, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, tk, hq, dp), jnp.float32),
            jax.ShapeDtypeStruct((b, tk, hq, dvp), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=_compiler_params(cfg.blocks, interpret),
        name="mixed_attention_dkdv",
    )(q, k, v, *q_arrays, *k_arrays, kt, qt, k_ranges, do, lse, delta)
    dk = dk.reshape(b, tk, hkv, group, dp).sum(3).astype(k.dtype)
    dv = dv.reshape(b, tk, hkv, group, dvp).sum(3).astype(v.dtype)

    specs = _specs(cfg, tq, tk, dp, dvp, group, bq, grid_q=True)
    dq = pl.pallas_call(
        functools.partial(_bwd_dq_kernel, cfg=cfg),
        grid=(tq // bq, b, hq),
        in_specs=[
            *specs,
            pl.BlockSpec((None, 8, nk), lambda i, b, h: (b, 0, 0)),
            pl.BlockSpec((None, 2, nq), lambda i, b, h: (b, 0, 0)),
            pl.BlockSpec((None, bq, None, dvp), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, tq, hq, dp), q.dtype),
        interpret=interpret,
        compiler_params=_compiler_params(cfg.blocks, interpret),
        name="mixed_attention_dq",
    )(q, k, v, *q_arrays, *k_arrays, kt, q_ranges, do, lse, delta)
    return dq, dk, dv


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, q_meta, k_meta, cfg, interpret):
    return _forward(q, k, v, q_meta, k_meta, cfg, interpret)[0]


def _attention_fwd(q, k, v, q_meta, k_meta, cfg, interpret):
    out, lse = _forward(q, k, v, q_meta, k_meta, cfg, interpret)
    return out, (q, k, v, q_meta, k_meta, out, lse)


def _attention_bwd(cfg, interpret, residuals, do):
    q, k, v, q_meta, k_meta, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, q_meta, k_meta, out, lse, do, cfg, interpret)
    zeros = jax.tree.map(_zero_cotangent, (q_meta, k_meta))
    return (dq, dk, dv, *zeros)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad_meta(meta: Entries, length: int, end_fill: int) -> Entries:
    return Entries(
        lod=_pad_to(meta.lod, 1, length),
        start=_pad_to(meta.start, 1, length),
        end=_pad_to(meta.end, 1, length, end_fill),
        valid=_pad_to(meta.valid, 1, length, False),
        mu=_pad_to(meta.mu, 1, length),
        sigma=_pad_to(meta.sigma, 1, length),
    )


def _fit_meta(meta: Entries, batch: int, length: int, name: str) -> Entries:
    """``meta`` as ``[batch, length]``: one row broadcasts to every batch row; any other shape
    is an error (a compiled kernel would read metadata rows that do not exist)."""
    shape = jnp.shape(meta.lod)
    if len(shape) != 2 or shape[1] != length or shape[0] not in (1, batch):
        raise ValueError(
            f"{name} metadata is {shape}; expected ({batch}, {length}) or (1, {length})"
        )
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, length)), meta)


def mixed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_meta: Entries,
    k_meta: Entries,
    spec: MaskSpec = MaskSpec(),
    *,
    rope: bool = True,
    theta: float = 10000.0,
    blocks: BlockSizes = BlockSizes(),
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of ``q [B, Tq, Hq, Dh]`` over ``k, v [B, Tk, Hkv, Dh]`` under ``spec``'s mask.

    Metadata is ``[B, Tq]`` / ``[B, Tk]``, or ``[1, T]`` for one layout shared by every row.

    Differentiable in q, k and v (Pallas backward). Lengths are padded to the tiles and head
    halves to powers of two here. ``interpret=None`` interprets on CPU and compiles elsewhere.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    tq, hq, dh = q.shape[1:]
    tk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {hkv}")
    if dh % 2:
        raise ValueError(f"head_dim must be even (rotary halves), got {dh}")
    b = q.shape[0]
    q_meta, k_meta = _fit_meta(q_meta, b, tq, "query"), _fit_meta(k_meta, b, tk, "key")
    half = max(8, pl.next_power_of_2(dh // 2))
    step_q = math.lcm(blocks.block_q, blocks.block_q_bwd)
    step_k = math.lcm(blocks.block_k, blocks.block_k_bwd)
    tq_p, tk_p = -(-tq // step_q) * step_q, -(-tk // step_k) * step_k
    cfg = _Cfg(spec, blocks, rope, theta, dh, dh**-0.5, jnp.dtype(q.dtype))
    qp = _pad_to(_pad_halves(q, half), 1, tq_p)
    kp = _pad_to(_pad_halves(k, half), 1, tk_p)
    vp = _pad_to(_pad_to(v, -1, 2 * half), 1, tk_p)
    out = _attention(
        qp, kp, vp, _pad_meta(q_meta, tq_p, -1), _pad_meta(k_meta, tk_p, _FAR), cfg, interpret
    )
    return out[:, :tq, :, :dh]
