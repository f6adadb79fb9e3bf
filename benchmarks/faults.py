"""Fault injection: the memory tree and the training checkpoints under every fault we know of.

    python benchmarks/faults.py --tree-trials 200 --checkpoint-trials 50

Tree faults (on copies of one committed tree of 40,000 tokens, K=8, 3 levels): the manifest
deleted, truncated, overwritten with garbage, or with one field set to a wrong value; a chunk
file of a level flipped, truncated or deleted; ``writer.lock`` removed under a writer while a
second one tries to open; ``writer.lock`` made a directory; SIGKILL at a random moment of a
writer's ingest. After each fault the user's operations run in turn: ``verify``, reading every
committed token and gist, and an ingest of 100 tokens. Checkpoint faults (on copies of a 4-step
run with checkpoints at steps 2 and 4): a byte flip, a truncation or the deletion of a file of the
newest step, restored as decode and evaluate do (``restore.load``); and SIGKILL at a random moment
of a run that saves every step, restored after.

Each trial is one of:
- ``clean``: every operation succeeded and read back exactly what was committed (a fault in
  bytes that hold no committed data);
- ``detected``: an operation refused with a one-line error of the system's own kind, and once the
  damaged file is put back the tree reads back everything committed;
- ``traceback``: an error of another kind, or of more than one line;
- ``lost``: an operation returned data other than what was committed, or committed data is gone.

Prints per class ``tried N / clean C / detected D / traceback T / lost L`` and exits non-zero
unless T = L = 0 everywhere. ``--quick`` runs one trial of each in-process class (the test).
"""

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# The sibling benchmark: a script's own directory comes first on sys.path.
import crash_ingest
import numpy as np

from megacontext_jax.memory.errors import TreeError
from megacontext_jax.memory.gister import Gister
from megacontext_jax.memory.lock import LOCK
from megacontext_jax.memory.manifest import MANIFEST
from megacontext_jax.memory.tree import Tree
from megacontext_jax.testing import random_gister, write_corpus
from megacontext_jax.training.checkpoint import CheckpointError

HISTORY = 40_000
OUTCOMES = ("clean", "detected", "traceback", "lost")


class Lost(Exception):
    """The trial found committed data gone or altered."""


def one_line(error: BaseException, kinds: tuple[type, ...]) -> bool:
    return isinstance(error, kinds) and "\n" not in str(error).strip()


# -- the tree ------------------------------------------------------------------------------------
def build_tree(path: Path, gister: Gister) -> dict:
    tokens = np.random.default_rng(0).integers(0, 256, HISTORY).astype(np.int32)
    with Tree.create(path, gister, crash_ingest.MAX_LEVEL, 256) as tree:
        tree.append(tokens)
        return snapshot(tree)


def snapshot(tree: Tree) -> dict:
    return {
        level: tree.tokens(0, tree.num_tokens) if level == 0 else tree.gists(level, 0, n)
        for level, n in enumerate(tree.storage.lengths)
    }


def same_prefix(found: dict, expected: dict) -> bool:
    return all(
        len(found[level]) >= len(rows) and np.array_equal(found[level][: len(rows)], rows)
        for level, rows in expected.items()
    )


def tree_ops(path: Path, gister: Gister, expected: dict) -> list[BaseException]:
    """verify, read all, ingest 100 tokens; the errors they raised. Raises ``Lost`` for data
    read back other than committed."""
    errors = []
    try:
        with Tree.open(path, gister) as tree:
            tree.verify()
    except Exception as e:
        errors.append(e)
    try:
        with Tree.open(path) as tree:
            if not same_prefix(snapshot(tree), expected):
                raise Lost("committed data read back altered")
    except Lost:
        raise
    except Exception as e:
        errors.append(e)
    try:
        with Tree.open_or_create(path, gister, crash_ingest.MAX_LEVEL, 256) as tree:
            tree.append(np.arange(100, dtype=np.int32) % 256)
    except Exception as e:
        errors.append(e)
    return errors


def intact(path: Path, gister: Gister, expected: dict) -> bool:
    try:
        with Tree.open(path, gister) as tree:
            tree.verify()
            return same_prefix(snapshot(tree), expected)
    except TreeError:
        return False


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("level_*/**/*") if p.is_file())


def flip(file: Path, rng) -> None:
    data = bytearray(file.read_bytes())
    if data:
        data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        file.write_bytes(bytes(data))


def truncate(file: Path, rng) -> None:
    file.write_bytes(file.read_bytes()[: int(rng.integers(file.stat().st_size))])


BAD_VALUES = (None, 0, -1, "x", [], {}, 1.5, 2**70)


def mutate_manifest(file: Path, rng) -> None:
    manifest = json.loads(file.read_text())
    field = sorted(manifest)[int(rng.integers(len(manifest)))]
    value = BAD_VALUES[int(rng.integers(len(BAD_VALUES)))]
    if field == "lengths" and rng.random() < 0.5:  # inconsistent levels, not just a bad type
        value = [n + int(rng.integers(1, 50)) * (i == 1) for i, n in enumerate(manifest[field])]
    manifest[field] = value
    file.write_text(json.dumps(manifest))


