"""Pallas mixed-resolution attention against its pure-jnp reference.

The same suite runs interpreted on CPU and compiled on a GPU (``interpret`` is chosen by the
backend); compiled float32 dots may use TF32, hence the looser tolerance there.
"""

import dataclasses
import importlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megacontext_jax import kernels
from megacontext_jax.focus.rules import recency_pyramid
from megacontext_jax.focus.working_context import entries
from megacontext_jax.kernels.mask import FAR, visible
from megacontext_jax.kernels.mixed_attention import (
    TARGETS,
    BlockSizes,
    Entries,
    MaskSpec,
    mixed_attention,
    mixed_attention_reference,
)
from megacontext_jax.kernels.tiles import (
    EMPTY,
    FIRST,
    FLAGS,
    FULL,
    HEAD,
    LAST,
    MASKED,
    OTHER,
    OWN,
    PARTIAL,
    UNMASKED,
    TileLists,
    key_tile_bounds,
    pass_lists,
    query_tile_bounds,
    tile_kinds,
    tile_lists,
    walk_length,
    walk_sizes,
    work_list,
)
from megacontext_jax.nets.specs import ModelConfig

K = 4
COMPILED = jax.default_backend() != "cpu"
TOL = {"atol": 2e-2, "rtol": 2e-2} if COMPILED else {"atol": 2e-5, "rtol": 1e-5}
GRAD_TOL = {"atol": 5e-2, "rtol": 5e-2} if COMPILED else {"atol": 1e-4, "rtol": 1e-4}
BLOCKS = BlockSizes(16, 16, 16, 8)  # unequal backward tiles exercise the padding to their lcm


