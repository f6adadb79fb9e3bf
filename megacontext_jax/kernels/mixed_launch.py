"""The ``pallas_call`` launchers of the mixed-attention kernels (DESIGN section 6).

``forward`` and ``backward`` run the tile-list pre-pass (``kernels.tiles``) and launch the
kernels of ``kernels.mixed_kernels`` on grids ``(tiles, B, heads)``: the forward and dq walk query
tiles per query head, dk/dv key tiles per KV head (over the query heads of its GQA group, so dk
and dv are written once, in the input dtype). Program i takes the i-th tile of its side's
heavy-first ``order``, so a program's own tile is known only inside the kernel: both sides come
whole for the program's batch row and head (all queries of the group for dk/dv), with the tile
lists, counts and order of the row, and the kernel slices its own tile and the listed tiles out
of them and writes its own rows of the outputs.
GQA: query head h reads key head ``h // (Hq // Hkv)``. Interpreted on CPU, compiled for Triton elsewhere.

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
    unrotate_rows,
)
from megacontext_jax.kernels.tiles import TileLists, pass_lists


def _compiler_params(blocks: BlockSizes, interpret: bool, backward: bool = False):
    if interpret:
        return None
    # Imported here: the Triton backend is needed (and may only exist) where the kernels compile.
    from jax.experimental.pallas import triton as plgpu

    if backward:
        return plgpu.CompilerParams(
            num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages_bwd
        )
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
    """BlockSpecs of a batch row's tile lists, counts and order (grid ``(n, B, H)``)."""
    n, n_other = lists.lists.shape[1:]
    return [
        pl.BlockSpec((None, n, n_other), lambda t, b, h: (b, 0, 0)),
        pl.BlockSpec((None, 2, n), lambda t, b, h: (b, 0, 0)),
        pl.BlockSpec((None, n), lambda t, b, h: (b, 0)),
    ]


def _rows(length: int, width: int, heads=lambda h: h) -> pl.BlockSpec:
    """All rows of one head (``heads(h)``) of a ``[B, T, H, width]`` array."""
    return pl.BlockSpec((None, length, None, width), lambda t, b, h: (b, 0, heads(h), 0))


def _meta(length: int) -> list[pl.BlockSpec]:
    """The ``[B, T]`` metadata rows of the program's batch row."""
    return [pl.BlockSpec((None, length), lambda t, b, h: (b, 0))]


def _query_side(tq: int, tk: int, dp: int, dvp: int, group: int) -> list[pl.BlockSpec]:
    """BlockSpecs of q, k, v and the metadata for a grid ``(query tiles, B, Hq)`` (forward,
    dq): all queries of the program's head, all keys of its KV head."""

    def kv_head(h):
        return h // group

    return [
        _rows(tq, dp),
        _rows(tk, dp, kv_head),
        _rows(tk, dvp, kv_head),
        *_meta(tq) * 3,
        *_meta(tk) * 6,
    ]


def _head_stats(tq: int) -> pl.BlockSpec:
    """The ``[B, Hq, Tq]`` log-sum-exp (or delta) row of the program's query head."""
    return pl.BlockSpec((None, None, tq), lambda t, b, h: (b, h, 0))


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
    ``k, v [B, Tk, Hkv, .]``; ``lse`` is in base 2 (what the backward takes) and ``inf`` for a
    query that sees no key."""
    b, tq, hq, dp = q.shape
    tk, hkv, dvp = k.shape[1], k.shape[2], v.shape[-1]
    bq = cfg.blocks.block_q
    lists = pass_lists(q_meta.end, k_meta, bq, cfg.blocks.block_k, cfg.spec)[0]
    q_arrays = [q_meta.end, q_meta.mu.astype(jnp.float32), q_meta.sigma.astype(jnp.float32)]
    lists = lists.first(tq // bq)
    in_specs = [*_query_side(tq, tk, dp, dvp, hq // hkv), *_list_specs(lists)]
    return pl.pallas_call(
        functools.partial(fwd_kernel, cfg=cfg),
        grid=(tq // bq, b, hq),
        in_specs=in_specs,
        out_specs=[_rows(tq, dvp), _head_stats(tq)],
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
    q_lists, k_lists = q_lists.first(tq // bq), k_lists.first(tk // bk)
    q_arrays = [q_meta.end, q_meta.mu.astype(jnp.float32), q_meta.sigma.astype(jnp.float32)]
    k_arrays = _meta_arrays(k_meta)

    # dk, dv: one program per key tile and KV head, over the query heads of its group.
    def group_rows(width):
        return pl.BlockSpec((None, tq, group, width), lambda j, b, h: (b, 0, h, 0))

    group_stats = pl.BlockSpec((None, group, tq), lambda j, b, h: (b, h, 0))
    fused = cfg.blocks.fused_dq
    # The fused dq: a float32 accumulator, zeros in, aliased to the third output.
    dq_acc = [jnp.zeros((b, tq, hq, dp), jnp.float32)] if fused else []
    args = [q, k, v, *q_arrays, *k_arrays, *k_lists, do, lse, delta, *dq_acc]
    outs = pl.pallas_call(
        functools.partial(dkdv_kernel, cfg=cfg),
        grid=(tk // bk, b, hkv),
        in_specs=[
            group_rows(dp),
            _rows(tk, dp),
            _rows(tk, dvp),
            *_meta(tq) * 3,
            *_meta(tk) * 6,
            *_list_specs(k_lists),
            group_rows(dvp),
            group_stats,
            group_stats,
            *[group_rows(dp)] * fused,
        ],
        out_specs=[_rows(tk, dp), _rows(tk, dvp), *[group_rows(dp)] * fused],
        out_shape=[
            jax.ShapeDtypeStruct((b, tk, hkv, dp), k.dtype),
            jax.ShapeDtypeStruct((b, tk, hkv, dvp), v.dtype),
            *[jax.ShapeDtypeStruct((b, tq, hq, dp), jnp.float32)] * fused,
        ],
        input_output_aliases={len(args) - 1: 2} if fused else {},
        interpret=interpret,
        compiler_params=_compiler_params(cfg.blocks, interpret, backward=True),
        name="mixed_attention_dkdv",
    )(*args)
    dk, dv = outs[:2]
    if fused:
        dq = unrotate_rows(outs[2], q_meta.mu, q_meta.sigma, cfg).astype(q.dtype)
        return dq, dk, dv

    dq = pl.pallas_call(
        functools.partial(dq_kernel, cfg=cfg),
        grid=(tq // bq, b, hq),
        in_specs=[
            *_query_side(tq, tk, dp, dvp, group),
            *_list_specs(q_lists),
            _rows(tq, dvp),
            _head_stats(tq),
            _head_stats(tq),
        ],
        out_specs=_rows(tq, dp),
        out_shape=jax.ShapeDtypeStruct((b, tq, hq, dp), q.dtype),
        interpret=interpret,
        compiler_params=_compiler_params(cfg.blocks, interpret, backward=True),
        name="mixed_attention_dq",
    )(q, k, v, *q_arrays, *k_arrays, *q_lists, do, lse, delta)
    return dq, dk, dv
