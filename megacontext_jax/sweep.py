"""Runs a grid of config overrides, each in its own workdir, and tabulates the results.

    python -m megacontext_jax.sweep --config configs/tiny.py --sweep configs/sweeps/X.py \\
        [--root runs/sweep_X] [--config.train.steps=200 ...] [--lengths 8] [--docs 16]

The sweep file's ``sweep()`` returns a list of ``{"dotted.key": value}`` dicts. Each run trains (or
resumes) in ``ROOT/<name>``, is evaluated (``megacontext_jax.evaluate``), and the table of all runs
is written to ``ROOT/results.csv`` and ``ROOT/results.md``. A finished run is not repeated.
"""

import argparse
import csv
import importlib.util
import json
import sys
from pathlib import Path

from megacontext_jax.config import ConfigError, apply_override, parse_args, validate


def load_sweep(path: str) -> list[dict]:
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
    return runs


def run_name(overrides: dict) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ",".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in overrides.items())


def results_row(overrides: dict, summary: dict, evaluation: dict) -> dict:
    row = {k: v for k, v in overrides.items()}
    for key in ("val/bpb", "train/loss/mc_static", "train/loss/mc_focus", "train/lens/agreement"):
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


def write_tables(root: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (root / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    (root / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megacontext_jax.sweep", description=__doc__.splitlines()[0]
    )
    p.add_argument("--sweep", required=True)
    p.add_argument("--root", help="directory of the runs (default: runs/sweep_<sweep file name>)")
    p.add_argument("--lengths", default="8")
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--probes", type=int, default=16)
    args, rest = p.parse_known_args(argv)
    try:
        base, unknown = parse_args(rest)
        if unknown:
            raise ConfigError(f"unexpected arguments: {' '.join(unknown)}")
        runs = load_sweep(args.sweep)
        configs = []
        for overrides in runs:
            config = parse_args(rest)[0]
            for key, value in overrides.items():
                apply_override(config, key, str(value))
            validate(config)
            configs.append(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megacontext_jax import data
    from megacontext_jax.evaluate import evaluate
    from megacontext_jax.restore import load_model
    from megacontext_jax.tokenizer import tokenizer_for
    from megacontext_jax.trainer import train

    root = Path(args.root or f"runs/sweep_{Path(args.sweep).stem}")
    root.mkdir(parents=True, exist_ok=True)
    docs = data.evaluation_documents(base, tokenizer_for(base.model))
    rows = []
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
        summary = train(config)
        model, _ = load_model(workdir)
        lengths = [int(x) for x in args.lengths.split(",")]
        evaluation = evaluate(model, config, docs, lengths, args.docs, 8, 4, args.probes)
        row = results_row(overrides, summary, evaluation)
        done.write_text(json.dumps(row))
        rows.append(row)
        write_tables(root, rows)
    write_tables(root, rows)
    print((root / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
