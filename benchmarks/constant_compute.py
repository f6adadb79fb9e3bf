"""Constant compute: decode cost against history length at a fixed working context.

    python benchmarks/constant_compute.py                       # histories of 10K, 100K, 1M
    python benchmarks/constant_compute.py --sizes 10000,100000 --tokens 256 --rounds 1

Ingests each history into a disk tree first (the tiny config, random weights: timing does not
depend on training), then decodes in a fresh process per history so peak RSS is that history's
alone. Each worker interleaves blocks of
  * the full runtime: decode with the KV cache, new tokens into the tree, aging, LensNet and the
    allocator every ``refocus_every`` tokens (``session``), and
  * the same model decoding one new token at a time over a fixed WC of the same size, no refocus
    and no tree (``fixed``),
so their ratio is the refocus overhead, measured side by side. Prints ms/token, peak RSS, the
ratio of the longest to the shortest history, and the refocus overhead.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from megacontext_jax.config_files import load_config

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 64  # tokens per timed block; blocks of the two modes alternate


def _model(config):
    from flax import nnx

    from megacontext_jax.megacontext import MegaContext

    return MegaContext(config, rngs=nnx.Rngs(0))


def build(gister, config, directory: Path, size: int) -> float:
    """Ingests ``size`` tokens into a new tree at ``directory``; returns tokens/s."""
    from megacontext_jax.memory.tree import Tree

    tokens = np.random.default_rng(size).integers(0, 256, size).astype(np.int32)
    with Tree.create(directory, gister, config.mc.max_level, config.model.vocab_size) as tree:
        start = time.perf_counter()
        tree.append(tokens)
        return size / (time.perf_counter() - start)


def worker(config, directory: Path, tokens: int) -> dict:
    """Times decoding over the tree at ``directory`` (run in its own process)."""
    import jax

    from megacontext_jax.memory.tree import Tree
    from megacontext_jax.runtime.cached_context import CachedContext
    from megacontext_jax.runtime.session import Session, _sample, gister_for
    from megacontext_jax.training.metrics import peak_rss_mb

    model = _model(config)
    tree = Tree.open(directory, gister_for(model, config))
    session = Session(model, config, tree)
    fixed = CachedContext(model.base, session.capacity, session.layout.positions)
    base, n = list(session.entries), session.num_tokens
    token_row = tree.gister.embed(np.array([32], np.int32))

    def embed(ents):
        return np.concatenate([session._embed([e]) if e in base else token_row for e in ents])

    def fixed_block(key):
        start = time.perf_counter()
        for i in range(BLOCK):
            key, sub = jax.random.split(key)
            logits, _ = fixed.update([*base, (0, n + i % session.every)], embed)
            int(_sample(logits[None], sub, session.allowed, 1.0, 0)[0])
        return time.perf_counter() - start, key

    def session_block(seed):
        start = time.perf_counter()
        for _ in session.generate(BLOCK, temperature=1.0, seed=seed):
            pass
        return time.perf_counter() - start

    # Warm-up compiles every suffix bucket, the allocator and GistNet at every level.
    key = jax.random.key(0)
    _, key = fixed_block(key)
    for seed in range(max(1, 2 * config.mc.block_size**2 // BLOCK)):
        session_block(seed)
    timed = {"session": [], "fixed": []}
    refocus_before = session.refocus_count
    for block in range(max(1, tokens // BLOCK)):
        timed["session"].append(session_block(100 + block) / BLOCK)
        seconds, key = fixed_block(key)
        timed["fixed"].append(seconds / BLOCK)
    result = {
        "history": n,
        "session_ms": 1e3 * float(np.median(timed["session"])),
        "fixed_ms": 1e3 * float(np.median(timed["fixed"])),
        "refocus_steps": session.refocus_count - refocus_before,
        "horizon": session.horizon,
        "peak_rss_mb": peak_rss_mb(),
    }
    session.close()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.py"))
    p.add_argument(
        "--sizes", default="10000,100000,1000000", help="history lengths, comma-separated"
    )
    p.add_argument("--tokens", type=int, default=512, help="timed tokens per worker and mode")
    p.add_argument("--rounds", type=int, default=2, help="workers per history (medians taken)")
    p.add_argument(
        "--max-level",
        type=int,
        default=6,
        help="tree depth (tiny trains with 3 levels, 512-token top nodes: beyond ~30K tokens a "
        "horizon drops the oldest; 6 levels cover 1M tokens in W=64 with no horizon)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    config = load_config(args.config)
    config.unlock()
    config.mc.max_level = args.max_level
    config.lock()
    if args.worker:
        print(json.dumps(worker(config, Path(args.worker), args.tokens)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    mc = config.mc
    print(
        f"config: {args.config}  W={mc.wc_size} K={mc.block_size} levels={mc.max_level} "
        f"refocus every {mc.refocus_every or mc.block_size} tokens, width {config.model.width}"
    )
    from megacontext_jax.runtime.session import gister_for

    gister = gister_for(_model(config), config)
    with tempfile.TemporaryDirectory() as tmp:
        build(gister, config, Path(tmp) / "warm-up", mc.block_size**mc.max_level)  # compiles
        for size in sizes:
            rate = build(gister, config, Path(tmp) / str(size), size)
            print(f"ingested {size:>9,} tokens: {rate:,.0f} tokens/s")
        results = {size: [] for size in sizes}
        for _ in range(args.rounds):
            for size in sizes:
                cmd = [sys.executable, __file__, "--config", args.config]
                cmd += ["--max-level", str(args.max_level), "--tokens", str(args.tokens)]
                cmd += ["--worker", str(Path(tmp) / str(size))]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode:
                    sys.exit(f"worker for {size} tokens failed:\n{out.stderr[-3000:]}")
                results[size].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print()
    print("| history | horizon | session ms/token | fixed WC ms/token | overhead | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for size in sizes:
        runs = results[size]
        row = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        summary[size] = row
        print(
            f"| {size:,} | {int(row['horizon']):,} | {row['session_ms']:.3f} | "
            f"{row['fixed_ms']:.3f} | {row['session_ms'] / row['fixed_ms']:.3f}x | "
            f"{row['peak_rss_mb']:.0f} |"
        )
    lo, hi = summary[sizes[0]], summary[sizes[-1]]
    print()
    print(f"ms/token {sizes[-1]:,} / {sizes[0]:,}: {hi['session_ms'] / lo['session_ms']:.3f}")
    print(f"peak RSS {sizes[-1]:,} / {sizes[0]:,}: {hi['peak_rss_mb'] / lo['peak_rss_mb']:.3f}")
    overhead = np.median([r["session_ms"] / r["fixed_ms"] for r in summary.values()])
    print(f"refocus overhead (session / fixed WC, median over histories): {overhead:.3f}x")


if __name__ == "__main__":
    main()
