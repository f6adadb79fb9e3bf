"""The Working Context: a fixed-capacity sequence of tokens and gists that tiles the history.

Arrays of capacity W (static shapes for ``jit``): ``lod [W]``, ``start [W]`` (first token of the
entry's span) and ``valid [W]``, with any leading batch axes. Valid entries are packed at the
front, past to present. ``WorkingContext`` is the one form of a WC in jnp and NumPy code, with
what every reader of one needs (positions, labels, the kernels' metadata); host code edits plain
``(lod, start)`` lists (``entries``, ``from_entries``). The rules (invariants, the recency pyramid,
legal edits) live in ``rules.py``.
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from megacontext_jax.kernels.mixed_attention import Entries
from megacontext_jax.specs import Layout


@flax.struct.dataclass
class WorkingContext:
    """Entries ``[..., W]`` (any leading batch and variant axes), the one form of a WC in jnp
    and NumPy code (host code also edits plain ``(lod, start)`` lists: ``entries``)."""

    lod: jax.Array  # int32 [W]: 0 for a token, l for a level-l gist
    start: jax.Array  # int32 [W]: first token of the span (tree node index = start // K^lod)
    valid: jax.Array  # bool [W]: True for the first count entries
    # bool [W]: the entries before the scored tokens, which LensNet reads and the allocator
    # edits (``with_tail``); None: every valid entry.
    context: jax.Array | None = None

    @property
    def capacity(self) -> int:
        return self.lod.shape[-1]

    @property
    def context_mask(self) -> jax.Array:
        return self.valid if self.context is None else self.context

    def span(self, block_size: int) -> jax.Array:
        return jnp.where(self.valid, block_size ** self.lod.astype(jnp.int32), 0)

    def end(self, block_size: int) -> jax.Array:
        return self.start + self.span(block_size)

    def positions(self, layout: Layout) -> tuple[jax.Array, jax.Array]:
        """Gaussian-RoPE ``(mu, sigma)`` float32 ``[..., W]`` in ``layout``'s position mode
        (DESIGN section 5; ``focus.positions``)."""
        return layout.positions(self.lod, self.start)

    def kernel_entries(self, layout: Layout) -> Entries:
        """The entries' metadata for a metadata-masked attention pass (``kernels``)."""
        ents = Entries.make(self.lod, self.start, self.valid, layout.block_size)
        mu, sigma = self.positions(layout)
        return dataclasses.replace(ents, mu=mu, sigma=sigma)

    def labels(
        self, tokens: jax.Array, block_size: int, ignore: tuple[int, ...]
    ) -> tuple[jax.Array, jax.Array]:
        """Each entry's label: the first token after its span, ``tokens[start + K^lod]``.

        ``tokens [B, T + 1]``; entries ``[B, ..., W]`` end at or before T. Returns labels (int32)
        and a mask that is False for invalid entries and ``ignore`` labels (PAD, BOS).
        """
        end = self.start + jnp.power(block_size, self.lod)
        b = tokens.shape[0]
        idx = jnp.where(self.valid, end, 0).reshape(b, -1)
        labels = jnp.take_along_axis(tokens, idx, axis=1).reshape(self.lod.shape)
        mask = self.valid
        for token in ignore:
            mask = mask & (labels != token)
        return labels, mask

    def only_context(self, capacity: int | None = None) -> "WorkingContext":
        """The context entries alone (``context`` becomes ``valid``), in the first ``capacity``
        slots (all of them by default)."""
        take = slice(None, capacity)
        return WorkingContext(
            self.lod[..., take], self.start[..., take], self.context_mask[..., take]
        )

    def with_tail(self, cursor: int | jax.Array, scored: int, capacity: int) -> "WorkingContext":
        """These context entries ``[..., Wc]`` followed by the ``scored`` tokens
        ``[cursor, cursor + scored)`` at LOD0, in ``capacity`` slots. ``cursor``: one for all,
        or one per context of the leading axes (``[B]`` for contexts ``[B, ..., Wc]``)."""
        pad = [(0, 0)] * (self.lod.ndim - 1) + [(0, capacity - self.capacity)]
        lod, start, ctx = (jnp.pad(a, pad) for a in (self.lod, self.start, self.valid))
        tail = jnp.arange(capacity) - ctx.sum(-1, keepdims=True)
        is_tail = (tail >= 0) & (tail < scored)
        cursor = jnp.asarray(cursor, jnp.int32)
        cursor = cursor.reshape(cursor.shape + (1,) * (lod.ndim - cursor.ndim))
        return WorkingContext(
            lod=jnp.where(is_tail, 0, lod),
            start=jnp.where(is_tail, cursor + tail, start),
            valid=ctx | is_tail,
            context=ctx,
        )

    def as_batch(self, prefix: str = "") -> dict[str, jax.Array]:
        """The fields as named arrays of a training batch (``from_batch`` reads them back)."""
        fields = {"lod": self.lod, "start": self.start, "valid": self.valid}
        if self.context is not None:
            fields["context"] = self.context
        return {prefix + name: value for name, value in fields.items()}

    @classmethod
    def from_batch(cls, batch: dict[str, jax.Array], prefix: str = "") -> "WorkingContext":
        lod = batch[prefix + "lod"]
        valid = batch.get(prefix + "valid")
        return cls(
            lod,
            batch[prefix + "start"],
            jnp.ones(lod.shape, bool) if valid is None else valid,
            batch.get(prefix + "context"),
        )


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
