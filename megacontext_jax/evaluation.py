"""Evaluation: does MegaContext beat a plain context window at the same budget? (DESIGN section 8)

    python -m megacontext_jax.evaluation --checkpoint runs/tiny [--data DIR] [--out eval.json]

On held-out documents of m x W tokens (m in ``--lengths``), the final S tokens (``mc.scored_tokens``)
are scored under four conditions:

* ``full``: every token at LOD0 (the upper bound);
* ``window``: the newest W tokens only (what a plain model sees);
* ``mc_static``: the recency pyramid over the whole history, no LensNet;
* ``mc_focus``: the pyramid refocused by LensNet and the allocator (``--refocus-steps`` rounds).

LensNet and the allocator see the history before the scored tokens only, as at a refocus during
decoding. Reports NLL (nats per token), bits per byte and ``gap_recovered = (window - mc) /
(window - full)`` (NaN unless ``full`` beats ``window`` by more than two standard errors of their
paired difference), and the paired per-document differences
``mc_static - window``, ``mc_focus - mc_static`` and ``full - window`` with their standard
errors; then passkey and multi-query associative recall accuracy per condition and length,
passkey accuracy by the level of detail of the answer's span (its digits where the needle planted
them), and ``passkey_oracle``: the accuracy of the pyramid with those digits brought to LOD0, an
upper bound for focus that tells LensNet's misses from the base model's. Writes JSON and a PNG.
"""

import hashlib
import json
import math
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from megacontext_jax import data, tasks, variants
from megacontext_jax.allocator import AllocatorConfig
from megacontext_jax.checkpoint import CheckpointError
from megacontext_jax.cli import HelpFormatter, OneLineParser, at_least, history_lengths
from megacontext_jax.config import to_json
from megacontext_jax.mc_losses import ignored
from megacontext_jax.megacontext import (
    MegaContext,
    entry_labels,
    focus_rounds,
    gather_entries,
    node_table,
    wc_positions,
    with_tail,
)
from megacontext_jax.model import token_nll
from megacontext_jax.tokenizer import tokenizer_for
from megacontext_jax.working_context import WorkingContext

CONDITIONS = ("full", "window", "mc_static", "mc_focus")
COMPARISONS = (("mc_static", "window"), ("mc_focus", "mc_static"), ("full", "window"))


