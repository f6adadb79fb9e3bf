import itertools
import re

import numpy as np
import pytest

from megacontext_jax.data import pipeline as data
from megacontext_jax.data import tasks
from megacontext_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
FILLER = TOK.encode("def f(x):\n    return x + 1\n" * 100)


@pytest.mark.parametrize("split", ["train", "held_out"])
def test_passkey_answer_repeats_the_needle(split):
    rng = np.random.default_rng(0)
    used = set()
    for depth in (0.0, 0.5, 1.0, None) * 4:
        probe = tasks.passkey(FILLER, 400, rng, depth, split=split)
        assert len(probe.tokens) == 400
        text = TOK.decode(probe.tokens)
        key = TOK.decode(probe.tokens[probe.answer])
        assert len(key) == 5 and key.isdigit()
        needle = TOK.decode(probe.tokens[slice(*probe.needle)])
        (phrasing,) = [
            p for p in tasks.PHRASINGS[split] if needle == p.needle[0] + key + p.needle[1]
        ]
        used.add(phrasing)
        assert text.endswith(phrasing.question + key)
        assert (probe.tokens[slice(*probe.source)] == probe.tokens[probe.answer]).all()
        assert probe.needle[0] < probe.source[0] < probe.source[1] < probe.needle[1]
    assert used == set(tasks.PHRASINGS[split])
    early = tasks.passkey(FILLER, 400, rng, 0.0).needle[0]
    late = tasks.passkey(FILLER, 400, rng, 1.0).needle[0]
    assert early == 1 and late > 300


def test_code_probe_assigns_a_name_and_asserts_it():
    probe = tasks.code(FILLER, 300, np.random.default_rng(3), depth=0.2)
    text = TOK.decode(probe.tokens)
    (name, key) = re.findall(r"\n([A-Z]{4}_[A-Z]{4}) = '(\d{5})'\n", text)[0]
    assert text.endswith(f"\nassert {name} == '{key}")
    assert TOK.decode(probe.tokens[probe.answer]) == key
    assert TOK.decode(probe.tokens[slice(*probe.source)]) == key


def test_prose_filler_is_sentences_and_never_code():
    text = TOK.decode(tasks.prose(2000, np.random.default_rng(0)))
    assert len(text) == 2000
    words = set(re.findall(r"[A-Za-z]+", text.rsplit(" ", 1)[0]))  # the last may be cut
    assert words <= {w for s in tasks.SENTENCES for w in re.findall(r"[A-Za-z]+", s)}
    assert not {"def", "return", "import", "class"} & words


def test_mqar_before_plants_every_fact_beyond_the_window():
    for seed in range(10):
        probe = tasks.mqar(FILLER, 600, np.random.default_rng(seed), pairs=6, before=300)
        assert probe.needle[1] <= 300
        text = TOK.decode(probe.tokens)
        assert len(re.findall(r" ([a-z]{3})=(\d\d);", text[:300])) == 6
    with pytest.raises(ValueError, match="no room for 6 pairs"):
        tasks.mqar(FILLER, 600, np.random.default_rng(0), pairs=6, before=40)


def test_training_plants_only_the_training_phrasings(corpus_dir):
    """Held-out phrasings, the code task and prose filler never reach the training pipeline."""
    docs = data.load_documents(str(corpus_dir))
    ds = data.train_dataset(docs, 96, 8, seed=0, passkey_fraction=1.0, repeat_fraction=0.5)
    texts = [
        TOK.decode(np.append(row, batch["targets"][i, -1]))
        for batch in itertools.islice(iter(ds), 12)
        for i, row in enumerate(batch["inputs"])
    ]
    seen = {p for p in tasks.PHRASINGS["train"] if any(p.question in t for t in texts)}
    assert seen == set(tasks.PHRASINGS["train"])  # the check below can see a phrasing
    for text in texts:
        for p in tasks.PHRASINGS["held_out"]:
            assert p.needle[0] not in text and p.needle[1] not in text and p.question not in text
        assert "assert " not in text and not any(s in text for s in tasks.SENTENCES)


def test_passkeys_end_at_each_sequences_stop(corpus_dir):
    """With random stops (``mc.min_history``) every sequence draws its stop in [low, L], and a
    passkey planted into it asks its question just before the stop: the scored tokens there
    hold the answer."""
    docs = data.load_documents(str(corpus_dir))
    ds = data.train_dataset(docs, 256, 8, seed=0, passkey_fraction=1.0, min_stop=140)
    stops = []
    for batch in itertools.islice(iter(ds), 4):
        for i, stop in enumerate(batch["stop"]):
            stops.append(int(stop))
            text = TOK.decode(np.append(batch["inputs"][i], batch["targets"][i, -1])[: stop + 1])
            (asked,) = [p for p in tasks.PHRASINGS["train"] if p.question in text]
            key = text[-5:]
            assert text.endswith(asked.question + key) and key.isdigit()
            first, last = batch["source"][i]  # the key's digits in the needle
            assert text[first:last] == key and last < stop - len(asked.question)
    assert min(stops) >= 140 and max(stops) <= 256 and len(set(stops)) > 8


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
