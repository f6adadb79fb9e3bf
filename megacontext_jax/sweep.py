"""Runs a grid of config overrides, each in its own workdir, and tabulates the results.

    python -m megacontext_jax.sweep --config configs/tiny.py --sweep configs/sweeps/X.py \\
        [--root runs/sweep_X] [--config.train.steps=200 ...] [--lengths 8] [--docs 16]

The sweep file's ``sweep()`` returns a list of ``{"dotted.key": value}`` dicts, each set at most
once. Every run trains (or resumes) in ``ROOT/<run_name>``, a name unique to its override set, is
evaluated (``megacontext_jax.evaluation``) on its own config's held-out data, and the table of all
runs is written to ``ROOT/results.csv`` and ``ROOT/results.md`` after each one. A finished run is
not repeated. A run that raises becomes a row with its one-line ``error`` and the sweep goes on; it
is not marked finished, so the same command retries it. Exit status: 0 when every run finished, 1
when any failed (listed at the end), 2 for a bad command line, config or sweep file, 130 when
interrupted.
"""

import argparse
import csv
import hashlib
import importlib.util
import json
import re
import sys
import traceback
from pathlib import Path

from megacontext_jax.cli import OneLineParser, at_least, history_lengths
from megacontext_jax.config import ConfigError, apply_override, parse_args, validate
from megacontext_jax.training.checkpoint import CheckpointError

NAME_MAX = 80  # characters of a run's directory name
_SAFE = re.compile(r"[A-Za-z0-9._+-]*")  # what a key or value may hold to appear verbatim
# Failures a user causes (data, checkpoints, values; ConfigError and DataError are ValueErrors)
# are reported in one line; anything else is a bug and also prints its traceback.
_EXPECTED = (CheckpointError, ValueError)


def _canonical(overrides: dict) -> tuple[tuple[str, str], ...]:
    # apply_override receives str(value), so {"k": 2} and {"k": "2"} are the same run, and the
    # order of distinct keys does not change the config.
    return tuple(sorted((str(k), str(v)) for k, v in overrides.items()))


def run_name(overrides: dict) -> str:
    """The directory name of the run of ``overrides``: ``key=value`` pairs in key order, keys in
    full; when that is longer than ``NAME_MAX`` or holds characters unsafe in a path, a sanitized
    prefix plus ``-`` and 8 hex digits of the override set's sha256. ``base`` for no overrides."""
    items = _canonical(overrides)
    if not items:
        return "base"
    name = ",".join(f"{k}={v}" for k, v in items)
    if len(name) <= NAME_MAX and all(_SAFE.fullmatch(k) and _SAFE.fullmatch(v) for k, v in items):
        return name
    digest = hashlib.sha256(json.dumps(dict(items), sort_keys=True).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._+=,-]', '_', name)[: NAME_MAX - 9]}-{digest}"


