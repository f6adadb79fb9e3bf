"""The conditions of the evaluation scored on one batch of sequences (DESIGN section 8).

Each condition gives the scored tokens' NLL and argmax predictions: ``full`` (every token at
LOD0), ``window`` (the newest tokens only), ``mc_static`` (the recency pyramid) and ``mc_focus``
(the pyramid refocused by LensNet and the allocator). The jitted scorers take the static parts
of a run as small typed configs (``Setting``), so that a config field they do not read never
recompiles them.
"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from megacontext_jax.focus.working_context import WorkingContext
from megacontext_jax.megacontext import MegaContext, focus_rounds, node_table, read_wc
from megacontext_jax.nets.decoder import DecoderLM
from megacontext_jax.nets.losses import token_nll
from megacontext_jax.specs import AllocatorConfig, Layout, ignored
from megacontext_jax.training import variants

CONDITIONS = ("full", "window", "mc_static", "mc_focus")


def _scored(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    return token_nll(logits, labels), jnp.argmax(logits, axis=-1)


@partial(nnx.jit, static_argnames=("scored",))
def score_full(
    model: MegaContext | DecoderLM, tokens: jax.Array, scored: int
) -> tuple[jax.Array, jax.Array]:
    """NLL and argmax ``[B, S]`` of the last S tokens with every token in context."""
    n = tokens.shape[1] - 1
    logits = model.base(tokens[:, :n])[:, n - scored :]
    return _scored(logits, tokens[:, n - scored + 1 :])


@partial(nnx.jit, static_argnames=("layout", "ignore"))
def score_wc(
    model: MegaContext | DecoderLM,
    tokens: jax.Array,
    wc: WorkingContext,
    layout: Layout,
    ignore: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
    """NLL and argmax ``[B, S]`` of the ``layout.scored`` tokens after the context of WCs
    ``wc [B, W]`` (their entries follow the context entries); ``ignore``: label ids that are
    never targets."""
    n = tokens.shape[1] - 1
    table, offsets = _table(model, tokens[:, :n], layout)
    logits, labels, _ = read_wc(model, table, offsets, wc, tokens, layout, ignore)
    rows = wc.context.sum(-1, keepdims=True) + jnp.arange(layout.scored)
    return _scored(
        jnp.take_along_axis(logits, rows[..., None], axis=1), jnp.take_along_axis(labels, rows, 1)
    )


def _table(model, inputs, layout: Layout):
    if isinstance(model, MegaContext):
        return node_table(
            model.gistnet, model.base.embed(inputs), layout.block_size, layout.max_level
        )
    return model.embed(inputs).astype(jnp.float32), (0,) * (layout.max_level + 1)


@partial(nnx.jit, static_argnames=("layout", "allocator", "steps"))
def focus(
    model: MegaContext,
    tokens: jax.Array,
    wc: WorkingContext,
    layout: Layout,
    allocator: AllocatorConfig,
    steps: int,
) -> WorkingContext:
    """``steps`` rounds of LensNet scoring + allocator edits of the context of ``wc [B, W]``."""
    n = tokens.shape[1] - 1
    cursor = n - layout.scored
    table, offsets = _table(model, tokens[:, :n], layout)
    context = wc.only_context(layout.context_capacity)
    context, _ = focus_rounds(model, table, offsets, context, cursor, layout, allocator, steps)
    return context.with_tail(cursor, layout.scored, layout.capacity)


def contexts(rows: list[variants.Entries], cursor: int, layout: Layout) -> WorkingContext:
    """Host-built contexts, each followed by the scored tokens, as one ``[n, W]`` WC."""
    arrays = variants.to_arrays(rows, cursor, layout)
    return WorkingContext.from_batch({k: jnp.asarray(v) for k, v in arrays.items()})


def condition_arrays(name: str, cursor: int, layout: Layout, batch: int) -> WorkingContext:
    ents = variants.window(cursor, layout) if name == "window" else variants.pyramid(cursor, layout)
    return contexts([ents] * batch, cursor, layout)


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the evaluation reads of a run's config, built once at its entry."""

    layout: Layout
    allocator: AllocatorConfig
    ignore: tuple[int, ...]
    bos: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Setting":
        return cls(
            Layout.from_config(config),
            AllocatorConfig.from_config(config),
            ignored(config),
            config.model.bos_id,
        )


def run_conditions(
    model: MegaContext | DecoderLM, setting: Setting, tokens: np.ndarray, refocus_steps: int
) -> dict[str, tuple]:
    """``{condition: (nll [B, S], argmax [B, S], WC or None)}`` for one batch of sequences."""
    layout = setting.layout
    n = tokens.shape[1] - 1
    cursor = n - layout.scored
    tokens = jnp.asarray(tokens)
    out = {"full": (*score_full(model, tokens, layout.scored), None)}
    names = ["window"] + (["mc_static", "mc_focus"] if isinstance(model, MegaContext) else [])
    for name in names:
        wc = condition_arrays(name, cursor, layout, tokens.shape[0])
        if name == "mc_focus":
            wc = focus(model, tokens, wc, layout, setting.allocator, refocus_steps)
        out[name] = (*score_wc(model, tokens, wc, layout, setting.ignore), wc)
    return {
        k: tuple(x if x is None or isinstance(x, WorkingContext) else np.asarray(x) for x in v)
        for k, v in out.items()
    }
