"""Shared fixtures: a small text corpus and a tiny config that trains in seconds."""

import atexit
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' programs are tiny and compile far longer than they run: with XLA's older CPU emitters
# and without LLVM's optimizations the MC objective's gradient compiles in ~4 s instead of ~14
# (what a program computes is unchanged, up to float rounding). Set once, by the process that
# starts the workers and CLIs, and only if this jaxlib knows the flags (XLA aborts on unknown ones).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    flags += " --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
    flags = flags.strip()
    probe = [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"]
    env = {**os.environ, "XLA_FLAGS": flags}
    if subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0:
        os.environ["XLA_FLAGS"] = flags
# One persistent compilation cache for the whole run, fresh each run: the tests build the same tiny
# programs again and again (every train() call jits a new step of the same shapes), in the xdist
# workers and in the CLIs they start, which inherit it from here (the controller imports this file
# before it starts the workers). It only skips recompiling identical XLA programs: what runs is the
# same. A size limit turns on the cache's file lock, so no process reads an entry half written;
# as every write then scans the whole directory, programs compiled in under 0.25 s (the thousands
# of single eager ops) are left out of it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="megacontext-jax-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.25")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import ml_collections
import pytest

from megacontext_jax.config import base_config, validate
from megacontext_jax.testing import (
    random_checkpoint,
    random_gister,
    tiny_config,
    train_tokenizer,
    write_corpus,
)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    write_corpus(directory)
    return directory


# A Llama-family checkpoint small enough to write in a test (random weights, BPE tokenizer).
HF_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, corpus_dir):
    """A Hugging Face directory of ``HF_CONFIG``: config, one safetensors file, tokenizer."""
    directory = tmp_path_factory.mktemp("hf")
    train_tokenizer(directory, [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))], 300)
    random_checkpoint(directory, HF_CONFIG)
    return directory


@pytest.fixture(scope="session")
def mc_checkpoint(tmp_path_factory, corpus_dir):
    """A MegaContext run of ``tiny_mc_config`` trained 3 steps (shared: tests write memories
    elsewhere, never into it)."""
    from megacontext_jax.training.loop import train

    workdir = tmp_path_factory.mktemp("mc_run")
    train(tiny_mc_config(workdir, corpus_dir, steps=3), progress=False)
    return workdir


def benchmark_script(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def signal_when(process, pattern: str, sig: int) -> tuple[int, str]:
    """Reads ``process``'s stderr until ``pattern`` matches, sends ``sig``, waits; returns the exit
    status and the whole stderr."""
    seen = ""
    while not re.search(pattern, seen):
        char = process.stderr.read(1)
        assert char, f"the process ended before {pattern!r}: {seen[-2000:]}"
        seen += char
    process.send_signal(sig)
    seen += process.stderr.read()
    return process.wait(timeout=120), seen


def train_cli(workdir, corpus, steps: int) -> list[str]:
    """``train.py`` arguments for a seconds-long plain-LM run of configs/tiny.py on ``corpus``."""
    return [
        sys.executable,
        "train.py",
        "--config",
        "configs/tiny.py",
        f"--config.workdir={workdir}",
        f"--config.data.source={corpus}",
        "--config.data.val_fraction=0.2",
        "--config.data.passkey_fraction=0",
        "--config.mc.enabled=false",
        "--config.data.seq_len=32",
        "--config.model.width=32",
        "--config.model.depth=1",
        "--config.train.batch_size=4",
        f"--config.train.steps={steps}",
        "--config.curriculum.steps=0",
        "--config.train.eval_batches=1",
    ]


def mc_config(
    block_size: int = 4, max_level: int = 3, width: int = 32, **mc
) -> ml_collections.ConfigDict:
    """A small MegaContext config: width-32 model with smeared keys, K=4, 3 levels, GistNet
    chunks of 8 blocks."""
    c = base_config()
    c.model.width, c.model.depth, c.model.num_heads, c.model.num_kv_heads = width, 1, 2, 2
    c.model.smear_keys = True
    c.mc.block_size, c.mc.max_level = block_size, max_level
    c.mc.gist.num_heads, c.mc.gist.depth = 2, 1
    c.mc.ingest_chunk = 8
    c.mc.wc_size, c.mc.recent_tail = 64, 8
    for key, value in mc.items():
        c.mc[key] = value
    validate(c)
    return c


def make_gister(config: ml_collections.ConfigDict | None = None, seed: int = 0):
    return random_gister(config or mc_config(), seed)


def tiny_mc_config(workdir, corpus, **train) -> ml_collections.ConfigDict:
    """``tiny_config`` with the MegaContext model on: K=4, W=24 (S=4 scored, R=4), T=64."""
    c = tiny_config(workdir, corpus, **train)
    c.unlock()
    c.mc.enabled = True
    c.data.seq_len = 64
    c.mc.block_size, c.mc.max_level = 4, 2
    c.mc.gist.num_heads = c.mc.lens.num_heads = 2
    c.mc.gist.depth = c.mc.lens.depth = 1
    c.mc.wc_size, c.mc.recent_tail, c.mc.scored_tokens = 24, 4, 4
    c.mc.num_random_variants = 2
    c.lock()
    validate(c)
    return c
