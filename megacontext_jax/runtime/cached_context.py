"""The base model's KV cache over a working context, kept across refocus edits (DESIGN section 8).

An edit changes the WC from its first changed entry onward; every entry before it keeps its cached
keys and values, and only the suffix is recomputed. Suffix lengths are padded to powers of two so
the decode step compiles a handful of times, not once per edit; the cache holds ``2 W`` slots so a
padded write never runs off its end.
"""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megacontext_jax.focus.positions import Positions
from megacontext_jax.nets.gpt import GPT

Entry = tuple[int, int]  # (lod, start)


@partial(nnx.jit, donate_argnames=("cache",), static_argnames=("positions",))
def _run_suffix(model: GPT, cache, index, embeddings, lod, start, positions: Positions):
    mu, sigma = positions(lod, start, first_slot=index)
    return model.decode(cache, index, embeddings=embeddings, mu=mu, sigma=sigma)


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class CachedContext:
    """Keeps ``model``'s KV cache in step with a working context of at most ``capacity`` entries.

    Entries are identified by ``(lod, start)``; ``positions`` gives their Gaussian-RoPE
    positions (from the entry, or from its slot). ``update`` returns the logits ``[V]`` of the last entry and
    how many entries it had to recompute.
    """

    def __init__(self, model: GPT, capacity: int, positions: Positions):
        self.model, self.capacity, self.positions = model, capacity, positions
        self.cache = model.init_cache(1, 2 * capacity)
        self.entries: list[Entry] = []
        self.last_logits = None

    def update(
        self, entries: list[Entry], embed: Callable[[list[Entry]], np.ndarray]
    ) -> tuple[jax.Array, int]:
        """Brings the cache to ``entries``; ``embed(suffix)`` gives the ``[n, D]`` input embeddings
        of the entries it must recompute (only those are asked for).

        Returns the last entry's logits and the number of entries recomputed.
        """
        n = len(entries)
        if not 0 < n <= self.capacity:
            raise ValueError(
                f"a working context of {n} entries does not fit capacity {self.capacity}"
            )
        first = next(
            (
                i
                for i, (old, new) in enumerate(zip(self.entries, entries, strict=False))
                if old != new
            ),
            min(len(self.entries), n),
        )
        if first == n and n == len(self.entries):
            return self.last_logits, 0
        first = min(first, n - 1)  # always run at least the last entry, for its logits
        count = n - first
        pad = _bucket(count)
        suffix = entries[first:]
        embeddings = embed(suffix)
        emb = np.zeros((1, pad, embeddings.shape[-1]), np.float32)
        emb[0, :count] = embeddings
        lod_start = np.zeros((2, 1, pad), np.int32)
        lod_start[:, 0, :count] = np.array(suffix, np.int32).T
        logits, self.cache = _run_suffix(
            self.model,
            self.cache,
            jnp.int32(first),
            emb,
            lod_start[0],
            lod_start[1],
            self.positions,
        )
        self.entries = list(entries)
        self.last_logits = logits[0, count - 1]
        return self.last_logits, count
