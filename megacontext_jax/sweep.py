"""Runs a grid of config overrides, each in its own workdir, and tabulates the results.

    python -m megacontext_jax.sweep --config configs/tiny.py --sweep configs/sweeps/X.py \\
        [--root runs/sweep_X] [--seeds 3] [--share-curriculum] [--config.train.steps=200 ...] \\
        [--lengths 8] [--windows 64]

The sweep file's ``sweep()`` returns a list of ``{"dotted.key": value}`` dicts, each set at most
once. Every run trains (or resumes) in ``ROOT/<run_name>``, a name unique to its override set, is
evaluated (``megacontext_jax.evaluation``) on its own config's held-out data, and the table of all
runs is written to ``ROOT/results.csv`` and ``ROOT/results.md`` after each one. With ``--seeds N``
(N > 1) each override set runs once per seed ``config.seed + k``, k < N (model init and data
order; the held-out data is the same), in ``ROOT/<run_name>,seed=<seed>``, and
``ROOT/results_by_config.csv`` and ``.md`` give one row per override set: ``seeds`` (its runs),
``failed``, ``n`` (the others, the only ones in the statistics) and each numeric metric's
``mean``, sample ``std`` and ``se`` (std / sqrt(n)). With ``--share-curriculum`` a run whose
curriculum is an earlier run's (same seed, model, curriculum and optimizer: the overrides change
the MegaContext phase alone) starts from that run's curriculum checkpoint
(``curriculum.reuse_from``): it trains only its main phase, and ends as it would from step 0.
A finished run is not repeated. A run that
raises becomes a row with its one-line ``error`` and the sweep goes on; it is not marked
finished, so the same command retries it. Exit status: 0 when every run finished, 1 when any
failed (listed at the end), 2 for a bad command line, config or sweep file, 130 when interrupted.
"""

import argparse
import csv
import hashlib
import importlib.util
import json
import math
import re
import sys
import traceback
from pathlib import Path

import ml_collections

from megacontext_jax.cli import OneLineParser, at_least, history_lengths
from megacontext_jax.config import ConfigError, validate
from megacontext_jax.config_files import apply_override, parse_args
from megacontext_jax.training.checkpoint import CheckpointError

PAIRED = ("mc_static - window", "mc_focus - mc_static")  # columns of every run's row
NAME_MAX = 80  # characters of a run's directory name, before its seed part
_SAFE = re.compile(r"[A-Za-z0-9._+-]*")  # what a key or value may hold to appear verbatim
# Failures a user causes (data, checkpoints, values; ConfigError and DataError are ValueErrors)
# are reported in one line; anything else is a bug and also prints its traceback.
_EXPECTED = (CheckpointError, ValueError)


def _canonical(overrides: dict) -> tuple[tuple[str, str], ...]:
    # apply_override receives str(value), so {"k": 2} and {"k": "2"} are the same run, and the
    # order of distinct keys does not change the config.
    return tuple(sorted((str(k), str(v)) for k, v in overrides.items()))


def _overrides_name(overrides: dict) -> str:
    items = _canonical(overrides)
    if not items:
        return "base"
    name = ",".join(f"{k}={v}" for k, v in items)
    if len(name) <= NAME_MAX and all(_SAFE.fullmatch(k) and _SAFE.fullmatch(v) for k, v in items):
        return name
    digest = hashlib.sha256(json.dumps(dict(items), sort_keys=True).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._+=,-]', '_', name)[: NAME_MAX - 9]}-{digest}"


def run_name(overrides: dict, seed: int | None = None) -> str:
    """The directory name of the run of ``overrides``: ``key=value`` pairs in key order, keys in
    full; when that is longer than ``NAME_MAX`` or holds characters unsafe in a path, a sanitized
    prefix plus ``-`` and 8 hex digits of the override set's sha256. ``base`` for no overrides.
    A ``seed`` (one of several) follows as ``,seed=<seed>``, last, so that seed runs sort together
    and a long name's hash cannot hide it."""
    name = _overrides_name(overrides)
    return name if seed is None else f"{name},seed={seed}"


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


