"""Working contexts for MegaContext training and evaluation, built on the host.

Every WC here has two parts: a *context* over ``[0, c)`` (capacity ``Wc = W - S``), and the ``S``
newest tokens ``[c, c + S)`` at LOD0 whose next-token predictions are scored. LensNet and the
allocator see only the context, as they would at a refocus during decoding; every condition scores
the same S tokens, so their losses compare directly.

Conditions over the context: ``pyramid`` (the recency pyramid), ``window`` (the newest Wc tokens,
the plain-model baseline) and random counterfactual ``variants`` of a baseline: aligned edits
(expand a gist, collapsing random sibling groups when the budget needs room; or collapse a group),
each keeping every WC invariant. A ``deep_variant`` brings K tokens under gists to LOD0, a level
at a time: the one change that turns a passkey in a coarse gist into readable digits, which
single-level expansions never measure, since the base model reads no digits out of a gist.
"""

import dataclasses

import numpy as np

from megacontext_jax.focus.rules import (
    Entries,
    collapse_at,
    collapsible_at,
    expand_at,
    expandable_at,
    recency_pyramid,
)
from megacontext_jax.focus.working_context import entries
from megacontext_jax.specs import Layout, gistable, span_counts


@dataclasses.dataclass(frozen=True)
class Rows:
    """Where each condition sits on the variant axis of a training example's contexts
    ``[V, W]``: the baseline, the window, ``num_random`` random variants (as
    ``training_contexts`` builds them), then the LensNet-guided variant (made in-graph)."""

    num_random: int
    baseline: int = 0
    window: int = 1

    @property
    def random(self) -> slice:
        return slice(2, 2 + self.num_random)

    @property
    def guided(self) -> int:
        return 2 + self.num_random

    @property
    def edits_of_baseline(self) -> tuple[int, ...]:
        """The baseline and the variants made from it by edits (all but the window)."""
        return (self.baseline, *range(self.random.start, self.guided + 1))


def pyramid(cursor: int, layout: Layout) -> Entries:
    return entries(
        recency_pyramid(
            cursor,
            layout.context_capacity,
            layout.block_size,
            layout.max_level,
            layout.recent_tail,
            layout.pyramid,
        )
    )


def window(cursor: int, layout: Layout) -> Entries:
    return [(0, t) for t in range(max(0, cursor - layout.context_capacity), cursor)]


def sinks(cursor: int, layout: Layout, count: int) -> Entries:
    """The first ``count`` tokens and the newest ones, ``context_capacity`` in all (StreamingLLM's
    attention sinks); the window where the history fits whole."""
    newest = window(cursor, layout)
    if not newest or newest[0][1] == 0:
        return newest
    return [(0, t) for t in range(count)] + newest[count:]


def _legal_groups(ents: Entries, cursor: int, layout: Layout, frozen: set[int]) -> list[int]:
    """Indices i where entries i .. i + K - 1 may collapse, none of them ``frozen``."""
    k = layout.block_size
    return [
        i
        for i in range(len(ents) - k + 1)
        if collapsible_at(ents, i, cursor, k, layout.max_level, layout.recent_tail)
        and not frozen & set(range(i, i + k))
    ]


def _expandable(ents: Entries, cursor: int, layout: Layout) -> list[int]:
    k, tail = layout.block_size, layout.recent_tail
    return [i for i in range(len(ents)) if expandable_at(ents, i, cursor, k, tail)]


def _make_room(
    ents: Entries, cursor: int, layout: Layout, kept: list[tuple[int, int]], rng
) -> Entries | None:
    """``ents`` with random sibling groups collapsed, none inside the spans of the ``kept``
    (lod, start) nodes, until they fit the budget; None where no legal group is left."""
    k = layout.block_size
    while len(ents) > layout.context_capacity:
        frozen = {j for j, (_, s) in enumerate(ents) if any(r <= s < r + k**l for l, r in kept)}
        groups = _legal_groups(ents, cursor, layout, frozen)
        if not groups:
            return None
        ents = collapse_at(ents, int(rng.choice(groups)), k)
    return ents


def random_variant(
    ents: Entries, cursor: int, layout: Layout, rng: np.random.Generator
) -> tuple[Entries, int]:
    """One counterfactual edit of ``ents``; returns it and the lod of the expanded gist (-1: none).

    Half of the time (when a gist can expand) expands a random gist, collapsing random sibling
    groups elsewhere while over budget; otherwise collapses a random sibling group.
    """
    k = layout.block_size
    expandable = _expandable(ents, cursor, layout)
    if expandable and rng.random() < 0.5:
        i = int(rng.choice(expandable))
        new = _make_room(expand_at(ents, i, k), cursor, layout, [ents[i]], rng)
        if new is not None:
            return new, ents[i][0]
    groups = _legal_groups(ents, cursor, layout, frozen=set())
    if groups:
        return collapse_at(ents, int(rng.choice(groups)), k), -1
    return list(ents), -1


