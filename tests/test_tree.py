import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megacontext_jax import tree as tree_module
from megacontext_jax.gistnet import build_levels
from megacontext_jax.tree import Tree
from megacontext_jax.tree_storage import (
    TreeCorruptError,
    TreeError,
    TreeMismatchError,
    TreeNotFoundError,
)
from tests.conftest import make_gister, mc_config

ROOT = Path(__file__).resolve().parents[1]
GISTER = make_gister()
VOCAB = 320


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16)


def _assert_same_tree(a: Tree, b: Tree) -> None:
    assert [a.length(l) for l in range(4)] == [b.length(l) for l in range(4)]
    np.testing.assert_array_equal(a.tokens(0, a.num_tokens), b.tokens(0, b.num_tokens))
    for level in range(1, 4):
        np.testing.assert_array_equal(
            _bits(a.gists(level, 0, a.length(level))), _bits(b.gists(level, 0, b.length(level)))
        )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 2**31 - 1),
    st.integers(0, 700),
    st.lists(st.integers(1, 300), min_size=1, max_size=40),
)
def test_incremental_ingest_equals_full_rebuild(seed, length, chunk_sizes):
    stream = np.random.default_rng(seed).integers(0, VOCAB, length)
    full = Tree.in_memory(GISTER, 3, VOCAB)
    full.append(stream)
    incremental = Tree.in_memory(GISTER, 3, VOCAB)
    pos, i = 0, 0
    while pos < length:
        n = chunk_sizes[i % len(chunk_sizes)]
        incremental.append(stream[pos : pos + n])
        pos, i = pos + n, i + 1
    _assert_same_tree(full, incremental)
    assert [full.length(l) for l in range(4)] == [length // 4**l for l in range(4)]


def test_tree_matches_batched_hierarchical_build():
    stream = np.random.default_rng(0).integers(0, 256, 300)
    tree = Tree.in_memory(GISTER, 3, VOCAB)
    tree.append(stream)
    net = nnx.merge(GISTER.graphdef, GISTER.state)
    levels = build_levels(net, jnp.asarray(GISTER.embed(stream)), 4, 3)
    for level in range(1, 4):
        got = tree.gists(level, 0, tree.length(level)).astype(np.float32)
        np.testing.assert_allclose(got, levels[level], rtol=0.05, atol=0.05)


def test_disk_tree_round_trip(tmp_path):
    stream = np.random.default_rng(1).integers(0, 256, 450)
    memory = Tree.in_memory(GISTER, 3, VOCAB)
    memory.append(stream)
    with Tree.create(tmp_path / "t", GISTER, 3, VOCAB) as disk:
        disk.append(stream[:123])
        disk.append(stream[123:])
    with Tree.open(tmp_path / "t") as reader:  # read-only: no lock, no Gister needed
        _assert_same_tree(memory, reader)
        reader.verify()
        stats = reader.stats()
        assert stats["lengths"] == [450, 112, 28, 7]
        assert stats["ideal_bytes_per_token"] == 4 + 2 * 32 / 4 + 2 * 32 / 16 + 2 * 32 / 64
        with pytest.raises(TreeError, match="opened read-only"):
            reader.append([1])
    with Tree.open(tmp_path / "t", GISTER) as writer:
        writer.verify(deep=True)
        writer.append(stream[:10])
        assert writer.num_tokens == 460


def test_long_append_commits_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(tree_module, "APPEND_PIECE", 64)
    seen = []
    with Tree.create(tmp_path / "t", GISTER, 3, VOCAB) as t:
        t.append(np.arange(200) % 256, progress=seen.append)
        assert seen == [64, 64, 64, 8]
        t.verify(deep=True)


def test_bad_tokens_are_rejected_and_nothing_is_lost(tmp_path):
    with Tree.create(tmp_path / "t", GISTER, 3, VOCAB) as t:
        t.append(np.arange(10))
        with pytest.raises(ValueError, match="integer ids, got dtype float64"):
            t.append(np.array([1.0, 2.0]))
        with pytest.raises(
            ValueError, match=r"token 320 at offset 1 is outside the vocabulary \[0, 320\)"
        ):
            t.append([5, 320, 6])
        with pytest.raises(ValueError, match="token -1 at offset 0"):
            t.append([-1])
        with pytest.raises(ValueError, match="1-D"):
            t.append([[1, 2]])
        assert t.num_tokens == 10
    with Tree.open(tmp_path / "t", GISTER) as t:
        np.testing.assert_array_equal(t.tokens(0, 10), np.arange(10))
        t.verify(deep=True)


def test_open_errors(tmp_path):
    with pytest.raises(TreeNotFoundError, match="no tree at .*directory not found"):
        Tree.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TreeNotFoundError, match="manifest.json not found"):
        Tree.open(tmp_path / "empty")
    with Tree.create(tmp_path / "t", GISTER, 3, VOCAB) as t:
        t.append(np.arange(40))
    with pytest.raises(TreeError, match="already exists"):
        Tree.create(tmp_path / "t", GISTER, 3, VOCAB)
    other_weights = make_gister(seed=1)
    with pytest.raises(TreeMismatchError, match="gisted by other weights"):
        Tree.open(tmp_path / "t", other_weights)
    other_k = make_gister(mc_config(block_size=8, wc_size=64))
    with pytest.raises(TreeMismatchError, match="block size 4; this model uses 8"):
        Tree.open(tmp_path / "t", other_k)
    Tree.open(tmp_path / "t", GISTER).close()  # the failed opens released the lock


