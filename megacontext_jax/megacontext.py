"""The MegaContext model (base model + GistNet + LensNet) and its one working-context pass.

Inside ``jit``: a sequence's tree is built by ``gistnet.build_levels`` (``node_table``); a working
context is read by ``read_wc``, the one forward pass that training losses, evaluation and the
pyramid pass share: entries -> input embeddings (gathered from the node table) -> Gaussian-RoPE
positions -> base model -> logits, each entry labelled with the first token after its span (never
a token inside it). LensNet reads the same inputs (``wc_inputs``).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from megacontext_jax.focus.allocator import refocus
from megacontext_jax.focus.working_context import WorkingContext
from megacontext_jax.kernels.mixed_attention import MaskSpec
from megacontext_jax.nets.decoder import DecoderLM
from megacontext_jax.nets.gistnet import GistNet, build_levels, contextual_inputs
from megacontext_jax.nets.gpt import GPT
from megacontext_jax.nets.lensnet import LensNet
from megacontext_jax.nets.specs import GistConfig, LensConfig, ModelConfig
from megacontext_jax.specs import AllocatorConfig, Layout


def make_base(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> DecoderLM:
    """A freshly initialized base model of ``config.model.family`` (GPT or an imported Llama's
    architecture; its weights come from ``restore.attach_base``)."""
    if config.model.family == "llama":
        from megacontext_jax.nets.llama import Llama, base_config

        return Llama(base_config(config.model), rngs=rngs)
    return GPT(ModelConfig.from_config(config.model), rngs=rngs)


class MegaContext(nnx.Module):
    """The three learned parts, split and checkpointed together; built from a run's config."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        gist = GistConfig.from_config(config)
        self.base = make_base(config, rngs)
        self.gistnet = GistNet(gist, rngs=rngs)
        self.lensnet = LensNet(LensConfig.from_config(config), rngs=rngs)
        # Static: what LOD1 gists read (the base's stream after read_layer blocks, 0: embeddings)
        # and over how many tokens each causal pass runs.
        self.read_layer = gist.read_layer
        self.read_span = gist.read_blocks * gist.block_size

    def gist_reads(self, tokens: jax.Array, embeddings: jax.Array) -> jax.Array:
        """LOD1 GistNet's children ``[B, T, D]`` for ``tokens [B, T]`` (whose input embeddings
        are ``embeddings``): those embeddings, or the base's contextual states."""
        if self.read_layer == 0:
            return embeddings
        return contextual_inputs(self.base, tokens, self.read_layer, self.read_span)


def node_table(
    model: MegaContext, tokens: jax.Array, block_size: int, max_level: int
) -> tuple[jax.Array, tuple[int, ...]]:
    """All nodes of each sequence's tree in one table.

    Args:
      tokens: ``[B, T]`` token ids.
    Returns:
      ``table [B, M, D]`` (level 0 rows, the token embeddings, first, then level 1, ...) and the
      static row offset of each level (levels with no complete node get an offset past the end).
    """
    embeddings = model.base.embed(tokens)
    reads = model.gist_reads(tokens, embeddings)
    levels = jax.vmap(lambda e, r: build_levels(model.gistnet, e, r, block_size, max_level))(
        embeddings, reads
    )
    offsets, total = [], 0
    for level in levels:
        offsets.append(total)
        total += level.shape[1]
    offsets += [total] * (max_level + 1 - len(levels))
    table = jnp.concatenate([l.astype(jnp.float32) for l in levels], axis=1)
    return table, tuple(offsets)


def node_layout(num_tokens: int, block_size: int, max_level: int) -> tuple[np.ndarray, np.ndarray]:
    """``(lod, start)`` int32 ``[M]`` of the rows of ``node_table`` for a sequence of N tokens."""
    lod, start = [], []
    for level in range(max_level + 1):
        span = block_size**level
        count = num_tokens // span
        lod.append(np.full(count, level, np.int32))
        start.append(np.arange(count, dtype=np.int32) * span)
    return np.concatenate(lod), np.concatenate(start)


def gather_entries(
    table: jax.Array, offsets: tuple[int, ...], wc: WorkingContext, block_size: int
) -> jax.Array:
    """Input embeddings ``[B, ..., W, D]`` of the entries ``[B, ..., W]`` (zeros where invalid)."""
    lod, start, valid = wc.lod, wc.start, wc.valid
    node = start // jnp.power(block_size, lod)
    row = jnp.asarray(offsets)[lod] + node
    b = table.shape[0]
    flat_rows = jnp.where(valid, row, 0).reshape(b, -1)
    gathered = jnp.take_along_axis(table, flat_rows[..., None], axis=1)
    gathered = gathered.reshape(*lod.shape, table.shape[-1])
    return jnp.where(valid[..., None], gathered, 0.0)


