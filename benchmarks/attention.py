"""Mixed-resolution attention on a GPU: the wc_causal and pyramid kernels against cuDNN and Pallas mha.

    python benchmarks/attention.py                   # T = 4K and 16K causal, the pyramid at 64K
    python benchmarks/attention.py --quick           # T = 4K causal, the pyramid at 64K, fewer repeats
    python benchmarks/attention.py --out results.json --trace $OUT/trace
    python benchmarks/attention.py --tiles           # tile-list tightness only (no GPU needed)
    python benchmarks/attention.py --smoke           # every code path at toy shapes, on any backend
    python benchmarks/attention.py --autotune        # tile sizes, warps and stages of the kernels

What one run does, in order (issue 25's protocol; one call fits in 5 minutes on an H100/H200):

1. Versions and the device are printed.
2. Correctness first: every implementation's forward and its three gradients against the float32
   reference (wc_causal at T = 1K, the pyramid at N = 4K), as relative errors.
3. Timing. Each implementation is compiled first (compile time reported apart), run 3 times to
   warm up, then timed in batches of back-to-back calls with one sync per batch, each batch
   lasting at least 20 ms (so dispatch latency is amortised, not counted); 7 batches, median and
   min per call. The implementations of one shape are interleaved batch by batch, so drift on a
   shared machine hits them alike.
4. FLOPs count visible pairs only: 4 x pairs x Dh x heads forward, 3.5x that for
   forward+backward (the FlashAttention convention: the backward is 2.5 forwards). Causal: pairs
   T(T+1)/2; the pyramid's pairs are counted exactly from its mask. Rows: B = 1, H = 16, Dh = 128,
   bf16, q and k pre-rotated as the model passes them (``--fused-rope`` times the kernel's own
   rotation instead).
5. Decode: one new token (16 query heads, 4 KV heads) over a 32K / 128K KV cache, split-KV
   (``kernels.decode``) against ``mixed_attention`` and the dense attention, in GB/s of K and V.
6. The pyramid: every token and gist of an N = 64K sequence (K = 32, levels 1-3, level-major,
   LOD0 window 512) against dense causal cuDNN over the 64K tokens, with the tile visits of each
   pass (``kernels.tiles``: partial and full tiles) beside the tile pairs that hold a visible pair.
7. ``--trace DIR``: one perfetto trace of a pyramid forward+backward.

A failure in one implementation is reported in its row and the run goes on. Without a GPU the
timed part says so and exits 0; ``--smoke`` runs it anyway at toy shapes (interpreted kernels, XLA
attention in place of cuDNN), to check the script before a short GPU window.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from megacontext_jax.kernels.decode import decode_attention
from megacontext_jax.kernels.mask import visible
from megacontext_jax.kernels.mixed_attention import (
    BlockSizes,
    Entries,
    MaskSpec,
    mixed_attention,
    mixed_attention_reference,
)
from megacontext_jax.kernels.tiles import (
    EMPTY,
    FULL,
    key_tile_bounds,
    pass_lists,
    query_tile_bounds,
    tile_kinds,
    walk_sizes,
)

HEADS = 16
HEAD_DIM = 128
BLOCKS = BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)
FWD_BWD_FACTOR = 3.5  # forward + backward = 3.5 forwards (FlashAttention's FLOP convention)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How each implementation is timed (the module doc, step 3)."""

    warmups: int = 3
    repeats: int = 7
    min_batch_s: float = 0.02


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What one run measures; ``--quick`` and ``--smoke`` are smaller instances."""

    lengths: tuple[int, ...] = (4096, 16384)
    heads: int = HEADS
    head_dim: int = HEAD_DIM
    check_t: int = 1024
    pyramid_n: int = 65536
    pyramid_check_n: int = 4096
    pyramid_k: int = 32
    pyramid_levels: int = 3
    pyramid_window: int = 512
    blocks: BlockSizes = BLOCKS
    decode_lengths: tuple[int, ...] = (32768, 131072)
    decode_kv_heads: int = 4
    dense: str = "cudnn"  # the dense attention to beat: cuDNN on a GPU, XLA in --smoke
    pallas_mha: bool = True


QUICK = Shapes(lengths=(4096,), decode_lengths=(131072,))
SMOKE = Shapes(
    lengths=(256,),
    heads=2,
    head_dim=16,
    check_t=128,
    pyramid_n=512,
    pyramid_check_n=256,
    pyramid_k=8,
    pyramid_levels=2,
    pyramid_window=32,
    decode_lengths=(1024,),
    decode_kv_heads=1,
    blocks=BlockSizes(block_q=32, block_k=32, block_q_bwd=32, block_k_bwd=32),
    dense="xla",
    pallas_mha=False,
)


@dataclasses.dataclass
class Timing:
    """One implementation's timing: compile seconds, calls per timed batch, seconds per call of
    every batch."""

    compile_s: float
    calls: int = 1
    per_call_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.per_call_s)

    @property
    def min_s(self) -> float:
        return min(self.per_call_s)


def _batch_s(fn: Callable, args: tuple, calls: int, clock: Callable[[], float]) -> float:
    """Seconds for ``calls`` back-to-back calls of ``fn(*args)`` and one sync at the end."""
    start = clock()
    out = None
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return clock() - start


def time_interleaved(
    fns: dict[str, tuple[Callable, tuple]],
    protocol: Protocol = Protocol(),
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing | str]:
    """Times every ``name: (fn, args)`` by the protocol, batch by batch in turn.

    Each ``fn`` is jit-compiled here (``Timing.compile_s``), warmed up, and given the number of
    calls per batch that makes a batch last ``protocol.min_batch_s``. A name whose compile or run
    raises maps to the error's first line, and the others go on.
    """
    timings: dict[str, Timing | str] = {}
    ready = {}
    for name, (fn, args) in fns.items():
        try:
            start = clock()
            compiled = jax.jit(fn).lower(*args).compile()
            timing = Timing(compile_s=clock() - start)
            for _ in range(protocol.warmups):
                jax.block_until_ready(compiled(*args))
            while (seconds := _batch_s(compiled, args, timing.calls, clock)) < protocol.min_batch_s:
                grow = protocol.min_batch_s / max(seconds, 1e-6)
                timing.calls = max(2 * timing.calls, math.ceil(1.2 * timing.calls * grow))
            timings[name], ready[name] = timing, (compiled, args)
        except Exception as e:  # one implementation failing must not stop the table
            timings[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    for _ in range(protocol.repeats):
        for name, (compiled, args) in ready.items():
            timing = timings[name]
            timing.per_call_s.append(_batch_s(compiled, args, timing.calls, clock) / timing.calls)
    return timings


def attention_flops(pairs: int, head_dim: int, heads: int) -> float:
    """Forward FLOPs of attention over ``pairs`` visible (query, key) pairs: two matmuls."""
    return 4.0 * pairs * head_dim * heads


def causal_pairs(t: int) -> int:
    return t * (t + 1) // 2


def _inputs(t: int, shapes: Shapes, seed: int = 0) -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(seed), 3)
    shape = (1, t, shapes.heads, shapes.head_dim)
    return [jax.random.normal(key, shape, jnp.bfloat16) for key in keys]


def _dense(shapes: Shapes) -> Callable:
    return functools.partial(
        jax.nn.dot_product_attention, is_causal=True, implementation=shapes.dense
    )


def _fused_dq(shapes: Shapes) -> Shapes:
    """``shapes`` with the backward that adds dq atomically (``BlockSizes.fused_dq``)."""
    return dataclasses.replace(shapes, blocks=dataclasses.replace(shapes.blocks, fused_dq=True))


def causal_impls(
    t: int, shapes: Shapes, fused_rope: bool = False, backward: bool = False
) -> dict[str, Callable]:
    """The implementations of causal attention over ``t`` tokens, ``[1, t, H, Dh]`` in and out;
    with ``backward``, also ``wc_causal_fused_dq`` (the same forward, the fused-dq backward)."""
    meta = Entries.tokens(1, t)

    def wc_causal_fn(blocks):
        def wc_causal(q, k, v):
            spec = MaskSpec("wc_causal")
            return mixed_attention(q, k, v, meta, meta, spec, rope=fused_rope, blocks=blocks)

        return wc_causal

    impls = {"wc_causal": wc_causal_fn(shapes.blocks), shapes.dense: _dense(shapes)}
    if backward:
        impls["wc_causal_fused_dq"] = wc_causal_fn(_fused_dq(shapes).blocks)
    if shapes.pallas_mha:

        def pallas_mha(q, k, v):
            from jax.experimental.pallas.ops.gpu.attention import mha

            return mha(q, k, v, segment_ids=None, causal=True, sm_scale=q.shape[-1] ** -0.5)

        impls["pallas_mha"] = pallas_mha
    return impls


def fwd_bwd(fn: Callable) -> Callable:
    """``fn``'s gradients in q, k and v of the sum of its output (a forward and a backward)."""

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def _relative_errors(fn: Callable, reference: Callable, args: list[jax.Array]) -> dict[str, float]:
    """Relative L2 error of ``fn``'s output and q/k/v gradients against ``reference``'s in float32."""
    up = [x.astype(jnp.float32) for x in args]
    cotangent = jax.random.normal(jax.random.key(7), args[0].shape, jnp.float32)

    def with_grads(f, xs):
        out, pull = jax.vjp(f, *xs)
        return (out, *pull(cotangent.astype(out.dtype)))

    got = jax.jit(functools.partial(with_grads, fn))(args)
    want = jax.jit(functools.partial(with_grads, reference))(up)
    return {
        name: float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w))
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True)
    }


