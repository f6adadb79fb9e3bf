"""The rules of working contexts, in one place (DESIGN section 4): the five invariants
(``check``), the recency pyramid, and the expand / collapse edits with their legality.

Each rule is written once per form: for host ``(lod, start)`` lists (the training variants and
the decode session) and, vectorized, for ``WorkingContext`` arrays (the jit-able allocator);
``tests/test_working_context.py`` checks that the two forms agree.
"""

import heapq
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from megacontext_jax.focus.working_context import WorkingContext, entries, from_entries
from megacontext_jax.specs import PYRAMIDS

Entries = list[tuple[int, int]]


def coarsest_cover(num_tokens: int, block_size: int, max_level: int) -> list[tuple[int, int]]:
    """The fewest tree nodes that tile ``[0, num_tokens)``: the base-K digits of N, coarse first."""
    cover, pos = [], 0
    for level in range(max_level, -1, -1):
        span = block_size**level
        while pos + span <= num_tokens:
            cover.append((level, pos))
            pos += span
    return cover


def _children(lod: int, start: int, block_size: int) -> list[tuple[int, int]]:
    span = block_size ** (lod - 1)
    return [(lod - 1, start + j * span) for j in range(block_size)]


def _with_tail(
    cover: list[tuple[int, int]], num_tokens: int, block_size: int, tail: int
) -> list[tuple[int, int]]:
    """Expands every gist that overlaps the recent tail ``[N - R, N)`` down to tokens."""
    out, stack = [], list(reversed(cover))
    while stack:
        lod, start = stack.pop()
        if lod > 0 and start + block_size**lod > num_tokens - tail:
            stack.extend(reversed(_children(lod, start, block_size)))
        else:
            out.append((lod, start))
    return out


def min_entries(num_tokens: int, block_size: int, max_level: int, tail: int) -> int:
    """Entries needed to cover all history with the tail at LOD0; more than W forces a horizon."""
    cover = coarsest_cover(num_tokens, block_size, max_level)
    return len(_with_tail(cover, num_tokens, block_size, tail))


def expand_priority(
    shape: str, lod: int, start: int, num_tokens: int, block_size: int
) -> tuple[float, int]:
    """Sort key of a gist in the pyramid's expansion order (smallest first; ``shape`` in
    ``PYRAMIDS``). ``recent``: the newest gist first, so detail goes to the present (the raw tokens
    just before the tail are worth far more per entry than older gists, ``benchmarks/gist_value.py``).
    ``proportional``: the largest span relative to its distance, ``span / (distance + span)``, so
    detail falls off gradually and leaves finer gists in the middle for focus to expand.
    """
    span = block_size**lod
    distance = num_tokens - (start + span)
    if shape == "recent":
        return (distance, -start)
    return (-span / (distance + span), -start)


def recency_pyramid(
    num_tokens: int,
    capacity: int,
    block_size: int,
    max_level: int,
    tail: int,
    shape: str = "proportional",
) -> WorkingContext:
    """The default WC: tail at LOD0, detail falling off with distance, as full as legally possible.

    Starting from the coarsest cover, repeatedly expands the first gist in ``expand_priority``
    order while ``K - 1`` more entries fit. When even the coarsest cover exceeds ``capacity`` the
    oldest entries are dropped: the horizon is the start of the first entry kept.
    """
    if shape not in PYRAMIDS:
        raise ValueError(f"pyramid shape {shape!r}: must be one of {PYRAMIDS}")
    k = block_size
    current = _with_tail(coarsest_cover(num_tokens, k, max_level), num_tokens, k, tail)
    if len(current) > capacity:
        current = current[len(current) - capacity :]

    def item(lod: int, start: int) -> tuple:
        return (*expand_priority(shape, lod, start, num_tokens, k), lod, start)

    chosen = set(current)
    heap = [item(l, s) for l, s in current if l > 0]
    heapq.heapify(heap)
    count = len(current)
    while heap and count + k - 1 <= capacity:
        *_, lod, start = heapq.heappop(heap)
        chosen.remove((lod, start))
        for child in _children(lod, start, k):
            chosen.add(child)
            if child[0] > 0:
                heapq.heappush(heap, item(*child))
        count += k - 1
    return from_entries(sorted(chosen, key=lambda e: e[1]), capacity)


class WCInvariantError(AssertionError):
    """A working context that breaks an invariant; the message names it."""