def file_fault(kind: str) -> Callable:
    """A fault on one file: ``(tree directory, rng) -> the file to put back after``."""

    def fault(path: Path, rng) -> Path:
        if kind.startswith("manifest"):
            file = path / MANIFEST
        else:
            files = _files(path)
            file = files[int(rng.integers(len(files)))]
        if kind == "manifest deleted" or kind == "chunk deleted":
            file.unlink()
        elif kind == "manifest truncated" or kind == "chunk truncated":
            truncate(file, rng)
        elif kind == "manifest garbage":
            file.write_bytes(rng.bytes(int(rng.integers(1, 400))))
        elif kind == "manifest field":
            mutate_manifest(file, rng)
        elif kind == "chunk flipped":
            flip(file, rng)
        return file

    return fault


FILE_FAULTS = (
    "manifest deleted",
    "manifest truncated",
    "manifest garbage",
    "manifest field",
    "chunk flipped",
    "chunk truncated",
    "chunk deleted",
)


def file_trial(kind, path, pristine, gister, expected, rng) -> str:
    file = file_fault(kind)(path, rng)
    errors = tree_ops(path, gister, expected)
    if any(not one_line(e, (TreeError, ValueError)) for e in errors):
        print(f"  {kind}: {type(errors[0]).__name__}: {str(errors[0])[:300]}")
        return "traceback"
    if not errors:
        return "clean" if intact(path, gister, expected) else "lost"
    # Refused: with the damaged file put back, nothing committed may be missing.
    shutil.copy2(pristine / file.relative_to(path), file)
    return "detected" if intact(path, gister, expected) else "lost"


def lock_removed_trial(path, gister, expected) -> str:
    """Writer A holds the tree; its lock file is removed; writer B tries to open it."""
    with Tree.open(path, gister) as a:
        (path / LOCK).unlink(missing_ok=True)
        try:
            with Tree.open(path, gister) as b:
                b.append(np.zeros(50, np.int32))
            refused = None
        except TreeError as e:
            refused = e
        a.append(np.ones(30, np.int32))
    if refused is None:
        return "lost"  # two writers at once
    ones = {**expected, 0: np.concatenate([expected[0], np.ones(30, np.int32)])}
    return "detected" if intact(path, gister, ones) else "lost"


def lock_directory_trial(path, gister, expected) -> str:
    (path / LOCK).unlink(missing_ok=True)
    (path / LOCK).mkdir()
    errors = tree_ops(path, gister, expected)
    if any(not one_line(e, (TreeError,)) for e in errors):
        return "traceback"
    if not intact(path, gister, expected):
        (path / LOCK).rmdir()
        return "lost" if not intact(path, gister, expected) else "detected"
    return "detected" if errors else "clean"


