"""Ingest throughput into the disk tree, and its size on disk (tiny GistNet, random weights).

    python benchmarks/ingest.py                      # 1M tokens in appends of 4096
    python benchmarks/ingest.py --tokens 200000 --append 512

Prints tokens/s for the disk tree and, side by side in the same run, for the in-memory tree (the
GistNet compute alone), and bytes per token on disk against the format's ideal
``4 + 2D/K + 2D/K^2 + ...``.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megacontext_jax.config_files import load_config
from megacontext_jax.memory.tree import Tree
from megacontext_jax.testing import random_gister

ROOT = Path(__file__).resolve().parents[1]


def ingest(tree: Tree, tokens: np.ndarray, append: int, label: str) -> float:
    start = time.perf_counter()
    with tqdm(total=len(tokens), desc=label, unit="tok", unit_scale=True, leave=False) as bar:
        for i in range(0, len(tokens), append):
            tree.append(tokens[i : i + append])
            bar.update(min(append, len(tokens) - i))
    return len(tokens) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.py"))
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--append", type=int, default=4096, help="tokens per append call")
    args = p.parse_args()
    config = load_config(args.config)
    gister = random_gister(config)
    tokens = np.random.default_rng(0).integers(0, 256, args.tokens).astype(np.int32)
    levels, vocab = config.mc.max_level, config.model.vocab_size

    warm = Tree.in_memory(gister, levels, vocab)  # compile every level's GistNet first
    warm.append(tokens[: config.mc.block_size**levels])
    memory_rate = ingest(Tree.in_memory(gister, levels, vocab), tokens, args.append, "memory")
    with (
        tempfile.TemporaryDirectory() as d,
        Tree.create(Path(d) / "tree", gister, levels, vocab) as tree,
    ):
        disk_rate = ingest(tree, tokens, args.append, "disk")
        stats = tree.stats()
    k, dim = config.mc.block_size, config.model.width
    print(f"config        K={k} D={dim} gist depth {config.mc.gist.depth}, {args.tokens:,} tokens")
    print(f"              in appends of {args.append}")
    print(f"in memory     {memory_rate:,.0f} tokens/s")
    print(f"disk tree     {disk_rate:,.0f} tokens/s  ({disk_rate / memory_rate:.2f}x in-memory)")
    print(f"lengths       {stats['lengths']}")
    print(
        f"bytes/token   {stats['disk_bytes_per_token']:.2f} on disk, "
        f"{stats['ideal_bytes_per_token']:.2f} ideal (uncompressed)"
    )


if __name__ == "__main__":
    main()
