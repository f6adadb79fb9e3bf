"""Orbax checkpoints of a run: train state (params, optimizer, step) and the Grain iterator state.

Layout of a workdir: ``config.json`` (the run's config, written once) and ``checkpoints/<step>/``
with items ``state``, ``data`` and ``pending`` (the metrics of the steps since the last log
record, so that a resumed run logs the same rows as one that never stopped).
"""

from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from megacontext_jax.config import from_json, leaves, normalized, to_json


class CheckpointError(RuntimeError):
    """A missing, incomplete or incompatible checkpoint, reported as one line."""


CONFIG_FILE = "config.json"
# Fields that change what a checkpoint holds (the shapes, dtypes or structure of the parameters and
# optimizer state, or where a frozen base comes from); anything else (steps, logging, lr, data,
# the attention implementation, the compute dtype) may change on resume. A group name covers all
# of its fields.
RESUME_FIXED = (
    "model",
    "mc.enabled",
    "mc.mode",
    "mc.base_checkpoint",
    "mc.block_size",
    "mc.max_level",
    "mc.gist",
    "mc.lens",
    "train.optimizer",
)
RESUME_FREE = ("model.attention_impl", "model.dtype")


def _fixed(field: str) -> bool:
    def under(group: str) -> bool:
        return field == group or field.startswith(f"{group}.")

    return any(map(under, RESUME_FIXED)) and not any(map(under, RESUME_FREE))


def check_resume(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Refuses, before anything is written, to resume the run in ``workdir`` with a config that
    changes what its checkpoints hold; one line names the first such field and both values."""
    checkpoints = Path(workdir) / "checkpoints"
    saved_steps = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    if not saved_steps or not (Path(workdir) / CONFIG_FILE).exists():
        return  # nothing to resume: the run starts afresh
    saved, new = leaves(read_config(workdir)), leaves(config)
    for field, value in new.items():
        if _fixed(field) and field in saved and normalized(saved[field]) != normalized(value):
            raise CheckpointError(
                f"{workdir} holds a run with {field}={saved[field]!r}, not {value!r}: resume "
                "with the same value or choose a new --config.workdir"
            )


def write_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Records the run's config (process 0). Call it only once the state is initialized or
    restored, so a resume that fails leaves the workdir's record as it was."""
    if jax.process_index() == 0:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        tmp = Path(workdir) / f"{CONFIG_FILE}.tmp"
        tmp.write_text(to_json(config))
        tmp.replace(Path(workdir) / CONFIG_FILE)


def read_config(workdir: Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {workdir}: {CONFIG_FILE} not found")
    try:
        return from_json(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not a valid config ({e})") from None


class Checkpointer:
    """Saves and restores ``(state, data iterator)`` under ``workdir/checkpoints``."""

    def __init__(self, workdir: Path, keep: int = 2, create: bool = True):
        directory = Path(workdir).absolute() / "checkpoints"
        if not create and not directory.is_dir():
            raise CheckpointError(f"no checkpoint at {workdir}: {directory} not found")
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        data_iter: grain.DatasetIterator,
        pending: list[dict[str, float]] = (),
    ) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
                pending=ocp.args.JsonSave(list(pending)),
            ),
        )

    def pending(self, step: int) -> list[dict[str, float]]:
        """The unlogged metrics saved with ``step`` (none for a checkpoint saved without them)."""
        if not (Path(self.manager.directory) / str(step) / "pending").is_dir():
            return []
        return list(
            self.manager.restore(step, args=ocp.args.Composite(pending=ocp.args.JsonRestore()))[
                "pending"
            ]
        )

    def restore(
        self, abstract_state: Any, data_iter: grain.DatasetIterator | None = None
    ) -> tuple[Any, int]:
        """Restores the latest step into ``abstract_state`` (and ``data_iter``, if given)."""
        step = self.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint saved under {self.manager.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint {self.manager.directory}/{step} does not match this model: {first_line}"
            ) from None
        return restored["state"], step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
