"""The Working Context: a fixed-capacity sequence of tokens and gists that tiles the history.

Arrays of capacity W (static shapes for ``jit``): ``lod [W]``, ``start [W]`` (first token of the
entry's span) and ``valid [W]``. Valid entries are packed at the front, past to present. ``check``
enforces the five invariants of DESIGN section 4 (coverage, alignment, order, budget, recent tail).
``recency_pyramid`` assembles the default WC; ``expand`` / ``collapse`` are the jit-able edits the
allocator applies.
"""

import heapq
import itertools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


class WCInvariantError(AssertionError):
    """A working context that breaks an invariant; the message names it."""


@flax.struct.dataclass
class WorkingContext:
    lod: jax.Array  # int32 [W]: 0 for a token, l for a level-l gist
    start: jax.Array  # int32 [W]: first token of the span (tree node index = start // K^lod)
    valid: jax.Array  # bool [W]: True for the first count entries

    @property
    def capacity(self) -> int:
        return self.lod.shape[-1]

    def span(self, block_size: int) -> jax.Array:
        return jnp.where(self.valid, block_size ** self.lod.astype(jnp.int32), 0)

    def end(self, block_size: int) -> jax.Array:
        return self.start + self.span(block_size)


def from_entries(entries: list[tuple[int, int]], capacity: int) -> WorkingContext:
    """A WC holding ``(lod, start)`` entries (in order) in arrays of ``capacity``."""
    if len(entries) > capacity:
        raise ValueError(f"{len(entries)} entries exceed the capacity {capacity}")
    lod = np.zeros(capacity, np.int32)
    start = np.zeros(capacity, np.int32)
    for i, (l, s) in enumerate(entries):
        lod[i], start[i] = l, s
    valid = np.arange(capacity) < len(entries)
    return WorkingContext(jnp.asarray(lod), jnp.asarray(start), jnp.asarray(valid))


def entries(wc: WorkingContext) -> list[tuple[int, int]]:
    """The valid ``(lod, start)`` entries, in order."""
    lod, start, valid = (np.asarray(a) for a in (wc.lod, wc.start, wc.valid))
    return [(int(l), int(s)) for l, s in zip(lod[valid], start[valid], strict=True)]


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


PYRAMIDS = ("recent", "proportional")


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


def _shift(values: jax.Array, index: jax.Array, delta: int, fill) -> jax.Array:
    """``out[p] = values[p - delta]`` for ``p > index`` (``delta`` may be negative), else ``values[p]``."""
    p = jnp.arange(values.shape[0])
    source = jnp.where(p > index, p - delta, p)
    inside = (source >= 0) & (source < values.shape[0])
    moved = values[jnp.clip(source, 0, values.shape[0] - 1)]
    return jnp.where(inside, moved, jnp.asarray(fill, values.dtype))


def expand(wc: WorkingContext, index: jax.Array, block_size: int) -> WorkingContext:
    """Replaces gist ``index`` by its K children. The caller ensures ``count + K - 1 <= W``."""
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
