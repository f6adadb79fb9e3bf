"""The Pallas Mosaic TPU kernels of mixed-resolution attention (DESIGN section 6).

The TPU face of ``kernels.mixed_launch``: the same ``forward`` / ``backward`` signatures, masks
(``kernels.mask``), block-sparse tile lists (``kernels.tiles``) and results, behind the same
``custom_vjp`` of ``kernels.mixed_attention``, which picks these kernels on a TPU backend.

As splash attention does with its ``MaskInfo``, the block-sparse structure is scalar-prefetched
into SMEM and drives the index maps; here it is ``kernels.tiles.work_list``, the tile lists of
every tile of one side flattened into one walk. A program is one (batch row, head) and its grid's
last axis is that walk: step n computes the n-th (own tile, listed tile) pair, whose blocks the
pipeline fetches while step n - 1 computes, so the grid's length is the number of listed tiles (a
dynamic grid bound, the longest batch row's walk), not ``n * n_other``, and a tile with a long
list holds up no other. The work list itself, which SMEM must hold, has a static length: the
launchers compile it at the few lengths of ``kernels.tiles.walk_sizes`` (the longest possible,
then quarters of it) and run the shortest that holds the walk (``lax.switch``); a shorter batch
row's steps past its walk's end compute nothing and fetch nothing new. Partial tiles (listed first) are
masked with ``kernels.mask.pairs_visible``; full tiles run no mask arithmetic. Online softmax
state and gradient accumulators live in VMEM scratch across a tile's steps, which are
consecutive; the outputs are written at its last step.

Layout (the blocks' last two dimensions are whole or tile-sized, as Mosaic requires): q, k, v,
out and do head-major ``[B, H, T, D]``; ``lse`` and ``delta`` ``[B, Hq, Tq, 1]``; query ends
``[B, Tq, 1]``; key metadata ``[B, 4, Tk]`` (rows lod, start, end, valid). q and k come rotated
(``kernels.mixed_attention`` rotates them in jnp first when asked to fuse RoPE). Logits, softmax
and accumulation are float32, matmul operands in the input dtype. dk / dv walk per KV head, each key
tile's list once per query head of its GQA group (the walk's ``HEAD`` row), so they are summed in
VMEM and written once in the input dtype. Interpreted on CPU
(``pltpu.InterpretParams``), compiled by Mosaic on a TPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from megacontext_jax.kernels.mask import Entries, pairs_visible
from megacontext_jax.kernels.mixed_kernels import KernelConfig
from megacontext_jax.kernels.tiles import (
    FIRST,
    FLAGS,
    HEAD,
    LAST,
    MASKED,
    OTHER,
    OWN,
    UNMASKED,
    TileLists,
    pass_lists,
    walk_length,
    walk_sizes,
    work_list,
)

NEG_INF = float("-inf")
# (batch row, head) are independent; the walk carries the accumulators from step to step.
SEMANTICS = ("parallel", "parallel", "arbitrary")


def _blocks(block, width, row, heads=None):
    """Blocks of a ``[B, H, T, width]`` array along the walk (grid ``(B, H, step)``): the tile
    in the work list's ``row`` (``OWN`` or ``OTHER``), of head ``heads(h, head_row)`` (default
    the program's own head ``h``)."""
    heads = heads or (lambda h, g: h)
    return pl.BlockSpec(
        (None, None, block, width),
        lambda b, h, n, work: (b, heads(h, work[b, HEAD, n]), work[b, row, n], 0),
    )


def _query_ends(block, row):
    return pl.BlockSpec((None, block, 1), lambda b, h, n, work: (b, work[b, row, n], 0))


def _key_meta(block, row):
    return pl.BlockSpec((None, 4, block), lambda b, h, n, work: (b, 0, work[b, row, n]))


def _dot(a, b, dtype, contract=((1,), (0,))):
    return jax.lax.dot_general(
        a.astype(dtype), b.astype(dtype), (contract, ((), ())), preferred_element_type=jnp.float32
    )


def _logits(q, k, cfg: KernelConfig):
    return _dot(q, k, cfg.dtype, ((1,), (1,))) * cfg.scale


def _masked(s, qe_ref, km_ref, cfg: KernelConfig):
    keys = km_ref[...]
    mask = pairs_visible(qe_ref[...], keys[0:1], keys[1:2], keys[2:3], keys[3:4] > 0, cfg.spec)
    return jnp.where(mask, s, NEG_INF)


def _step(work_ref, init, visit, finish):
    """This step of the walk: ``init()`` on a tile's first step, ``visit(masked)`` on a listed
    tile (masked on partial ones, unmasked on full ones), ``finish()`` on its last step."""
    flags = work_ref[pl.program_id(0), FLAGS, pl.program_id(2)]
    pl.when(flags & FIRST != 0)(init)
    pl.when(flags & MASKED != 0)(lambda: visit(True))
    pl.when(flags & UNMASKED != 0)(lambda: visit(False))
    pl.when(flags & LAST != 0)(finish)


