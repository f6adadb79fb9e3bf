"""Retrieval under each condition: planted facts asked at the end of a history (DESIGN section 8).

Tasks (``data.tasks``), each over filler text cut at random from the held-out documents unless
named otherwise:

* ``passkey``: the phrasings training plants (``tasks.PHRASINGS["train"]``);
* ``passkey_phrasing``: phrasings held out of training;
* ``passkey_prose``: the training phrasings over prose, a kind of filler training never reads;
* ``code``: ``NAME = '48213'`` far back, ``assert NAME == '48213`` at the end (never trained);
* ``mqar``: multi-query associative recall, every pair planted beyond the window.

A probe is answered when the argmax predictions of all its answer tokens are right. Needle
depths (the needle's place in the room the filler leaves it: 0 first, 1 last) are stratified
over [0, 1) so that every depth bin holds probes. Accuracy is reported per
condition, by needle depth, and by the level of detail of the answer's span in the condition's
working context (its coarsest entry; -1: outside it), with ``mc_oracle`` beside the rest.
"""

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from megacontext_jax.data import tasks
from megacontext_jax.data.tokenizer import ByteTokenizer, HFTokenizer
from megacontext_jax.evaluation.scoring import ORACLE, Setting, run_conditions
from megacontext_jax.focus.working_context import WorkingContext
from megacontext_jax.megacontext import MegaContext
from megacontext_jax.nets.decoder import DecoderLM

DEPTH_BINS = 5  # needle depth bins of a length's probes: [0, 0.2), ... [0.8, 1)


@dataclasses.dataclass(frozen=True)
class Task:
    """How a task's probes are made: ``make(filler, length, rng, depth, window, tokenizer)``,
    over held-out text (``prose=False``) or prose; ``depth``: whether it places one needle."""

    make: Callable[..., tasks.Probe]
    prose: bool = False
    depth: bool = True


TASKS = {
    "passkey": Task(lambda f, n, r, d, w, t: tasks.passkey(f, n, r, d, t, "train")),
    "passkey_phrasing": Task(lambda f, n, r, d, w, t: tasks.passkey(f, n, r, d, t, "held_out")),
    "passkey_prose": Task(lambda f, n, r, d, w, t: tasks.passkey(f, n, r, d, t), prose=True),
    "code": Task(lambda f, n, r, d, w, t: tasks.code(f, n, r, d, t)),
    "mqar": Task(
        lambda f, n, r, d, w, t: tasks.mqar(f, n, r, tokenizer=t, before=n - w), depth=False
    ),
}


def answered(pred: np.ndarray, probe: tasks.Probe, cursor: int) -> bool:
    """Whether the argmax predictions ``[S]`` after ``cursor`` spell the probe's answer."""
    return bool((pred[probe.answer - cursor - 1] == probe.tokens[probe.answer]).all())


def coarsest_over(wc: WorkingContext, row: int, span: tuple[int, int], block_size: int) -> int:
    """Index of the coarsest context entry of WC ``row`` overlapping ``span`` (-1: none does)."""
    lod, start, ctx = (np.asarray(a[row]) for a in (wc.lod, wc.start, wc.context_mask))
    hit = np.flatnonzero(ctx & (start < span[1]) & (np.asarray(wc.end(block_size)[row]) > span[0]))
    return int(hit[np.argmax(lod[hit])]) if hit.size else -1


def span_lod(wc: WorkingContext, row: int, span: tuple[int, int], block_size: int) -> int:
    """Coarsest level among the context entries overlapping ``span`` (-1: outside the WC)."""
    i = coarsest_over(wc, row, span, block_size)
    return int(np.asarray(wc.lod[row])[i]) if i >= 0 else -1


