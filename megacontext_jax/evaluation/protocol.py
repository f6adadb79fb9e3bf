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

import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from megacontext_jax.cli import HelpFormatter, OneLineParser, at_least, history_lengths
from megacontext_jax.config import to_json
from megacontext_jax.data import pipeline as data
from megacontext_jax.data import tasks
from megacontext_jax.data.tokenizer import ByteTokenizer, HFTokenizer, tokenizer_for
from megacontext_jax.focus.working_context import WorkingContext
from megacontext_jax.megacontext import MegaContext
from megacontext_jax.nets.decoder import DecoderLM
from megacontext_jax.report import plot, print_substitutability, print_table
from megacontext_jax.scoring import (
    CONDITIONS,
    Setting,
    contexts,
    run_conditions,
    score_wc,
)
from megacontext_jax.training import variants
from megacontext_jax.training.checkpoint import CheckpointError

COMPARISONS = (("mc_static", "window"), ("mc_focus", "mc_static"), ("full", "window"))


def substitutability(
    model: MegaContext, setting: Setting, docs: list[data.Document], num_docs: int, after: int = 32
) -> dict:
    """Mean ΔNLL of the ``after`` tokens following a span when the span is replaced by its LOD1
    gist (span K) or LOD2 gist (span K^2), or dropped, against the span as tokens.

    Sequences: ``K^2`` tokens of prefix, the LOD2 span ``[K^2, 2K^2)`` (the LOD1 span is its last
    K tokens), then the scored tokens; every other entry is a token.
    """
    k = setting.layout.block_size
    span_start, span_end = k * k, 2 * k * k
    n = span_end + after
    seqs = [
        np.concatenate([[setting.bos], d.data[:n].astype(np.int32)])
        for d in docs
        if len(d.data) >= n
    ]
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
    nll = {}
    for name, span in variants_of_span.items():
        ents = prefix + span
        layout = dataclasses.replace(
            setting.layout, capacity=len(ents) + after, scored=after, recent_tail=0
        )
        wc = contexts([ents] * len(seqs), span_end, layout)
        nll[name] = float(np.asarray(score_wc(model, tokens, wc, layout, setting.ignore)[0]).mean())
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


def coarsest_over(wc: WorkingContext, row: int, span: tuple[int, int], block_size: int) -> int:
    """Index of the coarsest context entry of WC ``row`` overlapping ``span`` (-1: none does)."""
    lod, start, ctx = (np.asarray(a[row]) for a in (wc.lod, wc.start, wc.context_mask))
    hit = np.flatnonzero(ctx & (start < span[1]) & (np.asarray(wc.end(block_size)[row]) > span[0]))
    return int(hit[np.argmax(lod[hit])]) if hit.size else -1


def _span_lod(wc: WorkingContext, row: int, span: tuple[int, int], block_size: int) -> int:
    """Coarsest level among the context entries overlapping ``span`` (-1: outside the WC)."""
    i = coarsest_over(wc, row, span, block_size)
    return int(np.asarray(wc.lod[row])[i]) if i >= 0 else -1


def answered(pred: np.ndarray, probe: tasks.Probe, cursor: int) -> bool:
    """Whether the argmax predictions ``[S]`` after ``cursor`` spell the probe's answer."""
    return bool((pred[probe.answer - cursor - 1] == probe.tokens[probe.answer]).all())


def oracle_passkey(
    model: MegaContext, setting: Setting, probes: list[tasks.Probe], cursor: int
) -> tuple[np.ndarray, np.ndarray]:
    """Passkeys found when the pyramid has each probe's answer tokens brought to LOD0
    (``variants.bring_to_lod0``): what a focus that found every needle would give the base model.

    Returns whether each probe is answered ``[B]`` and whether its tokens fit the budget ``[B]``
    (a probe that does not fit counts as not answered).
    """
    layout = setting.layout
    pyr = variants.pyramid(cursor, layout)
    rng = np.random.default_rng(0)
    rows, fits = [], []
    for p in probes:
        first, stop = p.source
        at = (*range(first, stop, layout.block_size), stop - 1)
        out = variants.bring_to_lod0(pyr, at, cursor, layout, rng)
        rows.append(pyr if out is None else out[0])
        fits.append(out is not None)
    tokens = jnp.asarray(np.stack([p.tokens for p in probes]))
    wc = contexts(rows, cursor, layout)
    pred = np.asarray(score_wc(model, tokens, wc, layout, setting.ignore)[1])
    found = [answered(pred[r], p, cursor) and fits[r] for r, p in enumerate(probes)]
    return np.array(found), np.array(fits)


