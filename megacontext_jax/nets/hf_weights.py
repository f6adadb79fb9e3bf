"""Weight I/O of the Llama-family models (DESIGN section 7b): Hugging Face tensor names, and
safetensors read tensor by tensor from memory-mapped files into an abstract model (peak host
memory stays near one copy of the weights) and written back.
"""

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from megacontext_jax.nets.llama import (
    Llama,
    LlamaConfig,
    PretrainedError,
    model_config,
    read_hf_config,
)
from megacontext_jax.nets.safetensors import SafetensorsError, SafetensorsFiles, write_safetensors


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
    directory: str | Path, dtype: str = "float32", attention_impl: str = "auto"
) -> tuple[Llama, LlamaConfig]:
    """The model of a Hugging Face checkpoint directory and its config.

    Raises ``PretrainedError`` (one line, naming the file or tensor) for an unknown
    architecture, a missing tensor or a shape that does not match the config.
    """
    cfg = model_config(read_hf_config(directory), dtype)
    cfg = dataclasses.replace(cfg, attention_impl=attention_impl)
    return load_weights(cfg, directory), cfg


def load_weights(cfg: LlamaConfig, directory: str | Path) -> Llama:
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


def hf_names(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``cfg`` holds, with its shape (Hugging Face layout)."""
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    shapes = {}
    for path, variable in nnx.to_flat_state(nnx.state(abstract)):
        name, transpose = _hf_name(path)
        shape = variable.value.shape
        shapes[name] = tuple(reversed(shape)) if transpose else tuple(shape)
    return shapes
