"""Trains a model from an ml_collections config; see ``--help`` or ``megacontext_jax/cli/train.py``.

python train.py --config configs/tiny.py
"""

from megacontext_jax.cli.train import run

if __name__ == "__main__":
    run()
