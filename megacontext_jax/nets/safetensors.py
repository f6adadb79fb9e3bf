"""Safetensors checkpoints without torch: read through the ``safetensors`` package's numpy API,
written by a streaming writer of our own.

The format is an 8-byte little-endian header size, a JSON header
``{name: {dtype, shape, data_offsets}}``, then the raw tensor bytes. Tensors are float32, float16
or bfloat16 (bfloat16 as ``ml_dtypes.bfloat16``).

The library parses and validates every file (header size, JSON, offsets against the file's
length) when it is opened; ``SafetensorsError`` (a ``ValueError``) carries its message after the
file's path, one line, as do a missing shard or tensor and an unsupported dtype. Reads open the
file for one tensor and return a copy, so the loader holds one tensor at a time beyond what it
keeps. Writes stream tensor by tensor: ``safetensors.serialize_file`` needs every tensor in memory
at once, so a generator of tensors goes through ``write_safetensors`` instead.
"""

import json
from collections.abc import Iterable
from pathlib import Path

# Importing ml_dtypes registers the name "bfloat16" with numpy; the library's numpy API resolves
# BF16 tensors by that name and fails with a TypeError without it.
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

_CODES = {
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32",
}
_READABLE = frozenset(_CODES.values())


class SafetensorsError(ValueError):
    """A missing or malformed safetensors file or tensor; the message names it."""


class SafetensorsFiles:
    """The tensors of a checkpoint directory (one file, or shards listed by their index)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise SafetensorsError(f"{index}: not a safetensors index ({e!r})") from None
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise SafetensorsError(f"no *.safetensors weights in {self.directory}")
        self.tensors: dict[str, Path] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise SafetensorsError(f"{index}: shard {name} not found")
            # Opening validates the whole header, so a corrupt shard fails here, before any
            # tensor is loaded; the handle is closed again to hold no mapping between reads.
            with _open(path) as f:
                self.tensors.update(dict.fromkeys(f.keys(), path))

    def read(self, name: str) -> np.ndarray:
        """The tensor as a numpy array (bf16 through ml_dtypes), a copy owning its memory."""
        if name not in self.tensors:
            raise SafetensorsError(f"{self.directory}: tensor {name} is missing")
        path = self.tensors[name]
        with _open(path) as f:
            try:
                dtype = f.get_slice(name).get_dtype()  # from the header: no data read yet
                if dtype not in _READABLE:
                    raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {dtype}")
                return f.get_tensor(name)
            except SafetensorError as e:  # the file changed since it was listed
                raise SafetensorsError(f"{path}: tensor {name}: {e}") from None


def _open(path: Path) -> safe_open:
    """``safe_open(path)`` for numpy, the library's errors raised as ``SafetensorsError``."""
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise SafetensorsError(f"{path}: {e}") from None


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """Writes ``(name, array)`` pairs (float32, float16 or bfloat16) to one safetensors file.

    The header, which comes first, needs every shape: the tensors go to a temporary body file as
    they arrive (a generator makes one at a time), then header and body are joined.
    """
    path = Path(path)
    body = path.with_suffix(".body.tmp")
    header, offset = {}, 0
    with body.open("wb") as f:
        for name, array in tensors:
            # Not ascontiguousarray, which makes a 0-d array 1-d; tobytes() writes C order.
            array = np.asarray(array)
            if array.dtype not in _CODES:
                raise SafetensorsError(f"tensor {name}: dtype {array.dtype} cannot be written")
            f.write(array.tobytes())
            header[name] = {
                "dtype": _CODES[array.dtype],
                "shape": list(array.shape),
                "data_offsets": [offset, offset + array.nbytes],
            }
            offset += array.nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the body to 8 bytes
    with path.open("wb") as out, body.open("rb") as f:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        while chunk := f.read(1 << 24):
            out.write(chunk)
    body.unlink()
