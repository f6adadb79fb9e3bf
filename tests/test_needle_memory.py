"""benchmarks/needle_memory.py on a tiny random MegaContext checkpoint: the records it writes."""

import json
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from megacontext_jax.data.tasks import PHRASINGS
from megacontext_jax.data.tokenizer import ByteTokenizer
from megacontext_jax.memory.tree import Tree
from megacontext_jax.testing import tiny_config
from megacontext_jax.training.checkpoint import Checkpointer, write_config
from megacontext_jax.training.sharding import make_mesh
from megacontext_jax.training.step import TrainState, checkpointed, make_trainable
from tests.conftest import benchmark_script, tiny_mc_config

needle_memory = benchmark_script("needle_memory")


def random_run(workdir: Path, corpus: Path, step: int = 1, mc: bool = True) -> Path:
    """A workdir (MegaContext, or with ``mc=False`` a plain LM) holding one checkpoint of random
    weights at ``step``, without training (``trainable.init`` compiles for ~10 s on 2 cores;
    numpy draws them at once)."""
    if mc:
        config = tiny_mc_config(workdir, corpus, steps=step)
        config.unlock()  # low thresholds: random scores edit the WC, round after round
        config.mc.allocator.tau_expand = config.mc.allocator.tau_collapse = 0.005
        config.mc.max_level = 3  # K^3 = 64 tokens a node: room below the top level to edit
        config.lock()
    else:
        config = tiny_config(workdir, corpus, steps=step)
    write_config(workdir, config)
    abstract = make_trainable(config, make_mesh()).abstract_state()
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "gain" in name:
            return 1 + 0.05 * rng.standard_normal(leaf.shape).astype(leaf.dtype)
        scale = 1 / np.sqrt(leaf.shape[0]) if len(leaf.shape) == 2 else 0.1
        return (scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, abstract.params)
    opt_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract.opt_state)
    state = TrainState(step=np.asarray(step, np.int32), params=params, opt_state=opt_state)
    with Checkpointer(workdir) as checkpointer:
        checkpointer.save(
            step, checkpointed(state, config), iter(grain.MapDataset.range(1).to_iter_dataset())
        )
    return workdir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_dir):
    return random_run(tmp_path_factory.mktemp("needle_run"), corpus_dir)


def test_one_record_per_probe_with_the_planted_key(run_dir, tmp_path, capsys):
    out, keep = tmp_path / "needles.json", tmp_path / "memories"
    argv = ["--checkpoint", str(run_dir), "--history", "300,1200", "--depths", "0.2,0.8"]
    argv += ["--probes", "1", "--lens", "on", "--max-rounds", "3", "--out", str(out)]
    assert needle_memory.main([*argv, "--keep", str(keep), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ingest ms/tok" in printed and f"wrote {out}" in printed
    results = json.loads(out.read_text())
    run = results["run"]
    assert run["step"] == 1 and run["lens"] is True and run["arguments"]["probes"] == 1
    assert run["versions"]["jax"] == jax.__version__
    records = results["records"]
    cells = [(r["history"], r["depth"], r["probe"]) for r in records]
    assert cells == [(300, 0.2, 0), (300, 0.8, 0), (1200, 0.2, 0), (1200, 0.8, 0)]
    tokenizer = ByteTokenizer()
    for r in records:
        assert isinstance(r["correct"], bool)
        assert r["correct"] == (r["generated_tokens"] == r["key_tokens"])
        assert len(r["key"]) == 5 and r["key"].isdigit() and r["key"] in r["needle_text"]
        assert len(r["generated_tokens"]) <= 5
        assert r["ingested"] == r["history"] - 5  # up to and including the question
        assert 1 <= r["refocus_rounds"] <= 3 and len(r["edits"]) == r["refocus_rounds"]
        assert r["refocus_rounds"] == 3 or sum(r["edits"][-1]) == 0  # the cap, or no edit
        assert r["needle_lod"] >= -1 and r["ingest_ms_per_token"] > 0
        assert r["decode_ms_per_token"] > 0
        # The key is in the memory on disk where the needle planted it, and the history ends
        # with the question: what the memory holds is the probe without its answer.
        tree = Tree.open(r["memory"])
        try:
            tokens = tree.tokens(0, tree.num_tokens)
        finally:
            tree.close()
        assert tree.num_tokens == r["memory_tokens"] == r["ingested"] + len(r["generated_tokens"])
        a, b = r["source"]
        assert tokenizer.decode(tokens[a:b]) == r["key"]
        assert r["needle"][0] < a < b < r["needle"][1] < r["ingested"]
        history = tokenizer.decode(tokens[: r["ingested"]])
        assert any(history.endswith(ph.question) for ph in PHRASINGS["train"])
    rows = results["summary"]["by_depth"]
    assert [(r["history"], r["depth"], r["probes"]) for r in rows] == [(*c[:2], 1) for c in cells]
    by_history = results["summary"]["by_history"]
    assert [(r["history"], r["probes"]) for r in by_history] == [(300, 2), (1200, 2)]
    assert sum(r["found"] for r in by_history) == sum(r["correct"] for r in records)
    assert any(sum(map(sum, r["edits"])) for r in records)  # LensNet + allocator did edit


def test_bad_input_is_one_line(run_dir, tmp_path, capsys, corpus_dir):
    def error(*args):
        args = [*map(str, args)]
        checkpoint = [] if "--checkpoint" in args else ["--checkpoint", str(run_dir)]
        try:
            code = needle_memory.main([*checkpoint, *args])
        except SystemExit as e:  # argparse's refusal
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code in (1, 2) and "\n" not in err, err
        return err

    assert error("--history", "40", "--out", tmp_path / "a.json") == (
        "error: --history 40 is shorter than the 73 tokens a passkey of the train phrasings needs"
    )
    assert "invalid choice: 'test'" in error("--split", "test")
    assert "numbers in [0, 1]" in error("--depths", "0.5,1.5")
    assert "token counts" in error("--history", "10k,10000")
    missing = tmp_path / "nothing"
    assert error("--checkpoint", missing).startswith(f"error: no checkpoint at {missing}")
    assert not missing.exists()  # the default --out is not made for a missing checkpoint
    plain = random_run(tmp_path / "plain", corpus_dir, mc=False)
    assert error("--checkpoint", plain, "--history", "300") == (
        f"error: {plain} holds a plain language model: a memory needs a MegaContext checkpoint "
        "(trained with --config.mc.enabled=true)"
    )
    assert not (plain / "needle_memory.json").exists()
