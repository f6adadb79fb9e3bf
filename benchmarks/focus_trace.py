"""Where focus takes a passkey's digits, refocus round by refocus round.

    python benchmarks/focus_trace.py --checkpoint runs/tiny_retrieval
    python benchmarks/focus_trace.py --checkpoint runs/tiny_retrieval --length 4 --rounds 8

On passkey probes of ``length x W`` tokens (held-out text as filler, as in
``megacontext_jax.evaluation``), after r = 0, 1, ... rounds of LensNet scoring and allocator edits,
counts the probes by the coarsest level of detail over the key's digits. For those still under a
gist, it also gives the rank of that gist among the context's gists by LensNet's score at that
round (0: LensNet would expand it first). Last, the share of probes whose answer is right after
the final round.

The evaluation's ``mc_oracle`` says whether the base model reads the digits once they are
tokens; this says where focus stops on the way there. Digits under a top-ranked gist that stay
there mean the allocator found no room; a low rank means LensNet did not find the needle.
"""

import argparse
import sys
from collections import Counter

import jax.numpy as jnp
import numpy as np

from megacontext_jax.data import pipeline as data
from megacontext_jax.data import tasks
from megacontext_jax.data.tokenizer import tokenizer_for
from megacontext_jax.evaluation.retrieval import answered, coarsest_over
from megacontext_jax.evaluation.scoring import Setting, condition_entries, contexts, focus, score_wc
from megacontext_jax.megacontext import lens_scores, node_table
from megacontext_jax.training.restore import load_model


def digits_state(wc, scores: np.ndarray, row: int, source: tuple[int, int], k: int):
    """``"L0"``, or ``"L<lod> rank <r>"`` for the coarsest entry over the digits of WC ``row``
    (ranks over 3 are pooled as ``">3"``)."""
    lod, ctx = np.asarray(wc.lod[row]), np.asarray(wc.context[row])
    top = coarsest_over(wc, row, source, k)
    if lod[top] == 0:
        return "L0"
    gist_scores = np.where(ctx & (lod > 0), scores[row], -np.inf)
    rank = int((gist_scores > gist_scores[top]).sum())
    return f"L{lod[top]} rank {rank if rank <= 3 else '>3'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--length", type=int, default=8, help="probe length in multiples of W")
    p.add_argument("--probes", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4, help="refocus rounds (evaluate's default)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    model, config = load_model(args.checkpoint)
    if not hasattr(model, "lensnet"):
        sys.exit(f"{args.checkpoint} is a plain LM: it has no LensNet")
    setting = Setting.from_config(config)
    layout = setting.layout
    k, n = layout.block_size, args.length * layout.capacity
    tokenizer = tokenizer_for(config.model)
    docs = data.evaluation_documents(config.data, tokenizer)
    filler = np.concatenate([d.data.astype(np.int32) for d in docs])
    rng = np.random.default_rng(args.seed)
    probes = []
    for _ in range(args.probes):
        offset = int(rng.integers(0, len(filler) - n - 2))
        text = np.concatenate([[config.model.bos_id], filler[offset : offset + n]])
        probes.append(tasks.passkey(text, n + 1, rng, tokenizer=tokenizer))
    tokens = jnp.asarray(np.stack([p.tokens for p in probes]))
    cursor = n - layout.scored
    table, offsets = node_table(model, tokens[:, :n], k, config.mc.max_level)
    pyramid = contexts(
        [condition_entries("mc_static", cursor, layout)] * len(probes), cursor, layout
    )
    print(f"{len(probes)} passkey probes of {n} tokens ({args.length}W), {args.checkpoint}")
    for r in range(args.rounds + 1):
        if r:
            wc, _ = focus(model, table, offsets, pyramid, cursor, layout, setting.allocator, r)
        else:
            wc = pyramid
        scores = np.asarray(lens_scores(model, table, offsets, wc, cursor, layout))
        states = Counter(digits_state(wc, scores, row, p.source, k) for row, p in enumerate(probes))
        print(f"after {r} rounds: " + ", ".join(f"{s} {c}" for s, c in sorted(states.items())))
    pred = np.asarray(score_wc(model, table, offsets, tokens, wc, layout, setting.ignore)[1])
    found = [answered(pred[row], p, cursor) for row, p in enumerate(probes)]
    print(f"passkey found after {args.rounds} rounds: {np.mean(found):.3f}")


if __name__ == "__main__":
    main()
