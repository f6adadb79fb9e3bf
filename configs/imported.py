"""MegaContext on an imported Llama-family model (Llama, Qwen2, Mistral, SmolLM, TinyLlama): the
base is read from a local Hugging Face directory and frozen; GistNet, then LensNet, are trained.
The MegaContext sizes are those of ``configs/tiny.py`` (its base-model curriculum left out).

    python train.py --config configs/imported.py:/path/to/hf_checkpoint
    python train.py --config configs/imported.py:/path/to/hf_checkpoint --config.train.steps=300
    python decode.py --checkpoint runs/imported --memory runs/imported/memory --prompt "..."

Sizes (width, depth, vocabulary, special ids) come from the checkpoint's config.json; its
tokenizer.json becomes the tokenizer. Checkpoints hold GistNet, LensNet and the optimizer only;
the base comes back from the directory named here.
"""

from pathlib import Path

import ml_collections

from megacontext_jax.config_files import load_config


def get_config(hf_path: str = "") -> ml_collections.ConfigDict:
    c = load_config(str(Path(__file__).with_name("tiny.py")))
    c.unlock()
    c.workdir = "runs/imported"
    c.model.family = "llama"
    c.model.smear_keys = False
    c.model.hf_path = hf_path
    c.mc.mode = "frozen_base"
    c.curriculum.steps = 0  # tiny's curriculum trains the base model, which stays frozen here
    c.mc.lens_start = 100  # GistNet first, then LensNet
    c.data.passkey_fraction = 0.0
    c.train.steps = 300
    c.train.lr = 1e-3
    c.train.warmup_steps = 30
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    return c
