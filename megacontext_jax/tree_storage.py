"""Storage backends of the MegaContext tree: in memory, and on disk with TensorStore ``zarr3``.

Both hold one growable array per level (level 0: int32 token ids ``[n]``; level l >= 1: gists
``[n, D]``) and a list of *committed* lengths. Rows are written first and committed after, in one
atomic step; readers trust only committed lengths. On disk (DESIGN section 3): ``level_<l>/`` zarr3
arrays with a resizable first axis and ``manifest.json``, replaced atomically (temp file, fsync,
rename) on every commit; ``writer.lock`` admits one writer at a time.
"""

import dataclasses
import fcntl
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import tensorstore as ts

FORMAT_VERSION = 1
CACHE_BYTES = 32 << 20  # per open tree
MANIFEST = "manifest.json"
LOCK = "writer.lock"


class TreeError(RuntimeError):
    """A tree problem, reported as one line that names it."""


class TreeNotFoundError(TreeError):
    pass


class TreeCorruptError(TreeError):
    pass


class TreeLockedError(TreeError):
    pass


class TreeMismatchError(TreeError):
    pass


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


class MemoryStorage:
    """Arrays in host memory with amortized growth; commit is a plain assignment.

    ``offsets`` (rows per level) makes it hold rows from there on only: the staging area of
    appends not yet committed to another storage.
    """

    def __init__(self, meta: TreeMeta, offsets: list[int] | None = None):
        self.meta = meta
        self.offsets = list(offsets or [0] * (meta.max_level + 1))
        self.lengths = list(self.offsets)
        self._arrays = [
            np.zeros((0, *meta.row_shape(l)), meta.dtype(l)) for l in range(meta.max_level + 1)
        ]

    def write(self, level: int, start: int, rows: np.ndarray) -> None:
        array = self._arrays[level]
        start -= self.offsets[level]
        stop = start + len(rows)
        if stop > len(array):
            grown = np.zeros((max(stop, 2 * len(array)), *array.shape[1:]), array.dtype)
            grown[: len(array)] = array
            self._arrays[level] = array = grown
        array[start:stop] = rows

    def read(self, level: int, start: int, stop: int) -> np.ndarray:
        offset = self.offsets[level]
        return self._arrays[level][start - offset : stop - offset].copy()

    def commit(self, lengths: list[int]) -> None:
        self.lengths = list(lengths)

    def close(self) -> None:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskStorage:
    """TensorStore ``zarr3`` arrays, one per level, plus an atomically replaced manifest."""

    def __init__(self, path: Path, meta: TreeMeta, lengths: list[int], writable: bool):
        self.path, self.meta, self.lengths, self.writable = path, meta, list(lengths), writable
        # Decoded chunks of recent reads and writes stay in memory (bounded): a decode refocus
        # touches the same few chunks again and again.
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": CACHE_BYTES}})
        self._lock_fd = self._acquire_lock() if writable else None
        try:
            self._arrays = [self._open_array(l) for l in range(meta.max_level + 1)]
        except ValueError as e:
            self.close()
            raise TreeCorruptError(f"tree at {path}: cannot open its arrays ({e})") from None

    # -- creation and opening ------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, meta: TreeMeta) -> "DiskStorage":
        path = Path(path)
        if (path / MANIFEST).exists():
            raise TreeError(f"a tree already exists at {path}")
        path.mkdir(parents=True, exist_ok=True)
        for level in range(meta.max_level + 1):
            spec = cls._spec(path, meta, level)
            ts.open(spec, create=True, delete_existing=True, dtype=spec["dtype"]).result()
        storage = cls(path, meta, [0] * (meta.max_level + 1), writable=True)
        storage.commit(storage.lengths)
        return storage

    @classmethod
    def open(cls, path: Path, writable: bool) -> "DiskStorage":
        path = Path(path)
        manifest = read_manifest(path)
        meta = TreeMeta(**{f.name: manifest[f.name] for f in dataclasses.fields(TreeMeta)})
        lengths = manifest["lengths"]
        if len(lengths) != meta.max_level + 1 or any(
            not isinstance(n, int) or n < 0 for n in lengths
        ):
            raise TreeCorruptError(f"tree at {path}: manifest lengths {lengths} are malformed")
        return cls(path, meta, lengths, writable)

    @staticmethod
    def _spec(path: Path, meta: TreeMeta, level: int) -> dict:
        rows = 1 << 14 if level == 0 else max(1, (1 << 17) // (meta.dim * 2))
        return {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(path / f"level_{level}")},
            "dtype": "int32" if level == 0 else meta.gist_dtype,
            "metadata": {
                "shape": [0, *meta.row_shape(level)],
                "chunk_grid": {
                    "name": "regular",
                    "configuration": {"chunk_shape": [rows, *meta.row_shape(level)]},
                },
                # Byte ids in int32 and the zero tail of a partly filled chunk compress well.
                "codecs": [
                    {"name": "bytes", "configuration": {"endian": "little"}},
                    {"name": "zstd", "configuration": {"level": 1, "checksum": False}},
                ],
            },
        }

    def _open_array(self, level: int):
        spec = {k: v for k, v in self._spec(self.path, self.meta, level).items() if k != "metadata"}
        mode = {"open": True} if self.writable else {"open": True, "read": True}
        # Committed rows never change, so chunks cached since opening need no revalidation.
        array = ts.open(spec, context=self._context, recheck_cached_data="open", **mode).result()
        if array.shape[0] < self.lengths[level]:
            raise TreeCorruptError(
                f"tree at {self.path}: level {level} holds {array.shape[0]} rows but "
                f"{self.lengths[level]} are committed"
            )
        return array

    def _acquire_lock(self) -> int:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise TreeLockedError(
                f"tree at {self.path} is locked by another writer (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    # -- the storage interface -----------------------------------------------------------------
    def write(self, level: int, start: int, rows: np.ndarray) -> None:
        array = self._arrays[level]
        stop = start + len(rows)
        if stop > array.shape[0]:
            # Grow geometrically: spare rows past the committed length are ignored by readers.
            size = max(stop, 2 * array.shape[0])
            array = array.resize(exclusive_max=[size, *array.shape[1:]], expand_only=True).result()
            self._arrays[level] = array
        array[start:stop].write(rows).result()

    def read(self, level: int, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._arrays[level][start:stop].read().result())

    def commit(self, lengths: list[int]) -> None:
        manifest = {
            "format_version": FORMAT_VERSION,
            **dataclasses.asdict(self.meta),
            "lengths": list(lengths),
        }
        tmp = self.path / (MANIFEST + ".tmp")
        with tmp.open("w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MANIFEST)
        _fsync_dir(self.path)
        self.lengths = list(lengths)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


def read_manifest(path: Path) -> dict:
    file = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise TreeNotFoundError(f"no tree at {path}: directory not found")
    if not file.is_file():
        raise TreeNotFoundError(f"no tree at {path}: {MANIFEST} not found")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TreeCorruptError(f"tree at {path}: {MANIFEST} is not valid JSON ({e})") from None
    required = {f.name for f in dataclasses.fields(TreeMeta)} | {"format_version", "lengths"}
    missing = sorted(required - set(manifest))
    if missing:
        raise TreeCorruptError(f"tree at {path}: {MANIFEST} lacks {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise TreeCorruptError(
            f"tree at {path}: format version {manifest['format_version']}, "
            f"this code reads {FORMAT_VERSION}"
        )
    return manifest
