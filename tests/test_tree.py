import json
import re
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

from megacontext_jax.megacontext import make_base
from megacontext_jax.memory import tree as tree_module
from megacontext_jax.memory.errors import (
    TreeCorruptError,
    TreeError,
    TreeLockedError,
    TreeMismatchError,
    TreeNotFoundError,
)
from megacontext_jax.memory.gister import fingerprint
from megacontext_jax.memory.tree import Tree
from megacontext_jax.nets.gistnet import GistNet, build_levels, contextual_inputs
from megacontext_jax.nets.specs import GistConfig
from tests.conftest import make_gister, mc_config

ROOT = Path(__file__).resolve().parents[1]
GISTER = make_gister()
VOCAB = 320


def contextual_config(depth: int = 1):
    """``mc_config`` with LOD1 reading the base's first block over spans of 2 blocks."""
    config = mc_config()
    config.model.depth = depth
    config.mc.gist.read_layer, config.mc.gist.read_blocks = 1, 2
    return config


CONTEXTUAL = make_gister(contextual_config())


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
    for gister in (GISTER, CONTEXTUAL):
        _assert_ingest_equals_rebuild(gister, stream, chunk_sizes)


def _assert_ingest_equals_rebuild(gister, stream, chunk_sizes) -> None:
    length = len(stream)
    full = Tree.in_memory(gister, 3, VOCAB)
    full.append(stream)
    incremental = Tree.in_memory(gister, 3, VOCAB)
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
    embeddings = jnp.asarray(GISTER.embed(stream))
    levels = build_levels(net, embeddings, embeddings, 4, 3)
    for level in range(1, 4):
        got = tree.gists(level, 0, tree.length(level)).astype(np.float32)
        np.testing.assert_allclose(got, levels[level], rtol=0.05, atol=0.05)


def test_contextual_tree_matches_the_in_graph_build_and_verifies_deep():
    """A contextual tree holds what training builds in-graph (up to the storage dtype), and
    ``verify(deep=True)`` recomputes its LOD1 gists from tokens bit for bit."""
    stream = np.random.default_rng(2).integers(0, 256, 300)
    tree = Tree.in_memory(CONTEXTUAL, 3, VOCAB)
    for piece in np.split(stream, [5, 77, 78, 201]):
        tree.append(piece)
    tree.verify(deep=True)
    net = nnx.merge(CONTEXTUAL.graphdef, CONTEXTUAL.state)
    base = nnx.merge(*CONTEXTUAL.base)
    tokens = jnp.asarray(stream, jnp.int32)[None]
    reads = contextual_inputs(base, tokens, 1, 8)[0]
    levels = build_levels(net, jnp.asarray(CONTEXTUAL.embed(stream)), reads, 4, 3)
    for level in range(1, 4):
        got = tree.gists(level, 0, tree.length(level)).astype(np.float32)
        np.testing.assert_allclose(got, levels[level], rtol=0.05, atol=0.05)


def test_contextual_fingerprint_names_the_base_blocks_it_reads():
    """LOD1 reads block 0 of a 2-block base: changing block 0 changes the fingerprint (such a
    tree is refused), changing block 1 does not; a GistNet of token embeddings differs too."""
    config = contextual_config(depth=2)
    gist = GistConfig.from_config(config)
    base = make_base(config, nnx.Rngs(0))
    gistnet = GistNet(gist, rngs=nnx.Rngs(0))
    table = np.asarray(base.embed(jnp.arange(VOCAB)))
    before = fingerprint(table, gistnet, gist, base)
    assert before != fingerprint(table, gistnet, GistConfig.from_config(mc_config()))
    kernel = base.blocks[1].mlp.up.kernel
    kernel.value = kernel.value + 1.0
    assert fingerprint(table, gistnet, gist, base) == before
    kernel = base.blocks[0].mlp.up.kernel
    kernel.value = kernel.value + 1.0
    assert fingerprint(table, gistnet, gist, base) != before


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
    with pytest.raises(TreeCorruptError, match="level 1 holds 24 gists"):  # refused at open
        Tree.open(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "lengths": [10**6, 0, 0, 0]}))
    with pytest.raises(TreeCorruptError, match="level 0 holds .* rows but 1000000 are committed"):
        Tree.open(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    # Rewrite one stored gist through TensorStore (a valid chunk, other values): its chunk's
    # digest no longer matches, on verify and on the first read alike.
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "level_2")}}
    array = ts.open(spec, open=True).result()
    array[3].write(np.ones(32, array.dtype.numpy_dtype)).result()
    altered = r"level 2 rows \[0, 6\) read back altered or missing \(chunk 0 fails its checksum\)"
    with Tree.open(path, GISTER) as t:
        with pytest.raises(TreeCorruptError, match=altered):
            t.verify()
        with pytest.raises(TreeCorruptError, match=altered):
            t.gists(2, 3, 4)
    # Deep verification still recomputes every gist (a tree without digests: written before).
    (path / "manifest.json").write_text(
        json.dumps({k: v for k, v in manifest.items() if k != "digests"})
    )
    with Tree.open(path, GISTER) as t:
        t.verify()
        with pytest.raises(TreeCorruptError, match=r"gist \(2, 3\) differs"):
            t.verify(deep=True)


