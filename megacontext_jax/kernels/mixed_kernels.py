"""The Pallas (Triton) kernel bodies of mixed-resolution attention (DESIGN section 6).

Three kernels, each one program per (tile, batch row, query head; KV head for dk/dv), program i
taking the i-th tile of its side's ``order`` (``kernels.tiles.TileLists``: the tiles with the
longest lists first, so the last programs of a launch are the shortest):

* ``fwd_kernel``: one query tile against the key tiles of its list; online softmax, writes the
  output and the log-sum-exp, in base 2 (``inf`` for a query that sees no key, whose output is 0).
* ``dkdv_kernel``: one key tile of one KV head against the query tiles of its list, for every
  query head of its GQA group; dk and dv in the input dtype. With ``BlockSizes.fused_dq`` it
  also adds each tile pair's ``ds @ k`` into a float32 dq atomically (FlashAttention-2's
  backward: 5 matmuls per tile pair, not 7), and ``dq_kernel`` does not run;
* ``dq_kernel``: one query tile against its key tiles, as the forward.

Each program walks its row of the block-sparse tile lists (``kernels.tiles.TileLists``) in two
loops with no conditional inside: the partial tiles, masked pair by pair with
``kernels.mask.visible``, then the full tiles with no mask arithmetic at all. With ``rope=True``
the kernels rotate q and k themselves (Gaussian RoPE from ``mu`` / ``sigma``, half-split pairs as
``kernels.rope``), else q and k come rotated. Logits, softmax and accumulation are float32; matmul
operands are in the input dtype (bf16 feeds the matrix units). Inputs come padded by
``kernels.mixed_attention``: lengths to whole tiles, each rotary half to a power of two;
``kernels.mixed_launch`` builds the grids and blocks.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from megacontext_jax.kernels.mask import MaskSpec, visible

NEG_INF = float("-inf")
LOG2E = math.log2(math.e)


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
    # The backward kernels' launch (``benchmarks/attention.py --autotune`` times candidates).
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2
    # dq by atomic adds from the dk/dv kernel (no dq kernel): fewer matmuls, more contention; off
    # until ``benchmarks/attention.py`` (its ``*_fused_dq`` rows) has timed both on a GPU.
    fused_dq: bool = False


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """The static parameters every kernel reads: mask, tiles, fused rope, head dim (unpadded),
    logit scale and the matmul operand dtype."""

    spec: MaskSpec
    blocks: BlockSizes
    rope: bool
    theta: float
    head_dim: int
    scale: float
    dtype: jnp.dtype


def _rope_tables(mu, sigma, half: int, head_dim: int, theta: float):
    """Damped ``cos, sin [n, half]`` (padded frequencies beyond ``head_dim // 2`` are unused).

    Not ``kernels.rope.rope_tables``: in a kernel the frequencies come from an iota over the padded
    half rather than a captured constant array.
    """
    j = jax.lax.broadcasted_iota(jnp.int32, (1, half), 1).astype(jnp.float32)
    freqs = jnp.exp(j * (-2.0 * math.log(theta) / head_dim))
    angles = mu[:, None] * freqs
    damp = jnp.exp(-0.5 * jnp.square(sigma[:, None] * freqs))
    return jnp.cos(angles) * damp, jnp.sin(angles) * damp


def _load(ref, rows, meta_refs, cfg, head=None):
    """Rows of ``ref`` (of its query head ``head`` when the block holds a GQA group's heads,
    ``[n, group, Dh]``) as a list of column parts, and the rotary tables.

    With ``cfg.rope``: the two rotated halves ``[n, half]`` (so no lane shuffles: logits are a
    sum of two dots); else the whole rows ``[n, Dh]`` in one part, in the input dtype.
    """

    def read(cols):
        return ref[rows, cols] if head is None else ref[rows, head, cols]

    if not cfg.rope:
        return [read(slice(None))], None
    half = ref.shape[-1] // 2
    x1 = read(pl.ds(0, half)).astype(jnp.float32)
    x2 = read(pl.ds(half, half)).astype(jnp.float32)
    mu_ref, sigma_ref = meta_refs
    cos, sin = _rope_tables(mu_ref[rows], sigma_ref[rows], half, cfg.head_dim, cfg.theta)
    return [x1 * cos - x2 * sin, x1 * sin + x2 * cos], (cos, sin)


def _unrotate(parts, tables):
    """The transpose of the rotation: gradients w.r.t. the unrotated parts."""
    if tables is None:
        return parts
    (d1, d2), (cos, sin) = parts, tables
    return [d1 * cos + d2 * sin, d2 * cos - d1 * sin]


def unrotate_rows(dx: jax.Array, mu: jax.Array, sigma: jax.Array, cfg: KernelConfig) -> jax.Array:
    """Gradients ``[B, T, H, 2 * half]`` w.r.t. rotated rows, taken back through the fused
    rotation of the rows at ``mu``, ``sigma [B, T]`` (outside a kernel: the fused dq)."""
    if not cfg.rope:
        return dx
    half = dx.shape[-1] // 2
    b, t = mu.shape
    cos, sin = (
        x.reshape(b, t, 1, half)
        for x in _rope_tables(mu.reshape(-1), sigma.reshape(-1), half, cfg.head_dim, cfg.theta)
    )
    return jnp.concatenate(_unrotate([dx[..., :half], dx[..., half:]], (cos, sin)), axis=-1)


def _store(ref, rows, parts):
    width = parts[0].shape[-1]
    for index, part in enumerate(parts):
        ref[rows, pl.ds(index * width, width)] = part.astype(ref.dtype)


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
    """Logits in base 2 (``log2(e)`` folded into the scale), so softmax runs on ``exp2``, the
    GPU's native exponential; probabilities are those of the natural-base softmax."""
    return sum(_dot(a, b, cfg.dtype) for a, b in zip(qs, ks, strict=True)) * (cfg.scale * LOG2E)


def _key_mask(q_end, k_meta_refs, cols, spec):
    lod_ref, start_ref, end_ref, valid_ref = k_meta_refs
    return visible(q_end, lod_ref[cols], start_ref[cols], end_ref[cols], valid_ref[cols] > 0, spec)


def _own_tile(order_ref):
    """The tile of this program: the ``program_id(0)``-th of its side's heavy-first order."""
    return order_ref[pl.program_id(0)]


def _walk(t, list_ref, count_ref, visit, init):
    """``visit(tile, carry, masked)`` over the list of tile ``t``: its partial tiles with the
    mask, then its full tiles without (``kernels.tiles``: no conditional inside either loop)."""
    n_partial, n_listed = count_ref[0, t], count_ref[1, t]

    def body(masked):
        return lambda n, carry: visit(list_ref[t, n], carry, masked)

    carry = jax.lax.fori_loop(0, n_partial, body(True), init)
    return jax.lax.fori_loop(n_partial, n_listed, body(False), carry)


def fwd_kernel(
    q_ref, k_ref, v_ref, qe_ref, qmu_ref, qsig_ref, kl_ref, ks_ref, ke_ref, kv_ref, kmu_ref,
    ksig_ref, list_ref, count_ref, order_ref, o_ref, lse_ref, *, cfg: KernelConfig
):  # fmt: skip
    """Output ``o [bq, Dv]`` and log-sum-exp ``lse [bq]`` of one query tile (refs: all of the
    batch row's q (of this head), query metadata, k, v and key metadata; its query-tile lists,
    counts and order; the whole outputs, of which this program writes its tile's rows)."""
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    t = _own_tile(order_ref)
    rows = pl.ds(t * bq, bq)
    qs, _ = _load(q_ref, rows, (qmu_ref, qsig_ref), cfg)
    q_end = qe_ref[rows]
    dv = v_ref.shape[-1]

    def visit(j, carry, masked):
        o, m, l = carry
        cols = pl.ds(j * bk, bk)
        ks, _ = _load(k_ref, cols, (kmu_ref, ksig_ref), cfg)
        s = _logits(qs, ks, cfg)
        if masked:
            mask = _key_mask(q_end, (kl_ref, ks_ref, ke_ref, kv_ref), cols, cfg.spec)
            s = jnp.where(mask, s, NEG_INF)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        # Only a masked tile can leave a row's max at -inf: every row sees a key of a full tile.
        m_safe = jnp.where(m_next == NEG_INF, 0.0, m_next) if masked else m_next
        correction = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        v = v_ref[cols, :]
        o = o * correction[:, None] + _dot_nn(p, v, cfg.dtype)
        return o, m_next, l * correction + jnp.sum(p, axis=1)

    init = (
        jnp.zeros((bq, dv), jnp.float32),
        jnp.full((bq,), NEG_INF, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    o, m, l = _walk(t, list_ref, count_ref, visit, init)
    seen = l > 0
    o_ref[rows, :] = (o / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[rows] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)


def dkdv_kernel(
    q_ref, k_ref, v_ref, qe_ref, qmu_ref, qsig_ref, kl_ref, ks_ref, ke_ref, kv_ref, kmu_ref,
    ksig_ref, list_ref, count_ref, order_ref, do_ref, lse_ref, delta_ref, *out_refs,
    cfg: KernelConfig,
):  # fmt: skip
    """dk, dv ``[bk, .]`` of one key tile of one KV head, summed over the query heads of its GQA
    group in float32 and written once in the input dtype (refs: the group's q ``[Tq, group, Dh]``,
    do and ``lse`` / ``delta = sum(out * do)`` ``[group, Tq]``, and all query metadata; all keys
    of the KV head and their metadata; the key-tile lists, counts and order; whole dk, dv). With
    ``fused_dq``, ``out_refs`` starts with the group's float32 dq accumulator ``[Tq, group, Dh]``
    and ends with the same buffer as an output (aliased), to which ``ds @ k`` is added
    atomically, with respect to the rotated queries."""
    fused = cfg.blocks.fused_dq
    dk_ref, dv_ref = out_refs[1:3] if fused else out_refs
    bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
    group = q_ref.shape[1]
    t = _own_tile(order_ref)
    cols = pl.ds(t * bk, bk)
    ks, k_tables = _load(k_ref, cols, (kmu_ref, ksig_ref), cfg)
    v = v_ref[cols, :]

    def visit(i, carry, masked):
        dks, dv = carry
        rows = pl.ds(i * bq, bq)
        if masked:
            mask = _key_mask(qe_ref[rows], (kl_ref, ks_ref, ke_ref, kv_ref), cols, cfg.spec)
        for g in range(group):
            qs, _ = _load(q_ref, rows, (qmu_ref, qsig_ref), cfg, head=g)
            s = _logits(qs, ks, cfg)
            if masked:
                s = jnp.where(mask, s, NEG_INF)
            p = jnp.exp2(s - lse_ref[g, rows][:, None])  # [bq, bk]
            do = do_ref[rows, g, :]
            dv = dv + _dot_nn(p.T, do, cfg.dtype)
            ds = p * (_dot(do, v, cfg.dtype) - delta_ref[g, rows][:, None]) * cfg.scale
            dks = [dk + _dot_nn(ds.T, x, cfg.dtype) for dk, x in zip(dks, qs, strict=True)]
            if fused:
                _add_dq(out_refs[-1], rows, g, [_dot_nn(ds, x, cfg.dtype) for x in ks])
        return dks, dv

    init = (
        [jnp.zeros(x.shape, jnp.float32) for x in ks],
        jnp.zeros((bk, v_ref.shape[-1]), jnp.float32),
    )
    dks, dv = _walk(t, list_ref, count_ref, visit, init)
    _store(dk_ref, cols, _unrotate(dks, k_tables))
    dv_ref[cols, :] = dv.astype(dv_ref.dtype)


def _add_dq(dq_ref, rows, head: int, parts) -> None:
    """Atomically adds the column parts of a dq tile to rows ``rows`` of query head ``head``."""
    # Imported here: the Triton backend is needed where the kernels compile or are interpreted.
    from jax.experimental.pallas import triton as plgpu

    width, head = parts[0].shape[-1], jnp.int32(head)  # an array index, as the interpreter needs
    for index, part in enumerate(parts):
        plgpu.atomic_add(dq_ref, (rows, head, pl.ds(index * width, width)), part)


def dq_kernel(
    q_ref, k_ref, v_ref, qe_ref, qmu_ref, qsig_ref, kl_ref, ks_ref, ke_ref, kv_ref, kmu_ref,
    ksig_ref, list_ref, count_ref, order_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
    cfg: KernelConfig
):  # fmt: skip
    """dq ``[bq, Dh]`` of one query tile (refs as the forward's, with the head's do, lse and
    delta)."""
    bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
    t = _own_tile(order_ref)
    rows = pl.ds(t * bq, bq)
    qs, q_tables = _load(q_ref, rows, (qmu_ref, qsig_ref), cfg)
    q_end = qe_ref[rows]
    do = do_ref[rows, :]
    lse, delta = lse_ref[rows], delta_ref[rows]

    def visit(j, dqs, masked):
        cols = pl.ds(j * bk, bk)
        ks, _ = _load(k_ref, cols, (kmu_ref, ksig_ref), cfg)
        s = _logits(qs, ks, cfg)
        if masked:
            mask = _key_mask(q_end, (kl_ref, ks_ref, ke_ref, kv_ref), cols, cfg.spec)
            s = jnp.where(mask, s, NEG_INF)
        p = jnp.exp2(s - lse[:, None])
        v = v_ref[cols, :]
        ds = p * (_dot(do, v, cfg.dtype) - delta[:, None]) * cfg.scale
        return [dq + _dot_nn(ds, x, cfg.dtype) for dq, x in zip(dqs, ks, strict=True)]

    init = [jnp.zeros(x.shape, jnp.float32) for x in qs]
    dqs = _walk(t, list_ref, count_ref, visit, init)
    _store(dq_ref, rows, _unrotate(dqs, q_tables))
