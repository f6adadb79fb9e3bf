"""The manifest of a tree directory: ``manifest.json``, the one file that says what is committed.

It holds the tree's ``TreeMeta``, the committed ``lengths`` per level, a ``generation`` counter
(one more on every commit, so a writer finds out that another one replaced the manifest) and the
CRC-32 of the committed rows of every chunk (``digests``); the last two are absent from a tree
written before they existed. ``write_manifest`` replaces the file atomically (temp file, fsync,
rename, fsync of the directory): after a crash it is the old manifest or the new one, whole.
``read_manifest`` returns only a manifest whose every field is of its type and range, else raises
``TreeCorruptError`` naming the first that is not, so code past it meets no value it cannot use.
A directory that holds tree data but no manifest is an error (``refuse_orphaned_data``), never an
empty place to create a tree in.
"""

import dataclasses
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from megacontext_jax.memory.errors import TreeCorruptError, TreeNotFoundError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The least value of each integer field of the tree's metadata in the manifest.
META_MINIMUM = {"block_size": 2, "dim": 1, "max_level": 1, "vocab_size": 1}


@dataclasses.dataclass(frozen=True)
class TreeMeta:
    """What a tree's contents depend on; fixed when the tree is created."""

    block_size: int
    dim: int
    max_level: int
    vocab_size: int
    gist_dtype: str
    fingerprint: str  # of the GistNet + embedding weights that produced the gists

    def dtype(self, level: int) -> np.dtype:
        return np.dtype(np.int32) if level == 0 else np.dtype(jnp.dtype(self.gist_dtype))

    def row_shape(self, level: int) -> tuple[int, ...]:
        return () if level == 0 else (self.dim,)


def read_manifest(path: Path) -> dict:
    """The manifest of the tree directory ``path``, every field checked (``TreeNotFoundError``
    without one, ``TreeCorruptError`` for one that is not valid)."""
    file = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise TreeNotFoundError(f"no tree at {path}: directory not found")
    if not file.is_file():
        refuse_orphaned_data(path)  # say what is there: data without its manifest
        raise TreeNotFoundError(f"no tree at {path}: {MANIFEST} not found")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TreeCorruptError(f"tree at {path}: {MANIFEST} is not valid JSON ({e})") from None
    _check_manifest(path, manifest)
    return manifest


def write_manifest(
    path: Path, meta: TreeMeta, lengths: list[int], generation: int, digests: list[list[int]]
) -> None:
    """Replaces the manifest of the tree directory ``path`` in one atomic step."""
    manifest = {
        "format_version": FORMAT_VERSION,
        **dataclasses.asdict(meta),
        "lengths": list(lengths),
        "generation": generation,
        "digests": digests,
    }
    tmp = path / (MANIFEST + ".tmp")
    with tmp.open("w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_data(path: Path) -> list[str]:
    """The names of what ``path`` holds of a tree's data (level arrays, a manifest's temp file)."""
    if not Path(path).is_dir():
        return []
    names = sorted(p.name for p in Path(path).iterdir())
    return [n for n in names if n.startswith("level_") or n == MANIFEST + ".tmp"]


def refuse_orphaned_data(path: Path) -> None:
    """Raises if ``path`` holds tree data but no manifest: creating a tree there would lose it."""
    found = tree_data(path)
    if found and not (Path(path) / MANIFEST).exists():
        raise TreeCorruptError(
            f"tree at {path} holds tree data ({', '.join(found)}) but no {MANIFEST}: not "
            "creating a tree over it (restore the manifest, or move the directory aside)"
        )


def _check_manifest(path: Path, manifest) -> None:
    """Raises ``TreeCorruptError`` naming the first field of ``manifest`` that is missing or not
    of its type and range: past this, code reading the manifest meets no value it cannot use."""
    if not isinstance(manifest, dict):
        raise TreeCorruptError(
            f"tree at {path}: {MANIFEST} holds {_shown(manifest)}, not an object"
        )
    required = {f.name for f in dataclasses.fields(TreeMeta)} | {"format_version", "lengths"}
    missing = sorted(required - set(manifest))
    if missing:
        raise TreeCorruptError(f"tree at {path}: {MANIFEST} lacks {', '.join(missing)}")
    if not _is_int(manifest["format_version"]) or manifest["format_version"] != FORMAT_VERSION:
        raise TreeCorruptError(
            f"tree at {path}: format version {_shown(manifest['format_version'])}, "
            f"this code reads {FORMAT_VERSION}"
        )

    def refuse(field: str, expected: str) -> None:
        raise TreeCorruptError(
            f"tree at {path}: {MANIFEST} field {field} is {_shown(manifest[field])}, "
            f"expected {expected}"
        )

    for field, least in META_MINIMUM.items():
        if not (_is_int(manifest[field]) and manifest[field] >= least):
            refuse(field, f"an integer >= {least}")
    name = manifest["gist_dtype"]
    try:
        dtype = jnp.dtype(name) if isinstance(name, str) else None
    except TypeError:  # not a dtype's name at all
        dtype = None
    if dtype is None or dtype.name != name or not jnp.issubdtype(dtype, jnp.floating):
        refuse("gist_dtype", "the name of a floating-point dtype (bfloat16, float16, float32)")
    if not (isinstance(manifest["fingerprint"], str) and manifest["fingerprint"]):
        refuse("fingerprint", "a non-empty string")
    levels = manifest["max_level"] + 1
    lengths = manifest["lengths"]
    if not (
        isinstance(lengths, list)
        and len(lengths) == levels
        and all(_is_int(n) and n >= 0 for n in lengths)
    ):
        refuse("lengths", f"a list of {levels} integers >= 0 (rows of levels 0 to {levels - 1})")
    # Both absent from a tree written before they existed.
    if "generation" in manifest and not (
        _is_int(manifest["generation"]) and manifest["generation"] >= 0
    ):
        refuse("generation", "an integer >= 0")
    digests = manifest.get("digests")
    if "digests" in manifest and not (
        isinstance(digests, list)
        and len(digests) == levels
        and all(
            isinstance(d, list) and all(_is_int(c) and 0 <= c < 1 << 32 for c in d) for d in digests
        )
    ):
        refuse("digests", f"a list of {levels} lists of CRC-32s (integers in [0, 2**32))")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is not 1


def _shown(value) -> str:
    """``value`` as the manifest spells it, cut short: one line of a message."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
