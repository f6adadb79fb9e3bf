"""What are a checkpoint's gists worth? NLL of the scored tokens under working contexts that differ
only in their gists.

    python benchmarks/gist_value.py --checkpoint runs/tiny
    python benchmarks/gist_value.py --checkpoint runs/tiny --length 16 --docs 64

On held-out documents of ``length x W`` tokens, the last S tokens are scored (as in
``megacontext_jax.evaluation``) after these contexts:

* ``window``: the newest W - S tokens; ``tail``: the pyramid's tokens alone (its gists dropped);
* ``pyramid``: the recency pyramid; ``pyramid, no LOD>=2``: without its coarser gists;
* ``pyramid, other gists``: every gist taken from another document (the tokens stay).

``pyramid`` below ``tail`` is what the gists add; ``other gists`` near ``pyramid`` means they add
nothing specific to their own text. ``full`` (every token) is the upper bound.

What the window has beyond the tail (the *gap*, between the window's start and the tail's):

* ``tail + older tokens``: as many raw tokens from just before the window instead of the gap's;
* ``gap's gists + tail``: the pyramid's gists of the gap alone in front of the tail;
* ``LOD1 gists + window``: every token before the window as LOD1 gists (over budget: a probe of
  whether gists in front of raw tokens help or distract).
"""

import argparse
import dataclasses
import sys

import jax.numpy as jnp
import numpy as np

from megacontext_jax.data import pipeline as data
from megacontext_jax.data.tokenizer import tokenizer_for
from megacontext_jax.evaluation.scoring import Setting, score_full, score_rows
from megacontext_jax.training import variants
from megacontext_jax.training.restore import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--length", type=int, default=8, help="document length in multiples of W")
    p.add_argument("--docs", type=int, default=32)
    args = p.parse_args()
    model, config = load_model(args.checkpoint)
    if not hasattr(model, "gistnet"):
        sys.exit(f"{args.checkpoint} is a plain LM: it has no gists")
    setting = Setting.from_config(config)
    layout = setting.layout
    n = args.length * layout.capacity
    docs = data.evaluation_documents(config.data, tokenizer_for(config.model))
    bos = config.model.bos_id
    seqs = [np.concatenate([[bos], d.data[:n].astype(np.int32)]) for d in docs if len(d.data) >= n]
    if len(seqs) < 2:
        sys.exit(f"fewer than 2 held-out documents have {n} tokens")
    tokens = np.stack(seqs[: args.docs])
    cursor = n - layout.scored
    pyramid = variants.pyramid(cursor, layout)
    tail = [e for e in pyramid if e[0] == 0]
    # The text under the gists comes from the next document; the pyramid's tokens stay.
    other = tokens.copy()
    first_token = tail[0][1]
    other[:, 1:first_token] = np.roll(tokens, 1, axis=0)[:, 1:first_token]

    def nll(ents, seq) -> float:
        room = dataclasses.replace(layout, capacity=max(layout.capacity, len(ents) + layout.scored))
        return float(
            score_rows(model, seq, [ents] * len(seq), cursor, room, setting.ignore)[0].mean()
        )

    full = float(np.asarray(score_full(model, jnp.asarray(tokens), layout.scored)[0]).mean())
    rows = [
        ("full", n - layout.scored, full),
        ("window", layout.context_capacity, nll(variants.window(cursor, layout), tokens)),
        ("tail", len(tail), nll(tail, tokens)),
        ("pyramid", len(pyramid), nll(pyramid, tokens)),
        (
            "pyramid, no LOD>=2",
            sum(l < 2 for l, _ in pyramid),
            nll([e for e in pyramid if e[0] < 2], tokens),
        ),
        ("pyramid, other gists", len(pyramid), nll(pyramid, other)),
    ]
    window = variants.window(cursor, layout)
    ws, k = window[0][1], layout.block_size
    gap = first_token - ws
    if gap > 0 and ws >= gap:
        older = [(0, t) for t in range(ws - gap, ws)] + tail
        gap_gists = [e for e in pyramid if e[1] >= ws and e[0] > 0]
        lod1 = [(1, s) for s in range(0, ws - ws % k, k)] + [(0, t) for t in range(ws - ws % k, ws)]
        rows += [
            ("tail + older tokens", len(older), nll(older, tokens)),
            ("gap's gists + tail", len(gap_gists) + len(tail), nll(gap_gists + tail, tokens)),
            ("LOD1 gists + window", len(lod1) + len(window), nll(lod1 + window, tokens)),
        ]
    print(f"{len(tokens)} documents of {n} tokens ({args.length}W), last {layout.scored} scored")
    print(f"{'context':<22}{'entries':>8}{'nll':>9}")
    for name, count, value in rows:
        print(f"{name:<22}{count:>8}{value:>9.4f}")


if __name__ == "__main__":
    main()