def seed_runs(runs: list[dict], base_seed: int, seeds: int) -> list[tuple[str, dict]]:
    """The ``(run name, overrides)`` of every run, in order: each override set as it is for one
    seed, else once per seed ``base_seed + k``, k < ``seeds``, with ``seed`` among its overrides;
    ``ConfigError`` when several seeds meet an override set that sets ``seed`` itself."""
    if seeds == 1:
        return [(run_name(overrides), overrides) for overrides in runs]
    for i, overrides in enumerate(runs, 1):
        if "seed" in overrides:
            raise ConfigError(
                f"--seeds {seeds} sets every run's seed, but run {i} of sweep() sets seed itself"
            )
    return [
        (run_name(overrides, seed), {**overrides, "seed": seed})
        for overrides in runs
        for seed in range(base_seed, base_seed + seeds)
    ]


def results_row(overrides: dict, summary: dict, evaluation: dict) -> dict:
    row = dict(overrides)
    for key in ("val/bpb", "mc/loss/mc_static", "mc/loss/mc_focus", "mc/lens/agreement"):
        if key in summary:
            row[key] = summary[key]
    for length, text in evaluation["text"].items():
        for c in ("full", "window", "mc_static", "mc_focus"):
            if c in text["conditions"]:
                row[f"{length} {c} nll"] = text["conditions"][c]["nll"]["mean"]
                row[f"{length} {c} key_nll"] = text["conditions"][c]["key_nll"]["mean"]
        for c, gap in text["gap_recovered"]["all"].items():
            row[f"{length} {c} gap_recovered"] = gap
        # The paired differences the claim rests on, with their SEs: a lever's table says
        # whether its gaps are resolved without the run's full report.
        for pair in PAIRED:
            if pair in text.get("differences", {}):
                d = text["differences"][pair]["all"]
                row[f"{length} {pair}"], row[f"{length} {pair} se"] = d["mean"], d["se"]
    for length, result in evaluation["retrieval"].get("passkey", {}).items():
        if "mc_focus" in result.get("accuracy", {}):
            row[f"{length} passkey mc_focus"] = result["accuracy"]["mc_focus"]["mean"]
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
    from megacontext_jax.evaluation import Protocol, evaluate
    from megacontext_jax.training.loop import train
    from megacontext_jax.training.restore import load_model

    summary = train(config)
    model, _ = load_model(config.workdir)
    docs = data.evaluation_documents(config.data, tokenizer_for(config.model))
    # The NLL rows and the passkey at the sweep's lengths: no budget curve, no other task.
    protocol = Protocol(
        lengths=tuple(args.lengths),
        windows=args.windows,
        budgets=(),
        retrieval_lengths=tuple(args.lengths),
        tasks=("passkey",),
        probes=args.probes,
        batch=args.batch,
        refocus_steps=args.refocus_steps,
    )
    evaluation = evaluate(model, config, docs, protocol, progress=False)
    return results_row(overrides, summary, evaluation)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def aggregate(overrides: dict, rows: list[dict]) -> dict:
    """The row of ``overrides`` in the by-config table, from the rows of its seed runs: ``seeds``
    (runs), ``failed`` (rows with an ``error``), ``n`` (the others, the only ones counted), and
    for every numeric metric their ``mean``, sample ``std`` and ``se`` = std / sqrt(n). ``std``
    and ``se`` are NaN for n = 1, and a NaN value (e.g. an insignificant gap) makes all three NaN:
    dropping it would average only the seeds that came out well."""
    ok = [row for row in rows if "error" not in row]
    summary = {**overrides, "seeds": len(rows), "failed": len(rows) - len(ok), "n": len(ok)}
    skip = {*overrides, "seed"}
    metrics = dict.fromkeys(
        k for row in ok for k, v in row.items() if k not in skip and _is_number(v)
    )
    for metric in metrics:
        values = [row[metric] for row in ok if metric in row]
        mean = math.fsum(values) / len(values)
        std = math.nan
        if len(values) > 1:
            std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
        se = std / math.sqrt(len(values))
        summary |= {f"{metric} mean": mean, f"{metric} std": std, f"{metric} se": se}
    return summary


