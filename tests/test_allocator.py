import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext_jax.focus.allocator import refocus
from megacontext_jax.focus.rules import check, recency_pyramid
from megacontext_jax.focus.working_context import entries, from_entries
from megacontext_jax.specs import AllocatorConfig


def _splice(values, i, count, new):
    """``values`` with ``values[i : i + count]`` replaced by ``new``."""
    return [*values[:i], *new, *values[i + count :]]


def _legal_group(ents, editable, i, cfg):
    k = cfg.block_size
    lod, start = ents[i]
    return (
        i + k <= len(ents)
        and all(editable[i : i + k])
        and all(l == lod for l, _ in ents[i : i + k])
        and start % k ** (lod + 1) == 0
        and lod < cfg.max_level
    )


def _first_max(ranked):
    """The first (rank, index) pair of highest rank, or None."""
    best = None
    for pair in ranked:
        if best is None or pair[0] > best[0]:
            best = pair
    return best


def reference_refocus(ents, scores, cooldown, num_tokens, capacity, cfg):
    """The allocator's rules, written plainly over Python lists (the spec the jit code must match)."""
    k, ranked = cfg.block_size, cfg.mode == "ranked"
    cost = k if cfg.group_cost == "sum" else 1  # a group costs its mean score, or its sum
    state = {"ents": list(ents), "scores": list(scores), "cooldown": list(cooldown)}
    state["touched"] = [False] * len(ents)
    expands = collapses = 0

    def edit(i, count, ents_new, score, new_count, cooldown):
        for key, new in (
            ("ents", ents_new),
            ("scores", [score] * new_count),
            ("cooldown", [cooldown] * new_count),
            ("touched", [True] * new_count),
        ):
            state[key] = _splice(state[key], i, count, new)

    def collapse_at(i):
        lod, start = state["ents"][i]
        edit(i, k, [(lod + 1, start)], sum(state["scores"][i : i + k]) / k, 1, -cfg.cooldown)

    go = cfg.max_edits > 0
    while go:
        ents, scores = state["ents"], state["scores"]
        n = len(ents)
        editable = [
            not state["touched"][i] and ents[i][1] + k ** ents[i][0] <= num_tokens - cfg.recent_tail
            for i in range(n)
        ]
        # Only undoing an edit waits: an expansion's children (cooldown > 0) may not collapse,
        # a collapse's parent (cooldown < 0) may not expand.
        collapsible = [e and state["cooldown"][i] <= 0 for i, e in enumerate(editable)]
        legal = [_legal_group(ents, collapsible, i, cfg) for i in range(n)]
        means = [sum(scores[i : i + k]) / k if legal[i] else 0.0 for i in range(n)]
        exp = [
            (scores[i], i)
            for i in range(n)
            if editable[i]
            and state["cooldown"][i] >= 0
            and ents[i][0] > 0
            and (ranked or scores[i] >= cfg.tau_expand)
        ]
        col = [
            (-means[i], i)
            for i in range(n)
            if not ranked and legal[i] and means[i] <= -cfg.tau_collapse
        ]
        e, c = _first_max(exp), _first_max(col)
        do_expand = e is not None and (c is None or e[0] >= c[0])
        skip = make_room = False
        if do_expand:
            e = e[1]
            if n + k - 1 > capacity:
                room = _first_max(
                    (-means[i], i)
                    for i in range(n)
                    if legal[i] and not i <= e < i + k and means[i] * cost < scores[e]
                )
                make_room = room is not None and expands + collapses + 2 <= cfg.max_edits
                skip = not make_room
                if make_room:
                    collapse_at(room[1])
                    e = e - (k - 1) if room[1] < e else e
            if skip:
                state["touched"][e] = True
            else:
                lod, start = state["ents"][e]
                children = [(lod - 1, start + j * k ** (lod - 1)) for j in range(k)]
                edit(e, 1, children, 0.0, k, cfg.cooldown)
        elif c is not None:
            collapse_at(c[1])
        expands += do_expand and not skip
        collapses += (c is not None and not do_expand) + make_room
        go = (bool(exp) or bool(col)) and expands + collapses < cfg.max_edits
    cooldown = [
        cd if t else cd - (cd > 0) + (cd < 0)
        for cd, t in zip(state["cooldown"], state["touched"], strict=True)
    ]
    return state["ents"], cooldown, expands, collapses


CONFIGS = [
    (AllocatorConfig(4, 3, 8, tau_expand=0.25, tau_collapse=0.25, max_edits=6, cooldown=2), 48),
    (AllocatorConfig(2, 4, 4, tau_expand=0.0, tau_collapse=0.5, max_edits=12, cooldown=0), 24),
    (AllocatorConfig(8, 2, 16, tau_expand=0.5, tau_collapse=0.0, max_edits=3, cooldown=1), 64),
    (AllocatorConfig(4, 3, 8, max_edits=6, cooldown=2, mode="ranked"), 48),
    (AllocatorConfig(4, 3, 8, max_edits=6, cooldown=2, mode="ranked", group_cost="sum"), 48),
]


