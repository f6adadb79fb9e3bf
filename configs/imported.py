"""MegaContext on an imported Llama-family model (Llama, Qwen2, Mistral, SmolLM, TinyLlama): the
base is read from a local Hugging Face directory and frozen; GistNet, then LensNet, are trained.

    python train.py --config configs/imported.py:/path/to/hf_checkpoint
    python train.py --config configs/imported.py:/path/to/hf_checkpoint --config.train.steps=300
    python decode.py --checkpoint runs/imported --memory runs/imported/memory --prompt "..."

Sizes (width, depth, vocabulary, special ids) come from the checkpoint's config.json; its
tokenizer.json becomes the tokenizer. Checkpoints hold GistNet, LensNet and the optimizer only;
the base comes back from the directory named here.
"""

import ml_collections

from megacontext_jax.config import base_config


def get_config(hf_path: str = "") -> ml_collections.ConfigDict:
    c = base_config()
    c.workdir = "runs/imported"
    c.model.family = "llama"
    c.model.hf_path = hf_path
    c.mc.enabled = True
    c.mc.mode = "frozen_base"
    c.mc.lens_start = 100  # GistNet first, then LensNet
    c.data.seq_len = 512
    c.train.batch_size = 8
    c.train.steps = 300
    c.train.lr = 1e-3
    c.train.warmup_steps = 30
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.mc.block_size = 8
    c.mc.max_level = 3
    c.mc.wc_size = 64
    c.mc.recent_tail = 16
    c.mc.scored_tokens = 16
    c.mc.ingest_chunk = 16
    c.mc.gist.num_heads = 4
    c.mc.lens.num_heads = 4
    return c
