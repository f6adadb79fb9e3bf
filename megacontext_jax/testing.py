"""Fixtures for tests and benchmarks: random weights, a tiny tokenizer, a corpus, a small config.

Like gemma's ``gm/testing``: the library never imports this module; the tests and the benchmark
scripts do, so a benchmark needs the installed package only, never the checkout's ``tests``.
Everything here is a pure function of its arguments (same seed, same bytes): a fixture written
twice is the same fixture.
"""

import json
import math
import random
from collections.abc import Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megacontext_jax.config import base_config, validate
from megacontext_jax.megacontext import make_base
from megacontext_jax.memory.gister import Gister
from megacontext_jax.nets.gistnet import GistNet
from megacontext_jax.nets.hf_weights import hf_names
from megacontext_jax.nets.llama import model_config
from megacontext_jax.nets.safetensors import write_safetensors
from megacontext_jax.nets.specs import GistConfig

WORDS = (
    *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while"),
    *("seven", "wizards", "quietly", "judge", "boxing"),
)


def write_corpus(directory: Path, num_docs: int = 24, seed: int = 0) -> None:
    """Text files of pseudo-sentences: some longer than a sequence, some shorter (packed)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(num_docs):
        n_words = rng.choice([8, 20, 200, 400])
        text = " ".join(rng.choice(WORDS) for _ in range(n_words)) + ".\n"
        (directory / f"doc{i:03d}.txt").write_text(text)


def tiny_config(workdir: str | Path, corpus: str | Path, **train) -> ml_collections.ConfigDict:
    """A 2-layer, width-32 model with smeared keys (as configs/tiny.py) on ``corpus`` with
    sequences of 32 bytes."""
    c = base_config()
    c.workdir = str(workdir)
    c.model.width, c.model.depth, c.model.num_heads, c.model.num_kv_heads = 32, 2, 4, 2
    c.model.smear_keys = True
    c.data.source = str(corpus)
    c.data.seq_len = 32
    c.data.val_fraction = 0.2
    c.train.batch_size = 4
    c.train.steps = 6
    c.train.warmup_steps = 2
    c.train.log_every = 1
    c.train.eval_every = 3
    c.train.eval_batches = 2
    c.train.checkpoint_every = 100
    for key, value in train.items():
        c.train[key] = value
    c.lock()
    validate(c)
    return c


def random_gister(config: ml_collections.ConfigDict, seed: int = 0) -> Gister:
    """A ``Gister`` of freshly initialized embeddings and GistNet, and for a contextual GistNet
    a fresh base model (same seed, same weights)."""
    m = config.model
    table = jax.random.normal(jax.random.key(seed), (m.vocab_size, m.width))
    gist = GistConfig.from_config(config)
    gistnet = GistNet(gist, rngs=nnx.Rngs(seed))
    base = make_base(config, nnx.Rngs(seed)) if gist.contextual else None
    return Gister.from_config(table, gistnet, config, base)


def random_checkpoint(
    directory: str | Path,
    hf_config: dict,
    seed: int = 0,
    dtype: str = "float32",
    std: float = 0.05,
    shard_bytes: int | None = None,
) -> None:
    """Writes ``config.json`` and random safetensors weights (tensor by tensor, optionally in
    shards with an index) of a Llama-family model: checkpoints for tests and benchmarks."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=1))
    shapes = hf_names(model_config(hf_config))
    rng = np.random.default_rng(seed)

    def tensors(names):
        for name in names:
            shape = shapes[name]
            if name.endswith("norm.weight"):
                yield name, (1.0 + std * rng.standard_normal(shape)).astype(dtype)
            else:
                yield name, (std * rng.standard_normal(shape)).astype(dtype)

    size = np.dtype(jnp.dtype(dtype)).itemsize
    shards, current, used = [], [], 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * size
        if current and shard_bytes and used + nbytes > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", tensors(shards[0]))
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(directory / file, tensors(names))
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def train_tokenizer(directory: str | Path, texts: Iterable[str], vocab_size: int = 512) -> None:
    """Writes a byte-level BPE ``tokenizer.json`` trained on ``texts``, with ``<s>`` (id 0) and
    ``</s>`` (id 1): the tokenizer of test and benchmark checkpoints (``bos_token_id`` 0,
    ``eos_token_id`` 1)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(Path(directory) / "tokenizer.json"))
