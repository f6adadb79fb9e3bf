"""Llama-family base models from local Hugging Face checkpoints (DESIGN section 7b).

Llama, Qwen2, Mistral, SmolLM, TinyLlama: RMSNorm with weights, RoPE (theta, Llama-3 frequency
scaling, linear scaling) made Gaussian by the per-entry ``sigma`` of DESIGN section 5, SwiGLU MLP,
grouped-query attention with optional q/k/v biases (Qwen2), tied or untied embeddings. The model
sits behind the same interface as the GPT (``DecoderLM``), so a working context of tokens and gists
runs through it unchanged.

``hf_weights.load_pretrained(directory)`` reads ``config.json`` and the safetensors weights (one
file or shards with their index; bf16, fp16 or fp32).
"""

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from megacontext_jax import kernels
from megacontext_jax.nets.decoder import DecoderLM
from megacontext_jax.nets.layers import LayerCache, attend, rms_norm
from megacontext_jax.nets.safetensors import SafetensorsError

MODEL_TYPES = ("llama", "mistral", "qwen2")  # SmolLM and TinyLlama are "llama"


class PretrainedError(SafetensorsError):
    """A checkpoint that cannot be imported; the message names the file or tensor."""


# -- config ------------------------------------------------------------------------------------
def read_hf_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise PretrainedError(f"no Hugging Face checkpoint at {directory}: config.json not found")
    hf = json.loads(path.read_text())
    kind = hf.get("model_type", "?")
    if kind not in MODEL_TYPES:
        arch = ", ".join(hf.get("architectures") or [kind])
        raise PretrainedError(
            f"{path}: model type {kind} ({arch}) is not supported "
            f"(supported: {', '.join(MODEL_TYPES)})"
        )
    return hf


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama-family model's sizes and options, read from its Hugging Face ``config.json``
    (``model_config``); frozen and hashable like every typed config (``specs``)."""

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int  # the SwiGLU MLP's width
    rope_theta: float
    # ``(key, value)`` pairs of the checkpoint's RoPE scaling (``scaling``); None: plain RoPE
    rope_scaling: tuple[tuple[str, Any], ...] | None
    norm_eps: float
    tie_embeddings: bool
    attention_bias: bool
    dtype: str = "float32"  # compute and storage
    attention_impl: str = "auto"

    @property
    def scaling(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)


def model_config(hf: dict, dtype: str = "float32") -> LlamaConfig:
    """Our model config of a Hugging Face ``config.json`` (``dtype``: compute and storage)."""
    heads = hf["num_attention_heads"]
    # transformers 5 writes rope_parameters (theta included); 4 wrote rope_theta + rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3", "linear"):
        raise PretrainedError(f"RoPE type {kind!r} is not supported (default, llama3, linear)")
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        width=hf["hidden_size"],
        depth=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        hidden=hf["intermediate_size"],
        rope_theta=float(theta),
        rope_scaling=None
        if kind == "default"
        else tuple(sorted(dict(rope, rope_type=kind).items())),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", hf["model_type"] == "qwen2")),
        dtype=dtype,
    )


def base_config(model: ml_collections.ConfigDict) -> LlamaConfig:
    """The Llama config of ``config.model`` (family llama): its checkpoint's, in our dtype."""
    cfg = model_config(read_hf_config(model.hf_path), model.dtype)
    return dataclasses.replace(cfg, attention_impl=model.attention_impl)


def sync_config(config: ml_collections.ConfigDict) -> None:
    """Fills ``config.model`` (in place) from the checkpoint at ``config.model.hf_path``: the
    sizes GistNet, LensNet and the tree read, and the tokenizer's special ids."""
    from megacontext_jax.data.tokenizer import HFTokenizer, special_ids

    hf = model_config(read_hf_config(config.model.hf_path))
    m = config.model
    m.width, m.depth, m.vocab_size = hf.width, hf.depth, hf.vocab_size
    m.num_heads, m.num_kv_heads, m.rope_theta = hf.num_heads, hf.num_kv_heads, hf.rope_theta
    ids = special_ids(m.hf_path)
    m.update(ids)
    m.num_tokens = min(HFTokenizer(m.hf_path, **ids).vocab_size, m.vocab_size)


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """``[head_dim / 2]`` float32 angular frequencies, with the checkpoint's scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    scaling = cfg.scaling
    kind = None if scaling is None else scaling["rope_type"]
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = (
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
        )
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        medium = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(
            wavelen > old / low, inv / factor, np.where(wavelen < old / high, inv, medium)
        )
    return inv.astype(np.float32)


# -- model -------------------------------------------------------------------------------------
def _dense(d_in: int, d_out: int, bias: bool, cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.Linear:
    dtype = jnp.dtype(cfg.dtype)
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class RMSNorm(nnx.Module):
    def __init__(self, width: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((width,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.weight[...] * rms_norm(x, self.eps)


class LlamaBlock(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, dh, dtype = cfg.width, cfg.head_dim, jnp.dtype(cfg.dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, dh
        self.impl = cfg.attention_impl
        self.input_layernorm = RMSNorm(d, cfg.norm_eps, dtype)
        self.q_proj = _dense(d, cfg.num_heads * dh, cfg.attention_bias, cfg, rngs)
        self.k_proj = _dense(d, cfg.num_kv_heads * dh, cfg.attention_bias, cfg, rngs)
        self.v_proj = _dense(d, cfg.num_kv_heads * dh, cfg.attention_bias, cfg, rngs)
        self.o_proj = _dense(cfg.num_heads * dh, d, False, cfg, rngs)
        self.post_attention_layernorm = RMSNorm(d, cfg.norm_eps, dtype)
        self.gate_proj = _dense(d, cfg.hidden, False, cfg, rngs)
        self.up_proj = _dense(d, cfg.hidden, False, cfg, rngs)
        self.down_proj = _dense(cfg.hidden, d, False, cfg, rngs)

    def _project(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(h).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(h).reshape(b, t, self.num_kv_heads, self.head_dim)
        return kernels.apply_rotary(q, cos, sin), kernels.apply_rotary(k, cos, sin), v

    def query_key(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        return self._project(x, cos, sin)[:2]

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        kv_valid: jax.Array | None,
        cache: LayerCache,
        index: jax.Array | int,
        entries: Any = None,
    ) -> tuple[jax.Array, LayerCache]:
        b, t, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        y, cache = attend(q, k, v, cache, index, kv_valid, True, self.impl, entries)
        x = x + self.o_proj(y.reshape(b, t, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h)), cache


class Llama(DecoderLM):
    """A Llama-family decoder (parameter names follow the Hugging Face checkpoints)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        self.num_kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim
        self.freqs = tuple(rope_frequencies(cfg).tolist())  # static: not a parameter
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.width, dtype=self.dtype, param_dtype=self.dtype, rngs=rngs
        )
        self.blocks = nnx.List([LlamaBlock(cfg, rngs) for _ in range(cfg.depth)])
        self.norm = RMSNorm(cfg.width, cfg.norm_eps, self.dtype)
        self.lm_head = (
            None if cfg.tie_embeddings else _dense(cfg.width, cfg.vocab_size, False, cfg, rngs)
        )

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens)

    def rope(self, mu: jax.Array, sigma: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        return kernels.rope_tables(mu, sigma, self.head_dim, freqs=jnp.asarray(self.freqs))

    def inputs(self, x: jax.Array) -> jax.Array:
        return x

    def logits(self, x: jax.Array) -> jax.Array:
        x = self.norm(x)
        if self.lm_head is None:
            return self.embed_tokens.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)
