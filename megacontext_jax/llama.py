"""Llama-family base models from local Hugging Face checkpoints (DESIGN section 7b).

Llama, Qwen2, Mistral, SmolLM, TinyLlama: RMSNorm with weights, RoPE (theta, Llama-3 frequency
scaling, linear scaling) made Gaussian by the per-entry ``sigma`` of DESIGN section 5, SwiGLU MLP,
grouped-query attention with optional q/k/v biases (Qwen2), tied or untied embeddings. The model
sits behind the same interface as the GPT (``DecoderLM``), so a working context of tokens and gists
runs through it unchanged.

``load_pretrained(directory)`` reads ``config.json`` and the safetensors weights (one file or shards
with their index; bf16, fp16 or fp32) tensor by tensor from memory-mapped files into an abstract
model, so peak host memory stays near one copy of the weights.
"""

import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import kernels
from megacontext_jax.model import DecoderLM, LayerCache, attend, rms_norm
from megacontext_jax.safetensors import SafetensorsError, SafetensorsFiles, write_safetensors

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


def model_config(hf: dict, dtype: str = "float32") -> ml_collections.ConfigDict:
    """Our model config of a Hugging Face ``config.json`` (``dtype``: compute and storage)."""
    heads = hf["num_attention_heads"]
    # transformers 5 writes rope_parameters (theta included); 4 wrote rope_theta + rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3", "linear"):
        raise PretrainedError(f"RoPE type {kind!r} is not supported (default, llama3, linear)")
    return ml_collections.ConfigDict(
        {
            "family": "llama",
            "vocab_size": hf["vocab_size"],
            "width": hf["hidden_size"],
            "depth": hf["num_hidden_layers"],
            "num_heads": heads,
            "num_kv_heads": hf.get("num_key_value_heads") or heads,
            "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
            "hidden": hf["intermediate_size"],
            "rope_theta": float(theta),
            "rope_scaling": None if kind == "default" else dict(rope, rope_type=kind),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "attention_bias": bool(hf.get("attention_bias", hf["model_type"] == "qwen2")),
            "dtype": dtype,
            "attention_impl": "reference",
        }
    )


def base_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The Llama config of ``config.model`` (family llama): its checkpoint's, in our dtype."""
    cfg = model_config(read_hf_config(model.hf_path), model.dtype)
    cfg.attention_impl = model.attention_impl
    return cfg


def sync_config(config: ml_collections.ConfigDict) -> None:
    """Fills ``config.model`` (in place) from the checkpoint at ``config.model.hf_path``: the
    sizes GistNet, LensNet and the tree read, and the tokenizer's special ids."""
    from megacontext_jax.tokenizer import HFTokenizer, special_ids

    hf = model_config(read_hf_config(config.model.hf_path))
    m = config.model
    m.width, m.depth, m.vocab_size = hf.width, hf.depth, hf.vocab_size
    m.num_heads, m.num_kv_heads, m.rope_theta = hf.num_heads, hf.num_kv_heads, hf.rope_theta
    ids = special_ids(m.hf_path)
    m.update(ids)
    m.num_tokens = min(HFTokenizer(m.hf_path, **ids).vocab_size, m.vocab_size)


def rope_frequencies(cfg: ml_collections.ConfigDict) -> np.ndarray:
    """``[head_dim / 2]`` float32 angular frequencies, with the checkpoint's scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    scaling = cfg.rope_scaling
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
def _dense(d_in: int, d_out: int, bias: bool, cfg, rngs: nnx.Rngs) -> nnx.Linear:
    dtype = jnp.dtype(cfg.dtype)
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class RMSNorm(nnx.Module):
    def __init__(self, width: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((width,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.weight[...] * rms_norm(x, self.eps)


class LlamaBlock(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
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
        h = self.input_layernorm(x)
        q = self.q_proj(h).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(h).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(h).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = kernels.apply_rotary(q, cos, sin), kernels.apply_rotary(k, cos, sin)
        y, cache = attend(q, k, v, cache, index, kv_valid, True, self.impl, entries)
        x = x + self.o_proj(y.reshape(b, t, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h)), cache


class Llama(DecoderLM):
    """A Llama-family decoder (parameter names follow the Hugging Face checkpoints)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
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


# -- weights -----------------------------------------------------------------------------------
def _hf_name(path: tuple) -> tuple[str, bool]:
    """The checkpoint tensor behind an NNX parameter path, and whether it is transposed."""
    keys = [str(p) for p in path]
    if keys[0] == "embed_tokens":
        return "model.embed_tokens.weight", False
    if keys[0] == "norm":
        return "model.norm.weight", False
    if keys[0] == "lm_head":
        return "lm_head.weight", True
    layer, module, leaf = keys[1], keys[2], keys[-1]
    group = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
    if module.endswith("layernorm"):
        return f"model.layers.{layer}.{module}.weight", False
    name = "weight" if leaf == "kernel" else "bias"
    return f"model.layers.{layer}.{group}.{module}.{name}", leaf == "kernel"


def load_pretrained(
    directory: str | Path, dtype: str = "float32", attention_impl: str = "reference"
) -> tuple[Llama, ml_collections.ConfigDict]:
    """The model of a Hugging Face checkpoint directory and its config.

    Raises ``PretrainedError`` (one line, naming the file or tensor) for an unknown
    architecture, a missing tensor or a shape that does not match the config.
    """
    cfg = model_config(read_hf_config(directory), dtype)
    cfg.attention_impl = attention_impl
    return load_weights(cfg, directory), cfg


def load_weights(cfg: ml_collections.ConfigDict, directory: str | Path) -> Llama:
    """A ``Llama(cfg)`` holding the weights of ``directory``, read one tensor at a time."""
    try:
        files = SafetensorsFiles(directory)
    except SafetensorsError as e:
        raise PretrainedError(str(e)) from None
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    loaded = []
    for path, variable in flat:
        name, transpose = _hf_name(path)
        try:
            array = files.read(name)
        except SafetensorsError as e:
            raise PretrainedError(str(e)) from None
        if transpose:
            array = array.T
        if array.shape != variable.value.shape:
            raise PretrainedError(
                f"{directory}: tensor {name} has shape {list(array.shape)}, the config needs "
                f"{list(variable.value.shape)}"
            )
        loaded.append((path, variable.replace(jnp.asarray(array, variable.value.dtype))))
        del array
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def save_pretrained(model: Llama, directory: str | Path, source: str | Path) -> None:
    """Writes ``model`` as a Hugging Face checkpoint at ``directory``: the ``config.json`` and
    ``tokenizer.json`` of ``source`` (the checkpoint whose architecture it has) and its weights."""
    import shutil

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(Path(source) / name, directory / name)

    def tensors():
        for path, variable in nnx.to_flat_state(nnx.state(model)):
            name, transpose = _hf_name(path)
            array = np.asarray(variable.value)
            yield name, array.T if transpose else array

    write_safetensors(directory / "model.safetensors", tensors())


def hf_names(cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``cfg`` holds, with its shape (Hugging Face layout)."""
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    shapes = {}
    for path, variable in nnx.to_flat_state(nnx.state(abstract)):
        name, transpose = _hf_name(path)
        shape = variable.value.shape
        shapes[name] = tuple(reversed(shape)) if transpose else tuple(shape)
    return shapes
