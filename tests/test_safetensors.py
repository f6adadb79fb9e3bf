"""The safetensors reader (the ``safetensors`` package) and streaming writer: round trips, and one
line naming the file for a truncated or corrupt one. No torch needed."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from megacontext_jax.nets.hf_weights import load_pretrained
from megacontext_jax.nets.llama import PretrainedError
from megacontext_jax.nets.safetensors import SafetensorsError, SafetensorsFiles, write_safetensors
from megacontext_jax.testing import random_checkpoint

HF_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": True,
}


def _tensors(dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((3, 5)).astype(dtype),
        "b.bias": rng.standard_normal(7).astype(dtype),
        "scalar": np.asarray(1.5, dtype),
    }


def _error(directory, name: str | None = None) -> str:
    """The one-line message of the ``SafetensorsError`` that listing (or reading) raises."""
    with pytest.raises(SafetensorsError) as info:
        files = SafetensorsFiles(directory)
        if name is not None:
            files.read(name)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_writer_and_reader_round_trip(tmp_path, dtype):
    tensors = _tensors(dtype)
    write_safetensors(tmp_path / "model.safetensors", tensors.items())
    files = SafetensorsFiles(tmp_path)
    assert sorted(files.tensors) == sorted(tensors)
    for name, expected in tensors.items():
        got = files.read(name)
        assert got.dtype == np.dtype(dtype) and got.shape == expected.shape
        assert got.tobytes() == expected.tobytes()
        got[...] = 0  # a copy of its own, not a view of the file
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_data_names_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, _tensors(np.float32).items())
    path.write_bytes(path.read_bytes()[:-4])
    message = _error(tmp_path)
    assert message.startswith(f"{path}: ") and "incomplete metadata" in message


def test_header_size_past_the_end_names_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, _tensors(np.float32).items())
    data = path.read_bytes()
    path.write_bytes(len(data).to_bytes(8, "little") + data[8:])
    message = _error(tmp_path)
    assert message.startswith(f"{path}: ") and "invalid header length" in message


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00", b"garbage!garbage!garbage!"])
def test_empty_or_garbage_file_names_the_file(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    assert _error(tmp_path).startswith(f"{path}: Error while deserializing header")


def test_corrupt_header_names_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, _tensors(np.float32).items())
    data = bytearray(path.read_bytes())
    data[8] = ord("[")  # the header's opening "{"
    path.write_bytes(bytes(data))
    message = _error(tmp_path)
    assert message.startswith(f"{path}: ") and "invalid JSON in header" in message


def test_header_offsets_that_disagree_with_the_shape_name_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = _tensors(np.float32)
    write_safetensors(path, tensors.items())
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["a.weight"]["shape"] = [3, 4]
    encoded = json.dumps(header).encode().ljust(size)
    path.write_bytes(data[:8] + encoded + data[8 + size :])
    assert _error(tmp_path).startswith(f"{path}: ")


def test_unsupported_dtype_and_missing_tensor_name_them(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"ids": np.arange(4, dtype=np.int32)}, path)
    assert _error(tmp_path, "ids") == f"{path}: tensor ids has unsupported dtype I32"
    assert _error(tmp_path, "nope") == f"{tmp_path}: tensor nope is missing"


def test_corrupt_index_or_missing_shard_names_the_index(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {}}')
    assert _error(tmp_path).startswith(f"{index}: not a safetensors index")
    index.write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    assert _error(tmp_path) == f"{index}: shard model-00001-of-00002.safetensors not found"


def test_truncated_shard_fails_the_import_as_one_value_error(tmp_path):
    # The CLIs print "error: <message>" for a ValueError; PretrainedError is one.
    random_checkpoint(tmp_path, HF_CONFIG, dtype="bfloat16", shard_bytes=2_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].write_bytes(shards[-1].read_bytes()[:-1])
    with pytest.raises(PretrainedError) as info:
        load_pretrained(tmp_path)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{shards[-1]}: Error while deserializing header")
    assert "\n" not in str(info.value)
