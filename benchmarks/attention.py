"""Mixed-resolution attention on a GPU: the wc_causal and pyramid kernels against cuDNN and Pallas mha.

    python benchmarks/attention.py                   # the full table (T = 4K..32K, Dh 64 and 128)
    python benchmarks/attention.py --quick           # T = 4K only
    python benchmarks/attention.py --out results.json
    python benchmarks/attention.py --tiles           # tile-list tightness only (no GPU needed)

Every row is measured in this one run, side by side, bf16, batch 1, 16 heads:
  * forward and forward+backward TFLOP/s (causal FLOPs: 2 matmuls x T^2/2 x Dh x heads, x2.5
    for forward+backward) of ``wc_causal`` (``kernels.mixed_attention``, pre-rotated q/k),
    ``jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`` and jax's Pallas
    ``mha(causal=True)``, with the kernel's ratio to cuDNN;
  * the pyramid mask over every token and gist of a 64K-token sequence (K=32, levels 1-3 in a
    level-major layout, LOD0 window 512) against dense causal cuDNN at N = 64K: time and speedup.
Before timing, each implementation's output is checked against the float32 reference at T=1K
(relative error printed). A failure in one implementation is reported in its row and the run goes
on. Without a GPU it says so and exits 0.

``--tiles`` prints, for the same pyramid and the forward and backward tiles, how many tile pairs
the block-sparse lists (``kernels.tiles``) visit, partial and full, against the pairs that hold a
visible pair, counted exactly from the dense mask one query tile at a time.
"""

import argparse
import functools
import json
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

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
    query_tile_bounds,
    tile_kinds,
)

HEADS = 16
BLOCKS = BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)