def check(wc: WorkingContext, num_tokens: int, block_size: int, max_level: int, tail: int) -> int:
    """Raises ``WCInvariantError`` naming the first broken invariant; returns the horizon."""
    k, capacity = block_size, wc.capacity
    valid = np.asarray(wc.valid)
    count = int(valid.sum())
    if not valid[:count].all():
        raise WCInvariantError("layout: valid entries are not packed at the front")
    if count > capacity:
        raise WCInvariantError(f"budget: {count} entries exceed W={capacity}")
    ents = entries(wc)
    if num_tokens == 0:
        if ents:
            raise WCInvariantError("coverage: entries present but the history is empty")
        return 0
    if not ents:
        raise WCInvariantError("coverage: no entries for a non-empty history")
    for lod, start in ents:
        if not 0 <= lod <= max_level:
            raise WCInvariantError(f"alignment: lod {lod} outside [0, {max_level}]")
        if start % k**lod:
            raise WCInvariantError(f"alignment: start {start} not a multiple of K^{lod}")
        if start < 0 or start + k**lod > num_tokens:
            raise WCInvariantError(f"alignment: node ({lod}, {start}) is not complete in the tree")
    for (l0, s0), (_l1, s1) in itertools.pairwise(ents):
        if s1 < s0 + k**l0:
            raise WCInvariantError(f"order: entry at {s1} overlaps or precedes entry at {s0}")
        if s1 > s0 + k**l0:
            raise WCInvariantError(f"coverage: gap [{s0 + k**l0}, {s1})")
    lod, start = ents[-1]
    if start + k**lod != num_tokens:
        raise WCInvariantError(
            f"coverage: entries end at {start + k**lod}, history at {num_tokens}"
        )
    horizon = ents[0][1]
    if horizon > 0 and min_entries(num_tokens, k, max_level, tail) <= capacity:
        raise WCInvariantError(f"coverage: horizon {horizon} > 0 though all history fits in W")
    for lod, start in ents:
        if lod > 0 and start + k**lod > num_tokens - tail:
            raise WCInvariantError(
                f"recent tail: gist ({lod}, {start}) overlaps the last {tail} tokens"
            )
    return horizon


# -- host lists ----------------------------------------------------------------------------------
def collapsible_at(
    ents: Entries, i: int, cursor: int, block_size: int, max_level: int, tail: int
) -> bool:
    """Whether entries ``i .. i + K - 1`` are K aligned siblings below ``max_level`` that end
    before the recent tail ``[cursor - tail, cursor)``: a group that may collapse."""
    k = block_size
    if i + k > len(ents):
        return False
    lod, start = ents[i]
    return (
        lod < max_level
        and start % k ** (lod + 1) == 0
        and all(l == lod for l, _ in ents[i : i + k])
        and start + k ** (lod + 1) <= cursor - tail
    )


def expandable_at(ents: Entries, i: int, cursor: int, block_size: int, tail: int) -> bool:
    """Whether entry ``i`` is a gist that ends before the recent tail: one that may expand."""
    lod, start = ents[i]
    return lod > 0 and start + block_size**lod <= cursor - tail


def expand_at(ents: Entries, i: int, block_size: int) -> Entries:
    """``ents`` with gist ``i`` replaced by its K children."""
    return [*ents[:i], *_children(*ents[i], block_size), *ents[i + 1 :]]


def collapse_at(ents: Entries, i: int, block_size: int) -> Entries:
    """``ents`` with the K siblings ``i .. i + K - 1`` replaced by their parent."""
    return [*ents[:i], (ents[i][0] + 1, ents[i][1]), *ents[i + block_size :]]


# -- arrays (jit-able) -----------------------------------------------------------------------
def _window_sum(x: jax.Array, k: int) -> jax.Array:
    """``out[i] = x[i] + ... + x[i + k - 1]`` (0 where the window runs off the end)."""
    c = jnp.concatenate([jnp.zeros((1,), x.dtype), jnp.cumsum(x)])
    n = x.shape[0]
    i = jnp.arange(n)
    return jnp.where(i + k <= n, c[jnp.minimum(i + k, n)] - c[i], 0)


def window_mean(x: jax.Array, k: int) -> jax.Array:
    """``out[i]``: the mean of ``x[i .. i + k - 1]`` (a group's mean score)."""
    return _window_sum(x, k) / k


