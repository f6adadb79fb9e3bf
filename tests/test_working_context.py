import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext_jax.focus import rules
from megacontext_jax.focus.positions import Positions
from megacontext_jax.focus.rules import WCInvariantError, check
from megacontext_jax.focus.working_context import entries, from_entries


@st.composite
def wc_setups(draw):
    k = draw(st.sampled_from([2, 4, 8]))
    max_level = draw(st.integers(1, 4))
    capacity = draw(st.integers(2 * k + 2, 120))
    tail = draw(st.integers(0, capacity - 2 * k))
    num_tokens = draw(st.integers(0, 20_000))
    shape = draw(st.sampled_from(rules.PYRAMIDS))
    return num_tokens, capacity, k, max_level, tail, shape


@settings(max_examples=300, deadline=None)
@given(wc_setups())
def test_recency_pyramid_is_legal_and_full(setup):
    n, capacity, k, max_level, tail, shape = setup
    wc = rules.recency_pyramid(n, capacity, k, max_level, tail, shape)
    horizon = check(wc, n, k, max_level, tail)
    ents = entries(wc)
    has_gist = any(lod > 0 for lod, _ in ents)
    # As full as legally possible: another expansion (K - 1 more entries) would not fit.
    assert not has_gist or len(ents) + k - 1 > capacity
    assert horizon == 0 or rules.min_entries(n, k, max_level, tail) > capacity
    if n <= capacity:
        assert ents == [(0, t) for t in range(n)]


@pytest.mark.parametrize("shape", rules.PYRAMIDS)
def test_pyramid_detail_falls_off_with_distance(shape):
    ents = entries(rules.recency_pyramid(100_000, 256, 8, 4, 32, shape))
    lods = [lod for lod, _ in ents]
    assert lods == sorted(lods, reverse=True)  # coarse in the past, fine near the present
    assert set(lods) == {0, 1, 2, 3, 4}
    assert all(lod == 0 for lod, start in ents if start >= 100_000 - 32)


def test_pyramid_shapes():
    # 496 tokens, 48 entries, K = 8, a 16-token tail: the coarsest cover is 7 LOD2 gists, 4 LOD1
    # gists and 16 tokens (27 entries), and 3 expansions of 7 entries fill the budget.
    lod2 = [(2, 64 * i) for i in range(7)]
    recent = entries(rules.recency_pyramid(496, 48, 8, 3, 16, "recent"))
    assert recent == lod2 + [(1, 448)] + [(0, t) for t in range(456, 496)]  # the newest LOD1s
    # "proportional" expands by span / (distance + span): the LOD2 gists at 384 (64 / 112) and
    # 320 (64 / 176), then the LOD1 gist at 472 (8 / 24).
    proportional = entries(rules.recency_pyramid(496, 48, 8, 3, 16, "proportional"))
    assert proportional == (
        lod2[:5] + [(1, 320 + 8 * j) for j in range(19)] + [(0, t) for t in range(472, 496)]
    )
    with pytest.raises(ValueError, match="pyramid shape 'flat': must be one of"):
        rules.recency_pyramid(496, 48, 8, 3, 16, "flat")


def test_horizon_when_history_exceeds_coarsest_cover():
    wc = rules.recency_pyramid(5000, 40, 4, 2, 8)
    horizon = check(wc, 5000, 4, 2, 8)
    assert horizon == 4480 and entries(wc)[0] == (2, 4480)


@pytest.mark.parametrize(
    "ents,n,message",
    [
        ([(0, 0), (0, 2)], 3, "coverage: gap"),
        ([(1, 0), (0, 3)], 4, "order"),
        ([(0, 0), (1, 1)], 5, "alignment: start 1"),
        ([(3, 0)], 64, "alignment: lod 3 outside"),
        ([(1, 0), (0, 4)], 4, "alignment: node"),
        ([(0, 0), (0, 1)], 3, "coverage: entries end at 2"),
        ([(1, 4), (0, 8)], 9, "coverage: horizon 4"),
        ([(0, 0), (0, 1), (0, 2), (0, 3), (1, 4)], 8, "recent tail"),
    ],
)
def test_check_names_the_broken_invariant(ents, n, message):
    with pytest.raises(WCInvariantError, match=message):
        check(from_entries(ents, 16), n, 4, 2, 2)


