"""How fast the base GPT learns to copy (induction), with and without smeared keys.

    python benchmarks/induction.py
    python benchmarks/induction.py --depth 2 --steps 1000 --width 128

Each sequence is uniform random tokens with one span (8 to 23 tokens) written twice at random
offsets; only the second copy is scored, so the loss leaves chance (ln V) only once the model
copies. Both models start from the same seed and see the same batches, step for step; the script
prints their losses side by side and the first step each went below half of chance.
"""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from megacontext_jax.config import base_config
from megacontext_jax.nets.gpt import GPT
from megacontext_jax.nets.losses import cross_entropy
from megacontext_jax.nets.specs import ModelConfig


def batches(rng: np.random.Generator, batch: int, length: int, vocab: int):
    while True:
        x = rng.integers(0, vocab, (batch, length))
        mask = np.zeros((batch, length), bool)
        for row in range(batch):
            n = int(rng.integers(8, 24))
            a = int(rng.integers(0, length - 2 * n))
            b = int(rng.integers(a + n, length - n + 1))
            x[row, b : b + n] = x[row, a : a + n]
            mask[row, b + 1 : b + n] = True  # the first token of the copy is not predictable
        yield jnp.asarray(x, jnp.int32), jnp.asarray(mask)


def make(args, smear: bool):
    cfg = base_config().model
    cfg.width, cfg.depth, cfg.num_heads, cfg.num_kv_heads = args.width, args.depth, 4, 2
    cfg.smear_keys = smear
    model = GPT(ModelConfig.from_config(cfg), rngs=nnx.Rngs(0))
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(args.lr, b2=0.95, weight_decay=0.1)
    )
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def step(model, optimizer, x, mask):
    def loss(m):
        nll, n = cross_entropy(m(x[:, :-1]), x[:, 1:], mask[:, 1:])
        return nll / n

    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()
    runs = {name: make(args, name == "smeared") for name in ("plain", "smeared")}
    data = batches(np.random.default_rng(0), args.batch, args.length, args.vocab)
    chance = math.log(args.vocab)
    first_below: dict[str, int | None] = dict.fromkeys(runs)
    print(
        f"{jax.devices()[0].platform}: depth {args.depth}, width {args.width}, chance {chance:.3f}"
    )
    print(f"{'step':>6} {'plain':>8} {'smeared':>8}")
    for i in range(args.steps + 1):
        x, mask = next(data)
        losses = {name: float(step(m, opt, x, mask)) for name, (m, opt) in runs.items()}
        for name, value in losses.items():
            if first_below[name] is None and value < chance / 2:
                first_below[name] = i
        if i % 100 == 0:
            print(f"{i:>6} {losses['plain']:8.3f} {losses['smeared']:8.3f}", flush=True)
    for name, at in first_below.items():
        print(f"{name}: loss below chance/2 {'never' if at is None else f'at step {at}'}")


if __name__ == "__main__":
    main()