def _scored(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    return token_nll(logits, labels), jnp.argmax(logits, axis=-1)


@partial(nnx.jit, static_argnames=("scored",))
def score_full(model: MegaContext, tokens: jax.Array, scored: int):
    """NLL and argmax ``[B, S]`` of the last S tokens with every token in context."""
    n = tokens.shape[1] - 1
    logits = model.base(tokens[:, :n])[:, n - scored :]
    return _scored(logits, tokens[:, n - scored + 1 :])


@partial(nnx.jit, static_argnames=("config", "scored"))
def score_wc(model: MegaContext, tokens: jax.Array, arrays: dict, config, scored: int = 0):
    """NLL and argmax ``[B, S]`` of the tokens after the context under WCs ``arrays`` (``[B, W]``).

    ``scored`` overrides S (``mc.scored_tokens``); the scored entries follow the context entries.
    """
    mc = config.mc
    n = tokens.shape[1] - 1
    table, offsets = _table(model, tokens[:, :n], config)
    lod, start, valid, ctx = (arrays[k] for k in ("lod", "start", "valid", "context"))
    emb = gather_entries(table, offsets, lod, start, valid, mc.block_size)
    mu, sigma = wc_positions(lod, start, config)
    logits = model.base(embeddings=emb, mu=mu, sigma=sigma, kv_valid=valid)
    labels, _ = entry_labels(tokens, lod, start, valid, mc.block_size, ignored(config))
    rows = ctx.sum(-1, keepdims=True) + jnp.arange(scored or mc.scored_tokens)
    return _scored(
        jnp.take_along_axis(logits, rows[..., None], axis=1), jnp.take_along_axis(labels, rows, 1)
    )


def _table(model, inputs, config):
    if isinstance(model, MegaContext):
        return node_table(
            model.gistnet, model.base.embed(inputs), config.mc.block_size, config.mc.max_level
        )
    return model.embed(inputs).astype(jnp.float32), (0,) * (config.mc.max_level + 1)


@partial(nnx.jit, static_argnames=("config", "steps"))
def focus(model: MegaContext, tokens: jax.Array, arrays: dict, config, steps: int):
    """``steps`` rounds of LensNet scoring + allocator edits of the pyramid's context."""
    mc = config.mc
    n = tokens.shape[1] - 1
    cursor, wc_cap = n - mc.scored_tokens, mc.wc_size - mc.scored_tokens
    table, offsets = _table(model, tokens[:, :n], config)
    wc = WorkingContext(*(arrays[k][:, :wc_cap] for k in ("lod", "start", "context")))
    cfg = AllocatorConfig.from_config(config)
    wc, _ = focus_rounds(model, table, offsets, wc, cursor, config, cfg, steps)
    return with_tail(wc, cursor, mc.scored_tokens, mc.wc_size)


def condition_arrays(name: str, cursor: int, layout: variants.Layout, batch: int) -> dict:
    ents = variants.window(cursor, layout) if name == "window" else variants.pyramid(cursor, layout)
    arrays = variants.to_arrays([ents] * batch, cursor, layout)
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def run_conditions(model, config, tokens: np.ndarray, refocus_steps: int):
    """``{condition: (nll [B, S], argmax [B, S], arrays or None)}`` for one batch of sequences."""
    layout = variants.Layout.from_config(config)
    config = ml_collections.FrozenConfigDict(config)  # hashable: a static argument of jit
    n = tokens.shape[1] - 1
    cursor = n - layout.scored
    tokens = jnp.asarray(tokens)
    out = {"full": (*score_full(model, tokens, layout.scored), None)}
    names = ["window"] + (["mc_static", "mc_focus"] if isinstance(model, MegaContext) else [])
    for name in names:
        arrays = condition_arrays(name, cursor, layout, tokens.shape[0])
        if name == "mc_focus":
            arrays = focus(model, tokens, arrays, config, refocus_steps)
        out[name] = (*score_wc(model, tokens, arrays, config), arrays)
    return {
        k: tuple(np.asarray(x) if x is not None and not isinstance(x, dict) else x for x in v)
        for k, v in out.items()
    }


def substitutability(
    model, config, docs: list[data.Document], num_docs: int, after: int = 32
) -> dict:
    """Mean ΔNLL of the ``after`` tokens following a span when the span is replaced by its LOD1
    gist (span K) or LOD2 gist (span K^2), or dropped, against the span as tokens.

    Sequences: ``K^2`` tokens of prefix, the LOD2 span ``[K^2, 2K^2)`` (the LOD1 span is its last
    K tokens), then the scored tokens; every other entry is a token.
    """
    k = config.mc.block_size
    span_start, span_end = k * k, 2 * k * k
    n = span_end + after
    bos = config.model.bos_id
    seqs = [np.concatenate([[bos], d.data[:n].astype(np.int32)]) for d in docs if len(d.data) >= n]
    seqs = seqs[:num_docs]
    if not seqs:
        raise ValueError(f"no held-out document has {n} bytes for the substitutability test")
    tokens = jnp.asarray(np.stack(seqs))
    prefix = [(0, t) for t in range(span_start)]
    variants_of_span = {
        "tokens": [(0, t) for t in range(span_start, span_end)],
        "lod1_gist": [(0, t) for t in range(span_start, span_end - k)] + [(1, span_end - k)],
        "lod1_dropped": [(0, t) for t in range(span_start, span_end - k)],
        "lod2_gist": [(2, span_start)],
        "lod2_dropped": [],
    }
    frozen = ml_collections.FrozenConfigDict(config)
    nll = {}
    for name, span in variants_of_span.items():
        ents = prefix + span
        capacity = len(ents) + after
        layout = variants.Layout(k, config.mc.max_level, capacity, after, 0)
        arrays = variants.to_arrays([ents] * len(seqs), span_end, layout)
        arrays = {key: jnp.asarray(v) for key, v in arrays.items()}
        nll[name] = float(np.asarray(score_wc(model, tokens, arrays, frozen, after)[0]).mean())
    return {name: value - nll["tokens"] for name, value in nll.items() if name != "tokens"} | {
        "tokens_nll": nll["tokens"],
        "documents": len(seqs),
    }


def _paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean of ``a - b`` over documents ``[docs]`` and its standard error."""
    d = a - b
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se}


def gap_recovered(row: dict) -> dict[str, float]:
    """``(window - mc) / (window - full)`` of each MC condition of a length's ``row``.

    NaN unless ``full`` beats ``window`` by more than two standard errors of their paired
    difference: otherwise there is no gap the sample resolves, and the ratio of two noises means
    nothing (a gap of 0.0003 +- 0.0002 nats once printed as 1.654).
    """
    gap = row["differences"]["full - window"]
    resolved = gap["mean"] < -2 * gap["se"]  # False when the SE is NaN (one document)
    return {
        c: (row["window"]["nll"] - row[c]["nll"]) / -gap["mean"] if resolved else float("nan")
        for c in ("mc_static", "mc_focus")
        if c in row
    }


def coarsest_over(arrays: dict, row: int, span: tuple[int, int], block_size: int) -> int:
    """Index of the coarsest context entry of WC ``row`` overlapping ``span`` (-1: none does)."""
    lod, start, ctx = (np.asarray(arrays[k][row]) for k in ("lod", "start", "context"))
    hit = np.flatnonzero(ctx & (start < span[1]) & (start + block_size**lod > span[0]))
    return int(hit[np.argmax(lod[hit])]) if hit.size else -1


def _span_lod(arrays: dict, row: int, span: tuple[int, int], block_size: int) -> int:
    """Coarsest level among the context entries overlapping ``span`` (-1: outside the WC)."""
    i = coarsest_over(arrays, row, span, block_size)
    return int(np.asarray(arrays["lod"][row])[i]) if i >= 0 else -1


def answered(pred: np.ndarray, probe: tasks.Probe, cursor: int) -> bool:
    """Whether the argmax predictions ``[S]`` after ``cursor`` spell the probe's answer."""
    return bool((pred[probe.answer - cursor - 1] == probe.tokens[probe.answer]).all())


def oracle_passkey(model: MegaContext, config, probes: list[tasks.Probe], cursor: int):
    """Passkeys found when the pyramid has each probe's answer tokens brought to LOD0
    (``variants.bring_to_lod0``): what a focus that found every needle would give the base model.

    Returns whether each probe is answered ``[B]`` and whether its tokens fit the budget ``[B]``
    (a probe that does not fit counts as not answered).
    """
    layout = variants.Layout.from_config(config)
    pyr = variants.pyramid(cursor, layout)
    rng = np.random.default_rng(0)
    rows, fits = [], []
    for p in probes:
        first, stop = p.source
        at = (*range(first, stop, layout.block_size), stop - 1)
        out = variants.bring_to_lod0(pyr, at, cursor, layout, rng)
        rows.append(pyr if out is None else out[0])
        fits.append(out is not None)
    arrays = {k: jnp.asarray(v) for k, v in variants.to_arrays(rows, cursor, layout).items()}
    tokens = jnp.asarray(np.stack([p.tokens for p in probes]))
    pred = np.asarray(score_wc(model, tokens, arrays, ml_collections.FrozenConfigDict(config))[1])
    found = [answered(pred[r], p, cursor) and fits[r] for r, p in enumerate(probes)]
    return np.array(found), np.array(fits)


def evaluate(
    model,
    config: ml_collections.ConfigDict,
    docs: list[data.Document],
    lengths: list[int],
    num_docs: int,
    batch: int,
    refocus_steps: int,
    num_probes: int,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    w, s = config.mc.wc_size, config.mc.scored_tokens
    tokenizer, bos = tokenizer_for(config.model), config.model.bos_id
    results: dict = {
        "conditions": {},
        "passkey": {},
        "mqar": {},
        "passkey_by_lod": {},
        "passkey_oracle": {},
    }
    if isinstance(model, MegaContext) and config.mc.max_level >= 2:
        results["substitutability"] = substitutability(model, config, docs, num_docs)
    filler = np.concatenate([d.data.astype(np.int32) for d in docs])
    # Bits per byte: bits per token over the held-out text's bytes per token (1 for bytes).
    per_token = tokenizer.token_bytes()[filler].mean()
    rng = np.random.default_rng(seed)
    for m in tqdm(lengths, desc="lengths", leave=False, disable=not progress):
        n = m * w
        seqs = [
            np.concatenate([[bos], d.data[:n].astype(np.int32)]) for d in docs if len(d.data) >= n
        ][:num_docs]
        if not seqs:
            raise ValueError(f"no held-out document has {n} bytes (length {m}W)")
        batch = min(batch, len(seqs))
        totals = {c: [] for c in CONDITIONS}
        for i in range(0, len(seqs) - batch + 1, batch):
            outs = run_conditions(model, config, np.stack(seqs[i : i + batch]), refocus_steps)
            for c, (nll, _, _) in outs.items():
                totals[c].append(nll)
        row = {}
        per_doc = {c: np.concatenate(p).mean(-1) for c, p in totals.items() if p}  # [docs]
        for c, nll in per_doc.items():
            mean = float(nll.mean())
            row[c] = {"nll": mean, "bpb": mean / math.log(2) / per_token}
        # The claims compare conditions on the same documents: paired differences and their
        # standard errors say which gaps the sample resolves.
        row["differences"] = {
            f"{a} - {b}": _paired(per_doc[a], per_doc[b])
            for a, b in COMPARISONS
            if a in per_doc and b in per_doc
        }
        row["gap_recovered"] = gap_recovered(row)
        row["documents"] = len(totals["full"]) * batch
        results["conditions"][f"{m}W"] = row
        for task in ("passkey", "mqar"):
            make = partial(tasks.passkey if task == "passkey" else tasks.mqar, tokenizer=tokenizer)
            span = n + 1 - make(filler, n + 1, np.random.default_rng(0)).answer.min()
            if span > s:
                results[task][f"{m}W"] = {"skipped": f"answers span {span} tokens > S={s}"}
                continue
            correct: dict = {}
            by_lod: dict = {}
            oracle: dict = {"accuracy": [], "fits_budget": []}
            for _ in range(max(1, num_probes // batch)):
                probes = []
                for _ in range(batch):
                    offset = int(rng.integers(0, len(filler) - n - 2))
                    window_text = np.concatenate([[bos], filler[offset : offset + n]])
                    probes.append(make(window_text, n + 1, rng))
                outs = run_conditions(
                    model, config, np.stack([p.tokens for p in probes]), refocus_steps
                )
                for c, (_, pred, arrays) in outs.items():
                    for r, p in enumerate(probes):
                        ok = answered(pred[r], p, n - s)
                        correct.setdefault(c, []).append(ok)
                        if task == "passkey" and arrays is not None and c != "window":
                            lod = _span_lod(arrays, r, p.source, config.mc.block_size)
                            by_lod.setdefault(c, {}).setdefault(str(lod), []).append(ok)
                if task == "passkey" and isinstance(model, MegaContext):
                    found, fits = oracle_passkey(model, config, probes, n - s)
                    oracle["accuracy"].extend(found)
                    oracle["fits_budget"].extend(fits)
            results[task][f"{m}W"] = {c: float(np.mean(v)) for c, v in correct.items()}
            if oracle["accuracy"]:
                results["passkey_oracle"][f"{m}W"] = {
                    k: float(np.mean(v)) for k, v in oracle.items()
                }
            if task == "passkey":
                results["passkey_by_lod"][f"{m}W"] = {
                    c: {lod: [float(np.mean(v)), len(v)] for lod, v in sorted(d.items())}
                    for c, d in by_lod.items()
                }
    return results


def print_substitutability(sub: dict) -> None:
    print(
        f"substitutability over {sub['documents']} documents: ΔNLL (nats per token) of the 32 tokens"
    )
    print(f"after a span, vs the span as tokens (NLL {sub['tokens_nll']:.4f}):")
    for level in (1, 2):
        print(
            f"  LOD{level} span: gist {sub[f'lod{level}_gist']:+.4f}   "
            f"dropped {sub[f'lod{level}_dropped']:+.4f}"
        )


def _accuracy(row: dict, condition: str) -> str:
    value = row.get(condition)
    return "-" if not isinstance(value, float) else f"{value:.3f}"


def print_table(results: dict) -> None:
    print(
        f"{'length':>7} {'condition':>10} {'nll':>8} {'bpb':>8} {'gap_rec':>8} {'passkey':>8} {'mqar':>8}"
    )
    for length, row in results["conditions"].items():
        for c in CONDITIONS:
            if c not in row:
                continue
            gap = row["gap_recovered"].get(c)
            print(
                f"{length:>7} {c:>10} {row[c]['nll']:8.4f} {row[c]['bpb']:8.4f} "
                f"{'' if gap is None else f'{gap:8.3f}':>8} "
                f"{_accuracy(results['passkey'][length], c):>8} "
                f"{_accuracy(results['mqar'][length], c):>8}"
            )
        diffs = "; ".join(
            f"{name} {d['mean']:+.4f} ± {d['se']:.4f}" for name, d in row["differences"].items()
        )
        print(f"{length:>7} paired over {row['documents']} documents: {diffs}")
        oracle = results["passkey_oracle"].get(length)
        if oracle:
            print(
                f"{length:>7} passkey with the digits brought to LOD0 (oracle focus): "
                f"{oracle['accuracy']:.3f}; they fit the budget in {oracle['fits_budget']:.3f}"
            )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(results["conditions"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for c in CONDITIONS:
        ys = [results["conditions"][m].get(c, {}).get("bpb") for m in lengths]
        if any(y is not None for y in ys):
            ax1.plot(lengths, ys, marker="o", label=c)
        acc = [results["passkey"][m].get(c) for m in lengths]
        if any(isinstance(a, float) for a in acc):
            ax2.plot(lengths, acc, marker="o", label=c)
    ax1.set_title("scored tokens: bits per byte")
    ax1.set_xlabel("history length")
    ax2.set_title("passkey accuracy")
    ax2.set_xlabel("history length")
    ax2.set_ylim(-0.05, 1.05)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def config_hash(config: ml_collections.ConfigDict) -> str:
    """A short, stable fingerprint of a run's whole config (which run a result belongs to)."""
    return hashlib.sha256(to_json(config).encode()).hexdigest()[:16]


def prepare_output(path: Path) -> None:
    """Creates ``path``'s parent and checks that ``path`` and its PNG can be written there,
    before any compute; ``ValueError`` (one line) if not."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"cannot create the output directory {path.parent}: {e.strerror}"
        ) from None
    for target in (path, path.with_suffix(".png")):
        if target.is_dir():
            raise ValueError(f"the output {target} is a directory")
        if target.exists() and not os.access(target, os.W_OK):
            raise ValueError(f"the output {target} is not writable")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to {path.parent}: {e.strerror}") from None


def main(argv: list[str]) -> int:
    p = OneLineParser(
        prog="python -m megacontext_jax.evaluation",
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a training workdir")
    p.add_argument(
        "--data", help="directory of text files or .jsonl (default: the run's held-out split)"
    )
    p.add_argument("--out", default=None, help="JSON results (default: CHECKPOINT/eval.json)")
    p.add_argument(
        "--lengths",
        type=history_lengths,
        default="4,8,16",
        help="history lengths in multiples of W",
    )
    # 32 documents leave a standard error of ~0.03 nats on a paired difference at 8W; the
    # default split of the standard library has ~80 held-out documents that long.
    p.add_argument(
        "--docs",
        type=at_least(1),
        default=96,
        help="documents per length (at most; those long enough)",
    )
    # At least one batch of probes runs whatever the count: 0 would not mean none.
    p.add_argument(
        "--probes", type=at_least(1), default=32, help="retrieval probes per task and length"
    )
    p.add_argument("--batch", type=at_least(1), default=8, help="sequences per forward pass")
    p.add_argument(
        "--refocus-steps", type=at_least(0), default=4, help="LensNet + allocator rounds"
    )
    p.add_argument(
        "--seed", type=at_least(0), default=0, help="retrieval probes and their positions"
    )
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval.json"
    try:
        from megacontext_jax.api import evaluate, load

        prepare_output(out)
        model = load(args.checkpoint)
        results = evaluate(
            model,
            data=args.data,
            lengths=args.lengths,
            docs=args.docs,
            probes=args.probes,
            batch=args.batch,
            refocus_steps=args.refocus_steps,
            seed=args.seed,
        )
    except (CheckpointError, data.DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    results["run"]["argv"] = list(argv)
    print_table(results)
    if "substitutability" in results:
        print_substitutability(results["substitutability"])
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def run() -> None:
    """The ``megacontext-eval`` console entry point."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    run()
