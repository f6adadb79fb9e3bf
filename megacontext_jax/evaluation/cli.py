"""``python -m megacontext_jax.evaluation`` / ``megacontext-eval``: the evaluation of a checkpoint.

    python -m megacontext_jax.evaluation --checkpoint runs/tiny [--data DIR] [--out eval.json]
    python -m megacontext_jax.evaluation --checkpoint runs/tiny --quick   # a one-minute look

Prints one block per history length (each condition's NLL and key-token NLL with standard
errors, bits per byte, gap recovered, then the paired differences with bootstrap intervals),
the budget curve with the effective window, and retrieval per task and length; writes the
results as JSON (``eval.json``, with what produced them under ``run``) and three PNGs beside it.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from megacontext_jax.cli import HelpFormatter, OneLineParser, at_least, history_lengths
from megacontext_jax.data import pipeline as data
from megacontext_jax.evaluation.protocol import Protocol
from megacontext_jax.evaluation.report import plot, print_results
from megacontext_jax.evaluation.retrieval import TASKS
from megacontext_jax.training.checkpoint import CheckpointError

PNG_SUFFIXES = ("", "_budget", "_depth")


def prepare_output(path: Path) -> None:
    """Creates ``path``'s parent and checks that ``path`` and its PNGs can be written there,
    before any compute; ``ValueError`` (one line) if not."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"cannot create the output directory {path.parent}: {e.strerror}"
        ) from None
    pngs = [path.with_name(path.stem + s + ".png") for s in PNG_SUFFIXES]
    for target in (path, *pngs):
        if target.is_dir():
            raise ValueError(f"the output {target} is a directory")
        if target.exists() and not os.access(target, os.W_OK):
            raise ValueError(f"the output {target} is not writable")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to {path.parent}: {e.strerror}") from None


def _tasks(text: str) -> list[str]:
    names = [t for t in text.split(",") if t]
    unknown = [t for t in names if t not in TASKS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"must be tasks among {', '.join(TASKS)} separated by commas, got {text!r}"
        )
    return names


def _budgets(text: str) -> list[int]:
    """Distinct positive entry counts (the rule of history lengths), or none for ``''``."""
    return history_lengths(text) if text else []


def build_parser() -> argparse.ArgumentParser:
    d = Protocol()
    p = OneLineParser(
        prog="python -m megacontext_jax.evaluation",
        description="Does MegaContext beat a plain context window at the same budget? "
        "The evaluation of a checkpoint (DESIGN section 8).",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a training workdir")
    p.add_argument(
        "--data", help="directory of text files or .jsonl (default: the run's held-out split)"
    )
    p.add_argument("--out", default=None, help="JSON results (default: CHECKPOINT/eval.json)")
    p.add_argument("--quick", action="store_true", help="a one-minute look: " + _quick_help())
    # Every other flag defaults to None here: the protocol's default, or --quick's.
    flags = (
        ("--lengths", history_lengths, d.lengths, "history lengths of the NLL rows, x W"),
        ("--windows", at_least(2), d.windows, "windows per length"),
        ("--stride", at_least(0), d.stride, "tokens between candidate window starts (0: W)"),
        (
            "--key-threshold",
            float,
            d.key_threshold,
            "nats by which full beats window on a key token",
        ),
        ("--budgets", _budgets, d.budgets, "budgets W of the budget curve (entries; none: '')"),
        ("--budget-length", at_least(1), d.budget_length, "history of the budget curve, x W"),
        (
            "--retrieval-lengths",
            history_lengths,
            d.retrieval_lengths,
            "retrieval history lengths, x W",
        ),
        ("--tasks", _tasks, d.tasks, "retrieval tasks"),
        ("--probes", at_least(1), d.probes, "retrieval probes per task and length"),
        ("--batch", at_least(1), d.batch, "sequences per forward pass"),
        ("--refocus-steps", at_least(0), d.refocus_steps, "LensNet + allocator rounds"),
        ("--seed", at_least(0), d.seed, "windows, probes and random edits"),
    )
    for flag, kind, default, text in flags:
        p.add_argument(flag, type=kind, default=None, help=f"{text} (default: {_show(default)})")
    return p


def _quick_help() -> str:
    q, d = Protocol.quick(), Protocol()
    changed = [
        f.name for f in dataclasses.fields(Protocol) if getattr(q, f.name) != getattr(d, f.name)
    ]
    return ", ".join(f"{name}={_show(getattr(q, name))}" for name in changed)


def _show(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def protocol_of(args: argparse.Namespace) -> Protocol:
    """The protocol of the parsed flags: those given, over ``--quick``'s or the defaults."""
    given = {
        f.name: tuple(v) if isinstance(v, list) else v
        for f in dataclasses.fields(Protocol)
        if (v := getattr(args, f.name, None)) is not None
    }
    return Protocol.quick(**given) if args.quick else Protocol(**given)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval.json"
    try:
        from megacontext_jax.api import evaluate, load

        prepare_output(out)
        protocol = protocol_of(args)
        protocol.validate()
        model = load(args.checkpoint)
        results = evaluate(model, data=args.data, protocol=protocol)
    except (CheckpointError, data.DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    results["run"]["argv"] = list(argv)
    print_results(results)
    out.write_text(json.dumps(json_safe(results), indent=2, allow_nan=False))
    written = plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {', '.join(str(p) for p in written)}")
    return 0


def json_safe(value: object) -> object:
    """``value`` with every NaN or infinite float as None: strict JSON (an undefined
    ``gap_recovered``, the SE of one document)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def run() -> None:
    """The ``megacontext-eval`` console entry point."""
    sys.exit(main(sys.argv[1:]))