def test_check_requires_packed_layout():
    wc = from_entries([(0, 0), (0, 1)], 4)
    wc = wc.replace(valid=jnp.array([True, False, True, False]))
    with pytest.raises(WCInvariantError, match="layout"):
        check(wc, 2, 4, 2, 0)


def test_expand_then_collapse_round_trips():
    wc = rules.recency_pyramid(1000, 64, 4, 3, 8)
    ents = entries(wc)
    for index, (lod, start) in enumerate(ents):
        if lod == 0 or len(ents) + 3 > 64:
            continue
        expanded = rules.expand(wc, index, 4)
        new = entries(expanded)
        assert new[index : index + 4] == [(lod - 1, start + j * 4 ** (lod - 1)) for j in range(4)]
        assert new[:index] == ents[:index] and new[index + 4 :] == ents[index + 1 :]
        assert entries(rules.collapse(expanded, index, 4)) == ents


# Compiled, one program per function and capacity: op by op, every capacity drawn compiles each
# of their ops again (about 4x the time).
_expand = jax.jit(rules.expand, static_argnums=2)
_collapse = jax.jit(rules.collapse, static_argnums=2)
_outside_tail = jax.jit(rules.outside_tail, static_argnums=(2, 3))
_legal_expansions = jax.jit(rules.legal_expansions)
_legal_groups = jax.jit(rules.legal_groups, static_argnums=(2, 3))


@settings(max_examples=100, deadline=None)
@given(wc_setups(), st.data())
def test_host_and_array_edit_rules_agree(setup, data):
    """``collapsible_at`` / ``expandable_at`` (host lists) and ``legal_groups`` (arrays, the
    allocator's) say the same, and ``expand_at`` / ``collapse_at`` make the arrays' edits."""
    n, capacity, k, max_level, tail, shape = setup
    wc = rules.recency_pyramid(n, capacity, k, max_level, tail, shape)
    ents = entries(wc)
    depth = data.draw(st.integers(0, 2))  # a few expansions, so that fine groups appear
    for _ in range(depth):
        gists = [i for i in range(len(ents)) if rules.expandable_at(ents, i, n, k, tail)]
        if not gists or len(ents) + k - 1 > capacity:
            break
        i = data.draw(st.sampled_from(gists))
        wc, ents = _expand(wc, i, k), rules.expand_at(ents, i, k)
        assert entries(wc) == ents
    editable = _outside_tail(wc, n, k, tail)
    expansions = np.asarray(_legal_expansions(wc, editable))
    host = [rules.expandable_at(ents, i, n, k, tail) for i in range(len(ents))]
    assert expansions[: len(ents)].tolist() == host and not expansions[len(ents) :].any()
    legal = np.asarray(_legal_groups(wc, editable, k, max_level))
    host = [rules.collapsible_at(ents, i, n, k, max_level, tail) for i in range(len(ents))]
    assert legal[: len(ents)].tolist() == host
    assert not legal[len(ents) :].any()
    for i in np.flatnonzero(host):
        assert entries(_collapse(wc, int(i), k)) == rules.collapse_at(ents, int(i), k)


def test_entry_positions():
    lod = jnp.array([0, 1, 2])
    start = jnp.array([7, 8, 16])
    mu, sigma = Positions("absolute", 4, 0.5)(lod, start)
    np.testing.assert_array_equal(mu, [7.0, 9.5, 23.5])
    np.testing.assert_array_equal(sigma, [0.0, 2.0, 8.0])


def test_slot_positions_are_bounded_by_the_capacity_whatever_the_history():
    # A pyramid over a million tokens: absolute positions put its gists up to ~1M tokens back,
    # slots put every entry within W of every other.
    k, capacity, n = 4, 32, 1_000_000
    wc = rules.recency_pyramid(n, capacity, k, 9, 4)
    mu, sigma = Positions("slots", k)(wc.lod, wc.start)
    np.testing.assert_array_equal(mu, np.arange(capacity))
    np.testing.assert_array_equal(sigma, 0.0)
    absolute, _ = Positions("absolute", k)(wc.lod, wc.start)
    assert float(absolute[wc.valid].max() - absolute[wc.valid].min()) > 500_000
    # A cached suffix continues from its first slot.
    shifted, _ = Positions("slots", k)(wc.lod[5:], wc.start[5:], first_slot=5)
    np.testing.assert_array_equal(shifted, mu[5:])
    with pytest.raises(ValueError, match="unknown position mode 'relative'"):
        Positions("relative", k)
