import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from megacontext_jax.data import pipeline as data
from megacontext_jax.data.tokenizer import BOS, PAD, ByteTokenizer


@given(st.text())
def test_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, bos=True)
    assert ids[0] == BOS and ids.dtype == np.int32
    assert tok.decode(ids) == text
    feed = tok.stream_decoder()
    assert "".join(feed(int(i)) for i in ids) == text


def test_stdlib_corpus_is_found_and_split_deterministically():
    docs = data.load_documents("stdlib")
    names = {d.name for d in docs}
    assert "os.py" in names and len(docs) > 500
    assert not any("site-packages" in n for n in names)
    train, val = data.split_documents(docs, 0.05)
    _, val2 = data.split_documents(data.load_documents("stdlib"), 0.05)
    assert [d.name for d in val] == [d.name for d in val2]
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    assert len(train) + len(val) == len(docs)
    assert 0.02 < len(val) / len(docs) < 0.1


def test_directory_source_skips_binary_and_hidden_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("world")
    (tmp_path / "c.bin").write_bytes(b"\xff\xfe\x00")
    (tmp_path / ".hidden").write_text("secret")
    (tmp_path / "empty.txt").write_text("")
    docs = data.load_documents(str(tmp_path))
    assert [(d.name, d.data.tobytes()) for d in docs] == [
        ("a.txt", b"hello"),
        ("sub/b.md", b"world"),
    ]


def test_jsonl_source(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": t}) for t in ["one", "two", ""]) + "\n")
    docs = data.load_documents(str(path), jsonl_field="body")
    assert [d.data.tobytes() for d in docs] == [b"one", b"two"]
    with pytest.raises(data.DataError, match="no string field 'text'"):
        data.load_documents(str(path))
    path.write_text("{broken\n")
    with pytest.raises(data.DataError, match=r"d\.jsonl:1: not a JSON line"):
        data.load_documents(str(path))


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_documents(str(tmp_path / "nope"))
    with pytest.raises(data.DataError, match="no non-empty UTF-8 text documents"):
        data.load_documents(str(tmp_path))


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(2, 16))
def test_examples_cover_documents(lengths, seq_len):
    span = seq_len + 1
    examples = data.make_examples(lengths, seq_len)
    windows = [e for e in examples if e[0] == data.WINDOW]
    packs = [e for e in examples if e[0] == data.PACK]
    for i, n in enumerate(lengths):
        if n >= span:
            assert sorted(w for _, w, d in windows if d == (i,)) == list(range(n // span))
    packed = [i for _, _, docs in packs for i in docs]
    assert packed == [i for i, n in enumerate(lengths) if n < span]
    assert all(sum(lengths[i] for i in docs) <= span for _, _, docs in packs)


def _docs(*texts):
    return [data.Document(f"d{i}", np.frombuffer(t, np.uint8)) for i, t in enumerate(texts)]


def test_materialize_windows_and_packs():
    docs = _docs(b"abcdefghijklmnopqrstuvwxyz", b"hi", b"yo")
    m = data.Materialize(docs, seq_len=8, random_windows=False)
    rng = np.random.default_rng(0)
    w1 = m.random_map((data.WINDOW, 1, (0,)), rng)  # tokens 9..17 of [BOS]abc... = "ijklmnopq"
    assert bytes(w1["inputs"].astype(np.uint8)) == b"ijklmnop"
    assert bytes(w1["targets"].astype(np.uint8)) == b"jklmnopq"
    assert w1["mask"].all()
    w0 = m.random_map((data.WINDOW, 0, (0,)), rng)
    assert w0["inputs"][0] == BOS and bytes(w0["targets"].astype(np.uint8)) == b"abcdefgh"
    pack = m.random_map((data.PACK, 0, (1, 2)), rng)
    assert list(pack["inputs"]) == [BOS, *b"hi", BOS, *b"yo", PAD, PAD]
    assert list(pack["mask"]) == [True, True, False, True, True, False, False, False]
    for _ in range(20):
        window = data.Materialize(docs, 8).random_map((data.WINDOW, 1, (0,)), rng)
        start = b"abcdefghijklmnopqrstuvwxyz".find(bytes(window["inputs"].astype(np.uint8)))
        assert 8 <= start <= 26 - 9  # window 1 of [BOS] + 26 bytes: starts in [9, 18), clipped


def test_iterator_state_resumes_exactly(corpus_dir):
    docs = data.load_documents(str(corpus_dir))
    ds = data.train_dataset(docs, 32, 4, seed=3, repeat_fraction=0.5)  # random transforms too
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_process_shards_are_disjoint(corpus_dir):
    docs = data.load_documents(str(corpus_dir))
    seen = []
    for index in range(2):
        it = iter(data.train_dataset(docs, 32, 2, seed=0, process_index=index, process_count=2))
        seen.append({next(it)["inputs"].tobytes() for _ in range(2)})
    assert seen[0].isdisjoint(seen[1])


def test_unigram_baseline_of_uniform_bytes():
    docs = _docs(bytes(range(256)) * 50)
    batches = data.validation_batches(docs, 255, 2, 10)
    assert data.unigram_bits_per_byte(docs, batches) == pytest.approx(8.0, abs=1e-3)