def random_edits(
    ents: Entries, cursor: int, layout: Layout, edits: int, rng: np.random.Generator
) -> Entries:
    """``ents`` after random legal edits (``random_variant``) making ``edits`` elementary edits
    (an expansion or a collapse each, as the allocator counts them): a variant that would
    exceed the count is drawn again, and the edits stop early only where none is legal."""
    k = layout.block_size
    made, misses = 0, 0
    while made < edits and misses < 64:
        if not _expandable(ents, cursor, layout) and not _legal_groups(ents, cursor, layout, set()):
            break
        new, lod = random_variant(ents, cursor, layout, rng)
        # An expansion adds K - 1 entries and each collapse that made room removes K - 1.
        cost = 1 if lod < 0 else 1 + (len(ents) + k - 1 - len(new)) // (k - 1)
        if new == ents or made + cost > edits:
            misses += 1  # the coin chose an edit that cannot be made, or one too many
            continue
        made, misses, ents = made + cost, 0, new
    return ents


def _descend(ents: Entries, token: int, k: int) -> tuple[Entries, tuple[int, int]]:
    """``ents`` with the entry over ``token`` expanded, then the child over it, down to LOD0;
    returns it and the (lod, start) of the entry first expanded (lod 0: nothing to do)."""
    i = max(j for j, (_, s) in enumerate(ents) if s <= token)
    root = ents[i]
    for lod in range(root[0], 0, -1):
        ents = expand_at(ents, i, k)
        i += (token - ents[i][1]) // k ** (lod - 1)
    return ents, root


def bring_to_lod0(
    ents: Entries, tokens: tuple[int, ...], cursor: int, layout: Layout, rng: np.random.Generator
) -> tuple[Entries, int] | None:
    """``ents`` with each of ``tokens`` at LOD0: the gist over it expanded, then the child over it,
    down to LOD0, collapsing random sibling groups outside those gists' spans while over budget.
    Returns it and the coarsest lod expanded (0: all were tokens already), or None where a token
    is older than the context's first entry or the budget cannot make room."""
    if not ents or min(tokens) < ents[0][1]:
        return None
    new, roots = list(ents), []
    for t in tokens:
        new, root = _descend(new, t, layout.block_size)
        roots.append(root)
    new = _make_room(new, cursor, layout, roots, rng)
    return None if new is None else (new, max(l for l, _ in roots))


def deep_variant(
    ents: Entries, cursor: int, layout: Layout, rng: np.random.Generator
) -> tuple[Entries, int] | None:
    """``ents`` with the K tokens from a random one under a gist brought to LOD0 (the one or two
    blocks they touch, by ``bring_to_lod0``). Returns it and the coarsest lod expanded, or None
    where no gist is expandable or the budget cannot make room.

    The token is uniform over the gists' spans, so a coarse gist is chosen in proportion to the
    history it covers; K tokens from it, a fact a few tokens long that straddles two blocks (a
    passkey's digits, half of the time) is read whole.
    """
    k = layout.block_size
    expandable = _expandable(ents, cursor, layout)
    if not expandable:
        return None
    spans = np.array([k ** ents[i][0] for i in expandable], np.float64)
    lod, start = ents[int(rng.choice(expandable, p=spans / spans.sum()))]
    token = start + int(rng.integers(k**lod))
    last = min(token + k - 1, cursor - layout.recent_tail - 1)
    return bring_to_lod0(ents, (token, last), cursor, layout, rng)


def to_arrays(
    contexts: list[Entries], cursor: int | list[int], layout: Layout
) -> dict[str, np.ndarray]:
    """Contexts, each followed by the S scored tokens from its ``cursor`` (one for all, or one
    per context), as a batch's ``lod``/``start``/``valid``/``context`` arrays ``[n, W]``
    (``WorkingContext.from_batch`` reads them; on the device, ``WorkingContext.with_tail`` makes
    the same layout)."""
    n, w = len(contexts), layout.capacity
    cursors = [cursor] * n if isinstance(cursor, int) else cursor
    lod = np.zeros((n, w), np.int32)
    start = np.zeros((n, w), np.int32)
    valid = np.zeros((n, w), bool)
    context = np.zeros((n, w), bool)
    for row, (ents, c) in enumerate(zip(contexts, cursors, strict=True)):
        if len(ents) > layout.context_capacity:
            raise ValueError(f"{len(ents)} context entries exceed {layout.context_capacity}")
        full = ents + [(0, t) for t in range(c, c + layout.scored)]
        lod[row, : len(full)] = [l for l, _ in full]
        start[row, : len(full)] = [s for _, s in full]
        valid[row, : len(full)] = True
        context[row, : len(ents)] = True
    return {"lod": lod, "start": start, "valid": valid, "context": context}


