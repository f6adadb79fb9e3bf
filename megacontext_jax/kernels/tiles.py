"""Block-sparse tile lists of the mask (DESIGN section 6, the pre-pass before the kernels).

A cheap jnp pass over ``[B, T / block]`` tile summaries sorts every (query tile, key tile) pair
into one of three kinds, as FlexAttention's BlockMask and splash attention's MaskInfo do:

* ``EMPTY``: no pair of the tiles is visible (``tile_may_see`` is false); never visited;
* ``FULL``: every pair is visible (``tile_sees_all``); visited with no mask arithmetic at all;
* ``PARTIAL``: the rest; visited with ``kernels.mask.visible`` computed per pair.

Both tests are sound, so a tile pair with a visible pair is never ``EMPTY`` and a ``FULL`` one
never hides a masked pair; a tile pair that is all visible may still be listed ``PARTIAL`` when
the bounds cannot prove it (a pyramid key tile that mixes levels), which costs a mask, not an
error. The pyramid's cost thus follows its visible pairs, N*(W0 + N/K + ...), not N^2.

Layouts (int32), the tile counts padded to powers of two so that every block a kernel sees has
power-of-two dimensions (padding key tiles hold no valid key, padding query tiles end at -1 like
the padded query rows of ``kernels.mixed_attention``, so padding is always ``EMPTY``):

* key tiles ``[B, KEY_FIELDS, nk]``: rows min end, max end, min start, max start, min lod,
  max lod (over the valid keys), any valid, all valid;
* query tiles ``[B, 2, nq]``: rows min end, max end;
* ``TileLists`` for one side of the kind matrix ``[B, n, n_other]``: ``lists [B, n, n_other]``,
  per tile the indices of its partial tiles of the other side, then of its full ones, each group
  ascending, padded with 0; ``counts [B, 2, n]``: rows number partial, number partial + full;
  ``order [B, n]``: the tiles by descending number listed (ties ascending), the order in which
  the Triton launchers hand tiles to programs, so the heaviest start first and the last programs
  of a launch are the lightest. The forward and dq take the query-tile lists, dk/dv the key-tile
  lists (the transpose).
* ``work_list``: the lists of every tile of one side flattened into one walk ``[B,
  WORK_FIELDS, steps]`` (rows own tile, other tile, head of the GQA group, flags), for the TPU
  kernels, whose grid is static: the walk's length follows the listed tiles, not ``n * n_other``,
  and ``walk_sizes`` gives the few static lengths a launcher chooses among.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from megacontext_jax.kernels.mask import FAR, Entries, MaskSpec, bands

# min end, max end, min start, max start, min lod, max lod, any valid, all valid
KEY_FIELDS = 8
PARTIAL, FULL, EMPTY = 0, 1, 2  # tile kinds, numbered in list order
# A work list's rows, and the bits of its flags row.
OWN, OTHER, HEAD, FLAGS = range(4)
WORK_FIELDS = 4
MASKED, UNMASKED, FIRST, LAST = 1, 2, 4, 8


class TileLists(NamedTuple):
    """Per tile of one side, the tiles of the other side to visit (layout in the module doc)."""

    lists: jax.Array
    counts: jax.Array
    order: jax.Array

    def first(self, n: int) -> "TileLists":
        """The lists of the first ``n`` tiles (the real ones, before the power-of-two padding,
        which lists nothing and comes last in ``order``)."""
        return TileLists(self.lists[:, :n], self.counts[..., :n], self.order[:, :n])


def _pow2_tiles(summary: jax.Array, fill: int) -> jax.Array:
    """Pads ``[B, r, n]`` to ``[B, r, 2^k >= n]`` with ``fill``."""
    n = summary.shape[-1]
    return jnp.pad(summary, ((0, 0), (0, 0), (0, pl.next_power_of_2(n) - n)), constant_values=fill)


def key_tile_bounds(meta: Entries, block: int) -> jax.Array:
    """``[B, KEY_FIELDS, nk]`` bounds of the key tiles of ``meta`` (``T`` a multiple of
    ``block``); invalid keys are left out of the min / max bounds."""
    b, t = meta.lod.shape
    shape = (b, t // block, block)
    valid = meta.valid.reshape(shape)
    big = jnp.int32(FAR)

    def masked(x, fill):
        return jnp.where(valid, x.reshape(shape), fill)

    summary = jnp.stack(
        [
            masked(meta.end, big).min(-1),
            masked(meta.end, -big).max(-1),
            masked(meta.start, big).min(-1),
            masked(meta.start, -big).max(-1),
            masked(meta.lod, big).min(-1),
            masked(meta.lod, -1).max(-1),
            valid.any(-1).astype(jnp.int32),
            valid.all(-1).astype(jnp.int32),
        ],
        axis=1,
    )
    return _pow2_tiles(summary, 0)


def query_tile_bounds(q_end: jax.Array, block: int) -> jax.Array:
    """``[B, 2, nq]`` min and max query end per query tile of ``q_end [B, Tq]``."""
    b, t = q_end.shape
    tiles = q_end.reshape(b, t // block, block)
    return _pow2_tiles(jnp.stack([tiles.min(-1), tiles.max(-1)], axis=1), -1)


def tile_may_see(
    q_min_end: jax.Array, q_max_end: jax.Array, key_tile: tuple, spec: MaskSpec
) -> jax.Array:
    """May any query of a tile (ends in ``[q_min_end, q_max_end]``) see any key of the tile whose
    ``KEY_FIELDS`` bounds are ``key_tile``? Bool, the broadcast shape of its arguments; sound
    (true whenever some pair is visible), not exact."""
    k_min_end, _, _, k_max_start, k_min_lod, k_max_lod, k_any, _ = key_tile
    ok = (k_any > 0) & (k_min_end <= q_max_end)
    if spec.kind == "pyramid":
        # The band bounds are non-decreasing in the query end: the loosest lower bound is the
        # min query end's, the loosest upper bound the max query end's.
        lows, highs = bands(q_min_end, spec), bands(q_max_end, spec)
        some = False
        for level in range(spec.max_level + 1):
            some = some | (
                (k_min_lod <= level)
                & (level <= k_max_lod)
                & (k_max_start >= lows[level][0])
                & (k_min_end <= highs[level][1])
            )
        ok = ok & some
    return ok


def tile_sees_all(
    q_min_end: jax.Array, q_max_end: jax.Array, key_tile: tuple, spec: MaskSpec
) -> jax.Array:
    """Does every query of a tile (ends in ``[q_min_end, q_max_end]``) see every key of the tile
    whose ``KEY_FIELDS`` bounds are ``key_tile``? Bool, the broadcast shape of its arguments;
    true only if ``kernels.mask.visible`` holds for every pair (exact for the causal masks)."""
    _, k_max_end, k_min_start, _, k_min_lod, k_max_lod, _, k_all = key_tile
    ok = (k_all > 0) & (k_max_end <= q_min_end)
    if spec.kind == "pyramid":
        # Keys of one level L only; the band bounds are non-decreasing in the query end, so the
        # tightest lower bound over the tile is the max query end's and the tightest upper bound
        # the min query end's.
        lows, highs = bands(q_max_end, spec), bands(q_min_end, spec)
        one = False
        for level in range(spec.max_level + 1):
            one = one | (
                (k_min_lod == level)
                & (k_max_lod == level)
                & (k_min_start >= lows[level][0])
                & (k_max_end <= highs[level][1])
            )
        ok = ok & one
    return ok


def tile_kinds(qt: jax.Array, kt: jax.Array, spec: MaskSpec) -> jax.Array:
    """``[B, nq, nk]`` int32 kind (``PARTIAL``, ``FULL``, ``EMPTY``) of every tile pair, from
    query-tile bounds ``qt`` and key-tile bounds ``kt``."""
    key_tile = tuple(kt[:, f, None, :] for f in range(KEY_FIELDS))
    q_min, q_max = qt[:, 0, :, None], qt[:, 1, :, None]
    may = tile_may_see(q_min, q_max, key_tile, spec)
    full = may & tile_sees_all(q_min, q_max, key_tile, spec)
    return jnp.where(full, FULL, jnp.where(may, PARTIAL, EMPTY)).astype(jnp.int32)


def tile_lists(kinds: jax.Array) -> TileLists:
    """The ``TileLists`` of the rows of ``kinds [B, n, n_other]``: pass ``tile_kinds`` for the
    query-tile lists, its transpose ``swapaxes(1, 2)`` for the key-tile lists."""
    # A stable sort by kind lists the partial tiles, then the full ones, each ascending.
    order = jnp.argsort(kinds, axis=-1, stable=True).astype(jnp.int32)
    partial = jnp.sum(kinds == PARTIAL, axis=-1, dtype=jnp.int32)
    listed = partial + jnp.sum(kinds == FULL, axis=-1, dtype=jnp.int32)
    slots = jnp.arange(kinds.shape[-1], dtype=jnp.int32)
    lists = jnp.where(slots < listed[..., None], order, 0)
    heavy_first = jnp.argsort(-listed, axis=-1, stable=True).astype(jnp.int32)
    return TileLists(lists, jnp.stack([partial, listed], axis=1), heavy_first)


def walk_sizes(n: int, n_other: int, repeat: int = 1) -> tuple[int, ...]:
    """The static lengths, ascending, a launcher may give the walk of ``work_list`` over ``n``
    tiles with lists of at most ``n_other`` (``repeat`` times each): the longest walk it can
    need, then quarters of it down to a 64th, none below ``n`` (each tile takes a step)."""
    longest = n * n_other * repeat
    return tuple(sorted({max(n, longest >> (2 * k)) for k in range(4)}))


def walk_length(lists: TileLists, repeat: int = 1) -> jax.Array:
    """Steps of the longest batch row's walk (int32 scalar): each tile takes its listed tiles
    ``repeat`` times, and one step if it lists none (to write its output)."""
    return jnp.max(jnp.sum(jnp.maximum(lists.counts[:, 1] * repeat, 1), axis=-1))


def work_list(lists: TileLists, steps: int, repeat: int = 1) -> jax.Array:
    """The walk over every tile of one side, ``[B, WORK_FIELDS, steps]`` int32 (needs ``steps
    >= walk_length(lists, repeat)``).

    Tiles in ascending order; each takes its listed tiles (partial, then full) ``repeat`` times
    over, the ``HEAD`` row counting the repeats (a GQA group's query heads for dk/dv), so that
    accumulators follow a tile's steps in a row. Flags: ``MASKED`` / ``UNMASKED`` mark a step
    that computes with or without the mask, ``FIRST`` / ``LAST`` a tile's first and last step
    (initialise, write out); a tile with an empty list gets one step that computes nothing.
    Steps past the walk's end repeat its last step's tiles and carry no flag, so a pipeline
    fetches nothing new and nothing is written again.
    """
    partial, listed = lists.counts[:, 0], lists.counts[:, 1]  # [B, n]
    per_tile = jnp.maximum(listed * repeat, 1)
    ends = jnp.cumsum(per_tile, axis=-1)
    total = ends[:, -1:]
    step = jnp.arange(steps, dtype=jnp.int32)[None]
    real = step < total
    s = jnp.minimum(step, total - 1)
    own = jax.vmap(lambda e, x: jnp.searchsorted(e, x, side="right"))(ends, s).astype(jnp.int32)

    def at(x, idx):
        return jnp.take_along_axis(x, idx, axis=-1)

    j = s - at(ends - per_tile, own)  # the step within its tile
    count, n_partial = at(listed, own), at(partial, own)
    head, entry = j // jnp.maximum(count, 1), j % jnp.maximum(count, 1)
    rows = lists.lists.reshape(lists.lists.shape[0], -1)
    other = jnp.take_along_axis(rows, own * lists.lists.shape[-1] + entry, axis=-1)
    computes = real & (count > 0)
    flags = (
        jnp.where(computes & (entry < n_partial), MASKED, 0)
        | jnp.where(computes & (entry >= n_partial), UNMASKED, 0)
        | jnp.where(real & (j == 0), FIRST, 0)
        | jnp.where(real & (j == at(per_tile, own) - 1), LAST, 0)
    )
    return jnp.stack([own, other, head, flags], axis=1).astype(jnp.int32)


def pass_lists(
    q_end: jax.Array, k_meta: Entries, block_q: int, block_k: int, spec: MaskSpec
) -> tuple[TileLists, TileLists]:
    """The query-tile lists (forward, dq) and key-tile lists (dk/dv) of one pass over query
    ends ``q_end [B, Tq]`` and keys ``k_meta``, in tiles of ``block_q`` x ``block_k``."""
    kinds = tile_kinds(query_tile_bounds(q_end, block_q), key_tile_bounds(k_meta, block_k), spec)
    return tile_lists(kinds), tile_lists(jnp.swapaxes(kinds, 1, 2))