def score_length(
    model: MegaContext | DecoderLM,
    setting: Setting,
    seqs: list[np.ndarray],
    batch: int,
    refocus_steps: int,
    per_token: float,
) -> dict:
    """One length's row of the results: each condition's NLL and bits per byte over the
    documents ``seqs``, the paired differences and ``gap_recovered``."""
    totals = {c: [] for c in CONDITIONS}
    for i in range(0, len(seqs) - batch + 1, batch):
        outs = run_conditions(model, setting, np.stack(seqs[i : i + batch]), refocus_steps)
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
    return row


def retrieval(
    model: MegaContext | DecoderLM,
    setting: Setting,
    task: str,
    filler: np.ndarray,
    n: int,
    batch: int,
    refocus_steps: int,
    num_probes: int,
    tokenizer: ByteTokenizer | HFTokenizer,
    rng: np.random.Generator,
) -> tuple[dict, dict | None, dict | None]:
    """One retrieval task at history length ``n``: accuracy per condition and, for the passkey,
    accuracy by the LOD of the answer's span and of the oracle focus (None for MQAR)."""
    s, k = setting.layout.scored, setting.layout.block_size
    make = partial(tasks.passkey if task == "passkey" else tasks.mqar, tokenizer=tokenizer)
    span = n + 1 - make(filler, n + 1, np.random.default_rng(0)).answer.min()
    if span > s:
        return {"skipped": f"answers span {span} tokens > S={s}"}, None, None
    correct: dict = {}
    by_lod: dict = {}
    oracle: dict = {"accuracy": [], "fits_budget": []}
    for _ in range(max(1, num_probes // batch)):
        probes = []
        for _ in range(batch):
            offset = int(rng.integers(0, len(filler) - n - 2))
            window_text = np.concatenate([[setting.bos], filler[offset : offset + n]])
            probes.append(make(window_text, n + 1, rng))
        outs = run_conditions(model, setting, np.stack([p.tokens for p in probes]), refocus_steps)
        for c, (_, pred, wc) in outs.items():
            for r, p in enumerate(probes):
                ok = answered(pred[r], p, n - s)
                correct.setdefault(c, []).append(ok)
                if task == "passkey" and wc is not None and c != "window":
                    lod = _span_lod(wc, r, p.source, k)
                    by_lod.setdefault(c, {}).setdefault(str(lod), []).append(ok)
        if task == "passkey" and isinstance(model, MegaContext):
            found, fits = oracle_passkey(model, setting, probes, n - s)
            oracle["accuracy"].extend(found)
            oracle["fits_budget"].extend(fits)
    accuracy = {c: float(np.mean(v)) for c, v in correct.items()}
    if task != "passkey":
        return accuracy, None, None
    lods = {
        c: {lod: [float(np.mean(v)), len(v)] for lod, v in sorted(d.items())}
        for c, d in by_lod.items()
    }
    found = {k: float(np.mean(v)) for k, v in oracle.items()} if oracle["accuracy"] else None
    return accuracy, lods, found


def evaluate(
    model: MegaContext | DecoderLM,
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
    setting = Setting.from_config(config)
    w, tokenizer = setting.layout.capacity, tokenizer_for(config.model)
    results: dict = {
        "conditions": {},
        "passkey": {},
        "mqar": {},
        "passkey_by_lod": {},
        "passkey_oracle": {},
    }
    if isinstance(model, MegaContext) and setting.layout.max_level >= 2:
        results["substitutability"] = substitutability(model, setting, docs, num_docs)
    filler = np.concatenate([d.data.astype(np.int32) for d in docs])
    # Bits per byte: bits per token over the held-out text's bytes per token (1 for bytes).
    per_token = tokenizer.token_bytes()[filler].mean()
    rng = np.random.default_rng(seed)
    for m in tqdm(lengths, desc="lengths", leave=False, disable=not progress):
        n = m * w
        seqs = [
            np.concatenate([[setting.bos], d.data[:n].astype(np.int32)])
            for d in docs
            if len(d.data) >= n
        ][:num_docs]
        if not seqs:
            raise ValueError(f"no held-out document has {n} bytes (length {m}W)")
        batch = min(batch, len(seqs))
        results["conditions"][f"{m}W"] = score_length(
            model, setting, seqs, batch, refocus_steps, per_token
        )
        for task in ("passkey", "mqar"):
            accuracy, lods, oracle = retrieval(
                model, setting, task, filler, n, batch, refocus_steps, num_probes, tokenizer, rng
            )
            results[task][f"{m}W"] = accuracy
            if oracle is not None:
                results["passkey_oracle"][f"{m}W"] = oracle
            if lods is not None:
                results["passkey_by_lod"][f"{m}W"] = lods
    return results


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
