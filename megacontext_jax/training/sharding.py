"""The device mesh and the sharding rules for parameters, optimizer state and batches.

Mesh axes are ``("data", "fsdp")``. Batches split over both axes (every device sees a different slice
of the global batch). Parameters and optimizer state are replicated when ``fsdp == 1`` (plain data
parallelism); with ``fsdp > 1`` each array with a dimension divisible by ``fsdp`` is sharded along
its largest such dimension, so a model larger than one device's memory still fits.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all); ``data=-1`` takes the rest."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} available devices")
    data = n // fsdp if data == -1 else data
    if data * fsdp != n:
        raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} != {n} available devices")
    return jax.make_mesh(
        (data, fsdp), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def array_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """FSDP rule: shard the largest dimension divisible by ``fsdp``; replicate otherwise."""
    if fsdp == 1:
        return PartitionSpec()
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return PartitionSpec(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Shardings for every leaf of a pytree of arrays (params, optimizer state, step)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, array_spec(tuple(x.shape), fsdp)), abstract_state
    )


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's rows of the batch into global arrays sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