def outside_tail(wc: WorkingContext, num_tokens, block_size: int, tail: int) -> jax.Array:
    """bool ``[W]``: the valid entries that end before the recent tail ``[N - tail, N)``, the
    ones focus may edit."""
    return wc.valid & (wc.end(block_size) <= num_tokens - tail)


def legal_expansions(wc: WorkingContext, editable: jax.Array) -> jax.Array:
    """bool ``[W]``: the gists among the ``editable`` entries (``expandable_at``'s array form)."""
    return editable & (wc.lod > 0)


def legal_groups(
    wc: WorkingContext, collapsible: jax.Array, block_size: int, max_level: int
) -> jax.Array:
    """bool ``[W]``: whether the group starting at i may collapse (``collapsible_at``), given
    which entries ``collapsible [W]`` may be edited at all (outside the tail, not cooling down).

    K collapsible entries of one level below ``max_level`` whose first entry is aligned to the
    parent's span: since entries tile time in order, they are exactly the siblings.
    """
    k = block_size
    next_lod = jnp.roll(wc.lod, -1)
    same_as_next = (wc.lod == next_lod) & jnp.roll(wc.valid, -1)
    return (
        (_window_sum(collapsible.astype(jnp.int32), k) == k)
        & (_window_sum(same_as_next.astype(jnp.int32), k - 1) == k - 1)
        & (wc.start % jnp.power(k, wc.lod + 1) == 0)
        & (wc.lod < max_level)
    )


def _context_only(wc: WorkingContext) -> None:
    if wc.context is not None:  # its scored tail would not move with the edit
        raise ValueError("edits apply to a context alone (WorkingContext.only_context)")


def _shift(values: jax.Array, index: jax.Array, delta: int, fill) -> jax.Array:
    """``out[p] = values[p - delta]`` for ``p > index`` (``delta`` may be negative), else ``values[p]``."""
    p = jnp.arange(values.shape[0])
    source = jnp.where(p > index, p - delta, p)
    inside = (source >= 0) & (source < values.shape[0])
    moved = values[jnp.clip(source, 0, values.shape[0] - 1)]
    return jnp.where(inside, moved, jnp.asarray(fill, values.dtype))


def expand(wc: WorkingContext, index: jax.Array, block_size: int) -> WorkingContext:
    """Replaces gist ``index`` by its K children. The caller ensures ``count + K - 1 <= W``."""
    _context_only(wc)
    k = block_size
    lod, start = wc.lod[index], wc.start[index]
    child = jnp.arange(wc.capacity) - index
    in_block = (child >= 0) & (child < k)
    child_span = jnp.power(k, jnp.maximum(lod - 1, 0)).astype(wc.start.dtype)
    return WorkingContext(
        lod=jnp.where(in_block, lod - 1, _shift(wc.lod, index, k - 1, 0)),
        start=jnp.where(in_block, start + child * child_span, _shift(wc.start, index, k - 1, 0)),
        valid=jnp.where(in_block, True, _shift(wc.valid, index, k - 1, False)),
    )


def collapse(wc: WorkingContext, index: jax.Array, block_size: int) -> WorkingContext:
    """Replaces K aligned siblings ``index .. index + K - 1`` by their parent."""
    _context_only(wc)
    k = block_size
    first = jnp.arange(wc.capacity) == index
    return WorkingContext(
        lod=jnp.where(first, wc.lod[index] + 1, _shift(wc.lod, index, -(k - 1), 0)),
        start=jnp.where(first, wc.start[index], _shift(wc.start, index, -(k - 1), 0)),
        valid=jnp.where(first, True, _shift(wc.valid, index, -(k - 1), False)),
    )


def shift_for_expand(values: jax.Array, index: jax.Array, block_size: int, fill) -> jax.Array:
    """Per-entry side data (scores, cooldowns) moved like ``expand``; children get ``fill``."""
    child = jnp.arange(values.shape[0]) - index
    in_block = (child >= 0) & (child < block_size)
    fill = jnp.asarray(fill, values.dtype)
    return jnp.where(in_block, fill, _shift(values, index, block_size - 1, fill))


def shift_for_collapse(values: jax.Array, index: jax.Array, block_size: int, parent) -> jax.Array:
    """Per-entry side data moved like ``collapse``; the parent gets ``parent``."""
    first = jnp.arange(values.shape[0]) == index
    parent = jnp.asarray(parent, values.dtype)
    return jnp.where(first, parent, _shift(values, index, -(block_size - 1), 0))