def _time(fn, *args, repeats: int = 20) -> float:
    """Median seconds of ``fn(*args)`` (compiled and warmed up first)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inputs(t: int, dh: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    shape = (1, t, HEADS, dh)
    return [jax.random.normal(k, shape, jnp.bfloat16) for k in keys]


def _impls(t: int):
    meta = Entries.tokens(1, t)

    def wc_causal(q, k, v):
        return mixed_attention(
            q, k, v, meta, meta, MaskSpec("wc_causal"), rope=False, blocks=BLOCKS
        )

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def pallas_mha(q, k, v):
        from jax.experimental.pallas.ops.gpu.attention import mha

        # mha takes [B, T, H, D] and a segment-id argument.
        return mha(q, k, v, segment_ids=None, causal=True, sm_scale=q.shape[-1] ** -0.5)

    return {"wc_causal": wc_causal, "cudnn": cudnn, "pallas_mha": pallas_mha}


def _fwd_bwd(fn):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def check(t: int = 1024, dh: int = 128) -> dict:
    """Relative error of each implementation against the float32 reference."""
    q, k, v = _inputs(t, dh, seed=1)
    meta = Entries.tokens(1, t)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = mixed_attention_reference(*up, meta, meta, MaskSpec("wc_causal"), rope=False)
    errors = {}
    for name, fn in _impls(t).items():
        try:
            out = jax.jit(fn)(q, k, v).astype(jnp.float32)
            errors[name] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        except Exception as e:  # one implementation failing must not stop the table
            errors[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return errors


def causal_table(lengths, dims) -> list[dict]:
    rows = []
    for dh in dims:
        for t in lengths:
            q, k, v = _inputs(t, dh)
            flops = 4 * t * t / 2 * dh * HEADS
            row = {"T": t, "Dh": dh}
            for name, fn in _impls(t).items():
                try:
                    row[f"{name}_fwd"] = flops / _time(jax.jit(fn), q, k, v) / 1e12
                    row[f"{name}_fwdbwd"] = 2.5 * flops / _time(_fwd_bwd(fn), q, k, v) / 1e12
                except Exception as e:
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def pyramid_meta(n: int, k: int, levels: int) -> Entries:
    nodes = [(l, i * k**l) for l in range(levels + 1) for i in range(n // k**l)]
    size = -(-len(nodes) // 128) * 128
    lod = np.zeros((1, size), np.int32)
    start = np.zeros((1, size), np.int32)
    lod[0, : len(nodes)], start[0, : len(nodes)] = np.array(nodes).T
    valid = np.arange(size)[None] < len(nodes)
    return Entries.make(lod, start, valid, k)


def pyramid_vs_dense(n: int = 65536, k: int = 32, levels: int = 3, window: int = 512) -> dict:
    meta = pyramid_meta(n, k, levels)
    spec = MaskSpec("pyramid", window=window, block_size=k, max_level=levels)
    entries = meta.lod.shape[1]
    out = {"N": n, "entries": entries, "K": k, "levels": levels, "window": window}
    q, kk, v = _inputs(entries, 128)
    qd, kd, vd = _inputs(n, 128)

    def pyramid(q, k, v):
        return mixed_attention(q, k, v, meta, meta, spec, rope=True, blocks=BLOCKS)

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    for name, fn, args in (("pyramid", pyramid, (q, kk, v)), ("dense_cudnn", dense, (qd, kd, vd))):
        try:
            out[f"{name}_fwd_ms"] = 1e3 * _time(jax.jit(fn), *args, repeats=10)
            out[f"{name}_fwdbwd_ms"] = 1e3 * _time(_fwd_bwd(fn), *args, repeats=5)
        except Exception as e:
            out[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    for phase in ("fwd", "fwdbwd"):
        a, b = out.get(f"dense_cudnn_{phase}_ms"), out.get(f"pyramid_{phase}_ms")
        if a and b:
            out[f"speedup_{phase}"] = a / b
    print(json.dumps(out), flush=True)
    return out


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _tile_visibility(meta: Entries, spec: MaskSpec, bq: int, bk: int):
    """``[nq, nk]`` whether some / every pair of each tile pair of batch row 0 is visible."""
    nq, nk = meta.lod.shape[1] // bq, meta.lod.shape[1] // bk

    def one_tile(q_end):
        mask = visible(q_end, meta.lod[0], meta.start[0], meta.end[0], meta.valid[0], spec)
        tiles = mask.reshape(bq, nk, bk)
        return tiles.any((0, 2)), tiles.all((0, 2))

    return jax.lax.map(one_tile, meta.end[0].reshape(nq, bq))


def tile_report(
    n: int = 65536, k: int = 32, levels: int = 3, window: int = 512, blocks: BlockSizes = BLOCKS
) -> list[dict]:
    """Listed vs needed tile pairs of the pyramid for the forward and backward tile sizes.

    ``needed``: pairs holding a visible pair; ``all_visible``: pairs whose every pair is visible
    (what a perfect pre-pass would list as full). Exact, from ``kernels.mask.visible`` one query
    tile at a time, so memory stays at one ``[block_q, T]`` mask.
    """
    meta = pyramid_meta(n, k, levels)
    spec = MaskSpec("pyramid", window=window, block_size=k, max_level=levels)
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
        some, every = (np.asarray(x) for x in _tile_visibility(meta, spec, bq, bk))
        row = {
            "N": n,
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
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T = 4K only, head dim 128")
    p.add_argument("--skip-pyramid", action="store_true")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--tiles", action="store_true", help="only the tile-list tightness report")
    p.add_argument("--tiles-n", type=int, default=65536, help="tokens of the --tiles pyramid")
    args = p.parse_args()
    if args.tiles:
        tile_report(args.tiles_n)
        return
    if jax.default_backend() != "gpu":
        print(f"no GPU (backend {jax.default_backend()!r}): nothing to time")
        return
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    results = {"check_rel_error_T1024": check()}
    print("check:", json.dumps(results["check_rel_error_T1024"]), flush=True)
    lengths = [4096] if args.quick else [4096, 8192, 16384, 32768]
    dims = [128] if args.quick else [64, 128]
    results["causal"] = causal_table(lengths, dims)
    if not args.skip_pyramid:
        results["pyramid"] = pyramid_vs_dense()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))

    print()
    print(
        "| T | Dh | wc_causal fwd | cuDNN fwd | mha fwd | ratio | wc_causal f+b | cuDNN f+b | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results["causal"]:
        get = lambda key, row=row: row.get(key, math.nan)
        print(
            f"| {row['T']} | {row['Dh']} | {get('wc_causal_fwd'):.0f} | {get('cudnn_fwd'):.0f} | "
            f"{get('pallas_mha_fwd'):.0f} | {get('wc_causal_fwd') / get('cudnn_fwd'):.2f} | "
            f"{get('wc_causal_fwdbwd'):.0f} | {get('cudnn_fwdbwd'):.0f} | "
            f"{get('wc_causal_fwdbwd') / get('cudnn_fwdbwd'):.2f} |"
        )
    errors = [
        (r["T"], r["Dh"], k, v) for r in results["causal"] for k, v in r.items() if "error" in k
    ]
    for error in errors:
        print("error:", *error)
    if "pyramid" in results:
        print("pyramid vs dense causal cuDNN:", json.dumps(results["pyramid"]))


if __name__ == "__main__":
    main()
