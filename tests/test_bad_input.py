"""Bad input is one line that names it, never a traceback, and nothing committed is lost.

A manifest of the wrong shape, lengths that break the tree's invariant, a ``writer.lock`` that is
not a file, a damaged chunk under a writer or decode, out-of-range CLI arguments and JSONL text
that is not UTF-8.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import decode
import megacontext_jax
from megacontext_jax.api import Model
from megacontext_jax.data import pipeline as data
from megacontext_jax.evaluation import cli as evaluation_cli
from megacontext_jax.evaluation.retrieval import TASKS
from megacontext_jax.megacontext import MegaContext
from megacontext_jax.memory import tree as tree_module
from megacontext_jax.memory.errors import TreeCorruptError, TreeLockedError
from megacontext_jax.memory.tree import Tree
from megacontext_jax.runtime.sampling import check_sampling
from megacontext_jax.runtime.session import gister_for
from tests.conftest import tiny_mc_config

TOKENS = np.arange(100) % 256


@pytest.fixture(scope="module")
def model() -> Model:
    """A MegaContext model as ``mcj.load`` returns it (K=4, levels 0..2, random weights); its
    trees here share one compiled GistNet with the decode test's."""
    config = tiny_mc_config("/unused", "/unused")
    # A step past the lens start: the session prints no note about an untrained LensNet.
    module = MegaContext(config, rngs=nnx.Rngs(0))
    return Model(module, config, Path("ckpt"), config.mc.lens_start + 1)


@pytest.fixture(scope="module")
def gister(model):
    return gister_for(model.module, model.config)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, gister) -> Path:
    """A tree of 100 tokens (lengths [100, 25, 6]) that each test copies before damaging."""
    path = tmp_path_factory.mktemp("pristine") / "t"
    with Tree.create(path, gister, 2, 320) as t:
        t.append(TOKENS)
    return path


@pytest.fixture
def tree_dir(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "t"))


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def _verify_cli(path: Path, capsys) -> tuple[int, str]:
    status = tree_module.main(["verify", str(path)])
    captured = capsys.readouterr()
    return status, _one_line(captured.err) if status else captured.out


def _intact(path: Path, gister, tokens: np.ndarray = TOKENS) -> None:
    """The tree at ``path`` holds exactly ``tokens`` and passes every check, for a writer too."""
    with Tree.open(path, gister) as t:
        np.testing.assert_array_equal(t.tokens(0, t.num_tokens), tokens)
        t.verify(deep=True)


def _edit_manifest(path: Path, **fields) -> bytes:
    """Rewrites fields of the manifest at ``path``; returns the original bytes."""
    original = (path / "manifest.json").read_bytes()
    manifest = json.loads(original)
    manifest.update(fields)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return original


@pytest.mark.parametrize(
    "manifest, message",
    [
        (5, "manifest.json holds 5, not an object"),
        (None, "manifest.json holds null, not an object"),
        ([1, 2], "manifest.json holds [1, 2], not an object"),
        ({"lengths": None}, "field lengths is null, expected a list of 3 integers >= 0"),
        ({"lengths": [100, 25]}, "field lengths is [100, 25], expected a list of 3 integers"),
        ({"lengths": [100.0, 25, 6]}, "field lengths is [100.0, 25, 6], expected a list of 3"),
        ({"lengths": [True, 0, 0]}, "field lengths is [true, 0, 0], expected a list of 3"),
        ({"lengths": "100"}, 'field lengths is "100", expected a list of 3 integers >= 0'),
        ({"block_size": "4"}, 'field block_size is "4", expected an integer >= 2'),
        ({"block_size": 0}, "field block_size is 0, expected an integer >= 2"),
        ({"dim": -1}, "field dim is -1, expected an integer >= 1"),
        ({"max_level": "2"}, 'field max_level is "2", expected an integer >= 1'),
        ({"max_level": 0, "lengths": [100]}, "field max_level is 0, expected an integer >= 1"),
        ({"vocab_size": 0}, "field vocab_size is 0, expected an integer >= 1"),
        ({"gist_dtype": "notadtype"}, 'field gist_dtype is "notadtype", expected the name of a'),
        ({"gist_dtype": "int32"}, 'field gist_dtype is "int32", expected the name of a floating'),
        ({"fingerprint": 5}, "field fingerprint is 5, expected a non-empty string"),
        ({"generation": "1"}, 'field generation is "1", expected an integer >= 0'),
        ({"generation": -1}, "field generation is -1, expected an integer >= 0"),
        ({"digests": "x"}, 'field digests is "x", expected a list of 3 lists of CRC-32s'),
        ({"digests": [["a"], [1], [1]]}, 'field digests is [["a"], [1], [1]], expected a list'),
        ({"digests": [[-1], [1], [1]]}, "field digests is [[-1], [1], [1]], expected a list"),
        ({"format_version": "1"}, 'format version "1", this code reads 1'),
    ],
)
def test_a_malformed_manifest_is_one_line_naming_the_field(
    tree_dir, gister, capsys, manifest, message
):
    if isinstance(manifest, dict):
        original = _edit_manifest(tree_dir, **manifest)
    else:
        original = (tree_dir / "manifest.json").read_bytes()
        (tree_dir / "manifest.json").write_text(json.dumps(manifest))
    for writer in (None, gister):  # a reader, and a writer (which takes the lock first)
        with pytest.raises(TreeCorruptError) as raised:
            Tree.open(tree_dir, writer)
        assert _one_line(str(raised.value)).startswith(f"tree at {tree_dir}: ")
        assert message in str(raised.value)
    status, err = _verify_cli(tree_dir, capsys)
    assert status == 1 and err.startswith("error: tree at") and message in err
    (tree_dir / "manifest.json").write_bytes(original)  # the user repairs it
    _intact(tree_dir, gister)  # and the failed writer's open released the lock


