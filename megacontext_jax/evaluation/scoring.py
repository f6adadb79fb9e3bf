"""The conditions of the evaluation scored on one batch of sequences (DESIGN section 8).

Each condition gives the scored tokens' NLL and argmax predictions after its context of the
history before them, at the same budget of ``W - S`` context entries:

* ``full``: every token at LOD0 (the upper bound; not held to the budget);
* ``window``: the newest tokens only (what a plain model sees);
* ``sinks``: the first ``SINKS`` tokens of the sequence and the newest ones (StreamingLLM's
  attention sinks; positions stay absolute, as for every condition here);
* ``mc_static``: the recency pyramid over the whole history;
* ``mc_random``: the pyramid after random legal edits, as many as focus made on the same row
  (what LensNet's choice of edits is worth over any edits);
* ``mc_focus``: the pyramid refocused by LensNet and the allocator;
* ``mc_attn``: the pyramid refocused by the base model's own attention instead of LensNet (the
  attention its K newest context entries pay each entry, ``megacontext.attention_scores``;
  the allocator ranks them, ``ranked`` mode, a group costing the sum of its entries' shares:
  NSA's and Landmark attention's selection);
* ``mc_oracle`` (retrieval only): the pyramid with the answer's tokens brought to LOD0 where the
  budget fits them, an upper bound for focus.

The tree of a batch is built once and every condition reads it. The jitted scorers take the
static parts of a run as small typed configs (``Setting``), so that a config field they do not
read never recompiles them.
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

CONDITIONS = ("full", "window", "sinks", "mc_static", "mc_random", "mc_focus", "mc_attn")
MC_CONDITIONS = ("mc_static", "mc_random", "mc_focus", "mc_attn")
ORACLE = "mc_oracle"
SINKS = 4  # StreamingLLM keeps 4 initial tokens


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


def table_offsets(num_tokens: int, layout: Layout, is_mc: bool) -> tuple[int, ...]:
    """Row offset of each level in ``tree_table``'s table (``node_table``'s, statically)."""
    if not is_mc:
        return (0,) * (layout.max_level + 1)
    counts = [num_tokens // layout.block_size**level for level in range(layout.max_level + 1)]
    return tuple(int(x) for x in np.cumsum([0, *counts[:-1]]))


@partial(nnx.jit, static_argnames=("layout",))
def tree_table(model: MegaContext | DecoderLM, inputs: jax.Array, layout: Layout) -> jax.Array:
    """Every node of the tree over ``inputs [B, N]`` (``node_table``; the token embeddings alone
    for a plain LM, which reads no gist)."""
    if isinstance(model, MegaContext):
        return node_table(model, inputs, layout.block_size, layout.max_level)[0]
    return model.embed(inputs).astype(jnp.float32)


@partial(nnx.jit, static_argnames=("offsets", "layout", "ignore"))
def score_wc(
    model: MegaContext | DecoderLM,
    table: jax.Array,
    offsets: tuple[int, ...],
    tokens: jax.Array,
    wc: WorkingContext,
    layout: Layout,
    ignore: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
    """NLL and argmax ``[B, S]`` of the ``layout.scored`` tokens after the context of WCs
    ``wc [B, W]`` (their entries follow the context entries) over the tree ``table``;
    ``ignore``: label ids that are never targets."""
    logits, labels, _ = read_wc(model, table, offsets, wc, tokens, layout, ignore)
    rows = wc.context.sum(-1, keepdims=True) + jnp.arange(layout.scored)
    return _scored(
        jnp.take_along_axis(logits, rows[..., None], axis=1), jnp.take_along_axis(labels, rows, 1)
    )


@partial(nnx.jit, static_argnames=("offsets", "cursor", "layout", "allocator", "steps", "scorer"))
def focus(
    model: MegaContext,
    table: jax.Array,
    offsets: tuple[int, ...],
    wc: WorkingContext,
    cursor: int,
    layout: Layout,
    allocator: AllocatorConfig,
    steps: int,
    scorer: str = "lens",
) -> tuple[WorkingContext, jax.Array]:
    """``steps`` rounds of scoring (LensNet, or the base's attention: ``focus_rounds``) +
    allocator edits of the context of ``wc [B, W]``; returns the refocused WCs and the edits
    made per row ``[B]``."""
    context = wc.only_context(layout.context_capacity)
    context, edits, _ = focus_rounds(
        model, table, offsets, context, cursor, layout, allocator, steps, scorer=scorer
    )
    return context.with_tail(cursor, layout.scored, layout.capacity), edits


def contexts(rows: list[variants.Entries], cursor: int, layout: Layout) -> WorkingContext:
    """Host-built contexts, each followed by the scored tokens, as one ``[n, W]`` WC."""
    arrays = variants.to_arrays(rows, cursor, layout)
    return WorkingContext.from_batch({k: jnp.asarray(v) for k, v in arrays.items()})


def score_rows(
    model: MegaContext | DecoderLM,
    tokens: np.ndarray,
    rows: list[variants.Entries],
    cursor: int,
    layout: Layout,
    ignore: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """NLL and argmax ``[B, S]`` after the host-built contexts ``rows``, one per sequence of
    ``tokens [B, N + 1]`` (their tree built here)."""
    n = tokens.shape[1] - 1
    tokens = jnp.asarray(tokens)
    table = tree_table(model, tokens[:, :n], layout)
    offsets = table_offsets(n, layout, isinstance(model, MegaContext))
    nll, pred = score_wc(
        model, table, offsets, tokens, contexts(rows, cursor, layout), layout, ignore
    )
    return np.asarray(nll), np.asarray(pred)


def condition_entries(name: str, cursor: int, layout: Layout) -> variants.Entries:
    """The context of a host-built condition (``window``, ``sinks`` or ``mc_static``)."""
    if name == "window":
        return variants.window(cursor, layout)
    if name == "sinks":
        return variants.sinks(cursor, layout, SINKS)
    return variants.pyramid(cursor, layout)


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

    def with_budget(self, capacity: int) -> "Setting":
        """This setting at a budget of ``capacity`` entries (``Layout.with_capacity``)."""
        layout = self.layout.with_capacity(capacity)
        allocator = dataclasses.replace(self.allocator, recent_tail=layout.recent_tail)
        return dataclasses.replace(self, layout=layout, allocator=allocator)


@dataclasses.dataclass
class Scored:
    """One condition over a batch: ``nll`` and ``pred`` ``[B, S]``, its WC (None: ``full``) and,
    for ``mc_oracle``, whether each row's answer fit the budget at LOD0 ``[B]``."""

    nll: np.ndarray
    pred: np.ndarray
    wc: WorkingContext | None
    fits: np.ndarray | None = None


def run_conditions(
    model: MegaContext | DecoderLM,
    setting: Setting,
    tokens: np.ndarray,
    refocus_steps: int,
    rng: np.random.Generator,
    names: tuple[str, ...] = CONDITIONS,
    sources: list[tuple[int, int]] | None = None,
) -> dict[str, Scored]:
    """The conditions ``names`` (those a plain LM has) over one batch of sequences
    ``tokens [B, N + 1]``; with ``sources`` (a token span per row), also ``mc_oracle``.

    ``rng`` draws ``mc_random``'s edits and ``mc_oracle``'s room-making collapses.
    """
    layout, is_mc = setting.layout, isinstance(model, MegaContext)
    n = tokens.shape[1] - 1
    cursor, batch = n - layout.scored, tokens.shape[0]
    tokens = jnp.asarray(tokens)
    table, offsets = tree_table(model, tokens[:, :n], layout), table_offsets(n, layout, is_mc)
    wcs: dict[str, WorkingContext] = {}
    for name in ("window", "sinks", "mc_static"):
        if name in names and (is_mc or not name.startswith("mc_")):
            wcs[name] = contexts([condition_entries(name, cursor, layout)] * batch, cursor, layout)
    if is_mc and {"mc_focus", "mc_random"} & set(names):
        pyramid = condition_entries("mc_static", cursor, layout)
        start = contexts([pyramid] * batch, cursor, layout)
        focused, edits = focus(
            model, table, offsets, start, cursor, layout, setting.allocator, refocus_steps
        )
        if "mc_focus" in names:
            wcs["mc_focus"] = focused
        if "mc_random" in names:
            rows = [variants.random_edits(pyramid, cursor, layout, int(e), rng) for e in edits]
            wcs["mc_random"] = contexts(rows, cursor, layout)
    if is_mc and "mc_attn" in names:
        start = contexts([condition_entries("mc_static", cursor, layout)] * batch, cursor, layout)
        ranked = dataclasses.replace(
            setting.allocator, mode="ranked", temperature=0.0, group_cost="sum"
        )
        wcs["mc_attn"] = focus(
            model, table, offsets, start, cursor, layout, ranked, refocus_steps, "attention"
        )[0]
    fits = None
    if is_mc and sources is not None:
        rows, fits = oracle_rows(sources, cursor, layout, rng)
        wcs[ORACLE] = contexts(rows, cursor, layout)
    out = {}
    if "full" in names:
        out["full"] = Scored(*map(np.asarray, score_full(model, tokens, layout.scored)), None)
    for name, wc in wcs.items():
        nll, pred = score_wc(model, table, offsets, tokens, wc, layout, setting.ignore)
        out[name] = Scored(np.asarray(nll), np.asarray(pred), wc, fits if name == ORACLE else None)
    order = (*CONDITIONS, ORACLE)
    return dict(sorted(out.items(), key=lambda item: order.index(item[0])))


def oracle_rows(
    sources: list[tuple[int, int]], cursor: int, layout: Layout, rng: np.random.Generator
) -> tuple[list[variants.Entries], np.ndarray]:
    """The pyramid with each row's ``source`` tokens at LOD0 (``variants.bring_to_lod0``), or
    the pyramid itself where they do not fit the budget; and whether they fit ``[B]``."""
    pyramid = variants.pyramid(cursor, layout)
    rows, fits = [], []
    for source in sources:
        out = variants.needle_variant(pyramid, source, cursor, layout, rng)
        rows.append(pyramid if out is None else out[0])
        fits.append(out is not None)
    return rows, np.array(fits)
