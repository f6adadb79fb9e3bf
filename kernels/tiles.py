"""Per-tile bounds of the mask: which tiles may see anything (DESIGN section 6, the pre-pass).

Tiles with no visible pair are skipped: each key tile's ``min end``, ``max start`` and lod range
and each query tile's end range bound the mask (``kernels.mask.visible``); each kernel program
loops over the range of tiles that may see anything (a prefix for the causal masks) and skips the
empty tiles inside it, so the pyramid's cost follows its visible pairs (in a level-major layout,
each band is a few contiguous tiles), not N^2.

The bounds are sound (a tile pair with a visible entry pair always ``tile_may_see``) and cheap:
jnp over ``[B, T / block]`` summaries, run before the kernels. DESIGN section 6's block-sparse tile
lists (partially / fully visible tiles per query tile, as splash attention's MaskInfo) will
replace this pre-pass.

Layouts, each padded with zero tiles (no valid key, hence never visited) to a power-of-two tile
count so that every block the kernels see has power-of-two dimensions:

* key tiles ``[B, KEY_ROWS, nk]`` int32: rows min end, max start, min lod, max lod, any valid
  (``KEY_FIELDS`` rows; the rest is padding);
* query tiles ``[B, 2, nq]`` int32: rows min end, max end;
* visit ranges ``[B, 2, n]`` int32: first and past-last tile of the other side.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.mask import FAR, Entries, MaskSpec, bands

KEY_FIELDS = 5  # min end, max start, min lod, max lod, any valid
KEY_ROWS = 8  # KEY_FIELDS padded to a power of two


def _pow2_tiles(summary: jax.Array, rows: int) -> jax.Array:
    """Pads ``[B, r, n]`` to ``[B, rows, 2^k >= n]`` with zeros: padding tiles hold no valid key."""
    r, n = summary.shape[1:]
    return jnp.pad(summary, ((0, 0), (0, rows - r), (0, pl.next_power_of_2(n) - n)))


def key_tile_bounds(meta: Entries, block: int) -> jax.Array:
    """``[B, KEY_ROWS, nk]`` bounds of the key tiles of ``meta`` (``T`` a multiple of ``block``);
    invalid keys are left out of each bound."""
    b, t = meta.lod.shape
    shape = (b, t // block, block)
    valid = meta.valid.reshape(shape)
    big = jnp.int32(FAR)

    def masked(x, fill):
        return jnp.where(valid, x.reshape(shape), fill)

    summary = jnp.stack(
        [
            masked(meta.end, big).min(-1),
            masked(meta.start, -big).max(-1),
            masked(meta.lod, big).min(-1),
            masked(meta.lod, -1).max(-1),
            valid.any(-1).astype(jnp.int32),
        ],
        axis=1,
    )
    return _pow2_tiles(summary, KEY_ROWS)


def query_tile_bounds(q_end: jax.Array, block: int) -> jax.Array:
    """``[B, 2, nq]`` min and max query end per query tile of ``q_end [B, Tq]``."""
    b, t = q_end.shape
    tiles = q_end.reshape(b, t // block, block)
    return _pow2_tiles(jnp.stack([tiles.min(-1), tiles.max(-1)], axis=1), 2)


def tile_may_see(
    q_min_end: jax.Array, q_max_end: jax.Array, key_tile: tuple, spec: MaskSpec
) -> jax.Array:
    """May any query of a tile (ends in ``[q_min_end, q_max_end]``) see any key of the tile whose
    ``KEY_FIELDS`` bounds are ``key_tile``? Bool, the broadcast shape of its arguments."""
    k_min_end, k_max_start, k_min_lod, k_max_lod, k_any = key_tile
    ok = (k_any > 0) & (k_min_end <= q_max_end)
    if spec.kind == "pyramid":
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


def visit_ranges(qt: jax.Array, kt: jax.Array, spec: MaskSpec) -> tuple[jax.Array, jax.Array]:
    """``[B, 2, nq]`` first and past-last key tile each query tile may see, and ``[B, 2, nk]``
    the same for the query tiles of each key tile (empty ranges are ``[0, 0)``). The kernels
    loop over these ranges only (and still skip the tiles inside them that see nothing)."""
    rows = tuple(kt[:, f, None, :] for f in range(KEY_FIELDS))
    may = tile_may_see(qt[:, 0, :, None], qt[:, 1, :, None], rows, spec)  # [B, nq, nk]

    def ranges(m):
        n = m.shape[-1]
        first, last = jnp.argmax(m, -1), n - jnp.argmax(m[..., ::-1], -1)
        some = m.any(-1)
        return jnp.stack([jnp.where(some, first, 0), jnp.where(some, last, 0)], 1)

    return ranges(may).astype(jnp.int32), ranges(jnp.swapaxes(may, 1, 2)).astype(jnp.int32)