def test_corrupt_trees(tmp_path):
    path = tmp_path / "t"
    with Tree.create(path, GISTER, 3, VOCAB) as t:
        t.append(np.arange(100) % 256)
    manifest = json.loads((path / "manifest.json").read_text())

    (path / "manifest.json").write_text("{not json")
    with pytest.raises(TreeCorruptError, match="not valid JSON"):
        Tree.open(path)
    (path / "manifest.json").write_text(json.dumps({"lengths": [1]}))
    with pytest.raises(TreeCorruptError, match="lacks block_size"):
        Tree.open(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "lengths": [100, 24, 6, 1]}))
    with Tree.open(path) as t, pytest.raises(TreeCorruptError, match="level 1 holds 24 gists"):
        t.verify()
    (path / "manifest.json").write_text(json.dumps({**manifest, "lengths": [10**6, 0, 0, 0]}))
    with pytest.raises(TreeCorruptError, match="level 0 holds .* rows but 1000000 are committed"):
        Tree.open(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    # Flip one stored gist: structure is fine, deep verification finds it.
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "level_2")}}
    array = ts.open(spec, open=True).result()
    array[3].write(np.ones(32, array.dtype.numpy_dtype)).result()
    with Tree.open(path, GISTER) as t:
        t.verify()
        with pytest.raises(TreeCorruptError, match=r"gist \(2, 3\) differs"):
            t.verify(deep=True)


LOCK_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from megacontext_jax.tree import Tree
from tests.conftest import make_gister
try:
    Tree.open({path!r}, make_gister())
except Exception as e:
    print(type(e).__name__, e)
"""


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "t"
    with Tree.create(path, GISTER, 3, VOCAB) as t:
        t.append(np.arange(8))
        script = LOCK_SCRIPT.format(root=str(ROOT), path=str(path))
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert out.stdout.strip().startswith("TreeLockedError")
        assert "locked by another writer" in out.stdout
        with Tree.open(path) as reader:  # readers are never blocked
            assert reader.num_tokens == 8


def test_cli(tmp_path):
    path = tmp_path / "t"
    with Tree.create(path, GISTER, 3, VOCAB) as t:
        t.append(np.arange(100) % 256)
    cli = [sys.executable, "-m", "megacontext_jax.tree"]
    ok = subprocess.run([*cli, "verify", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 100 tokens")
    stats = subprocess.run([*cli, "stats", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert json.loads(stats.stdout)["lengths"] == [100, 25, 6, 1]
    bad = subprocess.run(
        [*cli, "verify", str(tmp_path / "nope")], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"error: no tree at {tmp_path / 'nope'}: directory not found"
    ]
