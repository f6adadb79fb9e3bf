"""Entry metadata and the masks it decides (DESIGN section 6), for the kernels and the reference.

Every entry (a token or a gist) carries metadata (``Entries``): ``lod``, ``start``, ``end``
(= start + K^lod), ``valid``, and its Gaussian-RoPE ``mu`` / ``sigma`` (``kernels.rope``). The
metadata alone decides who sees whom (``MaskSpec.kind``):

* ``wc_causal``: key k is visible to query q iff k is valid and ``end_k <= end_q``. WC entries
  tile time in order, so this is the causal mask of the working context.
* ``decode``: the same rule with queries that are the newest entries and keys from a KV cache
  (``q_len != kv_len``).
* ``pyramid``: every token and gist of a sequence at once; query q sees exactly one
  representation of each past region: LOD0 within ``window`` tokens (back to a K-aligned bound),
  then ``window`` LOD1 gists (back to a K^2-aligned bound), and so on; the coarsest level covers
  the rest. Never a key whose span ends after ``end_q``.

``visible`` is that rule in jnp on any leading shape: the reference builds its dense mask with it
and the kernels call it (the TPU kernels its 2-D form ``pairs_visible``) on each tile they visit,
so the two cannot disagree.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from megacontext_jax.kernels.rope import span_positions

MASKS = ("wc_causal", "decode", "pyramid")
FAR = 1 << 30  # a bound no position reaches


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static mask parameters: kind, and for ``pyramid`` the band width, K and top level."""

    kind: str = "wc_causal"
    window: int = 0
    block_size: int = 2
    max_level: int = 0

    def __post_init__(self):
        if self.kind not in MASKS:
            raise ValueError(f"unknown mask {self.kind!r}; expected one of {MASKS}")
        if self.kind == "pyramid" and (self.window < 1 or self.block_size < 2):
            raise ValueError("the pyramid mask needs window >= 1 and block_size >= 2")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Entries:
    """Per-entry metadata, each ``[B, T]``: int32 lod/start/end, bool valid, float32 mu/sigma."""

    lod: jax.Array
    start: jax.Array
    end: jax.Array
    valid: jax.Array
    mu: jax.Array
    sigma: jax.Array

    @classmethod
    def make(cls, lod, start, valid, block_size: int, sigma_scale: float = 12**-0.5) -> "Entries":
        """Metadata of tree nodes ``(lod, start)`` with their DESIGN section 5 positions."""
        lod, start = jnp.asarray(lod, jnp.int32), jnp.asarray(start, jnp.int32)
        mu, sigma = span_positions(lod, start, block_size, sigma_scale)
        end = start + jnp.power(block_size, lod)
        return cls(lod, start, end, jnp.asarray(valid, bool), mu, sigma)

    @classmethod
    def tokens(cls, batch: int, length: int, offset: int = 0) -> "Entries":
        """Plain tokens at positions ``offset .. offset + length - 1`` (all valid)."""
        start = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + offset, (batch, length))
        return cls.make(jnp.zeros_like(start), start, jnp.ones_like(start, bool), 2)

    def fit(self, batch: int, length: int, name: str) -> "Entries":
        """As ``[batch, length]``: one row broadcasts to every batch row; any other shape is an
        error (a compiled kernel would read metadata rows that do not exist)."""
        shape = jnp.shape(self.lod)
        if len(shape) != 2 or shape[1] != length or shape[0] not in (1, batch):
            raise ValueError(
                f"{name} metadata is {shape}; expected ({batch}, {length}) or (1, {length})"
            )
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, length)), self)

    def padded(self, length: int, end_fill: int) -> "Entries":
        """``[B, length]``: invalid entries appended, ending at ``end_fill`` (-1 for padded
        queries, which then see nothing; ``FAR`` for padded keys, which no query sees)."""

        def pad(x, value=0):
            return jnp.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=value)

        return Entries(
            pad(self.lod), pad(self.start), pad(self.end, end_fill), pad(self.valid, False),
            pad(self.mu), pad(self.sigma),
        )  # fmt: skip

    def zero_cotangent(self) -> "Entries":
        """The cotangent of metadata, which no output depends on differentiably: zeros (float0
        for the integer and bool fields)."""

        def zero(x):
            if jnp.issubdtype(x.dtype, jnp.floating):
                return jnp.zeros_like(x)
            return np.zeros(x.shape, jax.dtypes.float0)

        return jax.tree.map(zero, self)


def bands(end: jax.Array, spec: MaskSpec) -> list[tuple[jax.Array, jax.Array]]:
    """``(lower, upper)`` token bounds of each level's pyramid band, for queries ending at
    ``end``."""
    k, bounds, upper = spec.block_size, [], end
    for level in range(spec.max_level + 1):
        if level == spec.max_level:
            lower = jnp.zeros_like(end)
        else:
            align = k ** (level + 1)
            lower = jnp.maximum(upper - spec.window * k**level, 0) // align * align
        bounds.append((lower, upper))
        upper = lower
    return bounds


def visible(
    q_end: jax.Array,
    k_lod: jax.Array,
    k_start: jax.Array,
    k_end: jax.Array,
    k_valid: jax.Array,
    spec: MaskSpec,
) -> jax.Array:
    """``[..., Tq, Tk]`` bool from query ends ``[..., Tq]`` and key metadata ``[..., Tk]``."""
    keys = (x[..., None, :] for x in (k_lod, k_start, k_end, k_valid))
    return pairs_visible(q_end[..., :, None], *keys, spec)


def pairs_visible(
    q_end: jax.Array,
    k_lod: jax.Array,
    k_start: jax.Array,
    k_end: jax.Array,
    k_valid: jax.Array,
    spec: MaskSpec,
) -> jax.Array:
    """The same rule on arguments that broadcast to the pairs' shape, e.g. query ends ``[Tq, 1]``
    and key rows ``[1, Tk]`` (the 2-D form the TPU kernels keep their tiles in)."""
    mask = k_valid & (k_end <= q_end)
    if spec.kind == "pyramid":
        lower, upper = jnp.full(mask.shape, FAR, jnp.int32), jnp.full(mask.shape, -1, jnp.int32)
        for level, (lo, hi) in enumerate(bands(q_end, spec)):
            lower = jnp.where(k_lod == level, lo, lower)
            upper = jnp.where(k_lod == level, hi, upper)
        mask = mask & (k_start >= lower) & (k_end <= upper)
    return mask
