import re

import numpy as np
import pytest

from megacontext_jax.data import tasks
from megacontext_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
FILLER = TOK.encode("def f(x):\n    return x + 1\n" * 100)


def test_passkey_answer_repeats_the_needle():
    rng = np.random.default_rng(0)
    for depth in (0.0, 0.5, 1.0, None):
        probe = tasks.passkey(FILLER, 400, rng, depth)
        assert len(probe.tokens) == 400
        text = TOK.decode(probe.tokens)
        key = TOK.decode(probe.tokens[probe.answer])
        assert len(key) == 5 and key.isdigit()
        assert text.endswith(f"the pass key is {key}")
        assert TOK.decode(probe.tokens[slice(*probe.needle)]) == f"\n# the pass key is {key}\n"
        assert (probe.tokens[slice(*probe.source)] == probe.tokens[probe.answer]).all()
        assert probe.needle[0] < probe.source[0] < probe.source[1] < probe.needle[1]
    early = tasks.passkey(FILLER, 400, rng, 0.0).needle[0]
    late = tasks.passkey(FILLER, 400, rng, 1.0).needle[0]
    assert early == 1 and late > 300


def test_mqar_answers_are_the_queried_values():
    probe = tasks.mqar(FILLER, 600, np.random.default_rng(1), pairs=6, queries=2)
    text = TOK.decode(probe.tokens)
    facts = dict(re.findall(r" ([a-z]{3})=(\d\d);", text[probe.needle[0] : probe.needle[1]]))
    assert len(facts) == 6
    queries = re.findall(r" ([a-z]{3})=(\d\d)", text[-15:])
    assert len(queries) == 2
    assert TOK.decode(probe.tokens[probe.answer]) == "".join(v for _, v in queries)
    for key, value in queries:
        assert facts[key] == value
    # The source runs from the first queried fact to the end of the last.
    source = text[probe.source[0] : probe.source[1]]
    inside = re.findall(r" ([a-z]{3})=(\d\d);", source)
    assert source.startswith(" {}={};".format(*inside[0])) and source.endswith(";")
    assert {inside[0], inside[-1]} <= set(queries) <= set(inside)


def test_too_short_for_a_task():
    with pytest.raises(ValueError, match="no room"):
        tasks.passkey(FILLER, 40, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shorter than"):
        tasks.passkey(FILLER[:50], 100, np.random.default_rng(0))


def test_repeats_write_each_span_twice():
    rng = np.random.default_rng(2)
    original = np.arange(300, dtype=np.int32)
    for _ in range(20):
        one = tasks.plant_repeats(original, rng, count=1, longest=24)
        changed = np.flatnonzero(one != original)
        length = (len(changed) + 1) // 2  # a span token may equal the original by chance
        first, second = changed[0], changed[-1] - length + 1
        assert 8 <= length <= 24 and first >= 1 and first + length <= second
        assert (one[first : first + length] == one[second : second + length]).all()
        assert np.isin(one[first : first + length], original[1:]).all()  # the sequence's tokens
        many = tasks.plant_repeats(original, rng, count=4)
        assert many[0] == 0 and (many != original).sum() >= 16
    assert (tasks.plant_repeats(original[:10], rng) == original[:10]).all()  # too short: as is
