"""Peak host memory of importing a Llama-family checkpoint, relative to the size of its weights.

    python benchmarks/import_memory.py                        # ~500M parameters, bf16 on disk
    python benchmarks/import_memory.py --layers 4 --keep DIR  # smaller; keep the checkpoint

Writes a random-weight checkpoint in the Hugging Face layout (sharded safetensors + index), then
imports it in a fresh process (``nets.hf_weights.load_pretrained`` in the checkpoint's dtype) and reports
that process's peak RSS: before the import (jax and the code loaded), after it, and the growth
relative to the bytes of the weights (1.0 = exactly one copy).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(directory: str, dtype: str) -> dict:
    import jax

    from megacontext_jax.nets.decoder import count_params
    from megacontext_jax.nets.hf_weights import load_pretrained
    from megacontext_jax.training.metrics import peak_rss_mb

    jax.numpy.zeros(1).block_until_ready()  # the runtime's own memory counts as baseline
    before = peak_rss_mb()
    start = time.perf_counter()
    model, _ = load_pretrained(directory, dtype=dtype)
    from flax import nnx

    state = nnx.state(model)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    params = count_params(state)
    weight_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    return {
        "params": params,
        "weights_mb": weight_mb,
        "rss_before_mb": before,
        "peak_rss_mb": peak_rss_mb(),
        "seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--keep", help="write the checkpoint here and keep it")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dtype)))
        return
    from megacontext_jax.testing import random_checkpoint

    hf = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": args.vocab,
        "hidden_size": args.width,
        "intermediate_size": int(args.width * 2.7) // 64 * 64,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.width // 64,
        "num_key_value_heads": max(1, args.width // 256),
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.keep or tmp)
        start = time.perf_counter()
        random_checkpoint(directory, hf, dtype=args.dtype, shard_bytes=200 << 20)
        files = sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**20
        print(
            f"wrote {directory}: {files:,.0f} MiB of safetensors in {time.perf_counter() - start:.1f} s"
        )
        cmd = [sys.executable, __file__, "--dtype", args.dtype, "--worker", str(directory)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"import failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["peak_rss_mb"] - r["rss_before_mb"]
    print(f"parameters        {r['params'] / 1e6:,.1f} M ({args.dtype})")
    print(f"weights           {r['weights_mb']:,.0f} MiB")
    print(f"RSS before import {r['rss_before_mb']:,.0f} MiB (python, jax, the code)")
    print(f"peak RSS          {r['peak_rss_mb']:,.0f} MiB after {r['seconds']:.1f} s of import")
    print(f"peak growth / weights: {growth / r['weights_mb']:.2f}x")


if __name__ == "__main__":
    main()
