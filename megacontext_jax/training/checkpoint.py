"""Orbax checkpoints of a run: train state (params, optimizer, step) and the Grain iterator state.

Layout of a workdir: ``config.json`` (the run's config, written once) and ``checkpoints/<step>/``
with items ``state``, ``data`` and ``pending`` (the metrics of the steps since the last log
record, so that a resumed run logs the same rows as one that never stopped).

Nothing damaged is restored: Orbax checks no checksum of its data files (a flipped byte restores
as a wrong weight), so once a step is finalized its files' sizes and CRC-32s are recorded in
``checkpoints/<step>/digests.json`` (in Orbax's background thread, right after the commit), and a
restore checks them first. A step that is damaged, or that fails to restore without a digest to
vouch for it, is skipped with one line saying so, and the newest intact step is restored.
"""

import contextlib
import json
import logging
import os
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from megacontext_jax.config import from_json, leaves, normalized, to_json
from megacontext_jax.errors import first_line


class CheckpointError(RuntimeError):
    """A missing, incomplete or incompatible checkpoint, reported as one line."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


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


def under(field: str, groups: tuple[str, ...]) -> bool:
    """Whether the dotted ``field`` is one of ``groups`` or lies in one."""
    return any(field == g or field.startswith(f"{g}.") for g in groups)


def _fixed(field: str) -> bool:
    return under(field, RESUME_FIXED) and not under(field, RESUME_FREE)


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


DIGESTS = "digests.json"
# Orbax rewrites a step's metadata file after it is in place (its commit time); it holds no data.
UNDIGESTED = (DIGESTS, "_CHECKPOINT_METADATA")


class Restored(NamedTuple):
    state: Any
    step: int
    data_iter: grain.DatasetIterator | None  # the iterator restored into, if one was asked for
    pending: list[dict[str, float]]  # the metrics not yet logged at ``step``


def _crc_file(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def write_digests(step_dir: Path) -> None:
    """Records the size and CRC-32 of every file of a finalized step (atomically)."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name not in UNDIGESTED)
    record = {str(p.relative_to(step_dir)): [p.stat().st_size, _crc_file(p)] for p in files}
    tmp = step_dir / f"{DIGESTS}.tmp"
    tmp.write_text(json.dumps({"files": record}, indent=0))
    os.replace(tmp, step_dir / DIGESTS)


