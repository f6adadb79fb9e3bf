"""Can a checkpoint's base model copy? Per-token accuracy with every token in context (``full``).

    python benchmarks/copy_probe.py --checkpoint runs/tiny
    python benchmarks/copy_probe.py --checkpoint runs/tiny --lengths 128,512,1024 --probes 64

Two probes, on the run's held-out text: 30 random letters written twice with 0, 150 and 400
random letters between the copies (accuracy over the second copy; chance 1/26), and passkeys at
each length (argmax accuracy per answer digit, and of all five). A base that cannot copy leaves
nothing for gists or LensNet to recover, so check this before reading an evaluation.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megacontext_jax.data import pipeline as data
from megacontext_jax.data import tasks
from megacontext_jax.data.tokenizer import tokenizer_for
from megacontext_jax.training.restore import load_model


@nnx.jit
def predictions(base, tokens: jax.Array) -> jax.Array:
    """Argmax next token ``[B, T]`` of ``tokens [B, T]``."""
    return jnp.argmax(base(tokens), axis=-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--lengths", default="128,512,1024", help="passkey lengths in tokens")
    p.add_argument("--probes", type=int, default=32)
    args = p.parse_args()
    model, config = load_model(args.checkpoint)
    base = getattr(model, "base", model)
    tokenizer, bos = tokenizer_for(config.model), config.model.bos_id
    rng = np.random.default_rng(0)
    letters = tokenizer.encode("abcdefghijklmnopqrstuvwxyz")
    for gap in (0, 150, 400):
        span = rng.choice(letters, (args.probes, 30))
        between = rng.choice(letters, (args.probes, gap))
        seqs = np.concatenate([np.full((args.probes, 1), bos), span, between, span], axis=1)
        pred = np.asarray(predictions(base, jnp.asarray(seqs[:, :-1], jnp.int32)))
        accuracy = (pred[:, -29:] == seqs[:, -29:]).mean()
        print(f"repeated 30 letters, {gap:>3} between: second-copy accuracy {accuracy:.3f}")
    docs = data.evaluation_documents(config.data, tokenizer, None)
    filler = np.concatenate([d.data.astype(np.int32) for d in docs])
    for n in (int(x) for x in args.lengths.split(",")):
        probes = []
        for _ in range(args.probes):
            offset = int(rng.integers(0, len(filler) - n - 2))
            text = np.concatenate([[bos], filler[offset : offset + n]])
            probes.append(tasks.passkey(text, n + 1, rng, tokenizer=tokenizer))
        seqs = np.stack([probe.tokens for probe in probes])
        pred = np.asarray(predictions(base, jnp.asarray(seqs[:, :-1], jnp.int32)))
        answer = probes[0].answer
        ok = pred[:, answer - 1] == seqs[:, answer]
        digits = " ".join(f"{a:.2f}" for a in ok.mean(0))
        print(f"passkey at {n:>5} tokens: per digit {digits}   all {ok.all(1).mean():.3f}")


if __name__ == "__main__":
    main()