def wc_inputs(
    table: jax.Array, offsets: tuple[int, ...], wc: WorkingContext, layout: Layout
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What a net reads of entries ``[B, ..., W]``: embeddings ``[B, ..., W, D]`` and positions
    ``mu``, ``sigma`` ``[B, ..., W]``."""
    mu, sigma = wc.positions(layout)
    return gather_entries(table, offsets, wc, layout.block_size), mu, sigma


def read_wc(
    model: MegaContext,
    table: jax.Array,
    offsets: tuple[int, ...],
    wc: WorkingContext,
    tokens: jax.Array,
    layout: Layout,
    ignore: tuple[int, ...],
    mask: MaskSpec | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The base model over working contexts ``wc [B, ..., W]`` of sequences ``tokens [B, T + 1]``.

    ``mask``: a metadata mask of ``kernels`` (the pyramid) instead of the WC-causal one.
    Returns logits ``[B, ..., W, V]``, labels and the label mask ``[B, ..., W]``.
    """
    w = wc.capacity
    emb, mu, sigma = wc_inputs(table, offsets, wc, layout)
    flat = lambda a: a.reshape(-1, w, *a.shape[wc.lod.ndim :])
    if mask is None:
        logits = model.base(
            embeddings=flat(emb), mu=flat(mu), sigma=flat(sigma), kv_valid=flat(wc.valid)
        )
    else:
        meta = wc.kernel_entries(layout)
        logits = model.base(
            embeddings=flat(emb), mu=meta.mu, sigma=meta.sigma, entries=(meta, mask)
        )
    labels, label_mask = wc.labels(tokens, layout.block_size, ignore)
    return logits.reshape(*wc.lod.shape, -1), labels, label_mask


def per_row(cursor: int | jax.Array, rows: int) -> jax.Array:
    """``cursor`` (one for all, or one per row) as int32 ``[rows]``."""
    return jnp.broadcast_to(jnp.asarray(cursor, jnp.int32), (rows,))


def lens_scores(
    model: MegaContext,
    table: jax.Array,
    offsets: tuple[int, ...],
    wc: WorkingContext,
    cursor: int | jax.Array,
    layout: Layout,
) -> jax.Array:
    """LensNet scores ``[B, W]`` of the context entries of ``[B, W]`` WCs that end at
    ``cursor`` (one for all, or ``[B]``).

    LensNet reads the entries as the base model would, but its loss never reaches the tree.
    """
    ctx = wc.only_context()
    emb, mu, sigma = wc_inputs(table, offsets, ctx, layout)
    cursor_b = per_row(cursor, wc.lod.shape[0])
    return model.lensnet(jax.lax.stop_gradient(emb), ctx, mu, sigma, ctx.valid, cursor_b)


def attention_scores(
    model: MegaContext,
    table: jax.Array,
    offsets: tuple[int, ...],
    wc: WorkingContext,
    layout: Layout,
    queries: int,
) -> jax.Array:
    """Focus scores ``[B, W]`` in [0, 1] from the base model's own reading (as NSA and Landmark
    attention select blocks): the attention its ``queries`` newest context entries pay each
    entry of ``[B, W]`` WCs (``DecoderLM.attention_mass``), over the largest."""
    ctx = wc.only_context()
    emb, mu, sigma = wc_inputs(table, offsets, ctx, layout)
    newest = ctx.valid.sum(-1, keepdims=True) - 1
    rows = jnp.maximum(newest - jnp.arange(queries)[::-1], 0)
    mass = model.base.attention_mass(emb, mu, sigma, ctx.valid, rows)
    return mass / jnp.maximum(mass.max(-1, keepdims=True), 1e-30)


def focus_rounds(
    model: MegaContext,
    table: jax.Array,
    offsets: tuple[int, ...],
    wc: WorkingContext,
    cursor: int | jax.Array,
    layout: Layout,
    cfg: AllocatorConfig,
    rounds: int,
    key: jax.Array | None = None,
    scores: jax.Array | None = None,
    scorer: str = "lens",
) -> tuple[WorkingContext, jax.Array, WorkingContext]:
    """``rounds`` refocus steps of the contexts ``wc [B, Wc]``: LensNet (``scorer="lens"``) or
    the base model's attention (``"attention"``, ``attention_scores`` from the K newest entries)
    scores them, the allocator edits them, the cooldown carries over. ``cursor``: where the
    contexts end (one for all, or ``[B]``). ``scores [B, Wc]``: the first round's, where the
    caller has them. Returns the refocused contexts, the edits made per example ``[B]`` and the
    contexts after the first round (what the second round scores).
    """
    b, capacity = wc.lod.shape
    cursors = per_row(cursor, b)
    cooldown = jnp.zeros((b, capacity), jnp.int32)
    edits = jnp.zeros(b, jnp.int32)
    keys = jax.random.split(jax.random.key(0) if key is None else key, (rounds, b))
    first = wc
    for r in range(rounds):
        if (scores is None or r > 0) and scorer == "attention":
            scores = attention_scores(model, table, offsets, wc, layout, layout.block_size)
        elif scores is None or r > 0:
            scores = lens_scores(model, table, offsets, wc, cursors, layout)
        result = jax.vmap(lambda w, s, c, k, n: refocus(w, s, c, n, cfg, k))(
            wc, jax.lax.stop_gradient(scores), cooldown, keys[r], cursors
        )
        wc, cooldown = result.wc, result.cooldown
        edits = edits + result.expands + result.collapses
        first = wc if r == 0 else first
    return wc, edits, first
