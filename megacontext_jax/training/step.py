"""Train state, optimizer, and the pure jitted ``train_step(state, batch) -> (state, metrics)``.

The NNX model is used functionally: ``nnx.split`` gives a static graphdef and a pytree of parameters
that lives in ``TrainState``; each step merges them back inside ``jax.jit``.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from megacontext_jax.megacontext import MegaContext, make_base
from megacontext_jax.nets.gpt import GPT
from megacontext_jax.nets.losses import cross_entropy
from megacontext_jax.specs import MCTraining
from megacontext_jax.training import sharding
from megacontext_jax.training.losses import mc_loss


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State
    opt_state: optax.OptState


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _is_matrix(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _muon_labels(params: Any) -> Any:
    """Muon for the transformer blocks' matrices; AdamW for embeddings, head and vectors."""

    def label(path, p):
        in_blocks = any(getattr(k, "key", None) == "blocks" for k in path)
        return "muon" if in_blocks and p.ndim == 2 else "adamw"

    return jax.tree_util.tree_map_with_path(label, params)


def build_model(config: ml_collections.ConfigDict, seed: int) -> GPT | MegaContext:
    """The model a run trains: a plain GPT, or with ``mc.enabled`` the MegaContext model."""
    rngs = nnx.Rngs(seed)
    return MegaContext(config, rngs=rngs) if config.mc.enabled else make_base(config, rngs)


def _part_labels(params: Any) -> Any:
    """Of a MegaContext model's parameter tree: "base" for every leaf of the base model, "mc" for
    GistNet's and LensNet's."""

    def label(path, _):
        return "base" if getattr(path[0], "key", None) == "base" else "mc"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (or Muon) under the warmup + cosine schedule.

    In ``frozen_base`` mode the base model's parameters get no updates.
    """
    cfg = config.train
    schedule = lr_schedule(cfg)
    adamw = optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_is_matrix
    )
    if cfg.optimizer == "adamw":
        inner = adamw
    else:
        muon = optax.contrib.muon(schedule, weight_decay=cfg.weight_decay)
        inner = optax.multi_transform({"muon": muon, "adamw": adamw}, _muon_labels)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), inner)
    if config.mc.enabled and config.mc.mode == "frozen_base":
        tx = optax.multi_transform({"mc": tx, "base": optax.set_to_zero()}, _part_labels)
    return tx


@dataclasses.dataclass(frozen=True)
class Trainable:
    """Everything static about a training run: the model graph, optimizer and shardings."""

    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    state_shardings: Any
    init: Callable[[], TrainState]
    config: ml_collections.ConfigDict

    def abstract_state(self) -> TrainState:
        """Shape/dtype/sharding structs of the state (the restore target of a checkpoint)."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(self.init),
            self.state_shardings,
        )


def make_trainable(config: ml_collections.ConfigDict, mesh: Mesh) -> Trainable:
    """Builds the static parts of a run; ``Trainable.init()`` creates the sharded initial state."""
    optimizer = make_optimizer(config)

    def init() -> TrainState:
        _, params = nnx.split(build_model(config, config.seed))
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
        )

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(config, 0)))
    shardings = sharding.state_shardings(jax.eval_shape(init), mesh)
    return Trainable(
        graphdef=graphdef,
        optimizer=optimizer,
        schedule=lr_schedule(config.train),
        mesh=mesh,
        state_shardings=shardings,
        init=jax.jit(init, out_shardings=shardings),
        config=config,
    )


def frozen_base(config: ml_collections.ConfigDict) -> bool:
    return bool(config.mc.enabled and config.mc.mode == "frozen_base")


def checkpointed(state: TrainState, config: ml_collections.ConfigDict) -> TrainState:
    """What a checkpoint holds: with a frozen base, everything but the base's parameters (the
    config's ``mc.base_checkpoint`` or ``model.hf_path`` is the reference they come back from)."""
    if not frozen_base(config):
        return state
    parts = {k: v for k, v in state.params.raw_mapping.items() if k != "base"}
    return state.replace(params=nnx.State(parts))


def base_model(model: GPT | MegaContext) -> GPT:
    return model.base if isinstance(model, MegaContext) else model


def _nll(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array]):
    model = base_model(nnx.merge(graphdef, params))
    return cross_entropy(model(batch["inputs"]), batch["targets"], batch["mask"])


def make_train_step(
    t: Trainable, base_only: bool = False
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted step. ``batch``: ``inputs``/``targets`` int32 ``[B, L]``, ``mask`` bool ``[B, L]``.

    Metrics: ``loss`` (the optimized total; for a plain LM the mean nats per target),
    ``grad_norm``, ``lr`` (of this update), and with ``mc.enabled`` the terms of ``mc_loss``.
    ``base_only`` (the curriculum's steps): the plain LM loss of the base model, and GistNet and
    LensNet left exactly as they are (no weight decay either). The state is donated.
    """

    spec = MCTraining.from_config(t.config) if t.config.mc.enabled else None

    def loss_fn(params, batch, step):
        if spec is not None and not base_only:
            key = jax.random.fold_in(jax.random.key(t.config.seed), step)
            return mc_loss(nnx.merge(t.graphdef, params), batch, step, key, spec)
        nll, count = _nll(t.graphdef, params, batch)
        loss = nll / jnp.maximum(count, 1)
        return loss, {"loss": loss}

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, state.step
        )
        updates, opt_state = t.optimizer.update(grads, state.opt_state, state.params)
        if base_only and t.config.mc.enabled:
            updates = jax.tree.map(
                lambda u, part: u if part == "base" else jnp.zeros_like(u),
                updates,
                _part_labels(updates),
            )
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **metrics,
            "grad_norm": optax.global_norm(grads),
            "lr": t.schedule(state.step),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    batch_sharding = sharding.batch_sharding(t.mesh)
    return jax.jit(
        train_step,
        in_shardings=(t.state_shardings, batch_sharding),
        out_shardings=(t.state_shardings, sharding.replicated(t.mesh)),
        donate_argnums=0,
    )


def make_eval_step(t: Trainable) -> Callable[[nnx.State, dict], tuple[jax.Array, jax.Array]]:
    """Jitted ``(params, batch) -> (sum of target NLL in nats, number of targets)``."""
    return jax.jit(
        lambda params, batch: _nll(t.graphdef, params, batch),
        in_shardings=(t.state_shardings.params, sharding.batch_sharding(t.mesh)),
        out_shardings=sharding.replicated(t.mesh),
    )
