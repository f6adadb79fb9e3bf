"""Tiny GPT on the embedded default corpus (the Python standard library's source), for a 2-core CPU.

python train.py --config configs/tiny.py
python train.py --config configs/tiny.py --config.train.steps=200 --config.workdir=runs/t200
"""

import ml_collections

from megacontext_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.workdir = "runs/tiny"
    c.model.width = 128
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.data.seq_len = 256
    c.train.batch_size = 16
    c.train.steps = 1500
    c.train.lr = 3e-3
    c.train.warmup_steps = 100
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    return c