def sigkill_trial(directory: Path, seed: int, gister: Gister, rng) -> str:
    cmd = [sys.executable, crash_ingest.__file__, "--writer", str(directory), "--seed", str(seed)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = child.stdout.readline().strip() == "ready"
    time.sleep(float(rng.uniform(0, 1.5)))
    child.send_signal(signal.SIGKILL)
    child.wait()
    if not ready:
        print(f"  sigkill: the writer failed to start: {child.stderr.read()[-300:]}")
        return "traceback"
    ok, _, why = crash_ingest.check(directory, seed, gister)
    if not ok:
        print(f"  sigkill: {why}")
    return "clean" if ok else "lost"


def schedule(table: dict[str, Counter], trials: int, quick: bool):
    """``(trial, class)`` pairs, the classes in turn: one of each with ``quick``."""
    kinds = list(table)
    for trial in range(len(kinds) if quick else trials):
        yield trial, kinds[trial % len(kinds)]


def tree_trials(root: Path, trials: int, rng, quick: bool) -> dict[str, Counter]:
    gister = random_gister(crash_ingest.small_config(), seed=0)
    pristine = root / "pristine"
    expected = build_tree(pristine, gister)
    kinds = [*FILE_FAULTS, "lock removed, two writers", "lock is a directory"]
    table = {k: Counter() for k in [*kinds, *([] if quick else ["sigkill mid-ingest"])]}
    for trial, kind in schedule(table, trials, quick):
        path = root / f"tree_{trial}"
        if kind == "sigkill mid-ingest":
            outcome = sigkill_trial(path, trial, gister, rng)
        else:
            shutil.copytree(pristine, path)
            if kind == "lock removed, two writers":
                outcome = lock_removed_trial(path, gister, expected)
            elif kind == "lock is a directory":
                outcome = lock_directory_trial(path, gister, expected)
            else:
                try:
                    outcome = file_trial(kind, path, pristine, gister, expected, rng)
                except Lost:
                    outcome = "lost"
        table[kind][outcome] += 1
        shutil.rmtree(path, ignore_errors=True)
    return table


# -- checkpoints ---------------------------------------------------------------------------------
RUN = """
from megacontext_jax.testing import tiny_config
from megacontext_jax.training.loop import train
train(tiny_config({workdir!r}, {corpus!r}, steps={steps}, checkpoint_every={every},
                  keep_checkpoints={keep}, eval_every=1000), progress=False)
"""


def run_training(workdir: Path, corpus: Path, steps: int, every: int, keep: int) -> list[str]:
    script = RUN.format(
        workdir=str(workdir), corpus=str(corpus), steps=steps, every=every, keep=keep
    )
    return [sys.executable, "-c", script]


def params(workdir: Path):
    import jax
    from flax import nnx

    from megacontext_jax.training.restore import load

    model, _, step = load(workdir)
    return step, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def checkpoint_trials(root: Path, trials: int, rng, quick: bool) -> dict[str, Counter]:
    corpus = root / "corpus"
    write_corpus(corpus)
    reference = root / "reference"  # every step kept: what each step's params must be
    steps = 4 if quick else 12
    subprocess.run(run_training(reference, corpus, steps, 1, 100), check=True, capture_output=True)
    by_step = {}
    for step in range(1, steps + 1):
        only = root / "only"
        shutil.copytree(reference, only, ignore=_other_steps(step))
        by_step[step] = params(only)[1]
        shutil.rmtree(only)
    kinds = ["step file flipped", "step file truncated", "step file deleted"]
    table = {k: Counter() for k in [*kinds, *([] if quick else ["sigkill mid-run"])]}
    for trial, kind in schedule(table, trials, quick):
        workdir = root / f"run_{trial}"
        if kind == "sigkill mid-run":
            child = subprocess.Popen(
                run_training(workdir, corpus, 12, 1, 2), stderr=subprocess.PIPE
            )
            time.sleep(float(rng.uniform(4, 12)))
            child.send_signal(signal.SIGKILL)
            child.wait()
        else:
            shutil.copytree(reference, workdir, ignore=_other_steps(4, 2))
            step_dir = workdir / "checkpoints" / "4"
            files = sorted(p for p in step_dir.rglob("*") if p.is_file())
            file = files[int(rng.integers(len(files)))]
            {"flipped": flip, "truncated": truncate, "deleted": lambda f, _: f.unlink()}[
                kind.rsplit(" ", 1)[1]
            ](file, rng)
        table[kind][checkpoint_outcome(workdir, by_step, kind)] += 1
        shutil.rmtree(workdir, ignore_errors=True)
    return table


def _other_steps(*keep: int):
    def ignore(directory, names):
        if Path(directory).name != "checkpoints":
            return []
        return [n for n in names if n.isdigit() and int(n) not in keep]

    return ignore


def checkpoint_outcome(workdir: Path, by_step: dict, kind: str) -> str:
    if kind == "sigkill mid-run" and not (workdir / "config.json").exists():
        return "clean"  # killed before anything was written
    try:
        step, found = params(workdir)
    except CheckpointError as e:
        if not one_line(e, (CheckpointError,)):
            return "traceback"
        if kind == "sigkill mid-run" and str(e).startswith("no checkpoint saved"):
            return "clean"  # killed before the first save landed
        return "detected"
    except Exception as e:
        print(f"  {kind}: {type(e).__name__}: {str(e)[:300]}")
        return "traceback"
    if any(not np.array_equal(a, b) for a, b in zip(found, by_step[step], strict=True)):
        return "lost"
    newest = 4 if kind != "sigkill mid-run" else step
    return "clean" if step == newest else "detected"


def print_table(title: str, table: dict[str, Counter]) -> None:
    print(f"\n{title}")
    print(f"  {'class':<28}" + "".join(f"{o:>10}" for o in ("tried", *OUTCOMES)))
    for kind, counts in table.items():
        row = f"  {kind:<28}{sum(counts.values()):>10}"
        print(row + "".join(f"{counts[o]:>10}" for o in OUTCOMES))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree-trials", type=int, default=200)
    p.add_argument("--checkpoint-trials", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one trial per in-process class")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="faults_") as tmp:
        root = Path(tmp)
        tables = {
            f"tree ({args.tree_trials if not args.quick else 'quick'} trials)": tree_trials(
                root / "tree", args.tree_trials, rng, args.quick
            ),
            f"checkpoints ({args.checkpoint_trials if not args.quick else 'quick'} trials)": (
                checkpoint_trials(root / "ckpt", args.checkpoint_trials, rng, args.quick)
            ),
        }
    bad = 0
    for title, table in tables.items():
        print_table(title, table)
        bad += sum(c["traceback"] + c["lost"] for c in table.values())
    print(f"\ntraceback + lost: {bad}")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
