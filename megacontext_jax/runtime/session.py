"""The decode runtime: a MegaContext over a tree on disk, refocused as it decodes (DESIGN section 8).

Per generated token the base model decodes one new entry against its KV cache. Every
``refocus_every`` tokens (default K) decoded tokens that have left the recent tail go into the
tree (gisting every block they complete), the working context *ages* (the sibling groups
farthest from the present, relative to their span, collapse into their parents until
``W - refocus_every`` entries remain, so the next tokens fit), then LensNet scores it and the
allocator edits it. The KV cache is kept up to the first changed entry. Per-token work depends
on W and K, never on the length of the history.

Without a trained LensNet the session says so and keeps the aged recency pyramid.
"""

import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from megacontext_jax.data.tokenizer import sampleable
from megacontext_jax.focus.allocator import refocus
from megacontext_jax.focus.rules import (
    collapse_at,
    collapsible_at,
    expand_priority,
    recency_pyramid,
)
from megacontext_jax.focus.working_context import WorkingContext, entries
from megacontext_jax.megacontext import MegaContext
from megacontext_jax.memory.gister import Gister
from megacontext_jax.memory.tree import APPEND_PIECE, Tree
from megacontext_jax.runtime.cached_context import CachedContext, Entry
from megacontext_jax.runtime.sampling import SAMPLING_ARGS, check_sampling, sample_logits
from megacontext_jax.runtime.telemetry import Telemetry
from megacontext_jax.specs import AllocatorConfig, Layout


class SessionError(ValueError):
    """A session that cannot start or go on; the message says why in one line."""


def gister_for(model: MegaContext, config: ml_collections.ConfigDict) -> Gister:
    """The Gister of a MegaContext model: its base model's token embeddings and GistNet (and the
    base itself, which a contextual GistNet reads)."""
    table = model.base.embed(jnp.arange(config.model.vocab_size))
    return Gister.from_config(table, model.gistnet, config, model.base)


@partial(jax.jit, static_argnames=("lens_graph", "cfg", "layout"))
def _focus(
    lens_graph,
    cfg: AllocatorConfig,
    layout: Layout,
    lens_state,
    emb,
    lod,
    start,
    count,
    cooldown,
    n,
):
    """LensNet scores of one WC and the allocator's edits of it, packed for one transfer:
    ``[4, W]`` int32 rows lod, start, valid, cooldown, and ``[2]`` (expands, collapses)."""
    lensnet = nnx.merge(lens_graph, lens_state)
    wc = WorkingContext(lod, start, jnp.arange(lod.shape[0]) < count)
    mu, sigma = wc.positions(layout)
    batched = jax.tree.map(lambda a: a[None], wc)
    scores = lensnet(emb[None], batched, mu[None], sigma[None], wc.valid[None], n[None])[0]
    r = refocus(wc, scores, cooldown, n, cfg)
    rows = jnp.stack([r.wc.lod, r.wc.start, r.wc.valid.astype(jnp.int32), r.cooldown])
    return rows, jnp.stack([r.expands, r.collapses])