@pytest.mark.parametrize("cfg,capacity", CONFIGS)
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_matches_reference_and_keeps_invariants(cfg, capacity, data):
    k = cfg.block_size
    n = data.draw(st.integers(1, 6000))
    wc = recency_pyramid(n, capacity, k, cfg.max_level, cfg.recent_tail)
    # Scores on a 1/8 grid: sums and means are exact in float32, so ties are real ties.
    scores = data.draw(st.lists(st.integers(-8, 8), min_size=capacity, max_size=capacity))
    scores = [s / 8 for s in scores]
    cooldown = data.draw(st.lists(st.integers(-2, 2), min_size=capacity, max_size=capacity))
    for _ in range(2):  # a second refocus starts from the first's output and cooldowns
        out = refocus(wc, jnp.array(scores, jnp.float32), jnp.array(cooldown), n, cfg)
        check(out.wc, n, k, cfg.max_level, cfg.recent_tail)
        count = len(entries(wc))
        want = reference_refocus(entries(wc), scores[:count], cooldown[:count], n, capacity, cfg)
        got_ents = entries(out.wc)
        assert got_ents == want[0]
        assert list(np.asarray(out.cooldown)[: len(got_ents)]) == want[1]
        assert (int(out.expands), int(out.collapses)) == want[2:]
        assert int(out.expands) + int(out.collapses) <= cfg.max_edits
        again = refocus(wc, jnp.array(scores, jnp.float32), jnp.array(cooldown), n, cfg)
        assert entries(again.wc) == got_ents  # same input, same output
        wc, cooldown = out.wc, list(np.asarray(out.cooldown))


def _tokens_and_gists():
    # Four level-1 gists, then 8 tokens (the last 4 of them form the recent tail).
    return [(1, 0), (1, 4), (1, 8), (1, 12), *[(0, t) for t in range(16, 24)]], 24


def _run(ents, scores, n, capacity=32, **kw):
    cfg = AllocatorConfig(4, 2, kw.pop("tail", 4), **{"max_edits": 8, "cooldown": 2, **kw})
    scores = jnp.array(scores + [0.0] * (capacity - len(scores)), jnp.float32)
    return refocus(from_entries(ents, capacity), scores, jnp.zeros(capacity, jnp.int32), n, cfg)


def test_expands_only_at_or_above_threshold():
    ents, n = _tokens_and_gists()
    out = _run(ents, [0.19, 0.2, 0.9, -0.1] + [0.0] * 8, n, tau_expand=0.2)
    assert entries(out.wc)[:9] == [
        (1, 0),
        (0, 4),
        (0, 5),
        (0, 6),
        (0, 7),
        (0, 8),
        (0, 9),
        (0, 10),
        (0, 11),
    ]
    assert int(out.expands) == 2 and int(out.collapses) == 0


def test_collapses_aligned_siblings_and_protects_the_tail():
    ents, n = _tokens_and_gists()
    # Tokens 16..19 are siblings (parent (1, 16)); 20..23 are siblings but in the tail.
    out = _run(ents, [0.0] * 4 + [-1.0] * 8, n, tau_collapse=0.5)
    assert entries(out.wc) == [
        (1, 0),
        (1, 4),
        (1, 8),
        (1, 12),
        (1, 16),
        *[(0, t) for t in range(20, 24)],
    ]
    # The four level-1 gists are aligned to their parent (2, 0): they collapse too when cold.
    out = _run(ents, [-0.9] * 4 + [0.0] * 8, n, tau_collapse=0.5)
    assert entries(out.wc)[0] == (2, 0)
    # Misaligned runs never collapse: tokens 17..20 are not siblings.
    misaligned = [(1, 0), (1, 4), (1, 8), (1, 12), (0, 16), *[(0, t) for t in range(17, 24)]]
    out = _run(misaligned, [0.0] * 4 + [1.0] + [-1.0] * 4 + [1.0] * 3, n, tau_collapse=0.6, tail=0)
    assert entries(out.wc) == misaligned


def test_budget_collapses_to_make_room():
    ents, n = _tokens_and_gists()
    capacity = len(ents)  # full: an expansion needs room
    out = _run(
        ents, [0.0, 0.0, 0.0, 0.9, -0.5, -0.5, -0.5, -0.5] + [0.0] * 4, n, capacity=capacity, tail=4
    )
    got = entries(out.wc)
    assert got[3:8] == [(0, 12), (0, 13), (0, 14), (0, 15), (1, 16)]
    assert (int(out.expands), int(out.collapses)) == (1, 1)
    check(out.wc, n, 4, 2, 4)
    # No group scores below the expansion: it is skipped rather than exceed the budget.
    out = _run(ents, [0.0, 0.0, 0.0, 0.9] + [0.95] * 8, n, capacity=capacity, tail=4)
    assert entries(out.wc) == ents


