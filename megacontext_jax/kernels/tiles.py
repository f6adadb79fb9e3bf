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
  ascending, padded with 0; ``counts [B, 2, n]``: rows number partial, number partial + full.
  The forward and dq take the query-tile lists, dk/dv the key-tile lists (the transpose).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from megacontext_jax.kernels.mask import FAR, Entries, MaskSpec, bands

# min end, max end, min start, max start, min lod, max lod, any valid, all valid
KEY_FIELDS = 8
PARTIAL, FULL, EMPTY = 0, 1, 2  # tile kinds, numbered in list order


class TileLists(NamedTuple):
    """Per tile of one side, the tiles of the other side to visit (layout in the module doc)."""

    lists: jax.Array
    counts: jax.Array


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
    return TileLists(lists, jnp.stack([partial, listed], axis=1))


def pass_lists(
    q_end: jax.Array, k_meta: Entries, block_q: int, block_k: int, spec: MaskSpec
) -> tuple[TileLists, TileLists]:
    """The query-tile lists (forward, dq) and key-tile lists (dk/dv) of one pass over query
    ends ``q_end [B, Tq]`` and keys ``k_meta``, in tiles of ``block_q`` x ``block_k``."""
    kinds = tile_kinds(query_tile_bounds(q_end, block_q), key_tile_bounds(k_meta, block_k), spec)
    return tile_lists(kinds), tile_lists(jnp.swapaxes(kinds, 1, 2))