def make_probes(
    task: Task,
    filler: np.ndarray,
    n: int,
    count: int,
    setting: Setting,
    tokenizer: ByteTokenizer | HFTokenizer,
    rng: np.random.Generator,
) -> tuple[list[tasks.Probe], list[float | None]]:
    """``count`` probes of ``n + 1`` tokens (BOS, then ``n``) and the depth of each needle
    (stratified: probe i's in ``[i / count, (i + 1) / count)``; None for MQAR)."""
    if not task.prose and len(filler) < n:
        raise ValueError(f"the held-out text has {len(filler)} tokens, fewer than a probe's {n}")
    probes, depths = [], []
    for i in range(count):
        if task.prose:
            text = tasks.prose(n, rng, tokenizer)
        else:
            offset = int(rng.integers(0, len(filler) - n + 1))
            text = filler[offset : offset + n]
        seq = np.concatenate([[setting.bos], text]).astype(np.int32)
        depth = (i + rng.random()) / count if task.depth else None
        probes.append(task.make(seq, n + 1, rng, depth, setting.layout.capacity, tokenizer))
        depths.append(depth)
    return probes, depths


def _rate(hits: list[bool]) -> dict[str, float]:
    p = float(np.mean(hits))
    return {"mean": p, "se": math.sqrt(p * (1 - p) / len(hits)), "n": len(hits)}


def retrieval(
    model: MegaContext | DecoderLM,
    setting: Setting,
    task: str,
    filler: np.ndarray,
    n: int,
    count: int,
    batch: int,
    refocus_steps: int,
    tokenizer: ByteTokenizer | HFTokenizer,
    rng: np.random.Generator,
) -> dict:
    """One task at history length ``n``: accuracy per condition (mean, SE, count), by needle
    depth bin (``[accuracy, count]`` per bin) and by the LOD of the answer's span, and how
    often the answer fits the budget at LOD0 (``oracle_fits``)."""
    s, k = setting.layout.scored, setting.layout.block_size
    spec = TASKS[task]
    probes, depths = make_probes(spec, filler, n, count, setting, tokenizer, rng)
    span = max(n + 1 - p.answer.min() for p in probes)  # answers vary with a BPE tokenizer
    if span > s:
        return {"skipped": f"answers span {span} tokens > S={s}"}
    hits: dict[str, list[bool]] = {}
    by_depth: dict[str, list[list[bool]]] = {}
    by_lod: dict[str, dict[str, list[bool]]] = {}
    fits: list[bool] = []
    cursor = n - s
    for i in range(0, len(probes), batch):
        rows, row_depths = probes[i : i + batch], depths[i : i + batch]
        padded = rows + [rows[-1]] * (batch - len(rows))
        outs = run_conditions(
            model,
            setting,
            np.stack([p.tokens for p in padded]),
            refocus_steps,
            rng,
            sources=[p.source for p in padded],
        )
        if ORACLE in outs:
            fits.extend(bool(f) for f in outs[ORACLE].fits[: len(rows)])
        for c, scored in outs.items():
            for r, (p, depth) in enumerate(zip(rows, row_depths, strict=True)):
                # An answer the budget cannot hold at LOD0 counts as missed by the oracle.
                fit = scored.fits is None or bool(scored.fits[r])
                ok = answered(scored.pred[r], p, cursor) and fit
                hits.setdefault(c, []).append(ok)
                if depth is not None:
                    bins = by_depth.setdefault(c, [[] for _ in range(DEPTH_BINS)])
                    bins[min(int(depth * DEPTH_BINS), DEPTH_BINS - 1)].append(ok)
                if scored.wc is not None:
                    lod = str(span_lod(scored.wc, r, p.source, k))
                    by_lod.setdefault(c, {}).setdefault(lod, []).append(ok)
    result = {
        "probes": len(probes),
        "accuracy": {c: _rate(v) for c, v in hits.items()},
        "by_depth": {
            c: [[float(np.mean(b)) if b else None, len(b)] for b in bins]
            for c, bins in by_depth.items()
        },
        "by_lod": {
            c: {lod: [float(np.mean(v)), len(v)] for lod, v in sorted(d.items())}
            for c, d in by_lod.items()
        },
    }
    if fits:
        result["oracle_fits"] = float(np.mean(fits))
    return result