def test_ranked_mode_trades_the_best_gist_for_the_weakest_group_whatever_the_scale():
    ents, n = _tokens_and_gists()
    capacity = len(ents)  # full: every expansion needs room
    # Scores far below any threshold: gist (1, 12) at 0.02 beats the tokens 16..19 at -0.01.
    scores = [0.0, 0.0, 0.0, 0.02, -0.01, -0.01, -0.01, -0.01] + [0.0] * 4
    out = _run(ents, scores, n, capacity=capacity, mode="ranked", max_edits=2)
    assert entries(out.wc)[3:8] == [(0, 12), (0, 13), (0, 14), (0, 15), (1, 16)]
    assert (int(out.expands), int(out.collapses)) == (1, 1)
    # The thresholds mode does nothing with those scores; nor does ranked when no group is
    # weaker than the best gist, and it never collapses a group for its own sake.
    assert entries(_run(ents, scores, n, capacity=capacity).wc) == ents
    flat = [0.02] * 4 + [0.05] * 4 + [-0.9] * 4  # the coldest group sits in the tail
    assert entries(_run(ents, flat, n, capacity=capacity, mode="ranked").wc) == ents
    # A group costs its mean, or with group_cost="sum" its sum: tokens at 0.01 each are
    # weaker than the gist at 0.02 by their mean, not by their sum (0.04).
    warm = [0.0, 0.0, 0.0, 0.02, 0.01, 0.01, 0.01, 0.01] + [0.0] * 4
    out = _run(ents, warm, n, capacity=capacity, mode="ranked", max_edits=2)
    assert (int(out.expands), int(out.collapses)) == (1, 1)
    out = _run(ents, warm, n, capacity=capacity, mode="ranked", max_edits=2, group_cost="sum")
    assert entries(out.wc) == ents
    # With room to spare the best gist expands without a collapse.
    out = _run(ents, scores, n, capacity=capacity + 3, mode="ranked", max_edits=1)
    assert entries(out.wc)[3:7] == [(0, 12), (0, 13), (0, 14), (0, 15)]
    assert (int(out.expands), int(out.collapses)) == (1, 0)


def test_max_edits_and_cooldown():
    ents, n = _tokens_and_gists()
    out = _run(ents, [0.9, 0.8, 0.7, 0.6] + [0.0] * 8, n, max_edits=2)
    assert int(out.expands) == 2 and entries(out.wc)[0] == (0, 0)
    cfg = AllocatorConfig(4, 2, 4, max_edits=8, cooldown=2)
    # (1, 0) was made by a collapse a refocus ago: it may not expand back yet. (1, 4) came from
    # an expansion: it may expand further.
    cooldown = jnp.array([-1, 1, 0, 0] + [0] * 28)
    scores = jnp.array([0.9] * 4 + [0.0] * 28)
    out = refocus(from_entries(ents, 32), scores, cooldown, n, cfg)
    got = entries(out.wc)
    assert (1, 0) in got and (1, 4) not in got and (0, 4) in got
    cd = np.asarray(out.cooldown)
    assert cd[got.index((1, 0))] == 0  # cooldowns tick towards 0 each refocus
    assert cd[got.index((0, 4))] == 2  # an expansion's children may not collapse back yet
    # Children of an expansion do not collapse back however cold; a collapse's parent may
    # collapse further with its siblings.
    cold = jnp.array([-0.9] * 4 + [0.0] * 28)
    out = refocus(from_entries(ents, 32), cold, jnp.array([2, 0, 0, 0] + [0] * 28), n, cfg)
    assert entries(out.wc) == ents
    out = refocus(from_entries(ents, 32), cold, jnp.array([-2, 0, 0, 0] + [0] * 28), n, cfg)
    assert entries(out.wc)[0] == (2, 0)
    assert np.asarray(out.cooldown)[0] == -2


def test_descends_one_level_per_refocus():
    # A needle at token 21, inside the level-2 gist (2, 16): refocus steps scoring whatever
    # covers it bring it to LOD0 in two steps, one level each.
    ents, n = [(2, 0), (2, 16), *[(0, t) for t in range(32, 40)]], 40
    cfg = AllocatorConfig(4, 2, 4, max_edits=8, cooldown=2)
    wc, cooldown = from_entries(ents, 32), jnp.zeros(32, jnp.int32)
    for _ in range(2):
        got = entries(wc)
        scores = [1.0 if s <= 21 < s + 4**lod else 0.0 for lod, s in got]
        out = refocus(wc, jnp.array(scores + [0.0] * (32 - len(got))), cooldown, n, cfg)
        wc, cooldown = out.wc, out.cooldown
        check(wc, n, 4, 2, 4)
        assert int(out.expands) == 1
    assert (0, 21) in entries(wc) and (1, 16) in entries(wc)


def test_stochastic_variant_explores_and_stays_legal():
    wc = recency_pyramid(3000, 64, 4, 3, 8)
    cfg = AllocatorConfig(4, 3, 8, tau_expand=0.1, tau_collapse=0.1, max_edits=4, temperature=1.0)
    scores = jax.random.uniform(jax.random.key(0), (64,), minval=-1, maxval=1)
    outcomes = set()
    for seed in range(8):
        out = refocus(wc, scores, jnp.zeros(64, jnp.int32), 3000, cfg, jax.random.key(seed))
        check(out.wc, 3000, 4, 3, 8)
        outcomes.add(tuple(entries(out.wc)))
    assert len(outcomes) > 1