def _fwd_kernel(
    work_ref, q_ref, k_ref, v_ref, qe_ref, km_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *,
    cfg: KernelConfig,
):  # fmt: skip
    """One query tile against its listed key tiles: online softmax, then ``o`` and ``lse``
    (``inf`` for a query that sees no key, whose output is 0)."""

    def init():
        m_scr[...] = jnp.full(m_scr.shape, NEG_INF, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def visit(masked):
        s = _logits(q_ref[...], k_ref[...], cfg)
        if masked:
            s = _masked(s, qe_ref, km_ref, cfg)
        m = m_scr[...]
        m_next = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        # Only a masked tile can leave a row's max at -inf: every row sees a key of a full tile.
        m_safe = jnp.where(m_next == NEG_INF, 0.0, m_next) if masked else m_next
        correction = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe)
        l_scr[...] = l_scr[...] * correction + jnp.sum(p, axis=1, keepdims=True)
        acc_scr[...] = acc_scr[...] * correction + _dot(p, v_ref[...], cfg.dtype)
        m_scr[...] = m_next

    def finish():
        l = l_scr[...]
        seen = l > 0
        o_ref[...] = (acc_scr[...] / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)

    _step(work_ref, init, visit, finish)


def _dkdv_kernel(
    work_ref, q_ref, k_ref, v_ref, qe_ref, km_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    dk_scr, dv_scr, *, cfg: KernelConfig,
):  # fmt: skip
    """One key tile of one KV head against its listed query tiles, once per query head of its
    GQA group: dk and dv accumulated in float32, written once in the input dtype."""

    def init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def visit(masked):
        q = q_ref[...]
        s = _logits(q, k_ref[...], cfg)
        if masked:
            s = _masked(s, qe_ref, km_ref, cfg)
        p = jnp.exp(s - lse_ref[...])  # [bq, bk]
        do = do_ref[...]
        dv_scr[...] += _dot(p, do, cfg.dtype, ((0,), (0,)))
        dp = _dot(do, v_ref[...], cfg.dtype, ((1,), (1,)))
        ds = p * (dp - delta_ref[...]) * cfg.scale
        dk_scr[...] += _dot(ds, q, cfg.dtype, ((0,), (0,)))

    def finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)

    _step(work_ref, init, visit, finish)


def _dq_kernel(
    work_ref, q_ref, k_ref, v_ref, qe_ref, km_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr,
    *, cfg: KernelConfig,
):  # fmt: skip
    """One query tile against its listed key tiles: dq."""

    def init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def visit(masked):
        k = k_ref[...]
        s = _logits(q_ref[...], k, cfg)
        if masked:
            s = _masked(s, qe_ref, km_ref, cfg)
        p = jnp.exp(s - lse_ref[...])
        dp = _dot(do_ref[...], v_ref[...], cfg.dtype, ((1,), (1,)))
        ds = p * (dp - delta_ref[...]) * cfg.scale
        dq_scr[...] += _dot(ds, k, cfg.dtype)

    def finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)

    _step(work_ref, init, visit, finish)


def _heads_major(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, 1, 2)


def _key_rows(meta: Entries) -> jax.Array:
    return jnp.stack([meta.lod, meta.start, meta.end, meta.valid.astype(jnp.int32)], axis=1)