def check(shapes: Shapes, fused_rope: bool = False) -> dict:
    """Relative errors of every implementation (forward and gradients) against the reference."""
    results = {}
    t = shapes.check_t
    meta = Entries.tokens(1, t)
    causal_ref = functools.partial(
        mixed_attention_reference, q_meta=meta, k_meta=meta, rope=fused_rope
    )
    cases = {f"causal T={t}": (causal_impls(t, shapes, fused_rope, True), causal_ref, t)}
    n = shapes.pyramid_check_n
    p_meta, spec = pyramid_meta(n, shapes), pyramid_spec(shapes)
    pyramid_ref = functools.partial(
        mixed_attention_reference, q_meta=p_meta, k_meta=p_meta, spec=spec, rope=fused_rope
    )
    pyramid_impl = {"pyramid": pyramid_fn(p_meta, shapes, fused_rope)}
    pyramid_impl["pyramid_fused_dq"] = pyramid_fn(p_meta, _fused_dq(shapes), fused_rope)
    cases[f"pyramid N={n}"] = (pyramid_impl, pyramid_ref, p_meta.lod.shape[1])
    for case, (impls, ref, length) in cases.items():
        args = _inputs(length, shapes, seed=1)
        for name, fn in impls.items():
            try:
                errors = _relative_errors(fn, ref, args)
            except Exception as e:  # one implementation failing must not stop the table
                errors = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            results[f"{case} {name}"] = errors
            print("check", case, name, json.dumps(errors), flush=True)
    return results