def load_sweep(path: str) -> list[dict]:
    """The override sets of the sweep file's ``sweep()``; ``ConfigError`` (one line) for a missing
    file, no ``sweep()``, an empty or malformed list, or an override set listed twice."""
    spec = importlib.util.spec_from_file_location("_sweep", path)
    if spec is None or not Path(path).is_file():
        raise ConfigError(f"sweep file not found: {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "sweep"):
        raise ConfigError(f"sweep file {path} defines no sweep()")
    runs = module.sweep()
    if not runs or not all(isinstance(r, dict) for r in runs):
        raise ConfigError(f"sweep() in {path} must return a non-empty list of dicts")
    first: dict[tuple, int] = {}
    for i, overrides in enumerate(runs, 1):
        j = first.setdefault(_canonical(overrides), i)
        if j != i:
            raise ConfigError(
                f"sweep() in {path} lists the same overrides twice (runs {j} and {i}): {overrides}"
            )
    return runs


def results_row(overrides: dict, summary: dict, evaluation: dict) -> dict:
    row = dict(overrides)
    for key in ("val/bpb", "mc/loss/mc_static", "mc/loss/mc_focus", "mc/lens/agreement"):
        if key in summary:
            row[key] = summary[key]
    for length, conditions in evaluation["conditions"].items():
        for c in ("full", "window", "mc_static", "mc_focus"):
            if c in conditions:
                row[f"{length} {c} nll"] = conditions[c]["nll"]
        for c, gap in conditions["gap_recovered"].items():
            row[f"{length} {c} gap_recovered"] = gap
    for length, acc in evaluation["passkey"].items():
        if "mc_focus" in acc:
            row[f"{length} passkey mc_focus"] = acc["mc_focus"]
    return row


def error_line(e: BaseException) -> str:
    """``Type: first line of the message`` (``Type`` alone for an empty message)."""
    message = str(e).strip().splitlines()
    return f"{type(e).__name__}: {message[0]}" if message else type(e).__name__


def run_one(config, overrides: dict, args: argparse.Namespace) -> dict:
    """Trains (or resumes) the run in ``config.workdir``, evaluates its latest checkpoint on the
    run's own held-out data, and returns its row of the results."""
    # Imported here so that --help and config errors answer without loading the training stack.
    from megacontext_jax.data import pipeline as data
    from megacontext_jax.data.tokenizer import tokenizer_for
    from megacontext_jax.evaluation import evaluate
    from megacontext_jax.training.loop import train
    from megacontext_jax.training.restore import load_model

    summary = train(config)
    model, _ = load_model(config.workdir)
    docs = data.evaluation_documents(config.data, tokenizer_for(config.model))
    evaluation = evaluate(
        model, config, docs, args.lengths, args.docs, args.batch, args.refocus_steps, args.probes
    )
    return results_row(overrides, summary, evaluation)


def write_tables(root: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (root / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    (root / "results.md").write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m megacontext_jax.sweep",
        usage="%(prog)s --config PATH[:ARG] --sweep FILE\n"
        "       [--config.FIELD=VALUE ...] [options]",
        description=__doc__.splitlines()[0],
    )
    config = p.add_argument_group(
        "config",
        "--config.FIELD=VALUE (or --config.FIELD VALUE), any number of times, overrides one "
        "field of the base config, e.g. --config.train.steps=200; each run's overrides from the "
        "sweep file apply on top.",
    )
    # Parsed here only for the help and the error of a missing one; config.parse_args reads it.
    config.add_argument(
        "--config",
        required=True,
        metavar="PATH[:ARG]",
        help="the base config file; ARG is passed to its get_config(ARG) (required)",
    )
    p.add_argument(
        "--sweep",
        required=True,
        metavar="FILE",
        help="a Python file whose sweep() returns a list of {'dotted.key': value} (required)",
    )
    p.add_argument(
        "--root",
        metavar="DIR",
        help="directory of the runs and the results (default: runs/sweep_<sweep file stem>)",
    )
    p.add_argument(
        "--lengths",
        type=history_lengths,
        default="8",
        metavar="L,...",
        help="evaluation history lengths in multiples of W (default: %(default)s)",
    )
    p.add_argument(
        "--docs",
        type=at_least(1),
        default=16,
        metavar="N",
        help="evaluation documents per length (default: %(default)s)",
    )
    p.add_argument(
        "--probes",
        type=at_least(1),
        default=16,
        metavar="N",
        help="retrieval probes per task and length (default: %(default)s)",
    )
    p.add_argument(
        "--batch",
        type=at_least(1),
        default=8,
        metavar="N",
        help="evaluation sequences per forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--refocus-steps",
        type=at_least(0),
        default=4,
        metavar="N",
        help="evaluation LensNet + allocator rounds (default: %(default)s)",
    )
    return p


def main(argv: list[str]) -> int:
    args, rest = build_parser().parse_known_args(argv)
    try:
        config_argv = ["--config", args.config, *rest]
        unknown = parse_args(config_argv)[1]
        if unknown:
            raise ConfigError(f"unexpected arguments: {' '.join(unknown)}")
        runs = load_sweep(args.sweep)
        configs = []
        for overrides in runs:
            config = parse_args(config_argv)[0]
            for key, value in overrides.items():
                apply_override(config, key, str(value))
            validate(config)
            configs.append(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    root = Path(args.root or f"runs/sweep_{Path(args.sweep).stem}")
    root.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    for i, (overrides, config) in enumerate(zip(runs, configs, strict=True), 1):
        workdir = root / run_name(overrides)
        done = workdir / "sweep_result.json"
        print(f"[{i}/{len(runs)}] {workdir.name}")
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        config.unlock()
        config.workdir = str(workdir)
        config.lock()
        try:
            row = run_one(config, overrides, args)
        except KeyboardInterrupt:
            print("interrupted; rerun the same command to resume", file=sys.stderr)
            return 130
        except Exception as e:  # one run's failure must not end the sweep
            if not isinstance(e, _EXPECTED):
                traceback.print_exc()
            error = error_line(e)
            print(f"[{i}/{len(runs)}] {workdir.name} failed: {error}", file=sys.stderr)
            failures.append((workdir.name, error))
            rows.append({**overrides, "error": error})
        else:
            done.write_text(json.dumps(row))
            rows.append(row)
        write_tables(root, rows)  # after each run, so that an interrupted sweep leaves a table
    write_tables(root, rows)  # also when every run was already finished
    print((root / "results.md").read_text())
    if failures:
        print(
            f"{len(failures)} of {len(runs)} runs failed (rerun the same command to retry them):",
            file=sys.stderr,
        )
        for name, error in failures:
            print(f"  {name}: {error}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The ``megacontext-sweep`` console entry point."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    run()
