"""Crash safety of the disk tree: ingest in a subprocess, SIGKILL it at random moments, check.

    python benchmarks/crash_ingest.py --trials 50

Every trial starts a writer on the same tree directory; the writer appends a fixed pseudo-random
token stream from wherever the tree's committed length stands, in random chunk sizes (many cross
several block boundaries). The parent kills it with SIGKILL after a random delay, then reopens the
tree as the next writer would, runs ``verify(deep=True)`` (every gist recomputed from its children,
bit for bit) and checks that the committed tokens equal a prefix of the stream. Prints
``survived S/N``; exits non-zero if any trial failed.
"""

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from megacontext_jax.config import base_config
from megacontext_jax.memory.errors import TreeError
from megacontext_jax.memory.gister import Gister
from megacontext_jax.memory.tree import Tree
from megacontext_jax.testing import random_gister

STREAM_TOKENS = 2_000_000
MAX_LEVEL = 3


def small_config():
    """K=8 and a width-32 GistNet: fast to compute, and many levels in a short stream."""
    c = base_config()
    c.model.width, c.model.num_heads, c.model.num_kv_heads = 32, 2, 2
    c.mc.block_size, c.mc.max_level, c.mc.ingest_chunk = 8, MAX_LEVEL, 16
    c.mc.gist.depth, c.mc.gist.num_heads = 1, 2
    return c


def stream(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, STREAM_TOKENS).astype(np.int32)


def writer(directory: Path, seed: int) -> None:
    config = small_config()
    gister = random_gister(config, seed=0)
    tokens = stream(seed)
    rng = np.random.default_rng()
    # Compile before "ready", so kills land mid-ingest.
    gister.token_gists(0, np.zeros(config.mc.block_size, np.int32))
    for level in range(2, MAX_LEVEL + 1):
        gister.gists(level, 0, np.zeros((1, config.mc.block_size, gister.dim), np.float32))
    with Tree.open_or_create(directory, gister, MAX_LEVEL, config.model.vocab_size) as tree:
        position = tree.num_tokens
        print("ready", flush=True)
        while position < len(tokens):
            n = int(rng.integers(1, 5000))
            tree.append(tokens[position : position + n])
            position += n


def check(directory: Path, seed: int, gister: Gister) -> tuple[bool, int, str]:
    try:
        with Tree.open(directory, gister) as tree:
            tree.verify(deep=True)
            n = tree.num_tokens
            if not np.array_equal(tree.tokens(0, n), stream(seed)[:n]):
                return False, n, "committed tokens are not a prefix of the stream"
            return True, n, ""
    except TreeError as e:
        return False, -1, str(e)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--max-delay", type=float, default=1.5, help="seconds of writing before a kill")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", help="tree directory (default: a fresh temporary one)")
    p.add_argument("--writer", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.writer:
        writer(Path(args.writer), args.seed)
        return 0

    root = Path(args.dir or tempfile.mkdtemp(prefix="crash_ingest_"))
    directory = root / "tree"
    gister = random_gister(small_config(), seed=0)
    rng = np.random.default_rng(args.seed)
    survived = 0
    for trial in range(1, args.trials + 1):
        cmd = [sys.executable, __file__, "--writer", str(directory), "--seed", str(args.seed)]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = child.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0, args.max_delay)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        if not ready:
            print(f"trial {trial}: writer failed to start: {child.stderr.read()[-500:]}")
            continue
        ok, n, why = check(directory, args.seed, gister)
        survived += ok
        print(f"trial {trial}: {'ok' if ok else 'FAILED'}  committed {n} tokens  {why}".rstrip())
    print(f"survived {survived}/{args.trials}")
    if not args.dir:
        shutil.rmtree(root)
    return 0 if survived == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
