"""Orbax checkpoints of a run: train state (params, optimizer, step) and the Grain iterator state.

Layout of a workdir: ``config.json`` (the run's config, written once) and ``checkpoints/<step>/``
with items ``state`` and ``data``.
"""

from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from megacontext_jax.config import from_json, to_json


class CheckpointError(RuntimeError):
    """A missing, incomplete or incompatible checkpoint, reported as one line."""


CONFIG_FILE = "config.json"
# Fields that change the saved arrays; anything else (steps, logging, lr) may change on resume.
_SHAPE_GROUPS = ("model",)


def write_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Records the run's config, refusing a workdir that holds a run with another model."""
    path = workdir / CONFIG_FILE
    if path.exists():
        saved = read_config(workdir)
        for group in _SHAPE_GROUPS:
            for key, value in config[group].items():
                if key in saved[group] and saved[group][key] != value:
                    raise CheckpointError(
                        f"{workdir} holds a run with {group}.{key}={saved[group][key]!r}, not "
                        f"{value!r}: resume with the same model or choose a new --config.workdir"
                    )
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(to_json(config))


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

    def save(self, step: int, state: Any, data_iter: grain.DatasetIterator) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
            ),
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
