"""Loading a trained model from a workdir, and a frozen base from its reference."""

from pathlib import Path

import jax
import ml_collections
from flax import nnx

from megacontext_jax.megacontext import MegaContext
from megacontext_jax.nets.gpt import GPT
from megacontext_jax.training import sharding
from megacontext_jax.training.checkpoint import Checkpointer, CheckpointError, read_config
from megacontext_jax.training.step import (
    Trainable,
    TrainState,
    checkpointed,
    frozen_base,
    make_trainable,
)


def load_model(workdir: str | Path) -> tuple[GPT | MegaContext, ml_collections.ConfigDict]:
    """The model (GPT, or MegaContext with ``mc.enabled``) of the newest intact checkpoint in
    ``workdir`` and the config it was trained with. A frozen base comes back from its reference.

    Raises ``CheckpointError`` (one line) for a missing, damaged or mismatched checkpoint.
    """
    model, config, _ = load(workdir)
    return model, config


def load(workdir: str | Path) -> tuple[GPT | MegaContext, ml_collections.ConfigDict, int]:
    """``load_model``'s model and config, and the step restored."""
    workdir = Path(workdir)
    config = read_config(workdir)
    check_base_chain(workdir, config)
    trainable = make_trainable(config, sharding.make_mesh())
    checkpointer = Checkpointer(workdir, create=False)
    try:
        state, step, _, _ = checkpointer.restore(checkpointed(trainable.abstract_state(), config))
    finally:
        checkpointer.close()
    if frozen_base(config):
        state = attach_base(state, trainable, config)
    return nnx.merge(trainable.graphdef, state.params), config, step


def check_base_chain(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Follows ``mc.base_checkpoint`` from the run in ``workdir`` (with ``config``) through the
    configs of its bases, before anything is restored; a chain that comes back to a workdir it
    has passed is a ``CheckpointError`` (loading it would recurse without end)."""
    chain = [Path(workdir).resolve()]
    while frozen_base(config) and config.model.family != "llama" and config.mc.base_checkpoint:
        base = Path(config.mc.base_checkpoint).resolve()
        if base in chain:
            path = " -> ".join(map(str, [*chain, base]))
            raise CheckpointError(f"config.mc.base_checkpoint makes a cycle: {path}")
        chain.append(base)
        config = read_config(base)


def attach_base(
    state: TrainState, trainable: Trainable, config: ml_collections.ConfigDict
) -> TrainState:
    """``state`` with the base model's parameters from the reference of a frozen-base run:
    ``model.hf_path`` (an imported checkpoint) or ``mc.base_checkpoint`` (a workdir)."""
    if config.model.family == "llama":
        from megacontext_jax.nets.hf_weights import load_weights
        from megacontext_jax.nets.llama import base_config

        base = load_weights(base_config(config.model), config.model.hf_path)
    else:
        base = _trained_base(config)
    params = jax.device_put(nnx.state(base), trainable.state_shardings.params["base"])
    parts = {**state.params.raw_mapping, "base": params.raw_mapping}
    return state.replace(params=nnx.State(parts))


def _trained_base(config: ml_collections.ConfigDict) -> GPT:
    if not config.mc.base_checkpoint:
        raise ValueError("config.mc.mode=frozen_base needs config.mc.base_checkpoint (a workdir)")
    model, base_config, _ = load(config.mc.base_checkpoint)
    for key, value in config.model.items():
        if base_config.model[key] != value:
            raise ValueError(
                f"config.mc.base_checkpoint has model.{key}={base_config.model[key]!r}, "
                f"this run model.{key}={value!r}"
            )
    return model.base if isinstance(model, MegaContext) else model