def damage(step_dir: Path) -> str | None:
    """What is wrong with a step's files against its digests (None: intact, or no digests)."""
    try:
        record = json.loads((step_dir / DIGESTS).read_text())["files"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"its {DIGESTS} is unreadable"
    for name, expected in record.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if [size, _crc_file(path)] != expected:
            return f"{name} is truncated" if size < expected[0] else f"{name} is altered"
    return None


def _arrays(tree: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{dotted path: (dtype, shape)}`` of a tree of arrays, abstract arrays or Orbax metadata."""
    tree = getattr(tree, "item_metadata", tree)  # StepMetadata -> the tree

    def name(key) -> str:
        return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))

    return {
        ".".join(map(name, path)).removesuffix(".value"): (
            str(np.dtype(leaf.dtype)),
            tuple(leaf.shape),
        )
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


class Checkpointer:
    """Saves and restores ``(state, data iterator)`` under ``workdir/checkpoints``: the newest
    ``keep`` steps, and every step of ``keep_steps`` (the curriculum's last, which another run
    can start from: ``shared_curriculum``)."""

    def __init__(
        self, workdir: Path, keep: int = 2, create: bool = True, keep_steps: tuple[int, ...] = ()
    ):
        directory = Path(workdir).absolute() / "checkpoints"
        if not create and not directory.is_dir():
            raise CheckpointError(f"no checkpoint at {workdir}: {directory} not found")
        self.directory = directory
        policies = ocp.checkpoint_managers
        self._writer = writer = create and jax.process_index() == 0
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policies.AnyPreservationPolicy(
                    [policies.LatestN(keep), policies.CustomSteps(list(keep_steps))]
                ),
                create=create,
                async_options=ocp.AsyncOptions(
                    post_finalization_callback=self._digest_finalized if writer else None
                ),
            ),
        )

    def _digest_finalized(self, staged: bool = True) -> None:
        """Digests every finalized step that has none yet. As Orbax's post-finalization callback
        (``staged``) it digests the staged step too, before Orbax renames it into place, so the
        digests land with the step; otherwise only steps in place (after a wait)."""
        for step_dir in self.directory.iterdir():
            step, _, suffix = step_dir.name.partition(".")
            if (
                step.isdigit()
                and (staged or not suffix)
                and step_dir.is_dir()
                and not (step_dir / DIGESTS).exists()
            ):
                # A step deleted meanwhile (max_to_keep) has nothing to vouch for.
                with contextlib.suppress(FileNotFoundError):
                    write_digests(step_dir)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def damage(self, step: int) -> str | None:
        """What is wrong with ``step``'s files (None: they match their digests)."""
        return damage(self.directory / str(step))

    def save(
        self,
        step: int,
        state: Any,
        data_iter: grain.DatasetIterator,
        pending: list[dict[str, float]] = (),
    ) -> None:
        if self._writer:  # the previous save has finished; digest it if the callback did not
            self.manager.wait_until_finished()
            self._digest_finalized(staged=False)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
                pending=ocp.args.JsonSave(list(pending)),
            ),
        )

    def restore(
        self,
        abstract_state: Any,
        data_iter_at: Callable[[int], grain.DatasetIterator] | None = None,
        warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
        step: int | None = None,
    ) -> Restored:
        """Restores the newest intact step (or ``step`` alone) into ``abstract_state`` and, with
        ``data_iter_at`` (the data iterator to resume a step with), into that step's iterator.
        Damaged steps are skipped with one line to ``warn``; a step whose digests hold but that
        fails to restore does not match this model (``CheckpointError``)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint saved under {self.directory}")
        if step is not None:
            if step not in steps:
                kept = ", ".join(map(str, sorted(steps)))
                raise CheckpointError(
                    f"no checkpoint of step {step} under {self.directory} ({kept})"
                )
            steps = [step]
        skipped, damaged = [], []  # "step N (why)" and N of each damaged step, newest first
        for step in steps:
            problem = self.damage(step)
            if problem is None:
                data_iter = data_iter_at(step) if data_iter_at is not None else None
                try:
                    state, pending = self._restore(step, abstract_state, data_iter)
                except CheckpointError as e:
                    if (self.directory / str(step) / DIGESTS).exists():
                        raise  # intact files that do not restore: a different model
                    problem = f"cannot be restored: {e.reason}"
                else:
                    if skipped:
                        warn(
                            f"checkpoint {self.directory}: {', '.join(skipped)} damaged"
                            f"{self._set_aside(damaged)}; restored step {step}, the newest "
                            "intact one"
                        )
                    return Restored(state, step, data_iter, pending)
            skipped.append(f"step {step} ({problem})")
            damaged.append(step)
        raise CheckpointError(f"no intact checkpoint under {self.directory}: {', '.join(skipped)}")

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        """Compares the saved arrays' names, shapes and dtypes with ``abstract_state`` before any
        read: a restore that fails midway leaves TensorStore reads whose callbacks print dozens
        of "Event loop is closed" tracebacks."""
        where = f"checkpoint {self.directory}/{step}"
        reader = ocp.StandardCheckpointer()
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)  # "Metadata file does not exist": Orbax's, not ours
        try:
            saved = _arrays(reader.metadata(self.directory / str(step) / "state"))
        except Exception as e:  # unreadable metadata: a damaged step
            first = first_line(e)
            raise CheckpointError(f"{where} has unreadable metadata: {first}", first) from None
        finally:
            absl_logger.setLevel(level)
            reader.close()
        wanted = _arrays(abstract_state)
        # Parameters before optimizer state: the same mismatch reads best at its source.
        for name in sorted(wanted.keys() | saved.keys(), key=lambda n: (n.startswith("opt"), n)):
            here, there = wanted.get(name), saved.get(name)
            if here == there:
                continue
            if here is None:
                reason = f"it holds {name}, which this model lacks"
            elif there is None:
                reason = f"it lacks {name}"
            else:
                reason = (
                    f"{name} is {there[0]}{list(there[1])} there, {here[0]}{list(here[1])} here"
                )
            raise CheckpointError(f"{where} does not match this model: {reason}", reason)

    def _set_aside(self, steps: list[int]) -> str:
        """Moves damaged steps out of Orbax's sight (a writer would never save over them), kept
        for inspection; returns what to add to the warning."""
        if not self._writer:
            return ""
        aside = self.directory.with_name(f"{self.directory.name}.damaged")
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / str(step)
            if target.exists():  # an earlier damaged copy of the same step
                target = aside / f"{step}.{len(list(aside.iterdir()))}"
            os.replace(self.directory / str(step), target)
        self.manager.reload()
        return f" (moved to {aside})"

    def _restore(self, step: int, abstract_state: Any, data_iter) -> tuple[Any, list[dict]]:
        self._check_shapes(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        if (self.directory / str(step) / "pending").is_dir():  # none before pending existed
            items["pending"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax and TensorStore raise many kinds; each means "not this"
            first = first_line(e)
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} cannot be restored: {first}", first
            ) from None
        return restored["state"], list(restored["pending"]) if "pending" in items else []

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait(self) -> None:
        self.manager.wait_until_finished()
        if self._writer:
            self._digest_finalized(staged=False)

    def close(self) -> None:
        self.manager.close()
