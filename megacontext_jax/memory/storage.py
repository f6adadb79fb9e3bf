"""Storage backends of the MegaContext tree: in memory, and on disk with TensorStore ``zarr3``.

Both hold one growable array per level (level 0: int32 token ids ``[n]``; level l >= 1: gists
``[n, D]``) and a list of *committed* lengths. Rows are written first and committed after, in one
atomic step; readers trust only committed lengths. ``Storage`` is what the tree needs of a
backend. On disk (DESIGN section 3): ``level_<l>/`` zarr3 arrays with a resizable first axis and
``manifest.json`` (``manifest``), replaced atomically on every commit.

Nothing committed is ever lost to another writer or a lost file: one writer at a time holds the
directory's lock (``lock``); every commit checks that the manifest on disk is the one this
writer last read or wrote (its ``generation`` counter), so a commit never lands on a manifest
another writer replaced; and a tree is never created over a directory that holds tree data (a
lost manifest is an error, not an empty tree).

Nothing is silently wrong either: the manifest records a CRC-32 of the committed rows of every
chunk, each chunk is checked the first time it is read (``verify`` checks them all), and new
arrays carry zstd's checksum, so a flipped, truncated or deleted chunk is an error, never data.
"""

import dataclasses
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np
import tensorstore as ts

from megacontext_jax.errors import first_line
from megacontext_jax.memory.errors import TreeCorruptError, TreeError, TreeLockedError
from megacontext_jax.memory.lock import lock_directory, unlock
from megacontext_jax.memory.manifest import (
    MANIFEST,
    TreeMeta,
    read_manifest,
    refuse_orphaned_data,
    write_manifest,
)

CACHE_BYTES = 32 << 20  # per open tree


class Storage(Protocol):
    """What the tree needs of a backend: rows per level, written first and committed after.

    ``lengths`` are the committed rows per level, the only rows readers of the storage read.
    ``write`` puts rows at or past them; ``commit`` publishes new lengths in one atomic step.
    """

    meta: TreeMeta
    lengths: list[int]

    @property
    def where(self) -> str:
        """How messages name the storage: ``tree at {where}``."""
        ...

    def write(self, level: int, start: int, rows: np.ndarray) -> None: ...

    def read(self, level: int, start: int, stop: int) -> np.ndarray: ...

    def commit(self, lengths: list[int]) -> None: ...

    def check_all(self) -> None:
        """Raises ``TreeCorruptError`` unless every committed row reads back as committed."""
        ...

    def disk_bytes(self) -> int | None:
        """Bytes the storage takes on disk; ``None`` for one that holds nothing on disk."""
        ...

    def close(self) -> None:
        """Releases what the storage holds (the writer lock); its data stays."""
        ...


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

    @property
    def where(self) -> str:
        return "memory"

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

    def check_all(self) -> None:
        pass  # rows in memory carry no digests: what was written is what is there

    def disk_bytes(self) -> None:
        return None

    def close(self) -> None:
        pass