def _wc_meta(rng, batch: int, capacity: int) -> Entries:
    """Random working contexts (recency pyramids over random histories), padded to capacity."""
    lod = np.zeros((batch, capacity), np.int32)
    start = np.zeros((batch, capacity), np.int32)
    valid = np.zeros((batch, capacity), bool)
    for b in range(batch):
        n = int(rng.integers(capacity // 2, 40 * capacity))
        ents = entries(recency_pyramid(n, int(rng.integers(capacity // 2, capacity)), K, 3, 4))
        lod[b, : len(ents)], start[b, : len(ents)] = np.array(ents).T
        valid[b, : len(ents)] = True
    return Entries.make(lod, start, valid, K)


def _pyramid_meta(batch: int, num_tokens: int, max_level: int, rng=None) -> Entries:
    """Every token and complete gist of a sequence, in a random order (the mask reads metadata),
    or without ``rng`` level-major (each level in time order, finest first)."""
    nodes = [(l, i * K**l) for l in range(max_level + 1) for i in range(num_tokens // K**l)]
    order = lambda: rng.permutation(len(nodes)) if rng is not None else range(len(nodes))
    rows = np.array([[nodes[i] for i in order()] for _ in range(batch)])
    valid = np.ones(rows.shape[:2], bool)
    return Entries.make(rows[..., 0], rows[..., 1], valid, K)


def _decode_meta(rng, batch: int, capacity: int, new: int) -> tuple[Entries, Entries]:
    keys = _wc_meta(rng, batch, capacity)
    count = np.asarray(keys.valid).sum(-1).min()
    pick = lambda a: a[:, count - new : count]
    queries = Entries(
        *(pick(getattr(keys, f)) for f in ("lod", "start", "end", "valid", "mu", "sigma"))
    )
    return queries, keys


def _case(mask: str, rng, batch: int = 2) -> tuple[Entries, Entries, MaskSpec]:
    if mask == "wc_causal":
        meta = _wc_meta(rng, batch, 37)
        return meta, meta, MaskSpec("wc_causal")
    if mask == "decode":
        queries, keys = _decode_meta(rng, batch, 45, 5)
        return queries, keys, MaskSpec("decode")
    if mask == "key_holes":  # invalid keys amid valid ones, as in a cache with freed slots
        meta = Entries.tokens(batch, 64)
        meta.valid = jnp.broadcast_to(jnp.arange(64) % 23 != 5, (batch, 64))
        return meta, meta, MaskSpec("wc_causal")
    if mask == "pyramid_level_major":  # a wide window over a time-ordered layout: full tiles
        meta = _pyramid_meta(batch, 64, 2)
        return meta, meta, MaskSpec("pyramid", window=32, block_size=K, max_level=2)
    meta = _pyramid_meta(batch, 44, 2, rng)
    return meta, meta, MaskSpec("pyramid", window=6, block_size=K, max_level=2)


def _qkv(rng, tq, tk, hq, hkv, dh, dtype=jnp.float32):
    def draw(t, h):
        return jnp.asarray(rng.normal(size=(2, t, h, dh)), dtype)

    return draw(tq, hq), draw(tk, hkv), draw(tk, hkv)


GRID = [
    # mask, (Hq, Hkv), head dim, fused rope
    ("wc_causal", (4, 2), 16, True),
    ("wc_causal", (2, 2), 12, False),
    ("decode", (4, 1), 16, True),
    ("pyramid", (4, 2), 16, True),
    ("pyramid", (3, 3), 8, False),
    ("pyramid_level_major", (2, 1), 16, True),
]


def _interpret(target: str) -> bool | None:
    """The TPU kernels compile on a TPU alone; elsewhere the TPU interpreter runs them."""
    return True if target == "tpu" and jax.default_backend() != "tpu" else None


def _value_and_grads(fn, q, k, v, weight):
    """``fn(q, k, v)`` and the gradients of ``sum(fn(q, k, v) * weight)``, in one compiled
    program (op by op, a Pallas interpreter traces its kernels again at every call)."""

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * weight), out

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)[::-1]


def _check_case(mask, heads, dh, rope, **kw):
    """Forward and the three gradients of ``mixed_attention(**kw)`` against the reference on the
    grid case ``(mask, heads, dh, rope)``."""
    rng = np.random.default_rng(zlib.crc32(repr((mask, heads, dh, rope)).encode()))
    q_meta, k_meta, spec = _case(mask, rng)
    q, k, v = _qkv(rng, q_meta.lod.shape[1], k_meta.lod.shape[1], *heads, dh)
    weight = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    out, grads = _value_and_grads(
        lambda q, k, v: mixed_attention(q, k, v, q_meta, k_meta, spec, rope=rope, **kw),
        q, k, v, weight,
    )  # fmt: skip
    ref, ref_grads = _value_and_grads(
        lambda q, k, v: mixed_attention_reference(q, k, v, q_meta, k_meta, spec, rope=rope),
        q, k, v, weight,
    )  # fmt: skip
    np.testing.assert_allclose(out, ref, **TOL)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, **GRAD_TOL, err_msg=f"d{name}")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("mask,heads,dh,rope", GRID)
def test_forward_and_gradients_match_reference(mask, heads, dh, rope, target):
    _check_case(mask, heads, dh, rope, blocks=BLOCKS, target=target, interpret=_interpret(target))


@pytest.mark.parametrize("mask,heads,dh,rope", [GRID[0], GRID[4]])
def test_fused_dq_matches_reference(mask, heads, dh, rope):
    """The Triton backward with dq added atomically by the dk/dv kernel (``fused_dq``): fused
    RoPE with GQA, and a random-order pyramid with pre-rotated q and k."""
    _check_case(mask, heads, dh, rope, blocks=dataclasses.replace(BLOCKS, fused_dq=True))


@pytest.mark.parametrize("target", TARGETS)
def test_bf16_inputs_accumulate_in_float32(target):
    rng = np.random.default_rng(1)
    q_meta, k_meta, spec = _case("wc_causal", rng)
    q, k, v = _qkv(rng, 37, 37, 4, 2, 32, jnp.bfloat16)
    kw = {"blocks": BLOCKS, "target": target, "interpret": _interpret(target)}
    out = jax.jit(lambda q, k, v: mixed_attention(q, k, v, q_meta, k_meta, spec, **kw))(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = mixed_attention_reference(
        *(x.astype(jnp.float32) for x in (q, k, v)), q_meta, k_meta, spec
    )
    error = jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
    assert error < 1e-2


@pytest.mark.parametrize("target", TARGETS)
def test_query_that_sees_nothing_returns_zeros(target):
    q_meta = Entries.tokens(1, 3)
    k_meta = Entries.tokens(1, 5)
    k_meta.valid = jnp.zeros((1, 5), bool)
    q, k, v = _qkv(np.random.default_rng(0), 3, 5, 2, 2, 8)
    kw = {"blocks": BLOCKS, "target": target, "interpret": _interpret(target)}
    out, grads = _value_and_grads(
        lambda q, k, v: mixed_attention(q, k, v, q_meta, k_meta, **kw), q, k, v, 1.0
    )
    np.testing.assert_array_equal(out, 0.0)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


def test_a_tpu_backend_gets_the_tpu_kernels(monkeypatch):
    calls = []
    forward, backward = TARGETS["tpu"]

    def spy(*args):
        calls.append(args[-2].spec.kind)
        return forward(*args[:-1], True)  # interpreted: there is no TPU here

    monkeypatch.setitem(TARGETS, "tpu", (spy, backward))
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    q_meta, k_meta, spec = _case("wc_causal", np.random.default_rng(4))
    q, k, v = _qkv(np.random.default_rng(4), 37, 37, 2, 1, 8)
    out = mixed_attention(q, k, v, q_meta, k_meta, spec, blocks=BLOCKS)
    assert calls == ["wc_causal"]
    ref = mixed_attention_reference(q, k, v, q_meta, k_meta, spec)
    np.testing.assert_allclose(out, ref, **TOL)
    with pytest.raises(ValueError, match="unknown kernel target 'cuda'; expected one of"):
        mixed_attention(q, k, v, q_meta, k_meta, spec, target="cuda")


@pytest.mark.parametrize("mask", ["wc_causal", "pyramid"])
def test_tpu_kernels_lower_to_mosaic(monkeypatch, mask):
    """Forward and backward pass Pallas's Mosaic lowering at TPU-sized tiles (bf16, 128 x 128,
    head dim 128): no TPU is needed to lower, only to compile (which this machine cannot). Each
    pass lowers once per walk length it may choose (``kernels.tiles.walk_sizes``)."""
    tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
    if not hasattr(tpu_info, "get_device_kind"):
        pytest.skip("this jax reads the TPU's kind elsewhere")
    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1, raising=False)
    q_meta, k_meta, spec = _case(mask, np.random.default_rng(5))
    q, k, v = _qkv(np.random.default_rng(5), q_meta.lod.shape[1], k_meta.lod.shape[1], 4, 2, 128)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    blocks = BlockSizes(128, 128, 128, 128)

    def loss(q, k, v):
        out = mixed_attention(
            q, k, v, q_meta, k_meta, spec, rope=False, blocks=blocks, target="tpu", interpret=False
        )
        return out.astype(jnp.float32).sum()

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v)
    text = lowered.lower(lowering_platforms=("tpu",)).as_text()
    n_q, n_k = -(-q.shape[1] // 128), -(-k.shape[1] // 128)
    launches = {
        "fwd": len(walk_sizes(n_q, n_k)),
        "dkdv": len(walk_sizes(n_k, n_q, repeat=2)),  # two query heads per KV head
        "dq": len(walk_sizes(n_q, n_k)),
    }
    assert text.count("tpu_custom_call") == sum(launches.values())
    for name, count in launches.items():
        assert text.count(f'kernel_name = "mixed_attention_{name}_tpu"') == count


@pytest.mark.parametrize(
    "mask,rope,fused_dq",
    [("wc_causal", False, False), ("pyramid", True, False), ("pyramid", True, True)],
)
def test_triton_kernels_lower_for_a_gpu(mask, rope, fused_dq):
    """Forward and backward pass Pallas's Triton lowering at GPU-sized tiles (bf16, head dim 128,
    the benchmark's blocks): lowering builds the Triton IR here, so only the GPU compile is left.
    With ``fused_dq`` the dk/dv kernel adds dq atomically and no dq kernel runs."""
    q_meta, k_meta, spec = _case(mask, np.random.default_rng(6))
    q, k, v = _qkv(np.random.default_rng(6), q_meta.lod.shape[1], k_meta.lod.shape[1], 4, 2, 128)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    blocks = BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, fused_dq=fused_dq)

    def loss(q, k, v):
        out = mixed_attention(
            q, k, v, q_meta, k_meta, spec, rope=rope, blocks=blocks, target="triton",
            interpret=False,
        )  # fmt: skip
        return out.astype(jnp.float32).sum()

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3 - fused_dq  # forward, dk/dv, dq


def test_metadata_of_another_shape_is_refused():
    q, k, v = _qkv(np.random.default_rng(0), 3, 5, 2, 2, 8)  # batch 2
    with pytest.raises(
        ValueError, match=r"key metadata is \(3, 5\); expected \(2, 5\) or \(1, 5\)"
    ):
        mixed_attention(q, k, v, Entries.tokens(2, 3), Entries.tokens(3, 5), blocks=BLOCKS)
    with pytest.raises(ValueError, match=r"query metadata is \(2, 4\)"):
        mixed_attention(q, k, v, Entries.tokens(2, 4), Entries.tokens(2, 5), blocks=BLOCKS)


def test_pyramid_sees_one_representation_of_each_past_region():
    spec = MaskSpec("pyramid", window=5, block_size=K, max_level=2)
    meta = _pyramid_meta(1, 150, 2, np.random.default_rng(0))
    mask = np.asarray(visible(meta.end, meta.lod, meta.start, meta.end, meta.valid, spec))[0]
    start, end, lod = (np.asarray(a)[0] for a in (meta.start, meta.end, meta.lod))
    for row in range(mask.shape[0]):
        seen = np.flatnonzero(mask[row])
        spans = sorted(zip(start[seen], end[seen], strict=True))
        position = 0
        for s, e in spans:  # the visible spans tile [0, end_q) with no gap and no overlap
            assert s == position, (row, spans)
            position = e
        assert position == end[row]
        recent = [i for i in seen if end[row] - end[i] < 5]
        assert all(lod[i] == 0 for i in recent)  # the newest window tokens are raw tokens


def _kinds_of(lists: TileLists) -> np.ndarray:
    """The ``[B, n, n_other]`` kinds that ``lists`` encode, checking their order and padding."""
    rows, counts = np.asarray(lists.lists), np.asarray(lists.counts)
    kinds = np.full(rows.shape, EMPTY)
    for b, t in np.ndindex(counts.shape[0], counts.shape[2]):
        partial, listed = counts[b, :, t]
        row = rows[b, t]
        for kind, group in ((PARTIAL, row[:partial]), (FULL, row[partial:listed])):
            assert (np.diff(group) > 0).all(), (b, t, row)  # ascending, each tile once
            assert (kinds[b, t, group] == EMPTY).all(), (b, t, row)  # in one group only
            kinds[b, t, group] = kind
        assert (row[listed:] == 0).all(), (b, t, row)
    return kinds


def _checked_kinds(q_meta, k_meta, spec, bq: int, bk: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile kinds of the metadata padded as ``mixed_attention`` pads it, and which tile pairs
    hold a visible pair, after checking the lists against the dense mask:

    * both sides' lists encode the same kind matrix, and the power-of-two padding is empty;
    * sound: a tile pair holding a visible pair is listed (partial or full);
    * exact for full tiles: every pair of a full tile is visible;
    * a partial tile has a pair not visible, or (pyramid only) a key tile mixing levels, the one
      case ``tile_sees_all`` does not prove.
    """
    tq = -(-q_meta.lod.shape[1] // bq) * bq
    tk = -(-k_meta.lod.shape[1] // bk) * bk
    nq, nk = tq // bq, tk // bk

    @jax.jit  # one compiled pass: op by op, the eager dispatch would take seconds
    def prepass(q_meta, k_meta):
        qp, kp = q_meta.padded(tq, -1), k_meta.padded(tk, FAR)
        mask = visible(qp.end, kp.lod, kp.start, kp.end, kp.valid, spec)
        tiles = mask.reshape(mask.shape[0], nq, bq, nk, bk)
        kt = key_tile_bounds(kp, bk)
        kinds = tile_kinds(query_tile_bounds(qp.end, bq), kt, spec)
        lists = tile_lists(kinds), tile_lists(jnp.swapaxes(kinds, 1, 2))
        return tiles.any((2, 4)), tiles.all((2, 4)), kt, lists

    some, every, kt, (q_lists, k_lists) = jax.device_get(prepass(q_meta, k_meta))
    by_query = _kinds_of(q_lists)
    np.testing.assert_array_equal(by_query, _kinds_of(k_lists).mT)
    assert (by_query[:, nq:] == EMPTY).all() and (by_query[:, :, nk:] == EMPTY).all()
    listed = by_query[:, :nq, :nk]
    assert not (some & (listed == EMPTY)).any(), np.argwhere(some & (listed == EMPTY))
    assert not (~every & (listed == FULL)).any(), np.argwhere(~every & (listed == FULL))
    lods = kt[:, 4:6, None, :nk]  # min and max lod of each key tile
    provable = (lods[:, 0] == lods[:, 1]) | (spec.kind != "pyramid")
    missed = every & provable & (listed == PARTIAL)
    assert not missed.any(), np.argwhere(missed)
    return listed, some


@pytest.mark.parametrize(
    "mask", ["wc_causal", "decode", "key_holes", "pyramid", "pyramid_level_major"]
)
def test_tile_lists_are_sound_and_exact_for_full_tiles(mask):
    q_meta, k_meta, spec = _case(mask, np.random.default_rng(4))
    for bq, bk in ((BLOCKS.block_q, BLOCKS.block_k), (BLOCKS.block_q_bwd, BLOCKS.block_k_bwd)):
        listed, _ = _checked_kinds(q_meta, k_meta, spec, bq, bk)
        if mask not in ("decode", "pyramid"):  # both kernel loops have tiles to walk
            assert (listed == FULL).any() and (listed == PARTIAL).any()
        if mask == "decode":  # padded query rows see nothing: their tiles are never full
            assert not (listed == FULL).any()


def test_tile_lists_skip_most_pyramid_tiles():
    spec = MaskSpec("pyramid", window=16, block_size=K, max_level=3)
    meta = _pyramid_meta(1, 1024, 3)
    for block in (32, 8):
        listed, some = _checked_kinds(meta, meta, spec, block, block)
        tiles = listed.shape[-1]
        visits, needed, full = (listed != EMPTY).sum(), some.sum(), (listed == FULL).sum()
        print(f"{block=}: listed {visits} ({full} full), needed {needed}, causal {tiles**2 // 2}")
        assert visits <= 1.2 * needed  # tight: the bounds list little beyond the needed tiles
    assert full > 0  # at block 8, tiles fit inside the bands


def _python_walk(kinds: np.ndarray, repeat: int) -> list[tuple[int, int, int, str, bool, bool]]:
    """The TPU kernels' walk over one row of a kind matrix, stated plainly: each tile in turn,
    its partial tiles then its full ones, ``repeat`` times over; a tile listing nothing takes
    one idle step. Steps: (own, other, repeat, what it computes, first, last)."""
    walk = []
    for own, row in enumerate(kinds):
        listed = [(o, "masked") for o in np.flatnonzero(row == PARTIAL)]
        listed += [(o, "unmasked") for o in np.flatnonzero(row == FULL)]
        steps = [(o, r, what) for r in range(repeat) for o, what in listed] or [(0, 0, "idle")]
        for i, (other, r, what) in enumerate(steps):
            walk.append((own, other, r, what, i == 0, i == len(steps) - 1))
    return walk


@pytest.mark.parametrize("repeat", [1, 3])
def test_work_list_walks_every_listed_tile_in_order(repeat):
    rng = np.random.default_rng(repeat)
    kinds = rng.choice([PARTIAL, FULL, EMPTY], size=(2, 6, 8), p=[0.2, 0.2, 0.6])
    kinds[0, 2] = EMPTY  # a tile that lists nothing
    lists = tile_lists(jnp.asarray(kinds, jnp.int32))
    need = int(walk_length(lists, repeat))
    assert need == max(len(_python_walk(row, repeat)) for row in kinds)
    for steps in (need, need + 5):
        work = np.asarray(work_list(lists, steps, repeat))
        for b in range(2):
            expected = _python_walk(kinds[b], repeat)
            flags = work[b, FLAGS]
            what = np.where(flags & MASKED, "masked", "idle")
            what = np.where(flags & UNMASKED, "unmasked", what)
            got = [
                (int(work[b, OWN, n]), int(work[b, OTHER, n]), int(work[b, HEAD, n]), what[n],
                 bool(flags[n] & FIRST), bool(flags[n] & LAST))
                for n in range(len(expected))
            ]  # fmt: skip
            assert got == expected
            # Past the walk's end: the last step's tiles again, computing and writing nothing.
            past = work[b, :, len(expected) :]
            assert (past[FLAGS] == 0).all()
            assert (past[:3] == work[b, :3, len(expected) - 1, None]).all()


def test_heavy_tiles_come_first():
    kinds = jnp.asarray([[[PARTIAL, EMPTY, EMPTY], [FULL, PARTIAL, FULL], [EMPTY] * 3]] * 1)
    lists = tile_lists(kinds.astype(jnp.int32))
    assert np.asarray(lists.order).tolist() == [[1, 0, 2]]  # 3, 1, 0 tiles listed


def test_pyramid_walk_follows_the_listed_tiles():
    """The TPU kernels' walk over a 4K-token pyramid, and the static work list that holds it:
    far below the n x n steps of a step per tile pair, and at most 4x the walk."""
    spec = MaskSpec("pyramid", window=16, block_size=K, max_level=3)
    meta, block = _pyramid_meta(1, 4096, 3), 128
    padded = -(-meta.lod.shape[1] // block) * block
    q_lists, k_lists = jax.jit(pass_lists, static_argnums=(2, 3, 4))(
        meta.padded(padded, -1).end, meta.padded(padded, FAR), block, block, spec
    )
    n = padded // block
    for lists, repeat in ((q_lists, 1), (k_lists, 2)):
        need = int(walk_length(lists.first(n), repeat))
        steps = min(size for size in walk_sizes(n, n, repeat) if size >= need)
        print(f"{repeat=}: walk of {need} steps in a work list of {steps}; {n * n * repeat} dense")
        assert need <= steps <= 4 * need and steps <= n * n * repeat // 4


def test_dispatcher_pallas_matches_reference():
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 3, 11, 4, 2, 16)
    kv_valid = jnp.asarray(np.arange(11)[None] < np.array([[9], [11]]))
    for causal in (True, False):
        args = dict(causal=causal, kv_valid=kv_valid, q_offset=6)
        out = kernels.attention(q, k, v, impl="pallas", **args)
        ref = kernels.attention(q, k, v, impl="reference", **args)
        np.testing.assert_allclose(out, ref, **TOL)
    # cuDNN's own masks: a full pass with valid keys packed at the front (XLA on CPU).
    full_valid = jnp.asarray(np.arange(11)[None] < np.array([[7], [11]]))
    qf = jnp.asarray(rng.normal(size=(2, 11, 4, 16)), jnp.float32)
    for causal in (True, False):
        args = dict(causal=causal, kv_valid=full_valid)
        out = kernels.attention(qf, k, v, impl="cudnn", **args)
        ref = kernels.attention(qf, k, v, impl="reference", **args)
        np.testing.assert_allclose(out, ref, **TOL)
    # Decode is beyond cuDNN's masks: the Pallas kernel takes it.
    args = dict(causal=True, kv_valid=kv_valid, q_offset=6)
    out = kernels.attention(q, k, v, impl="cudnn", **args)
    np.testing.assert_allclose(out, kernels.attention(q, k, v, **args), **TOL)
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        kernels.attention(q, k, v, impl="flash")


def test_auto_is_cudnn_on_a_gpu_the_kernels_on_a_tpu_and_the_reference_on_cpu():
    resolve = importlib.import_module("megacontext_jax.kernels.attention").resolve
    assert [resolve("auto", b) for b in ("gpu", "tpu", "cpu")] == ["cudnn", "pallas", "reference"]
    assert resolve("pallas", "gpu") == "pallas" and resolve("reference", "tpu") == "reference"


def test_cudnn_applies_to_full_passes_and_on_a_gpu_to_half_precision_only():
    rng = np.random.default_rng(3)
    q, k, _ = _qkv(rng, 6, 6, 4, 2, 16)
    half = q.astype(jnp.bfloat16)
    assert kernels.cudnn_applies(half, k, 0, None, backend="gpu")
    assert kernels.cudnn_applies(q, k, 0, None, backend="cpu")
    # cuDNN refuses float32 on a GPU: the Pallas kernel takes it.
    assert not kernels.cudnn_applies(q, k, 0, None, backend="gpu")
    assert not kernels.cudnn_applies(half, k, 2, None, backend="gpu")  # decode
    assert not kernels.cudnn_applies(half[:, :3], k, 0, None, backend="gpu")
    meta = Entries.tokens(2, 6)
    assert not kernels.cudnn_applies(half, k, 0, (meta, MaskSpec()), backend="gpu")


def test_model_with_pallas_attention_matches_reference():
    from flax import nnx

    from megacontext_jax.nets.gpt import GPT
    from tests.conftest import mc_config

    config = mc_config()
    config.unlock()
    config.model.depth = 1
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 9)), jnp.int32)
    logits = {}
    for impl in ("reference", "pallas"):
        config.model.attention_impl = impl
        model = GPT(ModelConfig.from_config(config.model), rngs=nnx.Rngs(0))
        cache = model.init_cache(2, 12)
        _, cache = model.decode(cache, 0, tokens[:, :6])
        step, _ = model.decode(cache, 6, tokens[:, 6:])  # the decode mask over a KV cache
        logits[impl] = (model(tokens), step)
    for ref, out in zip(logits["reference"], logits["pallas"], strict=True):
        np.testing.assert_allclose(out, ref, **GRAD_TOL)