def needle_variant(
    ents: Entries, source: tuple[int, int], cursor: int, layout: Layout, rng: np.random.Generator
) -> tuple[Entries, int] | None:
    """``ents`` with every block of the token span ``source`` (a needle's key) at LOD0
    (``bring_to_lod0``), or None where the budget cannot hold them."""
    first, stop = source
    at = (*range(first, stop, layout.block_size), stop - 1)
    return bring_to_lod0(ents, at, cursor, layout, rng)


def training_contexts(
    cursors: list[int],
    num_random: int,
    layout: Layout,
    rng: np.random.Generator,
    deep_fraction: float = 0.0,
    sources: list[tuple[int, int]] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per example (one per cursor: where its scored tokens start): a baseline, the window,
    then ``num_random`` random variants of the baseline. With ``sources`` (per example, the
    token span of a needle's key, or ``(-1, -1)``), the first variant of an example with a
    needle brings it to LOD0 where the budget allows (``needle_variant``): a variant that
    answers the question, so LensNet sees a positive pair in every such example.

    The baseline is the pyramid, or with probability ``deep_fraction`` a ``deep_variant`` of it,
    so that LensNet also learns to score contexts focus has already changed (LOD0 blocks and
    fine gists far from the tail); each random variant is, with that probability, a
    ``deep_variant`` of the baseline, else a ``random_variant``.

    Returns arrays ``[batch, 2 + num_random, W]``, the expanded lod of each random variant
    ``[batch, num_random]`` (-1 for a collapse-only variant), and whether each baseline is the
    pyramid ``[batch]``.
    """
    order = Rows(num_random)
    pyramids: dict[int, Entries] = {}
    rows, lods, from_pyramid = [], [], []
    for row, cursor in enumerate(cursors):
        pyr = pyramids.setdefault(cursor, pyramid(cursor, layout))

        def deep_or(ents, fallback, cursor=cursor):
            if deep_fraction > 0 and rng.random() < deep_fraction:
                deep = deep_variant(ents, cursor, layout, rng)
                if deep is not None:
                    return deep
            return fallback(ents)

        base, _ = deep_or(pyr, lambda e: (e, -1))
        variants = [
            deep_or(base, lambda e, c=cursor: random_variant(e, c, layout, rng))
            for _ in range(num_random)
        ]
        source = None if sources is None else tuple(sources[row])
        if num_random and source is not None and source[0] >= 0:
            needle = needle_variant(base, source, cursor, layout, rng)
            variants[0] = variants[0] if needle is None else needle
        example = [None] * order.guided  # every row but the guided one, made in-graph
        example[order.baseline], example[order.window] = base, window(cursor, layout)
        example[order.random] = [v for v, _ in variants]
        rows.extend(example)
        lods.append([l for _, l in variants])
        from_pyramid.append(base == pyr)
    arrays = to_arrays(rows, [c for c in cursors for _ in range(order.guided)], layout)
    batch = len(cursors)
    shape = (batch, order.guided, layout.capacity)
    return (
        {k: v.reshape(shape) for k, v in arrays.items()},
        np.array(lods, np.int32).reshape(batch, num_random),
        np.array(from_pyramid),
    )


def span_layout(
    batch: int,
    num_tokens: int,
    fractions: tuple[float, ...],
    block_size: int,
    horizon: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Whole sequences in which random spans are replaced by their gists, for ``span_kl``.

    Per example, ``span_counts`` random level-l nodes (coarsest level first, never overlapping,
    never in the last block, so tokens follow every gist) stand in for their spans; every other
    token stays. All examples get the same number of entries ``L``.

    Returns ``lod``/``start`` ``[batch, L]`` and ``scored [batch, L]``: the tokens less than
    ``horizon`` tokens after the end of the gist before them, where the gists' absence shows.
    """
    k = block_size
    counts = span_counts(num_tokens, fractions, k)
    usable = gistable(num_tokens, k)
    rows = []
    for _ in range(batch):
        taken = np.zeros(num_tokens, bool)
        chosen = []
        for level in range(len(counts), 0, -1):
            span = k**level
            nodes = [s for s in range(0, usable - span + 1, span) if not taken[s : s + span].any()]
            for s in rng.choice(nodes, counts[level - 1], replace=False):
                taken[s : s + span] = True
                chosen.append((level, int(s)))
        chosen += [(0, t) for t in np.flatnonzero(~taken).tolist()]
        rows.append(sorted(chosen, key=lambda e: e[1]))
    lod = np.array([[l for l, _ in r] for r in rows], np.int32)
    start = np.array([[s for _, s in r] for r in rows], np.int32)
    gist_end = np.where(lod > 0, start + np.power(k, lod), -(10**9))
    since = start - np.maximum.accumulate(gist_end, axis=1)
    return {"lod": lod, "start": start, "scored": (lod == 0) & (since < horizon)}
