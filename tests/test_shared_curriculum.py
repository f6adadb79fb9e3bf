"""``curriculum.reuse_from``: a run that starts from another run's curriculum checkpoint."""

import jax
import numpy as np
import pytest
from flax import nnx

from megacontext_jax.training.checkpoint import Checkpointer, CheckpointError
from megacontext_jax.training.loop import train
from megacontext_jax.training.metrics import read_metrics
from megacontext_jax.training.restore import load_model
from tests.conftest import tiny_mc_config


def _config(workdir, corpus_dir, **fields):
    c = tiny_mc_config(workdir, corpus_dir, steps=4, keep_checkpoints=1)
    c.unlock()
    c.curriculum.steps, c.curriculum.seq_len, c.curriculum.batch_size = 2, 16, 8
    for field, value in fields.items():
        *groups, name = field.split(".")
        target = c
        for group in groups:
            target = target[group]
        target[name] = value
    c.lock()
    return c


# A main phase that differs in shape (GistNet without its transformer) and in its data.
LEVER = {"mc.gist.depth": 0, "mc.gist.pooling": "mean", "mc.num_random_variants": 3}


@pytest.fixture(scope="module")
def source(tmp_path_factory, corpus_dir):
    """A finished run of the default config: the curriculum every test reuses."""
    workdir = tmp_path_factory.mktemp("default")
    train(_config(workdir, corpus_dir), progress=False)
    return workdir


def test_a_run_from_a_shared_curriculum_is_the_run_from_step_0(tmp_path, corpus_dir, source):
    """It ends bit for bit where the same config trained from step 0 ends, logs the reused
    curriculum's rows as its own, and resumes like any run."""
    with Checkpointer(source, create=False) as checkpointer:  # keep=1, and the curriculum's
        assert checkpointer.manager.all_steps() == [2, 4]
    straight = train(_config(tmp_path / "straight", corpus_dir, **LEVER), progress=False)
    branched = tmp_path / "branched"
    reuse = {**LEVER, "curriculum.reuse_from": str(source)}
    train(_config(branched, corpus_dir, **reuse), stop_at=3, progress=False)
    summary = train(_config(branched, corpus_dir, **reuse), progress=False)
    for key in ("curriculum/loss", "mc/objective", "mc/lens", "mc/loss/mc_focus", "val/loss"):
        assert summary[key] == straight[key], key
    (a, _), (b, _) = load_model(tmp_path / "straight"), load_model(branched)
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(x, y)
    rows = read_metrics(branched / "metrics.jsonl")
    straight_rows = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    drop = ("tokens_per_s",)  # wall-clock rates differ

    def plain(records):
        return [{k: v for k, v in r.items() if not k.endswith(drop)} for r in records]

    assert plain(rows) == plain(straight_rows)


@pytest.mark.parametrize(
    ("field", "value"),
    [("curriculum.seq_len", 32), ("seed", 1), ("train.lr", 1e-3), ("model.width", 48)],
)
def test_a_curriculum_that_is_not_this_runs_is_refused(tmp_path, corpus_dir, source, field, value):
    config = _config(
        tmp_path / "b", corpus_dir, **{field: value, "curriculum.reuse_from": str(source)}
    )
    with pytest.raises(CheckpointError, match=rf"ran {field}=.*: its curriculum is not this run's"):
        train(config, progress=False)
    assert not (tmp_path / "b" / "config.json").exists()


def test_a_curriculum_step_not_kept_is_named(tmp_path, corpus_dir):
    source = tmp_path / "default"
    train(_config(source, corpus_dir), stop_at=1, progress=False)
    config = _config(tmp_path / "b", corpus_dir, **{"curriculum.reuse_from": str(source)})
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 2 under .* \(1\)"):
        train(config, progress=False)
