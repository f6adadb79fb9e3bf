"""The ``pallas_call`` launchers of the mixed-attention kernels (DESIGN section 6).

``forward`` and ``backward`` run the tile-list pre-pass (``kernels.tiles``) and launch the
kernels of ``kernels.mixed_kernels`` on grids ``(tiles, B, Hq)``: the forward and dq walk query
tiles, dk/dv key tiles. A program's own tile and its own row of the tile lists come in blocks, the
list counts of its batch row whole; the other side (all keys, or all queries for dk/dv) comes
whole, and the kernel slices the listed tiles out of it. GQA: query head h reads key head
``h // (Hq // Hkv)``. Interpreted on CPU, compiled for Triton elsewhere.

Inputs come padded by ``kernels.mixed_attention``: lengths to whole tiles of both the forward and
the backward block sizes, each rotary half of the head dim to a power of two, metadata ``[B, T]``.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from megacontext_jax.kernels.mask import Entries
from megacontext_jax.kernels.mixed_kernels import (
    BlockSizes,
    KernelConfig,
    dkdv_kernel,
    dq_kernel,
    fwd_kernel,
)
from megacontext_jax.kernels.tiles import TileLists, pass_lists


def _compiler_params(blocks: BlockSizes, interpret: bool):
    if interpret:
        return None
    # Imported here: the Triton backend is needed (and may only exist) where the kernels compile.
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _meta_arrays(meta: Entries) -> list[jax.Array]:
    return [
        meta.lod,
        meta.start,
        meta.end,
        meta.valid.astype(jnp.int32),
        meta.mu.astype(jnp.float32),
        meta.sigma.astype(jnp.float32),
    ]


def _list_specs(lists: TileLists) -> list[pl.BlockSpec]:
    """BlockSpecs of a program's own list row and of its batch row's counts (grid ``(n, B, Hq)``)."""
    n, n_other = lists.lists.shape[1:]
    return [
        pl.BlockSpec((None, None, n_other), lambda t, b, h: (b, t, 0)),
        pl.BlockSpec((None, 2, n), lambda t, b, h: (b, 0, 0)),
    ]


def _specs(
    cfg: KernelConfig, tq: int, tk: int, dp: int, dvp: int, group: int, block_q: int, grid_q: bool
):
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


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_meta: Entries,
    k_meta: Entries,
    cfg: KernelConfig,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """``(out [B, Tq, Hq, Dv], lse [B, Hq, Tq])`` of padded ``q [B, Tq, Hq, Dh]`` over
    ``k, v [B, Tk, Hkv, .]``; ``lse`` is ``inf`` for a query that sees no key."""
    b, tq, hq, dp = q.shape
    tk, hkv, dvp = k.shape[1], k.shape[2], v.shape[-1]
    bq = cfg.blocks.block_q
    lists = pass_lists(q_meta.end, k_meta, bq, cfg.blocks.block_k, cfg.spec)[0]
    q_arrays = [q_meta.end, q_meta.mu.astype(jnp.float32), q_meta.sigma.astype(jnp.float32)]
    in_specs = [*_specs(cfg, tq, tk, dp, dvp, hq // hkv, bq, grid_q=True), *_list_specs(lists)]
    return pl.pallas_call(
        functools.partial(fwd_kernel, cfg=cfg),
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
    )(q, k, v, *q_arrays, *_meta_arrays(k_meta), *lists)


def backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_meta: Entries,
    k_meta: Entries,
    out: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    cfg: KernelConfig,
    interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(dq, dk, dv)`` in the dtypes of q, k, v, from ``forward``'s ``out`` and ``lse`` and the
    output cotangent ``do``."""
    b, tq, hq, dp = q.shape
    tk, hkv, dvp = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
    q_lists, k_lists = pass_lists(q_meta.end, k_meta, bq, bk, cfg.spec)
    q_arrays = [q_meta.end, q_meta.mu.astype(jnp.float32), q_meta.sigma.astype(jnp.float32)]
    k_arrays = _meta_arrays(k_meta)

    # dk, dv: one program per key tile and query head; GQA groups are summed afterwards.
    specs = _specs(cfg, tq, tk, dp, dvp, group, bq, grid_q=False)
    specs[0] = pl.BlockSpec((None, tq, None, dp), lambda j, b, h: (b, 0, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(dkdv_kernel, cfg=cfg),
        grid=(tk // bk, b, hq),
        in_specs=[
            *specs,
            *_list_specs(k_lists),
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
    )(q, k, v, *q_arrays, *k_arrays, *k_lists, do, lse, delta)
    dk = dk.reshape(b, tk, hkv, group, dp).sum(3).astype(k.dtype)
    dv = dv.reshape(b, tk, hkv, group, dvp).sum(3).astype(v.dtype)

    specs = _specs(cfg, tq, tk, dp, dvp, group, bq, grid_q=True)
    dq = pl.pallas_call(
        functools.partial(dq_kernel, cfg=cfg),
        grid=(tq // bq, b, hq),
        in_specs=[
            *specs,
            *_list_specs(q_lists),
            pl.BlockSpec((None, bq, None, dvp), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, tq, hq, dp), q.dtype),
        interpret=interpret,
        compiler_params=_compiler_params(cfg.blocks, interpret),
        name="mixed_attention_dq",
    )(q, k, v, *q_arrays, *k_arrays, *q_lists, do, lse, delta)
    return dq, dk, dv