@pytest.mark.parametrize(
    "lengths, message",
    [
        ([100, 20, 5], "level 1 holds 20 gists; 100 tokens need 25"),  # too short
        ([100, 24, 6], "level 1 holds 24 gists; 100 tokens need 25"),
        ([100, 25, 5], "level 2 holds 5 gists; 100 tokens need 6"),
        ([64, 25, 6], "level 1 holds 25 gists; 64 tokens need 16"),  # too long
    ],
)
def test_lengths_that_break_the_tree_invariant_are_refused_at_open(
    tree_dir, gister, capsys, lengths, message
):
    """``append`` commits ``len(l) == len(0) // K^l`` at every level; a manifest that says
    otherwise would send reads past a level's end (an IndexError in the middle of decoding)."""
    original = _edit_manifest(tree_dir, lengths=lengths)
    for writer in (None, gister):
        with pytest.raises(TreeCorruptError) as raised:
            Tree.open(tree_dir, writer)
        assert _one_line(str(raised.value)) == (
            f"tree at {tree_dir}: manifest lengths {lengths} are inconsistent: {message}"
        )
    status, err = _verify_cli(tree_dir, capsys)
    assert status == 1 and err == f"error: {raised.value}"
    (tree_dir / "manifest.json").write_bytes(original)
    _intact(tree_dir, gister)


def test_a_level_longer_than_its_array_is_refused_and_releases_the_lock(tree_dir, gister):
    original = _edit_manifest(tree_dir, lengths=[100, 30, 6])
    with pytest.raises(TreeCorruptError) as raised:
        Tree.open(tree_dir, gister)
    assert _one_line(str(raised.value)) == (
        f"tree at {tree_dir}: level 1 holds 25 rows but 30 are committed"
    )
    (tree_dir / "manifest.json").write_bytes(original)
    _intact(tree_dir, gister)  # the refused writer let go of the lock


def test_a_writer_lock_that_is_not_a_file_is_left_alone_and_the_lock_still_holds(
    tree_dir, gister, tmp_path
):
    """``writer.lock`` only names the holder; the ``flock`` on the directory is the lock. A
    directory there is kept with what it holds, a link is never written through, and a second
    writer is still refused."""
    lock = tree_dir / "writer.lock"
    lock.unlink()
    lock.mkdir()
    (lock / "notes").write_text("someone's")
    with Tree.open(tree_dir, gister) as t:
        with pytest.raises(TreeLockedError) as raised:
            Tree.open(tree_dir, gister)
        assert _one_line(str(raised.value)) == (
            f"tree at {tree_dir} is locked by another writer (pid ?)"
        )
        t.append(np.arange(8))
    assert (lock / "notes").read_text() == "someone's"
    _intact(tree_dir, gister, np.concatenate([TOKENS, np.arange(8)]))

    shutil.rmtree(lock)
    target = tmp_path / "precious.txt"
    target.write_text("do not overwrite")
    lock.symlink_to(target)
    with Tree.open(tree_dir, gister) as t:
        t.append(np.arange(8))
    assert target.read_text() == "do not overwrite"
    _intact(tree_dir, gister, np.concatenate([TOKENS, np.arange(8), np.arange(8)]))


def _chunk(path: Path, level: int) -> Path:
    (chunk,) = [p for p in (path / f"level_{level}" / "c").rglob("*") if p.is_file()]
    return chunk


