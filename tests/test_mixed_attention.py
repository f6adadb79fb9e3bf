"""Pallas mixed-resolution attention against its pure-jnp reference.

The same suite runs interpreted on CPU and compiled on a GPU (``interpret`` is chosen by the
backend); compiled float32 dots may use TF32, hence the looser tolerance there.
"""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.mask import visible
from kernels.mixed_attention import (
    BlockSizes,
    Entries,
    MaskSpec,
    _pad_meta,
    mixed_attention,
    mixed_attention_reference,
)
from kernels.tiles import KEY_FIELDS, key_tile_bounds, query_tile_bounds, tile_may_see
from megacontext_jax.focus.rules import recency_pyramid
from megacontext_jax.focus.working_context import entries
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


def _pyramid_meta(batch: int, num_tokens: int, max_level: int, rng) -> Entries:
    """Every token and complete gist of a sequence, in a random order (the mask reads metadata)."""
    nodes = [(l, i * K**l) for l in range(max_level + 1) for i in range(num_tokens // K**l)]
    rows = np.array([[nodes[i] for i in rng.permutation(len(nodes))] for _ in range(batch)])
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
]


@pytest.mark.parametrize("mask,heads,dh,rope", GRID)
def test_forward_and_gradients_match_reference(mask, heads, dh, rope):
    rng = np.random.default_rng(zlib.crc32(repr((mask, heads, dh, rope)).encode()))
    q_meta, k_meta, spec = _case(mask, rng)
    q, k, v = _qkv(rng, q_meta.lod.shape[1], k_meta.lod.shape[1], *heads, dh)
    weight = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, q_meta, k_meta, spec, rope=rope) * weight)

    kernel = lambda *a, **kw: mixed_attention(*a, **kw, blocks=BLOCKS)
    out = kernel(q, k, v, q_meta, k_meta, spec, rope=rope)
    ref = mixed_attention_reference(q, k, v, q_meta, k_meta, spec, rope=rope)
    np.testing.assert_allclose(out, ref, **TOL)
    grads = jax.grad(lambda *x: loss(kernel, *x), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(lambda *x: loss(mixed_attention_reference, *x), argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, **GRAD_TOL, err_msg=f"d{name}")


def test_bf16_inputs_accumulate_in_float32():
    rng = np.random.default_rng(1)
    q_meta, k_meta, spec = _case("wc_causal", rng)
    q, k, v = _qkv(rng, 37, 37, 4, 2, 32, jnp.bfloat16)
    out = mixed_attention(q, k, v, q_meta, k_meta, spec, blocks=BLOCKS)
    assert out.dtype == jnp.bfloat16
    ref = mixed_attention_reference(
        *(x.astype(jnp.float32) for x in (q, k, v)), q_meta, k_meta, spec
    )
    error = jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
    assert error < 1e-2


def test_query_that_sees_nothing_returns_zeros():
    q_meta = Entries.tokens(1, 3)
    k_meta = Entries.tokens(1, 5)
    k_meta.valid = jnp.zeros((1, 5), bool)
    q, k, v = _qkv(np.random.default_rng(0), 3, 5, 2, 2, 8)
    out = mixed_attention(q, k, v, q_meta, k_meta, blocks=BLOCKS)
    np.testing.assert_array_equal(out, 0.0)
    grads = jax.grad(lambda q: mixed_attention(q, k, v, q_meta, k_meta, blocks=BLOCKS).sum())(q)
    np.testing.assert_array_equal(grads, 0.0)


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


def test_tile_bounds_are_sound_and_skip_most_pyramid_tiles():
    spec = MaskSpec("pyramid", window=16, block_size=K, max_level=3)
    n = 1024
    nodes = [(l, i * K**l) for l in range(4) for i in range(n // K**l)]  # level-major layout
    lod, start = np.array(nodes).T
    meta = Entries.make(lod[None], start[None], np.ones((1, len(nodes)), bool), K)
    block = 32
    padded = _pad_meta(meta, -(-len(nodes) // block) * block, 1 << 30)
    mask = np.asarray(
        visible(padded.end, padded.lod, padded.start, padded.end, padded.valid, spec)
    )[0]
    kt, qt = (
        np.asarray(key_tile_bounds(padded, block))[0],
        np.asarray(query_tile_bounds(padded.end, block))[0],
    )
    tiles = kt.shape[-1]
    visited = needed = 0
    for i, j in itertools.product(range(tiles), range(tiles)):
        may = bool(tile_may_see(qt[0, i], qt[1, i], tuple(kt[:KEY_FIELDS, j]), spec))
        any_visible = mask[i * block : (i + 1) * block, j * block : (j + 1) * block].any()
        assert may or not any_visible, (i, j)  # sound: a tile with a visible pair is visited
        visited += may
        needed += any_visible
    print(f"visited {visited}, needed {needed}, causal {tiles * (tiles + 1) // 2}")
    assert visited <= 1.2 * needed  # tight: the bounds visit little beyond the needed tiles


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
