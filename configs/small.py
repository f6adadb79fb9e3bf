"""~100M-parameter GPT for one GPU (bf16 activations, fp32 parameters).

python train.py --config configs/small.py
python train.py --config configs/small.py --config.mesh.fsdp=8   # shard params over 8 devices
"""

import ml_collections

from megacontext_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.workdir = "runs/small"
    c.model.width = 768
    c.model.depth = 14
    c.model.num_heads = 6
    c.model.num_kv_heads = 6
    c.model.smear_keys = True
    c.model.dtype = "bfloat16"
    c.data.seq_len = 1024
    c.train.batch_size = 64
    c.train.steps = 20000
    c.train.lr = 1e-3
    c.train.warmup_steps = 500
    c.train.eval_every = 1000
    c.train.eval_batches = 20
    c.train.checkpoint_every = 1000
    return c