class DiskStorage:
    """TensorStore ``zarr3`` arrays, one per level, plus an atomically replaced manifest."""

    def __init__(
        self,
        path: Path,
        meta: TreeMeta,
        lengths: list[int],
        writable: bool,
        generation: int = 0,
        lock_fd: int | None = None,
        digests: list[list[int]] | None = None,
    ):
        self.path, self.meta, self.lengths, self.writable = path, meta, list(lengths), writable
        self.generation = generation  # of the manifest this storage last read or wrote
        # CRC-32 of the committed rows of each chunk, per level (None: a tree written before
        # digests existed; its next commit records them); chunks checked since opening.
        self.digests = digests
        self._verified: set[tuple[int, int]] = set()
        # Decoded chunks of recent reads and writes stay in memory (bounded): a decode refocus
        # touches the same few chunks again and again.
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": CACHE_BYTES}})
        if writable and lock_fd is None:
            lock_fd = lock_directory(path)
        self._lock_fd = lock_fd
        try:
            self._arrays = [self._open_array(l) for l in range(meta.max_level + 1)]
        except ValueError as e:
            self.close()
            raise TreeCorruptError(
                f"tree at {path}: cannot open its arrays ({first_line(e)})"
            ) from None
        except TreeError:  # an array shorter than its committed rows: the lock is released too
            self.close()
            raise

    @property
    def where(self) -> str:
        return str(self.path)

    # -- creation and opening ------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, meta: TreeMeta) -> "DiskStorage":
        path = Path(path)
        if (path / MANIFEST).exists():
            raise TreeError(f"a tree already exists at {path}")
        refuse_orphaned_data(path)
        path.mkdir(parents=True, exist_ok=True)
        lock = lock_directory(path)  # first: two creators must not both write arrays
        try:
            refuse_orphaned_data(path)  # another creator may have finished while we waited
            for level in range(meta.max_level + 1):
                spec = cls._spec(path, meta, level)
                # Never delete_existing: an array that exists here is someone's data.
                ts.open(spec, create=True, dtype=spec["dtype"]).result()
        except ValueError as e:
            unlock(lock)
            raise TreeCorruptError(
                f"tree at {path}: cannot create its arrays ({first_line(e)})"
            ) from None
        except BaseException:
            unlock(lock)
            raise
        storage = cls(
            path,
            meta,
            [0] * (meta.max_level + 1),
            writable=True,
            lock_fd=lock,
            digests=[[] for _ in range(meta.max_level + 1)],
        )
        storage.commit(storage.lengths)
        return storage

    @classmethod
    def open(cls, path: Path, writable: bool) -> "DiskStorage":
        path = Path(path)
        manifest = read_manifest(path)
        meta = TreeMeta(**{f.name: manifest[f.name] for f in dataclasses.fields(TreeMeta)})
        lengths, digests = manifest["lengths"], manifest.get("digests")
        storage = cls(path, meta, lengths, writable, manifest.get("generation", 0), digests=digests)
        try:
            # After the arrays: rows missing from them is the likelier story of wrong lengths.
            k, n = meta.block_size, lengths[0]
            for level in range(1, meta.max_level + 1):
                if lengths[level] != n // k**level:
                    raise TreeCorruptError(
                        f"tree at {path}: manifest lengths {lengths} are inconsistent: level "
                        f"{level} holds {lengths[level]} gists; {n} tokens need {n // k**level}"
                    )
            chunks = [-(-n // _chunk_rows(meta, level)) for level, n in enumerate(lengths)]
            if digests is not None and [len(d) for d in digests] != chunks:
                raise TreeCorruptError(f"tree at {path}: manifest digests do not match its lengths")
            if writable:  # read again under the lock: the manifest may have changed as we waited
                storage._check_generation()
        except TreeError:
            storage.close()
            raise
        return storage

    @staticmethod
    def _spec(path: Path, meta: TreeMeta, level: int) -> dict:
        rows = _chunk_rows(meta, level)
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
                    # zstd's own checksum: a flipped byte is a read error, not wrong data.
                    {"name": "zstd", "configuration": {"level": 1, "checksum": True}},
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

    def _check_generation(self) -> None:
        """Raises unless the manifest on disk is the one this writer last read or wrote."""
        on_disk = read_manifest(self.path).get("generation", 0)
        if on_disk != self.generation:
            raise TreeLockedError(
                f"tree at {self.path} was changed by another writer (manifest generation "
                f"{on_disk}, this writer's {self.generation}): nothing committed; reopen it"
            )

    # -- the storage interface -----------------------------------------------------------------
    def write(self, level: int, start: int, rows: np.ndarray) -> None:
        array = self._arrays[level]
        stop = start + len(rows)
        # TensorStore rewrites a partly filled chunk whole: committed rows of it that went bad
        # are an error here, never carried into the new chunk.
        self._check_chunks(level, start, stop)
        try:
            if stop > array.shape[0]:
                # Grow geometrically: spare rows past the committed length are ignored by readers.
                size = max(stop, 2 * array.shape[0])
                array = array.resize(
                    exclusive_max=[size, *array.shape[1:]], expand_only=True
                ).result()
                self._arrays[level] = array
            array[start:stop].write(rows).result()
        except ValueError as e:
            raise TreeError(
                f"tree at {self.path}: level {level} rows [{start}, {stop}) cannot be written "
                f"({first_line(e)})"
            ) from None

    def read(self, level: int, start: int, stop: int) -> np.ndarray:
        """Committed rows ``[start, stop)``; every chunk they touch is checked against its digest
        the first time it is read (``TreeCorruptError`` if it reads back altered or missing)."""
        self._check_chunks(level, start, stop)
        return self._read_raw(level, start, stop)

    def check_all(self) -> None:
        """Reads every committed row back and checks every chunk's digest."""
        self._verified.clear()
        for level, n in enumerate(self.lengths):
            self._check_chunks(level, 0, n)

    def _read_raw(self, level: int, start: int, stop: int) -> np.ndarray:
        try:
            return np.asarray(self._arrays[level][start:stop].read().result())
        except ValueError as e:
            raise TreeCorruptError(
                f"tree at {self.path}: level {level} rows [{start}, {stop}) cannot be read "
                f"({first_line(e)})"
            ) from None

    def _check_chunks(self, level: int, start: int, stop: int) -> None:
        if self.digests is None or start >= stop:
            return
        rows = _chunk_rows(self.meta, level)
        for chunk in range(start // rows, (stop - 1) // rows + 1):
            a, b = chunk * rows, min((chunk + 1) * rows, self.lengths[level])
            if (level, chunk) in self._verified or a >= b:
                continue
            if _crc(self._read_raw(level, a, b)) != self.digests[level][chunk]:
                raise TreeCorruptError(
                    f"tree at {self.path}: level {level} rows [{a}, {b}) read back altered or "
                    f"missing (chunk {chunk} fails its checksum)"
                )
            self._verified.add((level, chunk))

    def _digests_after(self, lengths: list[int]) -> list[list[int]]:
        """The digests once ``lengths`` are committed (the rows are written already): the chunks
        that gained rows are read back, after checking the rows they held before."""
        out = []
        for level, (old, new) in enumerate(zip(self.lengths, lengths, strict=True)):
            rows = _chunk_rows(self.meta, level)
            known = self.digests[level] if self.digests is not None else []
            if new == old and self.digests is not None:
                out.append(list(known))
                continue
            first = old // rows if self.digests is not None else 0
            self._check_chunks(level, first * rows, old)  # never bless rows that went bad
            fresh = [
                _crc(self._read_raw(level, c * rows, min((c + 1) * rows, new)))
                for c in range(first, -(-new // rows))
            ]
            out.append(known[:first] + fresh)
            self._verified |= {(level, c) for c in range(first, -(-new // rows))}
        return out

    def commit(self, lengths: list[int]) -> None:
        if (self.path / MANIFEST).exists():
            self._check_generation()
        digests = self._digests_after(lengths)
        write_manifest(self.path, self.meta, lengths, self.generation + 1, digests)
        self.lengths = list(lengths)
        self.digests = digests
        self.generation += 1

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def close(self) -> None:
        if self._lock_fd is not None:
            unlock(self._lock_fd)
            self._lock_fd = None


def _chunk_rows(meta: TreeMeta, level: int) -> int:
    """Rows per storage chunk (and per digest): 64 KiB of token ids, 128 KiB of gists (bf16)."""
    return 1 << 14 if level == 0 else max(1, (1 << 17) // (meta.dim * 2))


def _crc(rows: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(rows).tobytes())
