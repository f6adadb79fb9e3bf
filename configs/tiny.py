"""Tiny MegaContext model on the embedded default corpus (the Python standard library's source),
sized for a 2-core CPU: base GPT, GistNet and LensNet trained together (``e2e``).

    python train.py --config configs/tiny.py
    python train.py --config configs/tiny.py --config.train.steps=200 --config.workdir=runs/t200
    python train.py --config configs/tiny.py --config.mc.enabled=False   # the plain LM alone
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
    c.model.smear_keys = True  # a one-layer path to copying (model.py)
    c.data.seq_len = 512  # T = 8 W: a training sequence's history is 8x the working context
    c.data.passkey_fraction = 0.25  # retrieval practice for LensNet and GistNet
    c.train.batch_size = 8
    c.train.steps = 800
    c.train.lr = 3e-3
    c.train.warmup_steps = 80
    c.train.eval_every = 400
    c.train.checkpoint_every = 400
    c.mc.enabled = True
    c.mc.block_size = 8
    c.mc.max_level = 3
    c.mc.wc_size = 64
    # 16 blocks per GistNet call: a decode refocus gists one new block in a fixed-shape chunk, so
    # a small chunk keeps that cheap (bulk ingest pays ~25% more dispatches than with 64).
    c.mc.ingest_chunk = 16
    c.mc.recent_tail = 16
    c.mc.scored_tokens = 16
    c.mc.gist.num_heads = 4
    c.mc.lens.num_heads = 4
    return c
