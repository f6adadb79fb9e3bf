"""The Focus Allocator: turns LensNet scores into legal expand/collapse edits (DESIGN section 8).

Deterministic and jit-able (fixed shapes; the edit loop is a ``lax.while_loop``). Candidates, in
the ``thresholds`` mode:

* expand gist i (replace it by its K children) if ``score[i] >= tau_expand``;
* collapse K aligned siblings ``i .. i + K - 1`` (replace them by their parent) if their mean score
  is ``<= -tau_collapse``.

The ``ranked`` mode has no thresholds, so the scale of the scores does not matter (a LensNet
prior that keeps them small fights fixed thresholds): every gist is a candidate for expansion
and no group collapses on its own, so the best gist expands while it fits, or while it outscores
the weakest collapsible group, which collapses to make room (the rule below). A group's score
is its mean, or with ``group_cost = "sum"`` its sum (for scores that are shares of attention).

Edits are applied one at a time in order of |score|, each keeping every WC invariant: nothing in the
recent tail is touched, an entry created or changed in this refocus is not edited again (no
overlapping edits), no edit is undone within ``cooldown`` refocus steps, and the budget W is never
exceeded: an expansion that does not fit first collapses the lowest-scoring sibling group (if that
group scores below the expansion). At most ``max_edits`` edits per refocus.
With ``temperature > 0`` candidates are ranked by |score| plus Gumbel noise times the temperature:
the stochastic variant for exploration during training.

The cooldown is directional, so that only flipping back waits: the children of an expansion may not
be collapsed again (cooldown > 0) but may expand further, and the parent made by a collapse may not
be expanded again (cooldown < 0) but may collapse further. A needle in a LOD3 gist so reaches LOD0
in three refocus steps, one level per step.
"""

from functools import partial

import flax.struct
import jax
import jax.numpy as jnp

from megacontext_jax.focus.rules import (
    collapse,
    expand,
    legal_expansions,
    legal_groups,
    outside_tail,
    shift_for_collapse,
    shift_for_expand,
    window_mean,
)
from megacontext_jax.focus.working_context import WorkingContext
from megacontext_jax.specs import AllocatorConfig

NEG = -jnp.inf


@flax.struct.dataclass
class RefocusResult:
    wc: WorkingContext
    # int32 [W]: refocus steps before an edit may be undone: > 0 for an expansion's children (no
    # collapse yet), < 0 for a collapse's parent (no expansion yet)
    cooldown: jax.Array
    expands: jax.Array  # int32: edits applied, by kind
    collapses: jax.Array


def _candidates(wc, scores, expandable, collapsible, cfg: AllocatorConfig):
    """Expand priority per entry; for a group starting at i, its legality (``rules``) and mean
    score."""
    k = cfg.block_size
    expand_priority = jnp.where(legal_expansions(wc, expandable), scores, NEG)
    legal = legal_groups(wc, collapsible, k, cfg.max_level)
    return expand_priority, legal, window_mean(scores, k)


