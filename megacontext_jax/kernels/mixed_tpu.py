"""The Pallas Mosaic TPU kernels of mixed-resolution attention (DESIGN section 6).

The TPU face of ``kernels.mixed_launch``: the same ``forward`` / ``backward`` signatures, masks
(``kernels.mask``), block-sparse tile lists (``kernels.tiles``) and results, behind the same
``custom_vjp`` of ``kernels.mixed_attention``, which picks these kernels on a TPU backend.

As splash attention does with its ``MaskInfo``, the tile lists are scalar-prefetched into SMEM and
drive the index maps: a program is one (batch row, query head, tile) and its last grid axis walks
its list, step n visiting the n-th listed tile of the other side, whose blocks the pipeline fetches
while step n - 1 computes. Partial tiles (listed first) are masked with
``kernels.mask.pairs_visible``; full tiles run no mask arithmetic. A grid is static while the list
lengths are traced, so that axis has as many steps as the other side has tiles: steps past the
list's end repeat its last block index (the pipeline copies nothing) and compute nothing, costing
the grid's per-step overhead alone. Online softmax state and gradient accumulators live in VMEM
scratch across the walk; the outputs are written at its last step.

Layout (the blocks' last two dimensions are whole or tile-sized, as Mosaic requires): q, k, v,
out and do head-major ``[B, H, T, D]``; ``lse`` and ``delta`` ``[B, Hq, Tq, 1]``; query ends
``[B, Tq, 1]``; key metadata ``[B, 4, Tk]`` (rows lod, start, end, valid). q and k come rotated
(``kernels.mixed_attention`` rotates them in jnp first when asked to fuse RoPE). Logits, softmax
and accumulation are float32, matmul operands in the input dtype. dk / dv have one program per key
tile and KV head, whose step axis walks the list once per query head of its GQA group, so they
are summed in VMEM and written once in the input dtype. Interpreted on CPU
(``pltpu.InterpretParams``), compiled by Mosaic on a TPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from megacontext_jax.kernels.mask import Entries, pairs_visible
from megacontext_jax.kernels.mixed_kernels import KernelConfig
from megacontext_jax.kernels.tiles import pass_lists

NEG_INF = float("-inf")
# (batch row, head, own tile) are independent; the walk over the list carries the accumulators.
SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _tile(walked: bool):
    """The tile a program reads at step ``n``: its own ``t``, or the n-th of its list (past the
    list's end, its last tile again)."""

    def listed(b, t, n, lists_ref, counts_ref):
        last = jnp.maximum(counts_ref[b, 1, t] - 1, 0)
        return lists_ref[b, t, jnp.minimum(n, last)]

    return listed if walked else lambda b, t, n, lists_ref, counts_ref: t


def _rows(block, width, walked, heads=lambda h: h):
    """Blocks of a ``[B, H, T, width]`` array (grid ``(B, H, tile, step)``; ``heads`` maps the
    query head to this array's head)."""
    tile = _tile(walked)
    return pl.BlockSpec(
        (None, None, block, width), lambda b, h, t, n, *r: (b, heads(h), tile(b, t, n, *r), 0)
    )


def _own(block, width, heads=lambda h: h):
    return _rows(block, width, False, heads)


def _walked(block, width, heads=lambda h: h):
    return _rows(block, width, True, heads)


def _query_ends(block, walked):
    tile = _tile(walked)
    return pl.BlockSpec((None, block, 1), lambda b, h, t, n, *r: (b, tile(b, t, n, *r), 0))


def _group_walked(block, width, group: int, steps: int, heads: bool = True):
    """Blocks of the query side for dk/dv on a grid ``(B, Hkv, key tile, group x steps)``: step n
    reads query head ``h * group + n // steps`` at the ``n % steps``-th tile of the list (a
    ``[B, Tq, 1]`` array of query ends, with ``heads=False``, has no head axis)."""
    tile = _tile(walked=True)
    if not heads:
        return pl.BlockSpec(
            (None, block, width), lambda b, h, t, n, *r: (b, tile(b, t, n % steps, *r), 0)
        )
    return pl.BlockSpec(
        (None, None, block, width),
        lambda b, h, t, n, *r: (b, h * group + n // steps, tile(b, t, n % steps, *r), 0),
    )


def _key_meta(block, walked):
    tile = _tile(walked)
    return pl.BlockSpec((None, 4, block), lambda b, h, t, n, *r: (b, 0, tile(b, t, n, *r)))


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


def _walk(counts_ref, visit, steps: int | None = None):
    """Runs ``visit(masked)`` at this step if it is on the list: masked on its partial tiles,
    unmasked on its full ones. With ``steps``, the step axis walks the list once per query head
    of a GQA group (step n: head ``n // steps``, list entry ``n % steps``)."""
    b, t, n = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    if steps is not None:
        n = n % steps
    n_partial, n_listed = counts_ref[b, 0, t], counts_ref[b, 1, t]
    pl.when(n < n_partial)(lambda: visit(True))
    pl.when((n >= n_partial) & (n < n_listed))(lambda: visit(False))


def _fwd_kernel(
    lists_ref, counts_ref, q_ref, k_ref, v_ref, qe_ref, km_ref, o_ref, lse_ref, m_scr, l_scr,
    acc_scr, *, cfg: KernelConfig,
):  # fmt: skip
    """One query tile against its listed key tiles: online softmax, then ``o`` and ``lse``
    (``inf`` for a query that sees no key, whose output is 0)."""
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _init():
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

    _walk(counts_ref, visit)

    @pl.when(n == pl.num_programs(3) - 1)
    def _finish():
        l = l_scr[...]
        seen = l > 0
        o_ref[...] = (acc_scr[...] / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _dkdv_kernel(
    lists_ref, counts_ref, q_ref, k_ref, v_ref, qe_ref, km_ref, do_ref, lse_ref, delta_ref,
    dk_ref, dv_ref, dk_scr, dv_scr, *, cfg: KernelConfig, steps: int,
):  # fmt: skip
    """One key tile of one KV head against its listed query tiles, once per query head of its
    GQA group: dk and dv accumulated in float32, written once in the input dtype."""
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _init():
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

    _walk(counts_ref, visit, steps)

    @pl.when(n == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(
    lists_ref, counts_ref, q_ref, k_ref, v_ref, qe_ref, km_ref, do_ref, lse_ref, delta_ref,
    dq_ref, dq_scr, *, cfg: KernelConfig,
):  # fmt: skip
    """One query tile against its listed key tiles: dq."""
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _init():
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

    _walk(counts_ref, visit)

    @pl.when(n == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _heads_major(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, 1, 2)


def _key_rows(meta: Entries) -> jax.Array:
    return jnp.stack([meta.lod, meta.start, meta.end, meta.valid.astype(jnp.int32)], axis=1)


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, interpret, name):
    """The ``pallas_call`` of ``kernel``, its two scalar-prefetched operands the tile lists."""
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=name,
    )


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

    def kv_head(h):
        return h // group

    lists = pass_lists(q_meta.end, k_meta, bq, bk, cfg.spec)[0]
    call = _call(
        functools.partial(_fwd_kernel, cfg=cfg),
        (b, hq, tq // bq, tk // bk),
        in_specs=[
            _own(bq, dp),
            _walked(bk, dp, kv_head),
            _walked(bk, dvp, kv_head),
            _query_ends(bq, walked=False),
            _key_meta(bk, walked=True),
        ],
        out_specs=[_own(bq, dvp), _own(bq, 1)],
        out_shape=[
            jax.ShapeDtypeStruct((b, hq, tq, dvp), q.dtype),
            jax.ShapeDtypeStruct((b, hq, tq, 1), jnp.float32),
        ],
        scratch=[pltpu.VMEM((bq, 1), jnp.float32)] * 2 + [pltpu.VMEM((bq, dvp), jnp.float32)],
        interpret=interpret,
        name="mixed_attention_fwd_tpu",
    )
    out, lse = call(
        *lists,
        _heads_major(q),
        _heads_major(k),
        _heads_major(v),
        q_meta.end[..., None],
        _key_rows(k_meta),
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
    qh, kh, vh, doh = (_heads_major(x) for x in (q, k, v, do))
    q_end, k_rows = q_meta.end[..., None], _key_rows(k_meta)
    lse, delta = lse[..., None], delta[..., None]

    def kv_head(h):
        return h // group

    # dk, dv: one program per key tile and KV head; its step axis walks the list once per query
    # head of the group, so dk and dv are summed in VMEM and written once, in the input dtype.
    steps = tq // bq
    dkdv = _call(
        functools.partial(_dkdv_kernel, cfg=cfg, steps=steps),
        (b, hkv, tk // bk, group * steps),
        in_specs=[
            _group_walked(bq, dp, group, steps),
            _own(bk, dp),
            _own(bk, dvp),
            _group_walked(bq, 1, group, steps, heads=False),
            _key_meta(bk, walked=False),
            _group_walked(bq, dvp, group, steps),
            _group_walked(bq, 1, group, steps),
            _group_walked(bq, 1, group, steps),
        ],
        out_specs=[_own(bk, dp), _own(bk, dvp)],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, tk, dp), k.dtype),
            jax.ShapeDtypeStruct((b, hkv, tk, dvp), v.dtype),
        ],
        scratch=[pltpu.VMEM((bk, dp), jnp.float32), pltpu.VMEM((bk, dvp), jnp.float32)],
        interpret=interpret,
        name="mixed_attention_dkdv_tpu",
    )
    dk, dv = dkdv(*k_lists, qh, kh, vh, q_end, k_rows, doh, lse, delta)

    dq_call = _call(
        functools.partial(_dq_kernel, cfg=cfg),
        (b, hq, tq // bq, tk // bk),
        in_specs=[
            _own(bq, dp),
            _walked(bk, dp, kv_head),
            _walked(bk, dvp, kv_head),
            _query_ends(bq, walked=False),
            _key_meta(bk, walked=True),
            _own(bq, dvp),
            _own(bq, 1),
            _own(bq, 1),
        ],
        out_specs=_own(bq, dp),
        out_shape=jax.ShapeDtypeStruct((b, hq, tq, dp), q.dtype),
        scratch=[pltpu.VMEM((bq, dp), jnp.float32)],
        interpret=interpret,
        name="mixed_attention_dq_tpu",
    )
    dq = dq_call(*q_lists, qh, kh, vh, q_end, k_rows, doh, lse, delta)
    return _heads_major(dq), _heads_major(dk), _heads_major(dv)
