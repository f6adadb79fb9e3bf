"""The MegaContext model (base model + GistNet + LensNet) and its in-graph working-context ops.

Inside ``jit``: a sequence's tree is built by ``gistnet.build_levels``; a working context's input
embeddings are gathered from the flattened node table; entries get Gaussian-RoPE positions; and each
entry's label is the first token after its span (never a token inside it).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from megacontext_jax.allocator import AllocatorConfig, refocus
from megacontext_jax.gistnet import GistNet, build_levels
from megacontext_jax.lensnet import LensNet
from megacontext_jax.model import GPT, DecoderLM
from megacontext_jax.positions import entry_positions
from megacontext_jax.working_context import WorkingContext


def make_base(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> DecoderLM:
    """A freshly initialized base model of ``config.model.family`` (GPT or an imported Llama's
    architecture; its weights come from ``restore.attach_base``)."""
    if config.model.family == "llama":
        from megacontext_jax.llama import Llama, base_config

        return Llama(base_config(config.model), rngs=rngs)
    return GPT(config.model, rngs=rngs)


class MegaContext(nnx.Module):
    """The three learned parts, split and checkpointed together."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.base = make_base(config, rngs)
        self.gistnet = GistNet(config, rngs=rngs)
        self.lensnet = LensNet(config, rngs=rngs)


def node_table(
    gistnet: GistNet, embeddings: jax.Array, block_size: int, max_level: int
) -> tuple[jax.Array, tuple[int, ...]]:
    """All nodes of each sequence's tree in one table.

    Args:
      embeddings: ``[B, T, D]`` token embeddings.
    Returns:
      ``table [B, M, D]`` (level 0 rows first, then level 1, ...) and the static row offset of
      each level (levels with no complete node get an offset past the end).
    """
    levels = jax.vmap(lambda e: build_levels(gistnet, e, block_size, max_level))(embeddings)
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
    table: jax.Array,
    offsets: tuple[int, ...],
    lod: jax.Array,
    start: jax.Array,
    valid: jax.Array,
    block_size: int,
) -> jax.Array:
    """Input embeddings ``[B, ..., W, D]`` of WC entries ``[B, ..., W]`` (zeros where invalid)."""
    node = start // jnp.power(block_size, lod)
    row = jnp.asarray(offsets)[lod] + node
    b = table.shape[0]
    flat_rows = jnp.where(valid, row, 0).reshape(b, -1)
    gathered = jnp.take_along_axis(table, flat_rows[..., None], axis=1)
    gathered = gathered.reshape(*lod.shape, table.shape[-1])
    return jnp.where(valid[..., None], gathered, 0.0)


def wc_positions(
    lod: jax.Array, start: jax.Array, config: ml_collections.ConfigDict
) -> tuple[jax.Array, jax.Array]:
    return entry_positions(lod, start, config.mc.block_size, config.mc.sigma_scale)


def entry_labels(
    tokens: jax.Array,
    lod: jax.Array,
    start: jax.Array,
    valid: jax.Array,
    block_size: int,
    ignore: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
    """Label of each entry: the first token after its span, ``tokens[start + K^lod]``.

    Args:
      tokens: ``[B, T + 1]``; entries ``[B, ..., W]`` end at or before T.
    Returns:
      labels (int32) and a mask that is False for invalid entries and ``ignore`` labels (the
      tokenizer's PAD and BOS).
    """
    end = start + jnp.power(block_size, lod)
    b = tokens.shape[0]
    idx = jnp.where(valid, end, 0).reshape(b, -1)
    labels = jnp.take_along_axis(tokens, idx, axis=1).reshape(lod.shape)
    mask = valid
    for token in ignore:
        mask = mask & (labels != token)
    return labels, mask


def lens_scores(
    model: MegaContext, table, offsets, lod, start, context, cursor: int, config
) -> jax.Array:
    """LensNet scores ``[B, W]`` of the context entries (``context`` mask) of ``[B, W]`` WCs.

    LensNet reads the entries as the base model would, but its loss never reaches the tree.
    """
    emb = jax.lax.stop_gradient(
        gather_entries(table, offsets, lod, start, context, config.mc.block_size)
    )
    mu, sigma = wc_positions(lod, start, config)
    cursor_b = jnp.full(lod.shape[:1], cursor, jnp.int32)
    return model.lensnet(emb, WorkingContext(lod, start, context), mu, sigma, context, cursor_b)


def focus_rounds(
    model: MegaContext,
    table,
    offsets,
    wc: WorkingContext,
    cursor: int,
    config: ml_collections.ConfigDict,
    cfg: AllocatorConfig,
    rounds: int,
    key: jax.Array | None = None,
    scores: jax.Array | None = None,
) -> tuple[WorkingContext, jax.Array]:
    """``rounds`` refocus steps of the contexts ``wc [B, Wc]``: LensNet scores them, the allocator
    edits them, the cooldown carries over. ``scores [B, Wc]``: the first round's, where the caller
    has them. Returns the refocused contexts and the edits made per example ``[B]``.
    """
    b, capacity = wc.lod.shape
    cooldown = jnp.zeros((b, capacity), jnp.int32)
    edits = jnp.zeros(b, jnp.int32)
    keys = jax.random.split(jax.random.key(0) if key is None else key, (rounds, b))
    for r in range(rounds):
        if scores is None or r > 0:
            scores = lens_scores(model, table, offsets, wc.lod, wc.start, wc.valid, cursor, config)
        result = jax.vmap(lambda w, s, c, k: refocus(w, s, c, cursor, cfg, k))(
            wc, jax.lax.stop_gradient(scores), cooldown, keys[r]
        )
        wc, cooldown = result.wc, result.cooldown
        edits = edits + result.expands + result.collapses
    return wc, edits


def with_tail(
    context: WorkingContext, cursor: int, scored: int, capacity: int
) -> dict[str, jax.Array]:
    """``[B, Wc]`` contexts followed by the ``scored`` tokens ``[cursor, cursor + scored)``.

    Returns ``lod``/``start``/``valid``/``context`` arrays ``[B, capacity]``.
    """
    pad = ((0, 0), (0, capacity - context.capacity))
    lod, start, ctx = (jnp.pad(a, pad) for a in (context.lod, context.start, context.valid))
    tail = jnp.arange(capacity)[None] - ctx.sum(-1, keepdims=True)
    is_tail = (tail >= 0) & (tail < scored)
    return {
        "lod": jnp.where(is_tail, 0, lod),
        "start": jnp.where(is_tail, cursor + tail, start),
        "valid": ctx | is_tail,
        "context": ctx,
    }
