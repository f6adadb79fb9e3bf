"""Trains a model from an ml_collections config (``train.py``, ``megacontext-train``).

    python train.py --config configs/tiny.py
    python train.py --config configs/tiny.py --config.train.steps=200 --config.workdir=runs/t200

``--help`` lists every config field with its default (of ``--config FILE`` if given) and meaning;
``--print-config`` prints the config a command line resolves to and exits, before any compute.
Re-running with the same ``--config.workdir`` resumes from its latest checkpoint. Set
``--config.distributed=True`` on every process of a multi-process launch (``jax.distributed``
reads the cluster from the environment, or from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID).
"""

import os
import sys

import ml_collections

from megacontext_jax.config import ConfigError, base_config
from megacontext_jax.config_files import load_config, parse_args, split_args
from megacontext_jax.config_reference import describe_fields, format_config
from megacontext_jax.data.pipeline import DataError
from megacontext_jax.training.checkpoint import CheckpointError

USAGE = """\
usage: python train.py --config FILE[:ARG] [--config.FIELD=VALUE ...] [--print-config]
       python train.py [--config FILE[:ARG]] --help

Trains the model of a config file: a Python file whose get_config() (get_config(ARG) for FILE:ARG)
returns the config. Rerunning with the same workdir resumes. Any field below can be overridden with
--config.FIELD=VALUE (or --config.FIELD VALUE), parsed to the field's type; an unknown field or an
invalid value stops the run with one line naming it, before any compute.

  --print-config  print the resolved config (after overrides and checks) and exit
  -h, --help      print this help and exit (after --config FILE: with that file's defaults)

  python train.py --config configs/tiny.py --config.train.steps=300 --config.workdir=runs/t300
  python train.py --config configs/tiny.py:retrieval --print-config
  python train.py --config configs/imported.py:/path/to/hf_checkpoint
"""


def _parse(argv: list[str]) -> tuple[ml_collections.ConfigDict | None, str | None]:
    """The validated config of ``argv`` and its ``--config`` spec, or None once ``--help`` or
    ``--print-config`` has printed what it asks for. Raises ``ConfigError``."""
    spec, _, rest = split_args(argv)
    if "-h" in rest or "--help" in rest:
        # Defaults, overrides left out: help works even for a command line that would not validate.
        config = load_config(spec) if spec else base_config()
        source = spec or "base_config(); --config FILE --help shows a file's"
        print(f"{USAGE}\nfields (defaults of {source}):\n\n{describe_fields(config)}")
        return None, spec
    config, rest = parse_args(argv)
    unexpected = [arg for arg in rest if arg != "--print-config"]
    if unexpected:
        raise ConfigError(f"unexpected arguments: {' '.join(unexpected)}")
    if "--print-config" in rest:
        print(format_config(config))
        return None, spec
    return config, spec


def main(argv: list[str]) -> int:
    try:
        config, spec = _parse(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if config is None:
        return 0

    import jax

    if config.distributed:
        env = os.environ
        # CPU processes exchange collectives over gloo; GPUs and TPUs ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=env.get("JAX_COORDINATOR_ADDRESS"),
            num_processes=int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None,
            process_id=int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None,
        )
    from megacontext_jax.training.loop import train

    try:
        summary = train(config, defaults=load_config(spec), source=spec)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if jax.process_index() == 0:
        print(_done(summary, config.workdir))
    return 0


def _done(summary: dict, workdir: str) -> str:
    """The closing line: the last step and the validation numbers the run has (none are made up:
    a run that never validated shows none)."""
    parts = [f"done: step {summary['step']}"]
    for key, label in (("val/loss", "val loss"), ("val/bpb", "val bpb")):
        if key in summary:
            parts.append(f"{label} {summary[key]:.4f}")
    if "val/unigram_bpb" in summary:
        parts.append(f"(unigram bpb {summary['val/unigram_bpb']:.4f})")
    return "  ".join(parts) + f"  -> {workdir}"


def run() -> None:
    """The ``megacontext-train`` console entry point (and ``train.py``'s)."""
    status = main(sys.argv[1:])
    stopping = sys.modules.get(
        "megacontext_jax.training.stopping"
    )  # not imported by --help and errors
    if stopping is not None and stopping.startup_running():
        # Interrupted during a compilation, which goes on in its worker thread: Python's shutdown
        # would abort that thread inside XLA ("FATAL: exception not rethrown"); nothing is left
        # to flush but our own streams (the checkpointer and the metrics are closed).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