def _rates(timings: dict, flops: float, prefix: str) -> dict:
    row = {}
    for name, timing in timings.items():
        if isinstance(timing, str):
            row[f"{name}_{prefix}_error"] = timing
            continue
        row[f"{name}_{prefix}_ms"] = round(1e3 * timing.median_s, 4)
        row[f"{name}_{prefix}_min_ms"] = round(1e3 * timing.min_s, 4)
        row[f"{name}_{prefix}_compile_s"] = round(timing.compile_s, 2)
        row[f"{name}_{prefix}_calls_per_batch"] = timing.calls
        row[f"{name}_{prefix}_tflops"] = float(f"{flops / timing.median_s / 1e12:.4g}")
    return row


def causal_table(shapes: Shapes, protocol: Protocol, fused_rope: bool = False) -> list[dict]:
    """TFLOP/s of every causal implementation at each length, forward and forward+backward."""
    rows = []
    for t in shapes.lengths:
        args = tuple(_inputs(t, shapes))
        impls = causal_impls(t, shapes, fused_rope)
        flops = attention_flops(causal_pairs(t), shapes.head_dim, shapes.heads)
        row = {"T": t, "Dh": shapes.head_dim, "heads": shapes.heads}
        fwd = time_interleaved({n: (f, args) for n, f in impls.items()}, protocol)
        row |= _rates(fwd, flops, "fwd")
        impls = causal_impls(t, shapes, fused_rope, backward=True)
        both = time_interleaved({n: (fwd_bwd(f), args) for n, f in impls.items()}, protocol)
        row |= _rates(both, FWD_BWD_FACTOR * flops, "fwdbwd")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def decode_table(shapes: Shapes, protocol: Protocol) -> list[dict]:
    """One new token over a full KV cache: split-KV (``kernels.decode``) against
    ``mixed_attention`` (one program per query head walking every key tile) and the dense
    attention, as milliseconds and GB/s of K and V read (decoding is bound by that read)."""
    rows = []
    h, hkv, dh = shapes.heads, shapes.decode_kv_heads, shapes.head_dim
    for t in shapes.decode_lengths:
        keys = jax.random.split(jax.random.key(2), 3)
        q = jax.random.normal(keys[0], (1, 1, h, dh), jnp.bfloat16)
        k, v = (jax.random.normal(key, (1, t, hkv, dh), jnp.bfloat16) for key in keys[1:])
        q_meta, k_meta = Entries.tokens(1, 1, t - 1), Entries.tokens(1, t)
        spec = MaskSpec("decode")

        metas = {"q_meta": q_meta, "k_meta": k_meta, "spec": spec}
        split_kv = functools.partial(decode_attention, **metas)
        mixed = functools.partial(mixed_attention, **metas, rope=False, blocks=shapes.blocks)
        dense = functools.partial(jax.nn.dot_product_attention, implementation=shapes.dense)
        impls = {"split_kv": split_kv, "mixed": mixed, shapes.dense: dense}
        timings = time_interleaved({n: (f, (q, k, v)) for n, f in impls.items()}, protocol)
        row = {"T": t, "heads": h, "kv_heads": hkv, "Dh": dh}
        read = 2 * t * hkv * dh * 2  # bytes of bf16 K and V
        for name, timing in timings.items():
            if isinstance(timing, str):
                row[f"{name}_error"] = timing
                continue
            row[f"{name}_ms"] = round(1e3 * timing.median_s, 4)
            row[f"{name}_min_ms"] = round(1e3 * timing.min_s, 4)
            row[f"{name}_GBps"] = round(read / timing.median_s / 1e9, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def pyramid_spec(shapes: Shapes) -> MaskSpec:
    return MaskSpec(
        "pyramid",
        window=shapes.pyramid_window,
        block_size=shapes.pyramid_k,
        max_level=shapes.pyramid_levels,
    )


def pyramid_meta(n: int, shapes: Shapes) -> Entries:
    """Every node of levels 0..L over ``n`` tokens, level-major, padded to whole 128-entry tiles
    with invalid entries that end at -1 (a padding query sees nothing and tightens no bound)."""
    k, levels = shapes.pyramid_k, shapes.pyramid_levels
    nodes = [(lod, i * k**lod) for lod in range(levels + 1) for i in range(n // k**lod)]
    size = -(-len(nodes) // 128) * 128
    lod = np.zeros((1, size), np.int32)
    start = np.zeros((1, size), np.int32)
    lod[0, : len(nodes)], start[0, : len(nodes)] = np.array(nodes).T
    valid = np.arange(size)[None] < len(nodes)
    meta = Entries.make(lod, start, valid, k)
    return dataclasses.replace(meta, end=jnp.where(meta.valid, meta.end, -1))


def pyramid_fn(meta: Entries, shapes: Shapes, fused_rope: bool = False) -> Callable:
    spec = pyramid_spec(shapes)

    def pyramid(q, k, v):
        return mixed_attention(q, k, v, meta, meta, spec, rope=fused_rope, blocks=shapes.blocks)

    return pyramid


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _tile_visibility(meta: Entries, spec: MaskSpec, bq: int, bk: int):
    """Per tile pair of batch row 0 (``[nq, nk]``): whether some / every pair is visible, and the
    number of visible pairs of each query tile (``[nq]``)."""
    nq, nk = meta.lod.shape[1] // bq, meta.lod.shape[1] // bk

    def one_tile(q_end):
        mask = visible(q_end, meta.lod[0], meta.start[0], meta.end[0], meta.valid[0], spec)
        tiles = mask.reshape(bq, nk, bk)
        return tiles.any((0, 2)), tiles.all((0, 2)), mask.sum(dtype=jnp.int32)

    return jax.lax.map(one_tile, meta.end[0].reshape(nq, bq))


def visible_pairs(meta: Entries, spec: MaskSpec, bq: int = 128) -> int:
    """The pairs ``kernels.mask.visible`` allows, counted exactly one query tile at a time."""
    return int(np.asarray(_tile_visibility(meta, spec, bq, bq)[2]).sum(dtype=np.int64))


def tile_visits(meta: Entries, spec: MaskSpec, blocks: BlockSizes) -> dict:
    """Tile pairs each pass visits, partial and full (``kernels.tiles.pass_lists``)."""
    visits = {}
    fwd = pass_lists(meta.end, meta, blocks.block_q, blocks.block_k, spec)[0]
    dq, dkdv = pass_lists(meta.end, meta, blocks.block_q_bwd, blocks.block_k_bwd, spec)
    for name, lists in (("fwd", fwd), ("dq", dq), ("dkdv", dkdv)):
        partial, listed = (int(np.asarray(lists.counts[:, i]).sum()) for i in (0, 1))
        visits[f"{name}_tiles_partial"], visits[f"{name}_tiles_full"] = partial, listed - partial
    return visits


def pyramid_vs_dense(shapes: Shapes, protocol: Protocol, fused_rope: bool = False) -> dict:
    """The pyramid over every node of an N-token sequence against dense causal attention over the
    N tokens: milliseconds, TFLOP/s on visible pairs, speedup and the tile visits."""
    n = shapes.pyramid_n
    meta, spec = pyramid_meta(n, shapes), pyramid_spec(shapes)
    entries = meta.lod.shape[1]
    row = {"N": n, "entries": entries, "K": shapes.pyramid_k, "levels": shapes.pyramid_levels}
    row["window"] = shapes.pyramid_window
    pairs = visible_pairs(meta, spec)
    row |= {"pyramid_pairs": pairs, "dense_pairs": causal_pairs(n)}
    row["pairs_ratio"] = round(causal_pairs(n) / pairs, 2)
    row |= tile_visits(meta, spec, shapes.blocks)
    sparse, dense = tuple(_inputs(entries, shapes)), tuple(_inputs(n, shapes))
    impls = {"pyramid": (pyramid_fn(meta, shapes, fused_rope), sparse)}
    impls["dense_" + shapes.dense] = (_dense(shapes), dense)
    flops = {"pyramid": pairs, "pyramid_fused_dq": pairs, "dense_" + shapes.dense: causal_pairs(n)}
    fused = {"pyramid_fused_dq": (pyramid_fn(meta, _fused_dq(shapes), fused_rope), sparse)}
    for phase, factor, wrap in (("fwd", 1.0, lambda f: f), ("fwdbwd", FWD_BWD_FACTOR, fwd_bwd)):
        if phase == "fwdbwd":  # the fused dq changes the backward alone
            impls |= fused
        timings = time_interleaved({k: (wrap(f), a) for k, (f, a) in impls.items()}, protocol)
        for name, timing in timings.items():
            work = factor * attention_flops(flops[name], shapes.head_dim, shapes.heads)
            row |= _rates({name: timing}, work, phase)
        a, b = timings["dense_" + shapes.dense], timings["pyramid"]
        if isinstance(a, Timing) and isinstance(b, Timing):
            row[f"speedup_{phase}"] = round(a.median_s / b.median_s, 3)
    print(json.dumps(row), flush=True)
    return row


def trace_pyramid(directory: str, shapes: Shapes, fused_rope: bool = False) -> None:
    """One perfetto trace of three pyramid forward+backward calls into ``directory``."""
    meta = pyramid_meta(shapes.pyramid_n, shapes)
    args = _inputs(meta.lod.shape[1], shapes)
    step = jax.jit(fwd_bwd(pyramid_fn(meta, shapes, fused_rope)))
    jax.block_until_ready(step(*args))
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(3):
            jax.block_until_ready(step(*args))
    print(f"trace: {directory}", flush=True)


def tile_report(shapes: Shapes = Shapes()) -> list[dict]:
    """Listed vs needed tile pairs of the pyramid for the forward and backward tile sizes.

    ``needed``: pairs holding a visible pair; ``all_visible``: pairs whose every pair is visible
    (what a perfect pre-pass would list as full). Exact, from ``kernels.mask.visible`` one query
    tile at a time, so memory stays at one ``[block_q, T]`` mask. ``heaviest_q`` / ``mean_q``:
    the longest and mean query-tile list (a Triton program's work, heaviest first);
    ``tpu_walk``: steps of the TPU kernels' walk over the query tiles (their grid's last axis,
    per head), against ``tile_pairs = nq * nk`` for a step per tile pair; ``tpu_work_list``: the
    static length of the work list that holds it in SMEM (``kernels.tiles.walk_sizes``).
    """
    meta, spec, blocks = pyramid_meta(shapes.pyramid_n, shapes), pyramid_spec(shapes), shapes.blocks
    t = meta.lod.shape[1]
    rows = []
    for phase, bq, bk in (
        ("fwd", blocks.block_q, blocks.block_k),
        ("bwd", blocks.block_q_bwd, blocks.block_k_bwd),
    ):
        if t % bq or t % bk:
            raise ValueError(f"{t} entries are not whole tiles of {bq} x {bk}")
        nq, nk = t // bq, t // bk
        kinds = tile_kinds(query_tile_bounds(meta.end, bq), key_tile_bounds(meta, bk), spec)
        kinds = np.asarray(kinds)[0, :nq, :nk]
        start = time.perf_counter()
        some, every, _ = (np.asarray(x) for x in _tile_visibility(meta, spec, bq, bk))
        row = {
            "N": shapes.pyramid_n,
            "entries": t,
            "phase": phase,
            "tiles": f"{bq}x{bk}",
            "listed": int((kinds != EMPTY).sum()),
            "listed_full": int((kinds == FULL).sum()),
            "needed": int(some.sum()),
            "all_visible": int(every.sum()),
            "causal": nq * nk // 2,
            "unsound": int((some & (kinds == EMPTY)).sum()),  # needed but not listed: a bug
            "exact_count_s": round(time.perf_counter() - start, 1),
        }
        row["listed_per_needed"] = round(row["listed"] / row["needed"], 3)
        per_tile = (kinds != EMPTY).sum(-1)
        walk = int(np.maximum(per_tile, 1).sum())
        row |= {"heaviest_q": int(per_tile.max()), "mean_q": round(float(per_tile.mean()), 1)}
        held = min(size for size in walk_sizes(nq, nk) if size >= walk)
        row |= {"tpu_walk": walk, "tpu_work_list": held, "tile_pairs": nq * nk}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def versions() -> dict:
    import jaxlib

    info = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    info |= {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind}
    try:  # the CUDA / cuDNN / driver line of the backend, where it has one
        from jax.extend.backend import get_backend

        info["platform"] = get_backend().platform_version
    except Exception as e:  # an older or newer jax without it: say so, time anyway
        info["platform"] = f"unknown ({type(e).__name__})"
    return info


def print_table(results: dict, shapes: Shapes) -> None:
    """The causal rows as TFLOP/s, with wc_causal's speed relative to the dense attention."""
    d = shapes.dense
    print()
    print(f"| T | wc_causal fwd | {d} fwd | mha fwd | ratio | wc_causal f+b | {d} f+b | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results.get("causal", []):
        get = lambda key, row=row: row.get(key, math.nan)
        cells = [row["T"]]
        for phase in ("fwd", "fwdbwd"):
            names = ("wc_causal", d, "pallas_mha") if phase == "fwd" else ("wc_causal", d)
            cells += [f"{get(f'{name}_{phase}_tflops'):.3g}" for name in names]
            cells.append(f"{get(f'{d}_{phase}_ms') / get(f'wc_causal_{phase}_ms'):.2f}")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for row in results.get("causal", []):
        for key, value in row.items():
            if key.endswith("_error"):
                print("error:", row["T"], key, value)
    if "pyramid" in results:
        print(f"pyramid vs dense causal {d}:", json.dumps(results["pyramid"]))


# Candidates of --autotune, starting from issue 25's "8 warps, 3 stages for 128-row tiles".
FWD_CANDIDATES = [  # block_q, block_k, num_warps, num_stages
    (64, 64, 4, 2),
    (128, 64, 4, 2),
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 32, 4, 3),
]
BWD_CANDIDATES = [  # block_q_bwd, block_k_bwd, num_warps_bwd, num_stages_bwd, fused_dq
    (32, 32, 4, 2, False),
    (64, 64, 4, 2, False),
    (64, 64, 8, 3, False),
    (32, 64, 4, 3, False),
    (64, 64, 4, 2, True),
    (32, 64, 4, 3, True),
]


def autotune(shapes: Shapes, protocol: Protocol) -> dict:
    """Times the forward candidates (``FWD_CANDIDATES``) on causal T = ``shapes.lengths[0]``,
    then the backward ones (``BWD_CANDIDATES``, forward+backward with the best forward),
    interleaved; prints each and the fastest ``BlockSizes``."""
    t = shapes.lengths[0]
    args = tuple(_inputs(t, shapes))
    meta, spec = Entries.tokens(1, t), MaskSpec("wc_causal")

    def fn(blocks):
        return lambda q, k, v: mixed_attention(q, k, v, meta, meta, spec, blocks=blocks)

    def best(timings):
        done = {n: x for n, x in timings.items() if isinstance(x, Timing)}
        for name, timing in timings.items():
            ms = f"{1e3 * timing.median_s:.4f} ms" if isinstance(timing, Timing) else timing
            print("autotune", name, ms, flush=True)
        return min(done, key=lambda n: done[n].median_s)

    fwd = {
        f"fwd bq={bq} bk={bk} warps={w} stages={st}": dataclasses.replace(
            shapes.blocks, block_q=bq, block_k=bk, num_warps=w, num_stages=st
        )
        for bq, bk, w, st in FWD_CANDIDATES
    }
    chosen = fwd[best(time_interleaved({n: (fn(b), args) for n, b in fwd.items()}, protocol))]
    bwd = {
        f"f+b bq={bq} bk={bk} warps={w} stages={st} fused_dq={f}": dataclasses.replace(
            chosen, block_q_bwd=bq, block_k_bwd=bk, num_warps_bwd=w, num_stages_bwd=st, fused_dq=f
        )
        for bq, bk, w, st, f in BWD_CANDIDATES
    }
    timings = time_interleaved({n: (fwd_bwd(fn(b)), args) for n, b in bwd.items()}, protocol)
    chosen = bwd[best(timings)]
    print(f"autotune best at T={t}, Dh={shapes.head_dim}: {chosen}", flush=True)
    return dataclasses.asdict(chosen)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T = 4K causal only, 3 timed batches")
    p.add_argument("--smoke", action="store_true", help="toy shapes on any backend")
    p.add_argument("--skip-pyramid", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--fused-rope", action="store_true", help="the kernels rotate q and k")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--trace", help="write a perfetto trace of a pyramid fwd+bwd to this folder")
    p.add_argument("--tiles", action="store_true", help="only the tile-list tightness report")
    p.add_argument("--tiles-n", type=int, default=65536, help="tokens of the --tiles pyramid")
    p.add_argument("--autotune", action="store_true", help="only time the kernels' launch options")
    args = p.parse_args(argv)
    if args.tiles:
        tile_report(dataclasses.replace(Shapes(), pyramid_n=args.tiles_n))
        return
    shapes, protocol = Shapes(), Protocol()
    if args.quick:
        shapes, protocol = QUICK, Protocol(repeats=3)
    if args.smoke:
        shapes, protocol = SMOKE, Protocol(warmups=1, repeats=2, min_batch_s=0.0)
    results = {"versions": versions(), "shapes": dataclasses.asdict(shapes)}
    print(json.dumps(results["versions"]), flush=True)
    if jax.default_backend() != "gpu" and not args.smoke:
        print(f"no GPU (backend {jax.default_backend()!r}): nothing to time (--smoke runs anyway)")
        return
    if args.autotune:
        results["autotune"] = autotune(shapes, protocol)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        return
    results["check"] = check(shapes, args.fused_rope)
    results["causal"] = causal_table(shapes, protocol, args.fused_rope)
    if not args.skip_pyramid:
        results["pyramid"] = pyramid_vs_dense(shapes, protocol, args.fused_rope)
    if not args.skip_decode:
        results["decode"] = decode_table(shapes, protocol)
    trace = args.trace or (os.environ.get("OUT") and os.path.join(os.environ["OUT"], "trace"))
    if trace and not args.skip_pyramid:
        trace_pyramid(trace, shapes, args.fused_rope)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results, shapes)


if __name__ == "__main__":
    main()
