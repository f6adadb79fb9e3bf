"""Loading a trained model from a workdir for inference."""

from pathlib import Path

import ml_collections
from flax import nnx

from megacontext_jax import sharding
from megacontext_jax.checkpoint import Checkpointer, CheckpointError, read_config
from megacontext_jax.megacontext import MegaContext
from megacontext_jax.model import GPT
from megacontext_jax.train_step import make_trainable


def load_model(workdir: str | Path) -> tuple[GPT | MegaContext, ml_collections.ConfigDict]:
    """The model (GPT, or MegaContext with ``mc.enabled``) of the latest checkpoint in ``workdir``
    and the config it was trained with.

    Raises ``CheckpointError`` (one line) for a missing or mismatched checkpoint.
    """
    workdir = Path(workdir)
    config = read_config(workdir)
    trainable = make_trainable(config, sharding.make_mesh())
    checkpointer = Checkpointer(workdir, create=False)
    try:
        state, _ = checkpointer.restore(trainable.abstract_state())
    finally:
        checkpointer.close()
    return nnx.merge(trainable.graphdef, state.params), config


def latest_step(workdir: str | Path) -> int:
    """The training step of the latest checkpoint in ``workdir``."""
    checkpointer = Checkpointer(Path(workdir), create=False)
    try:
        step = checkpointer.latest_step()
    finally:
        checkpointer.close()
    if step is None:
        raise CheckpointError(f"no checkpoint saved under {workdir}")
    return step
