"""Time of one refocus (allocator only) at W = 8192 on the local device.

    python benchmarks/allocator.py
    python benchmarks/allocator.py --capacity 4096 --tokens 1000000 --max-edits 32

Random scores in [-1, 1] over a recency-pyramid WC; the jitted allocator is compiled first and
then timed over repeated calls. Also prints the host time of assembling the recency pyramid.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from megacontext_jax.focus.allocator import refocus
from megacontext_jax.focus.rules import check, recency_pyramid
from megacontext_jax.specs import AllocatorConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capacity", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=10_000_000)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--max-level", type=int, default=4)
    p.add_argument("--tail", type=int, default=256)
    p.add_argument("--max-edits", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()

    start = time.perf_counter()
    wc = recency_pyramid(args.tokens, args.capacity, args.block_size, args.max_level, args.tail)
    assembly = time.perf_counter() - start
    cfg = AllocatorConfig(
        args.block_size,
        args.max_level,
        args.tail,
        tau_expand=0.2,
        tau_collapse=0.2,
        max_edits=args.max_edits,
    )
    scores = jax.random.uniform(jax.random.key(0), (args.capacity,), minval=-1, maxval=1)
    cooldown = jnp.zeros(args.capacity, jnp.int32)
    out = refocus(wc, scores, cooldown, args.tokens, cfg)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(args.repeats):
        out = refocus(wc, scores, cooldown, args.tokens, cfg)
        jax.block_until_ready(out)
    per_call = (time.perf_counter() - start) / args.repeats
    check(out.wc, args.tokens, args.block_size, args.max_level, args.tail)
    print(f"device          {jax.devices()[0].device_kind}")
    print(f"W={args.capacity}  N={args.tokens:,}  K={args.block_size}  max_edits={args.max_edits}")
    print(
        f"refocus         {per_call * 1e3:.2f} ms  ({int(out.expands)} expands, {int(out.collapses)} collapses)"
    )
    print(f"pyramid (host)  {assembly * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
