"""Tokens/s (and on a GPU, model FLOPs utilization) of the jitted train step.

The MegaContext step (``mc.enabled``) counts the T tokens of each training sequence; its extra
work (the tree, V working contexts, LensNet) makes it slower per token than the plain GPT step.

    python benchmarks/train_throughput.py                      # tiny on CPU, small on a GPU
    python benchmarks/train_throughput.py --config configs/small.py --config.train.batch_size=32

Uses random token batches (the step's cost does not depend on the data), one warm-up step for
compilation, then times ``--steps`` steps.
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

from megacontext_jax.config_files import parse_args
from megacontext_jax.nets.decoder import count_params
from megacontext_jax.training import sharding
from megacontext_jax.training.loop import mc_batch
from megacontext_jax.training.step import make_train_step, make_trainable

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 peak FLOP/s by device kind (without sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def flops_per_token(config, n_params: int) -> float:
    """6 N for the matmuls (forward + backward) plus the attention scores and values."""
    m = config.model
    non_embedding = n_params - m.vocab_size * m.width  # the input embedding is a lookup
    return 6 * non_embedding + 12 * m.depth * m.width * config.data.seq_len


def peak_flops(device) -> float | None:
    kind = device.device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    args, rest = p.parse_known_args(argv)
    on_gpu = jax.devices()[0].platform == "gpu"
    if not any(a.startswith("--config") and not a.startswith("--config.") for a in rest):
        rest = ["--config", str(ROOT / "configs" / ("small.py" if on_gpu else "tiny.py")), *rest]
    config, unknown = parse_args(rest)
    if unknown:
        p.error(f"unexpected arguments: {unknown}")

    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    trainable = make_trainable(config, mesh)
    state, step = trainable.init(), make_train_step(trainable)
    b, t = config.train.batch_size, config.data.seq_len
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.integers(0, 256, (b, t)).astype(np.int32),
        "targets": rng.integers(0, 256, (b, t)).astype(np.int32),
        "mask": np.ones((b, t), bool),
    }
    if config.mc.enabled:
        batch = mc_batch(batch, 0, config)
    batch = sharding.global_batch(batch, mesh)
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / args.steps

    n_params = count_params(state.params)
    tokens_per_s = b * t / seconds
    device = jax.devices()[0]
    print(f"device        {device.device_kind} x {jax.device_count()} ({device.platform})")
    kind = "MegaContext (base + GistNet + LensNet)" if config.mc.enabled else "GPT"
    print(
        f"model         {kind}, {n_params / 1e6:.2f}M params, batch {b} x seq {t}, {config.model.dtype}"
    )
    print(f"step time     {seconds * 1e3:.1f} ms")
    print(f"tokens/s      {tokens_per_s:,.0f}")
    peak = peak_flops(device)
    if peak is not None and not config.mc.enabled:  # the FLOP count below is the plain GPT's
        achieved = tokens_per_s * flops_per_token(config, n_params) / jax.device_count()
        print(f"MFU           {achieved / peak:.1%} ({achieved / 1e12:.1f} TFLOP/s per device)")


if __name__ == "__main__":
    main(sys.argv[1:])