LOCK_SCRIPT = """
from megacontext_jax.memory.tree import Tree
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
        script = LOCK_SCRIPT.format(path=str(path))
        # From the checkout's root, where ``python -c`` finds ``tests`` (the package is installed).
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT
        )
        assert out.stdout.strip().startswith("TreeLockedError")
        assert "locked by another writer" in out.stdout
        with Tree.open(path) as reader:  # readers are never blocked
            assert reader.num_tokens == 8


def test_cli(tmp_path):
    path = tmp_path / "t"
    with Tree.create(path, GISTER, 3, VOCAB) as t:
        t.append(np.arange(100) % 256)
    cli = [sys.executable, "-m", "megacontext_jax.memory.tree"]
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


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_a_lost_manifest_is_refused_and_the_data_kept(tmp_path):
    """A directory with tree data but no manifest is never taken for an empty place to create a
    tree in: every way in says what it found, and no byte of the data changes."""
    path = tmp_path / "t"
    with Tree.create(path, GISTER, 3, VOCAB) as t:
        t.append(np.arange(100) % 256)
    manifest = (path / "manifest.json").read_bytes()
    (path / "manifest.json").unlink()
    data = _files(path)
    found = "holds tree data (level_0, level_1, level_2, level_3) but no manifest.json"
    for attempt in (
        lambda: Tree.open_or_create(path, GISTER, 3, VOCAB),
        lambda: Tree.create(path, GISTER, 3, VOCAB),
        lambda: Tree.open(path),
    ):
        with pytest.raises(TreeCorruptError, match=re.escape(found)):
            attempt()
        assert _files(path) == data
    cli = [sys.executable, "-m", "megacontext_jax.memory.tree", "verify", str(path)]
    verify = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert verify.returncode == 1 and len(verify.stderr.strip().splitlines()) == 1
    assert found in verify.stderr
    (path / "manifest.json").write_bytes(manifest)
    with Tree.open(path, GISTER) as t:
        assert t.num_tokens == 100
        t.verify(deep=True)


def test_an_unlinked_lock_file_keeps_the_second_writer_out(tmp_path):
    path = tmp_path / "t"
    with Tree.create(path, GISTER, 3, VOCAB) as t:
        t.append(np.arange(8))
        (path / "writer.lock").unlink()
        with pytest.raises(TreeLockedError, match="locked by another writer"):
            Tree.open(path, GISTER)
        t.append(np.arange(8))  # the first writer goes on
    with Tree.open(path) as t:
        assert t.num_tokens == 16


def test_a_commit_never_lands_on_a_manifest_it_did_not_write(tmp_path):
    """Another writer's commit (here one that got past the lock) is never overwritten: the
    manifest's generation tells this writer its view is stale."""
    path = tmp_path / "t"
    with Tree.create(path, GISTER, 3, VOCAB) as t:
        t.append(np.arange(40) % 256)
        theirs = json.loads((path / "manifest.json").read_text())
        theirs["generation"] += 1
        (path / "manifest.json").write_text(json.dumps(theirs))
        with pytest.raises(TreeLockedError, match="changed by another writer"):
            t.append(np.arange(8))
    assert json.loads((path / "manifest.json").read_text()) == theirs


@pytest.mark.parametrize("fault", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("level", [0, 1, 3])
def test_a_damaged_chunk_is_detected_by_verify_and_by_reads(tmp_path, fault, level):
    path = tmp_path / "t"
    with Tree.create(path, GISTER, 3, VOCAB) as t:
        t.append(np.arange(300) % 256)
    (chunk,) = [p for p in (path / f"level_{level}").rglob("*") if p.is_file() and "c" in p.parts]
    data = bytearray(chunk.read_bytes())
    if fault == "flip":
        data[len(data) // 2] ^= 0x10
        chunk.write_bytes(bytes(data))
    elif fault == "truncate":
        chunk.write_bytes(bytes(data[: len(data) // 2]))
    else:
        chunk.unlink()
    damaged = rf"tree at .*: level {level} rows \[0, \d+\) (cannot be read|read back altered)"
    with Tree.open(path) as t, pytest.raises(TreeCorruptError, match=damaged):
        t.verify()
    with Tree.open(path) as t, pytest.raises(TreeCorruptError, match=damaged):
        t.tokens(0, 10) if level == 0 else t.gists(level, 0, 1)
    cli = [sys.executable, "-m", "megacontext_jax.memory.tree", "verify", str(path)]
    verify = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert verify.returncode == 1 and len(verify.stderr.strip().splitlines()) == 1, verify.stderr
    assert re.search(damaged, verify.stderr)


def test_a_tree_written_before_digests_gets_them_at_its_next_commit(tmp_path):
    path = tmp_path / "t"
    with Tree.create(path, GISTER, 3, VOCAB) as t:
        t.append(np.arange(100) % 256)
    manifest = json.loads((path / "manifest.json").read_text())
    old = {k: v for k, v in manifest.items() if k not in ("digests", "generation")}
    (path / "manifest.json").write_text(json.dumps(old))
    with Tree.open(path, GISTER) as t:
        t.verify()  # nothing to check against yet
        t.append(np.arange(8))
    assert len(json.loads((path / "manifest.json").read_text())["digests"]) == 4
    with Tree.open(path) as t:
        t.verify()
        assert t.num_tokens == 108
