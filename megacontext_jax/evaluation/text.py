"""Next-token NLL of held-out text under each condition: a length's row, key tokens, the budget
curve and the substitutability of gists (DESIGN section 8).

Key tokens (after LongPPL, which picks them with a separate evaluator model; here the model
itself): the scored tokens where ``full`` beats ``window`` by more than a threshold, the tokens
that only long context predicts; their NLL is reported beside that of all scored tokens, and
``gap_recovered`` on both. Being picked where ``window`` does badly, they flatter any other
condition against ``window`` (regression to the mean: a context that differs from the window in
ways unrelated to what it keeps gains on them too); the differences between MC conditions
(``mc_focus - mc_static``, ``mc_focus - mc_random``) carry no such bias.
"""

import dataclasses
import math

import numpy as np
from tqdm import tqdm

from megacontext_jax.data import pipeline as data
from megacontext_jax.evaluation import stats
from megacontext_jax.evaluation.scoring import (
    CONDITIONS,
    MC_CONDITIONS,
    Setting,
    run_conditions,
    score_rows,
)
from megacontext_jax.megacontext import MegaContext
from megacontext_jax.nets.decoder import DecoderLM

# (a, b): the paired differences a - b every row reports.
COMPARISONS = (
    ("mc_static", "window"),
    ("mc_focus", "window"),
    ("mc_focus", "mc_static"),
    ("mc_focus", "mc_random"),
    ("mc_attn", "mc_static"),
    ("mc_attn", "mc_focus"),
    ("sinks", "window"),
    ("full", "window"),
)


def score_sequences(
    model: MegaContext | DecoderLM,
    setting: Setting,
    seqs: list[np.ndarray],
    batch: int,
    refocus_steps: int,
    rng: np.random.Generator,
    names: tuple[str, ...] = CONDITIONS,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """NLL ``[N, S]`` of each condition over the sequences ``seqs`` (``N`` of ``n + 1`` tokens),
    in batches of ``batch`` (the last padded with copies, so every batch has one shape)."""
    out: dict[str, list] = {}
    for i in tqdm(range(0, len(seqs), batch), leave=False, disable=not progress):
        rows = seqs[i : i + batch]
        padded = np.stack(rows + [rows[-1]] * (batch - len(rows)))
        for name, scored in run_conditions(
            model, setting, padded, refocus_steps, rng, names
        ).items():
            out.setdefault(name, []).append(scored.nll[: len(rows)])
    return {name: np.concatenate(parts) for name, parts in out.items()}


def text_row(
    nll: dict[str, np.ndarray],
    doc_of: np.ndarray,
    per_token: float,
    threshold: float,
    seed: int,
) -> dict:
    """One length's row: each condition's NLL (and bits per byte) on all scored tokens and on
    the key tokens, the paired differences ``COMPARISONS`` on both, and ``gap_recovered``.

    ``nll``: ``[N, S]`` per condition; ``doc_of [N]``: each window's document (the clusters of
    every standard error and interval).
    """
    s = nll["full"].shape[1]
    clusters = np.repeat(doc_of, s)
    key = (nll["window"] - nll["full"] > threshold).ravel()

    def mean(values: np.ndarray, where: np.ndarray | None = None) -> dict:
        values = values.ravel()
        return stats.clustered_mean(
            values if where is None else values[where],
            clusters if where is None else clusters[where],
            seed,
        )

    row: dict = {
        "windows": len(doc_of),
        "documents": len(np.unique(doc_of)),
        "tokens": int(key.size),
        "key_tokens": int(key.sum()),
        "conditions": {},
        "differences": {},
    }
    for c, values in nll.items():
        all_tokens = mean(values)
        row["conditions"][c] = {
            "nll": all_tokens,
            "bpb": all_tokens["mean"] / math.log(2) / per_token,
            "key_nll": mean(values, key),
        }
    for a, b in COMPARISONS:
        if a in nll and b in nll:
            d = nll[a] - nll[b]
            row["differences"][f"{a} - {b}"] = {"all": mean(d), "key": mean(d, key)}
    full_minus_window = row["differences"]["full - window"]
    row["gap_recovered"], row["gap_recovered_ci95"] = {}, {}
    for part, field in (("all", "nll"), ("key", "key_nll")):
        means = {c: v[field]["mean"] for c, v in row["conditions"].items()}
        gaps = stats.gap_recovered(means, full_minus_window[part], ("sinks", *MC_CONDITIONS))
        row["gap_recovered"][part] = gaps
        where = key if part == "key" else np.ones_like(key)
        gap = (nll["window"] - nll["full"]).ravel()[where]
        row["gap_recovered_ci95"][part] = {
            c: stats.ratio_interval(
                (nll["window"] - nll[c]).ravel()[where], gap, clusters[where], seed
            )
            if not math.isnan(value)
            else [math.nan, math.nan]
            for c, value in gaps.items()
        }
    return row


def budget_curve(
    model: MegaContext | DecoderLM,
    setting: Setting,
    seqs: list[np.ndarray],
    doc_of: np.ndarray,
    budgets: tuple[int, ...],
    at_trained: dict[str, np.ndarray],
    batch: int,
    refocus_steps: int,
    seed: int,
    progress: bool = False,
) -> dict:
    """Each condition's NLL against the budget W (the same windows ``seqs``, the same model),
    and the effective window of each: the W' at which ``window`` matches its NLL at the trained
    budget (``stats.effective_window``).

    ``at_trained``: the conditions' NLL ``[N, S]`` at the trained budget, reused there; ``full``
    does not depend on the budget.
    """
    trained = setting.layout.capacity
    names = tuple(c for c in CONDITIONS if c != "full")
    curve: dict = {"budgets": [], "nll": {}, "se": {}, "skipped": {}}
    for w in sorted(budgets):
        try:
            at = setting.with_budget(w)
        except ValueError as e:
            curve["skipped"][str(w)] = str(e)
            continue
        rng = np.random.default_rng([seed, w])
        if w == trained:
            nll = at_trained
        else:
            nll = score_sequences(model, at, seqs, batch, refocus_steps, rng, names, progress)
        curve["budgets"].append(w)
        for c in names:
            if c in nll:
                m = stats.clustered_mean(nll[c].ravel(), np.repeat(doc_of, nll[c].shape[1]), seed)
                curve["nll"].setdefault(c, []).append(m["mean"])
                curve["se"].setdefault(c, []).append(m["se"])
    if trained in curve["budgets"] and len(curve["budgets"]) > 1:
        i = curve["budgets"].index(trained)
        curve["effective_window"] = {
            c: stats.effective_window(curve["budgets"], curve["nll"]["window"], v[i])
            for c, v in curve["nll"].items()
            if c != "window"
        }
    return curve


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
    tokens = np.stack(seqs)
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
        scored = score_rows(model, tokens, [ents] * len(seqs), span_end, layout, setting.ignore)
        nll[name] = float(scored[0].mean())
    return {name: value - nll["tokens"] for name, value in nll.items() if name != "tokens"} | {
        "tokens_nll": nll["tokens"],
        "documents": len(seqs),
    }