@partial(jax.jit, static_argnames=("cfg",))
def refocus(
    wc: WorkingContext,
    scores: jax.Array,
    cooldown: jax.Array,
    num_tokens: jax.Array,
    cfg: AllocatorConfig,
    key: jax.Array | None = None,
) -> RefocusResult:
    """Applies up to ``cfg.max_edits`` edits to ``wc`` given ``scores [W]`` in [-1, 1]."""
    k, capacity = cfg.block_size, wc.capacity
    ranked = cfg.mode == "ranked"
    if key is None:
        key = jax.random.key(0)

    def noise(key, shape):
        if cfg.temperature == 0:
            return jnp.zeros(shape)
        return cfg.temperature * jax.random.gumbel(key, shape)

    def body(carry):
        wc, scores, cooldown, touched, expands, collapses, key, _ = carry
        key, k1, k2 = jax.random.split(key, 3)
        count = wc.valid.sum()
        editable = outside_tail(wc, num_tokens, k, cfg.recent_tail) & ~touched
        expand_p, legal, mean = _candidates(
            wc, scores, editable & (cooldown >= 0), editable & (cooldown <= 0), cfg
        )
        expand_ok = expand_p > NEG if ranked else expand_p >= cfg.tau_expand
        expand_rank = jnp.where(expand_ok, expand_p + noise(k1, (capacity,)), NEG)
        collapse_ok = legal & (mean <= -cfg.tau_collapse) & (not ranked)
        collapse_rank = jnp.where(collapse_ok, -mean + noise(k2, (capacity,)), NEG)
        e, c = jnp.argmax(expand_rank), jnp.argmax(collapse_rank)
        has_e, has_c = expand_rank[e] > NEG, collapse_rank[c] > NEG
        do_expand = has_e & (~has_c | (expand_rank[e] >= collapse_rank[c]))
        do_collapse = has_c & ~do_expand
        fits = count + k - 1 <= capacity
        # Room for an expansion that does not fit: the lowest-mean legal group not holding e.
        holds_e = (jnp.arange(capacity) <= e) & (jnp.arange(capacity) + k > e)
        cost = mean * (k if cfg.group_cost == "sum" else 1)
        room_rank = jnp.where(legal & ~holds_e & (cost < scores[e]), -mean, NEG)
        r = jnp.argmax(room_rank)
        can_make_room = (room_rank[r] > NEG) & (expands + collapses + 2 <= cfg.max_edits)
        make_room = do_expand & ~fits & can_make_room
        skip = do_expand & ~fits & ~can_make_room

        def apply_collapse(state, index):
            wc, scores, cooldown, touched = state
            parent_score = jnp.mean(jax.lax.dynamic_slice(scores, (index,), (k,)))
            return (
                collapse(wc, index, k),
                shift_for_collapse(scores, index, k, parent_score),
                shift_for_collapse(cooldown, index, k, -cfg.cooldown),
                shift_for_collapse(touched, index, k, True),
            )

        def apply_expand(state, index):
            wc, scores, cooldown, touched = state
            return (
                expand(wc, index, k),
                shift_for_expand(scores, index, k, 0.0),
                shift_for_expand(cooldown, index, k, cfg.cooldown),
                shift_for_expand(touched, index, k, True),
            )

        state = (wc, scores, cooldown, touched)
        state = jax.lax.cond(make_room, lambda s: apply_collapse(s, r), lambda s: s, state)
        e_after = jnp.where(make_room & (r < e), e - (k - 1), e)
        state = jax.lax.cond(
            do_expand & (fits | make_room), lambda s: apply_expand(s, e_after), lambda s: s, state
        )
        state = jax.lax.cond(do_collapse, lambda s: apply_collapse(s, c), lambda s: s, state)
        wc, scores, cooldown, touched = state
        # An expansion with no room is skipped: mark it so the loop moves on.
        touched = touched | (skip & (jnp.arange(capacity) == e))
        expands = expands + (do_expand & ~skip)
        collapses = collapses + do_collapse + make_room
        go_on = (has_e | has_c) & (expands + collapses < cfg.max_edits)
        return wc, scores, cooldown, touched, expands, collapses, key, go_on

    zero = jnp.zeros((), jnp.int32)
    init = (
        wc,
        scores.astype(jnp.float32),
        cooldown.astype(jnp.int32),
        jnp.zeros(capacity, bool),
        zero,
        zero,
        key,
        jnp.asarray(cfg.max_edits > 0),
    )
    out = jax.lax.while_loop(lambda c: c[-1], body, init)
    wc, _, cooldown, touched, expands, collapses = out[:6]
    cooldown = jnp.where(touched | ~wc.valid, cooldown, cooldown - jnp.sign(cooldown))
    return RefocusResult(
        wc=wc, cooldown=jnp.where(wc.valid, cooldown, 0), expands=expands, collapses=collapses
    )
