"""Trains a model from an ml_collections config; see ``--help`` or ``megacontext_jax/cli/train.py``.

python train.py --config configs/tiny.py
"""

import sys

from megacontext_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
