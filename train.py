"""Trains a model from an ml_collections config.

    python train.py --config configs/tiny.py
    python train.py --config configs/tiny.py --config.train.steps=200 --config.workdir=runs/t200

Re-running with the same ``--config.workdir`` resumes from its latest checkpoint. Set
``--config.distributed=True`` on every process of a multi-process launch (``jax.distributed``
reads the cluster from the environment, or from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID).
"""

import os
import sys

from megacontext_jax.checkpoint import CheckpointError
from megacontext_jax.config import ConfigError, parse_args
from megacontext_jax.data import DataError


def main(argv: list[str]) -> int:
    try:
        config, rest = parse_args(argv)
        if rest:
            raise ConfigError(f"unexpected arguments: {' '.join(rest)}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

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
    from megacontext_jax.trainer import train

    try:
        summary = train(config)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if jax.process_index() == 0:
        print(
            f"done: step {summary['step']}  val bpb {summary.get('val/bpb', float('nan')):.4f}  "
            f"unigram bpb {summary['val/unigram_bpb']:.4f}  -> {config.workdir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