def test_a_writer_never_rewrites_a_damaged_chunk(tree_dir, gister, capsys):
    """Four tokens add one level-1 gist and read no level-1 row: TensorStore's read-modify-write
    of the truncated chunk is where the damage shows, and it is one line naming the tree."""
    chunk = _chunk(tree_dir, 1)
    saved = chunk.read_bytes()
    chunk.write_bytes(saved[: len(saved) // 2])
    manifest = (tree_dir / "manifest.json").read_bytes()
    with Tree.open(tree_dir, gister) as t:
        with pytest.raises(TreeCorruptError) as raised:
            t.append(np.arange(4))
        assert re.fullmatch(
            rf"tree at {tree_dir}: level 1 rows \[0, 25\) cannot be read \(.*Zstd.*\)",
            _one_line(str(raised.value)),
        )
    assert (tree_dir / "manifest.json").read_bytes() == manifest  # nothing committed
    assert chunk.read_bytes() == saved[: len(saved) // 2]  # nor rewritten
    with Tree.open(tree_dir) as t:
        np.testing.assert_array_equal(t.tokens(0, 100), TOKENS)
    status, err = _verify_cli(tree_dir, capsys)
    assert status == 1 and re.fullmatch(r"error: tree at .*: level 1 rows \[0, 25\) .*", err)
    chunk.write_bytes(saved)  # restored from a backup
    _intact(tree_dir, gister)


def test_decode_over_a_damaged_chunk_is_one_line_and_loses_nothing(
    model, tmp_path, capsys, monkeypatch
):
    """A prompt of five tokens adds a level-1 gist to a chunk that decoding had not read: the
    error surfaces in the commit, and is the only line (no token count that was not kept)."""
    monkeypatch.setattr(megacontext_jax, "load", lambda path: model)
    memory = tmp_path / "memory"
    argv = ["--checkpoint", "ckpt", "--memory", str(memory), "--max-new-tokens", "4"]
    argv += ["--temperature", "0", "--prompt"]
    assert decode.main([*argv, "the quick brown fox " * 20]) == 0
    with Tree.open(memory) as t:
        stored = t.tokens(0, t.num_tokens)
    chunk = _chunk(memory, 1)
    saved = chunk.read_bytes()
    chunk.write_bytes(saved[:100])
    argv.append("jumps")
    capsys.readouterr()
    assert decode.main(argv) == 1
    err = _one_line(capsys.readouterr().err)
    assert re.fullmatch(rf"error: tree at {memory}: level 1 rows \[0, \d+\) cannot be read .*", err)
    chunk.write_bytes(saved)
    with Tree.open(memory) as t:
        np.testing.assert_array_equal(t.tokens(0, t.num_tokens), stored)
    assert decode.main(argv) == 0
    with Tree.open(memory) as t:
        assert t.num_tokens == len(stored) + len("jumps") + 4
        np.testing.assert_array_equal(t.tokens(0, len(stored)), stored)
        t.verify()


LENGTHS = "distinct integers >= 1 separated by commas"


@pytest.mark.parametrize(
    "flag, value, valid",
    [
        *(("--lengths", v, LENGTHS) for v in ("0", "4,-8", "4,2.5", "4,4", "4,,8")),
        ("--batch", "0", "an integer >= 1"),
        ("--batch", "-1", "an integer >= 1"),
        ("--windows", "1", "an integer >= 2"),
        ("--stride", "-1", "an integer >= 0"),
        ("--budget-length", "0", "an integer >= 1"),
        ("--budgets", "64,64", "distinct integers >= 1 separated by commas"),
        ("--tasks", "passkey,nope", f"tasks among {', '.join(TASKS)} separated by commas"),
        ("--probes", "-1", "an integer >= 1"),
        ("--refocus-steps", "-1", "an integer >= 0"),
        ("--seed", "-1", "an integer >= 0"),
        ("--seed", "x", "an integer >= 0"),
    ],
)
def test_evaluation_refuses_out_of_range_integers_in_one_line(tmp_path, capsys, flag, value, valid):
    missing = tmp_path / "nope"  # never reached: the parser refuses first
    with pytest.raises(SystemExit) as exit_:
        evaluation_cli.main(["--checkpoint", str(missing), flag, value])
    assert exit_.value.code == 2
    assert _one_line(capsys.readouterr().err) == (
        f"error: argument {flag}: must be {valid}, got {value!r}"
    )


@pytest.mark.parametrize("seed", [2**70, 2**32, -1])
def test_a_seed_outside_what_jax_takes_is_one_line(tmp_path, capsys, seed):
    memory = tmp_path / "memory"
    argv = ["--checkpoint", str(tmp_path / "nope"), "--memory", str(memory), "--prompt", "x"]
    assert decode.main([*argv, "--seed", str(seed)]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"error: --seed must be an integer in [0, 2**32), got {seed}"
    )
    assert not memory.exists()
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        check_sampling(8, 0.0, 0, 1.0, seed)
    check_sampling(8, 0.0, 0, 1.0, 2**32 - 1)


def test_a_lone_surrogate_in_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n')
    with pytest.raises(data.DataError) as raised:
        data.load_documents(str(path))
    assert _one_line(str(raised.value)) == (
        f"{path}:2: field 'text' holds '\\ud800', a lone surrogate, not text"
    )
    path.write_text('{"text": "fine"}\n{"text": "good \\u00e9 here"}\n')
    docs = data.load_documents(str(path))
    assert [d.data.tobytes() for d in docs] == [b"fine", "good é here".encode()]


def test_a_txt_source_is_plain_text_whatever_it_holds(tmp_path):
    prose = tmp_path / "notes.txt"
    prose.write_text("not JSON at all\n")
    looks_like_json = tmp_path / "record.txt"
    looks_like_json.write_text('{"text": "x"}\n')
    for path in (prose, looks_like_json):
        (doc,) = data.load_documents(str(path))
        assert (doc.name, doc.data.tobytes()) == (path.name, path.read_bytes())
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(data.DataError, match=r"no non-empty UTF-8 text documents in .*blob\.txt"):
        data.load_documents(str(binary))