def write_tables(root: Path, runs: list[dict], rows: list[dict], seeds: int) -> None:
    """``results.csv``/``.md`` of ``rows`` (those of the runs so far) and, for several seeds,
    ``results_by_config.csv``/``.md`` of their ``aggregate`` per override set of ``runs``."""
    _write_table(root / "results", rows)
    if seeds > 1:
        groups = [rows[i : i + seeds] for i in range(0, len(rows), seeds)]
        _write_table(root / "results_by_config", list(map(aggregate, runs, groups)))


def _write_table(stem: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


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
    # Parsed here only for the help and the error of a missing one; config_files.parse_args reads it.
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
        "--seeds",
        type=at_least(1),
        default=1,
        metavar="N",
        help="runs per override set, with seeds config.seed + 0..N-1, and for N > 1 a table "
        "of their mean, std and se per override set (default: %(default)s)",
    )
    p.add_argument(
        "--lengths",
        type=history_lengths,
        default="8",
        metavar="L,...",
        help="evaluation history lengths in multiples of W (default: %(default)s)",
    )
    p.add_argument(
        "--windows",
        type=at_least(2),
        default=64,
        metavar="N",
        help="evaluation windows per length (default: %(default)s)",
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
    p.add_argument(
        "--share-curriculum",
        action="store_true",
        help="runs whose curriculum is an earlier run's start from its checkpoint, training "
        "their main phase only (curriculum.reuse_from)",
    )
    return p


def share_curricula(configs: list[ml_collections.ConfigDict]) -> None:
    """Points each config's ``curriculum.reuse_from`` at the first earlier run that trains the
    same curriculum and does not reuse one itself."""
    from megacontext_jax.training import shared_curriculum

    owners: list[ml_collections.ConfigDict] = []
    for config in configs:
        if not config.curriculum.steps or config.curriculum.reuse_from:
            continue
        owner = next((o for o in owners if shared_curriculum.difference(config, o) is None), None)
        if owner is None:
            owners.append(config)
            continue
        config.unlock()
        config.curriculum.reuse_from = owner.workdir
        config.lock()


def sweep_run(
    config: ml_collections.ConfigDict, overrides: dict, args: argparse.Namespace, label: str
) -> dict:
    """The row of the run in ``config.workdir``: read back when it finished before, else from
    ``run_one``, else (it raised) its overrides and one-line ``error``."""
    done = Path(config.workdir) / "sweep_result.json"
    print(label)
    if done.exists():
        return json.loads(done.read_text())
    try:
        row = run_one(config, overrides, args)
    except Exception as e:  # one run's failure must not end the sweep
        if not isinstance(e, _EXPECTED):
            traceback.print_exc()
        error = error_line(e)
        print(f"{label} failed: {error}", file=sys.stderr)
        return {**overrides, "error": error}
    done.write_text(json.dumps(row))
    return row


def main(argv: list[str]) -> int:
    args, rest = build_parser().parse_known_args(argv)
    root = Path(args.root or f"runs/sweep_{Path(args.sweep).stem}")
    try:
        config_argv = ["--config", args.config, *rest]
        base, unknown = parse_args(config_argv)
        if unknown:
            raise ConfigError(f"unexpected arguments: {' '.join(unknown)}")
        runs = load_sweep(args.sweep)
        plan = seed_runs(runs, base.seed, args.seeds)
        configs = []
        for name, overrides in plan:
            config = parse_args(config_argv)[0]
            for key, value in overrides.items():
                apply_override(config, key, str(value))
            validate(config)
            config.unlock()
            config.workdir = str(root / name)
            config.lock()
            configs.append(config)
        if args.share_curriculum:
            share_curricula(configs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ((name, overrides), config) in enumerate(zip(plan, configs, strict=True), 1):
        try:
            rows.append(sweep_run(config, overrides, args, f"[{i}/{len(plan)}] {name}"))
        except KeyboardInterrupt:
            print("interrupted; rerun the same command to resume", file=sys.stderr)
            return 130
        write_tables(root, runs, rows, args.seeds)  # after each run: an interrupt leaves tables
    print((root / "results.md").read_text())
    if args.seeds > 1:
        print((root / "results_by_config.md").read_text())
    failures = [
        (name, row["error"]) for (name, _), row in zip(plan, rows, strict=True) if "error" in row
    ]
    if failures:
        print(
            f"{len(failures)} of {len(plan)} runs failed (rerun the same command to retry them):",
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
