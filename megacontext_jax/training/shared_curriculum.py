"""Starting a run from another run's curriculum (``curriculum.reuse_from``).

The curriculum trains the base model alone (``step.make_train_step(base_only=True)``): GistNet
and LensNet keep their initialization, their optimizer moments stay exactly zero, and nothing of
the main phase's settings (``mc.*``, ``data.seq_len``, the main phase's data mix) is read. So a
run whose config differs from another's only in such fields would reach, at step
``curriculum.steps``, the other run's base model and base optimizer state, and its own fresh
GistNet and LensNet (the base is built first, so the seed gives both runs the same draws). This
module builds that state from the other run's curriculum checkpoint: the run then trains only its
main phase, and equals, bit for bit, the same config trained from step 0.

Experiments that change one MegaContext lever at a time share one curriculum this way; pairing
them on the same base also removes the base's run-to-run noise from their differences.
"""

from pathlib import Path

import jax
import ml_collections

from megacontext_jax.config import config_diff
from megacontext_jax.training.checkpoint import Checkpointer, CheckpointError, read_config, under
from megacontext_jax.training.metrics import read_metrics
from megacontext_jax.training.step import Trainable, TrainState, make_trainable

# Every field the curriculum's state depends on (a prefix names a whole group) ...
SHARED = ("seed", "model", "curriculum", "train", "data.source", "data.jsonl_field")
SHARED += ("data.val_fraction", "mc.enabled", "mc.mode")
# ... but these, which only pace the run, name it, or change its numerics by rounding alone.
UNSHARED = ("curriculum.reuse_from", "train.log_every", "train.eval_every", "train.eval_batches")
UNSHARED += ("train.checkpoint_every", "train.keep_checkpoints", "train.batch_size")
UNSHARED += ("model.attention_impl",)


def difference(config: ml_collections.ConfigDict, source: ml_collections.ConfigDict) -> str | None:
    """The first field the curriculum depends on where ``config`` and ``source`` differ, as
    ``field=<source's value>, this run <config's>``; None if ``config`` can reuse ``source``'s
    curriculum."""
    for field, (theirs, mine) in sorted(config_diff(config, source).items()):
        if under(field, SHARED) and not under(field, UNSHARED):
            return f"{field}={theirs!r}, this run {mine!r}"
    return None


def check_shared(config: ml_collections.ConfigDict, source: ml_collections.ConfigDict) -> None:
    """Raises ``CheckpointError`` naming the first field the curriculum depends on where
    ``config`` and the run it reuses (``source``) differ."""
    found = difference(config, source)
    if found is not None:
        raise CheckpointError(
            f"config.curriculum.reuse_from={config.curriculum.reuse_from} ran {found}: its "
            "curriculum is not this run's"
        )


def _by_path(tree) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def branch_state(fresh: TrainState, curriculum: TrainState) -> TrainState:
    """``fresh`` (this run's initial state) with every leaf that is not GistNet's or LensNet's
    (the step, the base's parameters and optimizer state, the optimizer's counts) taken from
    ``curriculum`` (the reused run's state after its curriculum)."""
    mc_parts = {k for k in fresh.params.raw_mapping if k != "base"}
    saved = _by_path(curriculum)

    def pick(path, leaf):
        if any(getattr(k, "key", None) in mc_parts for k in path):
            return leaf
        name = jax.tree_util.keystr(path)
        other = saved.get(name)
        if other is None or other.shape != leaf.shape or other.dtype != leaf.dtype:
            raise CheckpointError(f"the reused curriculum's state does not match at {name}")
        return other

    return jax.tree_util.tree_map_with_path(pick, fresh)


def restore(
    config: ml_collections.ConfigDict, trainable: Trainable, mesh: jax.sharding.Mesh
) -> tuple[TrainState, list[dict]]:
    """This run's state at step ``curriculum.steps``, built from ``curriculum.reuse_from``'s
    checkpoint of that step, and the reused run's metric rows of its curriculum (to log as
    this run's). Raises ``CheckpointError`` (one line) if that run is not this run's curriculum
    or kept no checkpoint of its last curriculum step."""
    workdir, step = Path(config.curriculum.reuse_from), config.curriculum.steps
    source = read_config(workdir)
    check_shared(config, source)
    other = make_trainable(source, mesh)
    checkpointer = Checkpointer(workdir, create=False)
    try:
        saved, _, _, _ = checkpointer.restore(other.abstract_state(), step=step)
    finally:
        checkpointer.close()
    rows = []
    if (workdir / "metrics.jsonl").is_file():
        rows = [r for r in read_metrics(workdir / "metrics.jsonl") if 0 < r["step"] <= step]
    return branch_state(trainable.init(), saved), rows
