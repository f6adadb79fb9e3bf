"""The safetensors format, read and written without torch: an 8-byte little-endian header size,
a JSON header ``{name: {dtype, shape, data_offsets}}``, then the raw tensor bytes.

Reads go through memory maps, one tensor at a time; writes stream tensor by tensor, so neither
ever holds more than one tensor beyond what the caller keeps.
"""

import json
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

_NAMES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}
_CODES = {np.dtype(v): k for k, v in _NAMES.items()}


class SafetensorsError(ValueError):
    """A missing or malformed safetensors file or tensor; the message names it."""


class SafetensorsFiles:
    """The tensors of a checkpoint directory (one file, or shards listed by their index)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise SafetensorsError(f"no *.safetensors weights in {self.directory}")
        self.tensors: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise SafetensorsError(f"{index}: shard {name} not found")
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            for tensor, info in header.items():
                self.tensors[tensor] = (path, info, 8 + size)

    def read(self, name: str) -> np.ndarray:
        """The tensor as a numpy array (bf16 through ml_dtypes), copied out of the mapping."""
        if name not in self.tensors:
            raise SafetensorsError(f"{self.directory}: tensor {name} is missing")
        path, info, base = self.tensors[name]
        if info["dtype"] not in _NAMES:
            raise SafetensorsError(
                f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}"
            )
        start, stop = info["data_offsets"]
        data = np.memmap(path, np.uint8, "r", offset=base + start, shape=(stop - start,))
        return np.array(data.view(_NAMES[info["dtype"]]).reshape(info["shape"]))


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
            array = np.ascontiguousarray(array)
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