_sample = jax.jit(sample_logits, static_argnames=SAMPLING_ARGS)


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ids as ``[start, stop)`` runs of consecutive values."""
    runs = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


class Session:
    """Ingest, refocus and decode over one tree.

    Args:
      model: the MegaContext model (its base model decodes; LensNet scores).
      tree: opened for writing with this model's Gister.
      use_lens: score with LensNet and let the allocator edit; False keeps the recency pyramid.
      telemetry: gets one record per refocus.
    """

    def __init__(
        self,
        model: MegaContext,
        config: ml_collections.ConfigDict,
        tree: Tree,
        *,
        use_lens: bool = True,
        telemetry: Telemetry | None = None,
    ):
        mc = config.mc
        if tree.gister is None:
            raise SessionError("the session's tree must be opened for writing (with a Gister)")
        self.config, self.tree, self.use_lens, self.telemetry = config, tree, use_lens, telemetry
        self._sampleable = sampleable(config.model)
        self.allowed = jnp.asarray(self._sampleable)
        self.k, self.max_level, self.tail = mc.block_size, mc.max_level, mc.recent_tail
        self.pyramid = mc.pyramid
        self.capacity = mc.wc_size
        self.every = mc.refocus_every or self.k
        self.budget = self.capacity - self.every  # entries kept after a refocus
        self.layout = Layout.from_config(config)  # its positions: the same as training's
        self.alloc = AllocatorConfig.from_config(config)
        self.cached = CachedContext(model.base, self.capacity, self.layout.positions)
        self.lens_graph, self.lens_state = nnx.split(model.lensnet)
        self.pending: list[int] = []  # decoded tokens not yet in the tree
        self.entries: list[Entry] = []
        self.cooldown: dict[Entry, int] = {}
        self.since: dict[Entry, int] = {}  # refocus count when each entry entered the WC
        self.refocus_count = 0
        self.step = 0  # tokens decoded by this session
        self.new_tokens = 0  # tokens since the last refocus
        self._emb: dict[Entry, np.ndarray] = {}
        if self.num_tokens:
            self._assemble()

    @property
    def num_tokens(self) -> int:
        """History length N, decoded tokens included."""
        return self.tree.num_tokens + len(self.pending)

    @property
    def horizon(self) -> int:
        return self.entries[0][1] if self.entries else 0

    # -- ingest ----------------------------------------------------------------------------------
    def ingest(self, tokens: np.ndarray, progress: Callable[[int], None] | None = None) -> None:
        """Appends ``tokens [n]`` to the memory (committed), then brings the WC up to date.

        A short input joins the WC as tokens and is focused like decoded tokens; a long one
        re-assembles the recency pyramid over the whole history first.
        """
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            return
        self._flush()
        fits = len(self.entries) + len(tokens) <= self.capacity
        first = self.tree.num_tokens
        self.tree.append(tokens, progress)
        if fits and self.entries:
            self.entries += [(0, t) for t in range(first, self.tree.num_tokens)]
            self.refocus()
        else:
            self._assemble()

    def commit(self) -> None:
        """Publishes everything decoded so far to the tree on disk."""
        self._flush()
        self.tree.commit()

    def close(self) -> None:
        """Commits and releases the tree."""
        try:
            self.commit()
        finally:
            self.tree.close()

    # -- decode ----------------------------------------------------------------------------------
    def logits(self) -> jax.Array:
        """Next-token logits ``[V]`` given the current WC."""
        if not self.entries:
            raise SessionError("the memory is empty: give a prompt to start from")
        return self.cached.update(self.entries, self._embed)[0]

    def generate(
        self,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: tuple[int, ...] = (),
    ) -> Iterator[int]:
        """Yields up to ``max_new_tokens`` decoded ids (each joins the memory); ends after a
        ``stop`` id. Commits when done."""
        check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        key = jax.random.key(seed)
        try:
            for _ in range(max_new_tokens):
                key, sub = jax.random.split(key)
                logits = self.logits()
                token = int(_sample(logits[None], sub, self.allowed, temperature, top_k, top_p)[0])
                if not self._sampleable[token]:  # never commit PAD, BOS or a padding row
                    raise SessionError(
                        f"decoding drew id {token}, which is not a token it may draw: not "
                        "added to the memory"
                    )
                self._push(token)
                yield token
                if token in stop:
                    break
        finally:
            self.commit()

    def _push(self, token: int) -> None:
        self.entries.append((0, self.num_tokens))
        self.pending.append(token)
        self.step += 1
        self.new_tokens += 1
        if self.new_tokens >= self.every:
            self.refocus()

    # -- the working context ---------------------------------------------------------------------
    def _assemble(self) -> None:
        """The recency pyramid over the whole history, then a refocus."""
        pyramid = recency_pyramid(
            self.num_tokens, self.budget, self.k, self.max_level, self.tail, self.pyramid
        )
        self.entries = entries(pyramid)
        self.cooldown = {}
        self.refocus()

    def refocus(self) -> dict:
        """Ages the WC to the budget, lets LensNet + allocator edit it, updates the KV cache.

        Returns the telemetry record (also sent to ``telemetry``).
        """
        times, t = {}, time.perf_counter()
        # Only nodes outside the recent tail can be collapsed into or expanded, so decoded tokens
        # may wait in memory while they all sit in the tail: one GistNet call per few refocuses.
        if len(self.pending) > self.tail:
            self._flush()
        if self.tree.uncommitted >= APPEND_PIECE:  # long generations commit as they go
            self.tree.commit()
        n = self.num_tokens
        times["flush"], t = _lap(t)
        before = set(self.entries)
        ents, aged = self._age(self.entries, n)
        times["age"], t = _lap(t)
        expands = collapses = 0
        if self.use_lens:
            ents, expands, collapses = self._lens_edits(ents, n)
        times["focus"], t = _lap(t)
        self.entries = ents
        self.refocus_count += 1
        self.since = {e: self.since.get(e, self.refocus_count) for e in ents}
        self._emb = {e: v for e, v in self._emb.items() if e in self.since}
        _, recomputed = self.cached.update(ents, self._embed)
        times["cache"], _ = _lap(t)
        self.new_tokens = 0
        lods = np.array([l for l, _ in ents])
        record = {
            "refocus": self.refocus_count,
            "step": self.step,
            "num_tokens": n,
            "horizon": self.horizon,
            "count": len(ents),
            "aged": aged,
            "expands": int(expands),
            "collapses": int(collapses),
            "swap_rate": sum(e not in before for e in ents) / len(ents),
            "residency": float(np.mean([self.refocus_count - s for s in self.since.values()])),
            "recomputed": recomputed,
            "lod_hist": np.bincount(lods, minlength=self.max_level + 1).tolist(),
            "lens": self.use_lens,
            "ms": {k: round(v * 1e3, 3) for k, v in times.items()},
            "entries": [[l, s] for l, s in ents],
        }
        if self.telemetry is not None:
            self.telemetry.write(record)
        return record

    def _age(self, ents: list[Entry], n: int) -> tuple[list[Entry], int]:
        """Collapses sibling groups until ``budget`` entries remain, first the group whose parent
        comes last in the pyramid's expansion order; drops the oldest entries (the horizon) when
        nothing more can collapse."""
        ents, k, aged = list(ents), self.k, 0

        def parent_priority(i: int) -> tuple[float, int]:
            return expand_priority(self.pyramid, ents[i][0] + 1, ents[i][1], n, k)

        while len(ents) > self.budget:
            groups = [
                i
                for i in range(len(ents) - k + 1)
                if collapsible_at(ents, i, n, k, self.max_level, self.tail)
            ]
            if not groups:
                ents.pop(0)
            else:
                ents = collapse_at(ents, max(groups, key=parent_priority), k)
                aged += 1
        return ents, aged

    def _lens_edits(self, ents: list[Entry], n: int) -> tuple[list[Entry], int, int]:
        emb = np.zeros((self.budget, self.tree.meta.dim), np.float32)
        emb[: len(ents)] = self._embed(ents)
        arrays = np.zeros((3, self.budget), np.int32)  # lod, start, cooldown
        arrays[:2, : len(ents)] = np.array(ents, np.int32).T
        arrays[2, : len(ents)] = [self.cooldown.get(e, 0) for e in ents]
        rows, edits = jax.device_get(
            _focus(
                self.lens_graph,
                self.alloc,
                self.layout,
                self.lens_state,
                emb,
                arrays[0],
                arrays[1],
                np.int32(len(ents)),
                arrays[2],
                np.int32(n),
            )
        )
        count = int(rows[2].sum())
        new = [(int(l), int(s)) for l, s in zip(rows[0, :count], rows[1, :count], strict=True)]
        self.cooldown = {e: int(c) for e, c in zip(new, rows[3, :count], strict=True) if c}
        return new, int(edits[0]), int(edits[1])

    # -- entry embeddings ------------------------------------------------------------------------
    def _flush(self) -> None:
        if self.pending:
            tokens = np.asarray(self.pending, np.int32)
            self.pending = []
            self.tree.append(tokens, commit=False)

    def _embed(self, ents: list[Entry]) -> np.ndarray:
        """Input embeddings ``[n, D]`` float32 of entries: token embeddings or stored gists."""
        missing = sorted({e for e in ents if e not in self._emb})
        for lod in sorted({l for l, _ in missing}):
            span = self.k**lod
            nodes = [s // span for l, s in missing if l == lod]
            for a, b in _runs(nodes):
                rows = self._read(lod, a, b)
                for node, row in zip(range(a, b), rows, strict=True):
                    self._emb[(lod, node * span)] = row
        return np.stack([self._emb[e] for e in ents])

    def _read(self, lod: int, a: int, b: int) -> np.ndarray:
        if lod > 0:
            return self.tree.gists(lod, a, b).astype(np.float32)
        stored = self.tree.num_tokens
        ids = self.tree.tokens(min(a, stored), min(b, stored)).tolist()
        ids += self.pending[max(a - stored, 0) : max(b - stored, 0)]
        return self.tree.gister.embed(np.asarray(ids, np.int32))


def _lap(t: float) -> tuple[float, float]:
    now = time.perf_counter()
    return now - t, now


def open_session(
    model: MegaContext,
    config: ml_collections.ConfigDict,
    memory: str | Path,
    *,
    lens_trained: bool,
    telemetry: Telemetry | None = None,
) -> Session:
    """A session over the memory directory ``memory`` (created if new); ``lens_trained``: whether
    LensNet learned anything (if not, the session keeps the aged recency pyramid).

    Raises ``TreeError`` / ``SessionError`` (one line each).
    """
    tree = Tree.open_or_create(
        memory, gister_for(model, config), config.mc.max_level, config.model.vocab_size
    )
    try:
        return Session(model, config, tree, use_lens=lens_trained, telemetry=telemetry)
    except BaseException:
        tree.close()
        raise