def _walk(
    lists: TileLists, n: int, n_other: int, heads: int, kernel, in_specs, out_specs, out_shape, scratch,
    operands, interpret: bool, name: str, repeat: int = 1,
):  # fmt: skip
    """Runs ``kernel`` on the grid ``(B, heads, steps)`` of the walk over the ``n`` tiles of
    ``lists`` (each list ``repeat`` times); the work list is its scalar-prefetched operand, the
    kernel's first. ``steps`` is the walk's length, a dynamic grid bound, so no step is wasted;
    the work list, which must fit in SMEM, has the shortest of the static ``walk_sizes`` that
    holds the walk (one compiled launch per size, ``lax.switch`` picks at run time)."""
    b = lists.counts.shape[0]
    lists = lists.first(n)
    sizes = walk_sizes(n, n_other, repeat)
    steps = walk_length(lists, repeat)

    def launch(size):
        call = pl.pallas_call(
            kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1,
                grid=(b, heads, steps),
                in_specs=in_specs,
                out_specs=out_specs,
                scratch_shapes=scratch,
            ),
            out_shape=out_shape,
            compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
            interpret=pltpu.InterpretParams() if interpret else False,
            name=name,
        )
        return lambda: call(work_list(lists, size, repeat), *operands)

    if len(sizes) == 1:
        return launch(sizes[0])()
    return jax.lax.switch(jnp.searchsorted(jnp.asarray(sizes), steps), list(map(launch, sizes)))


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
    ``k, v [B, Tk, Hkv, .]`` (``kernels.mixed_launch.forward``'s contract)."""
    if cfg.rope:
        raise ValueError("the TPU kernels take q and k rotated (rope=False)")
    b, tq, hq, dp = q.shape
    tk, hkv, dvp = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k

    def kv_head(h, _):
        return h // group

    out, lse = _walk(
        pass_lists(q_meta.end, k_meta, bq, bk, cfg.spec)[0],
        tq // bq,
        tk // bk,
        hq,
        functools.partial(_fwd_kernel, cfg=cfg),
        in_specs=[
            _blocks(bq, dp, OWN),
            _blocks(bk, dp, OTHER, kv_head),
            _blocks(bk, dvp, OTHER, kv_head),
            _query_ends(bq, OWN),
            _key_meta(bk, OTHER),
        ],
        out_specs=[_blocks(bq, dvp, OWN), _blocks(bq, 1, OWN)],
        out_shape=[
            jax.ShapeDtypeStruct((b, hq, tq, dvp), q.dtype),
            jax.ShapeDtypeStruct((b, hq, tq, 1), jnp.float32),
        ],
        scratch=[pltpu.VMEM((bq, 1), jnp.float32)] * 2 + [pltpu.VMEM((bq, dvp), jnp.float32)],
        operands=(
            _heads_major(q),
            _heads_major(k),
            _heads_major(v),
            q_meta.end[..., None],
            _key_rows(k_meta),
        ),
        interpret=interpret,
        name="mixed_attention_fwd_tpu",
    )
    return _heads_major(out), lse[..., 0]


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
    """``(dq, dk, dv)`` in the dtypes of q, k, v (``kernels.mixed_launch.backward``'s contract)."""
    b, tq, hq, dp = q.shape
    tk, hkv, dvp = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
    q_lists, k_lists = pass_lists(q_meta.end, k_meta, bq, bk, cfg.spec)
    operands = (
        _heads_major(q),
        _heads_major(k),
        _heads_major(v),
        q_meta.end[..., None],
        _key_rows(k_meta),
        _heads_major(do),
        lse[..., None],
        delta[..., None],
    )

    def kv_head(h, _):
        return h // group

    def group_head(h, g):
        return h * group + g

    # dk, dv: the walk of each KV head takes every key tile's list once per query head of the
    # group (its HEAD row), so dk and dv are summed in VMEM and written once, in the input dtype.
    dk, dv = _walk(
        k_lists,
        tk // bk,
        tq // bq,
        hkv,
        functools.partial(_dkdv_kernel, cfg=cfg),
        in_specs=[
            _blocks(bq, dp, OTHER, group_head),
            _blocks(bk, dp, OWN),
            _blocks(bk, dvp, OWN),
            _query_ends(bq, OTHER),
            _key_meta(bk, OWN),
            _blocks(bq, dvp, OTHER, group_head),
            _blocks(bq, 1, OTHER, group_head),
            _blocks(bq, 1, OTHER, group_head),
        ],
        out_specs=[_blocks(bk, dp, OWN), _blocks(bk, dvp, OWN)],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, tk, dp), k.dtype),
            jax.ShapeDtypeStruct((b, hkv, tk, dvp), v.dtype),
        ],
        scratch=[pltpu.VMEM((bk, dp), jnp.float32), pltpu.VMEM((bk, dvp), jnp.float32)],
        operands=operands,
        interpret=interpret,
        name="mixed_attention_dkdv_tpu",
        repeat=group,
    )
    dq = _walk(
        q_lists,
        tq // bq,
        tk // bk,
        hq,
        functools.partial(_dq_kernel, cfg=cfg),
        in_specs=[
            _blocks(bq, dp, OWN),
            _blocks(bk, dp, OTHER, kv_head),
            _blocks(bk, dvp, OTHER, kv_head),
            _query_ends(bq, OWN),
            _key_meta(bk, OTHER),
            _blocks(bq, dvp, OWN),
            _blocks(bq, 1, OWN),
            _blocks(bq, 1, OWN),
        ],
        out_specs=_blocks(bq, dp, OWN),
        out_shape=jax.ShapeDtypeStruct((b, hq, tq, dp), q.dtype),
        scratch=[pltpu.VMEM((bq, dp), jnp.float32)],
        operands=operands,
        interpret=interpret,
        name="mixed_attention_dq_tpu",
    )
    return _heads_major(dq), _heads_major(dk), _heads_major(dv)
