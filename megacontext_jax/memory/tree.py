"""The MegaContext tree: every token of the history and every complete gist above it.

Node (l, i) covers tokens ``[i K^l, (i + 1) K^l)``; a gist exists only when all K children do.
``append`` writes tokens, gists every node they complete (at every level, in order), and commits,
so incremental ingest equals a full rebuild. Two backends share this class: ``Tree.in_memory`` and
the TensorStore directory of ``Tree.create`` / ``Tree.open``.

    python -m megacontext_jax.memory.tree verify DIR    # exit status 1 on a broken tree
    python -m megacontext_jax.memory.tree stats DIR
"""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megacontext_jax.memory.errors import TreeCorruptError, TreeError, TreeMismatchError
from megacontext_jax.memory.gister import Gister
from megacontext_jax.memory.manifest import MANIFEST, TreeMeta
from megacontext_jax.memory.storage import DiskStorage, MemoryStorage, Storage

APPEND_PIECE = 1 << 16  # tokens per ingest-and-commit step of a long append


def meta_for(gister: Gister, max_level: int, vocab_size: int) -> TreeMeta:
    return TreeMeta(
        block_size=gister.block_size,
        dim=gister.dim,
        max_level=max_level,
        vocab_size=vocab_size,
        gist_dtype=str(np.dtype(gister.dtype)),
        fingerprint=gister.fingerprint,
    )


class Tree:
    """A tree over one storage backend.

    Readers see committed data only. A writer also sees its own uncommitted appends, which wait
    in memory (``_staged``) until ``commit`` writes them to the storage and publishes them.
    """

    def __init__(self, storage: Storage, gister: Gister | None):
        self.storage, self.meta, self.gister = storage, storage.meta, gister
        self._lengths = list(storage.lengths)  # committed + staged
        self._staged = MemoryStorage(self.meta, offsets=storage.lengths)
        if gister is not None:
            _check_compatible(self.meta, gister, storage.where)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def in_memory(cls, gister: Gister, max_level: int, vocab_size: int) -> "Tree":
        return cls(MemoryStorage(meta_for(gister, max_level, vocab_size)), gister)

    @classmethod
    def create(cls, path: str | Path, gister: Gister, max_level: int, vocab_size: int) -> "Tree":
        return cls(DiskStorage.create(Path(path), meta_for(gister, max_level, vocab_size)), gister)

    @classmethod
    def open(cls, path: str | Path, gister: Gister | None = None) -> "Tree":
        """Opens for appending when ``gister`` is given (taking the writer lock), else read-only."""
        storage = DiskStorage.open(Path(path), writable=gister is not None)
        try:
            return cls(storage, gister)
        except TreeError:
            storage.close()
            raise

    @classmethod
    def open_or_create(
        cls, path: str | Path, gister: Gister, max_level: int, vocab_size: int
    ) -> "Tree":
        """Opens the tree at ``path`` for writing, or creates one there if the directory holds
        no tree data at all (data without a manifest is an error, never overwritten)."""
        if (Path(path) / MANIFEST).exists():
            return cls.open(path, gister)
        return cls.create(path, gister, max_level, vocab_size)

    def close(self) -> None:
        self.storage.close()

    def __enter__(self) -> "Tree":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads ---------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.meta.block_size

    @property
    def num_tokens(self) -> int:
        return self._lengths[0]

    def length(self, level: int) -> int:
        """Nodes at ``level`` (0: tokens): committed ones, plus the writer's uncommitted appends."""
        return self._lengths[level] if level <= self.meta.max_level else 0

    @property
    def uncommitted(self) -> int:
        """Tokens appended with ``commit=False`` and not committed yet."""
        return self._lengths[0] - self.storage.lengths[0]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Token ids ``[stop - start]`` int32."""
        self._check_range(0, start, stop)
        return self._read(0, start, stop)

    def gists(self, level: int, start: int, stop: int) -> np.ndarray:
        """Gists ``[stop - start, D]`` (storage dtype) of nodes ``start .. stop - 1`` of ``level``."""
        if not 1 <= level <= self.meta.max_level:
            raise ValueError(f"gist level must be in [1, {self.meta.max_level}], got {level}")
        self._check_range(level, start, stop)
        return self._read(level, start, stop)

    def _read(self, level: int, start: int, stop: int) -> np.ndarray:
        committed = self.storage.lengths[level]
        if stop <= committed:
            return self.storage.read(level, start, stop)
        if start >= committed:
            return self._staged.read(level, start, stop)
        return np.concatenate(
            [self.storage.read(level, start, committed), self._staged.read(level, committed, stop)]
        )

    def _check_range(self, level: int, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.length(level):
            raise IndexError(
                f"range [{start}, {stop}) outside level {level} of length {self.length(level)}"
            )

    # -- ingest --------------------------------------------------------------------------------
    def append(
        self,
        tokens: np.ndarray,
        progress: Callable[[int], None] | None = None,
        *,
        commit: bool = True,
    ) -> None:
        """Appends token ids, gisting every node they complete, and commits.

        Long inputs are ingested and committed in pieces of ``APPEND_PIECE`` tokens; ``progress``
        is called with the number of tokens appended by each piece. Invalid tokens raise before
        anything is written. ``commit=False`` leaves the data written but unpublished (this
        writer reads it; a crash loses it) until ``commit``: decoding appends a few tokens at a
        time and commits once per turn, not paying two fsyncs per block.
        """
        if self.gister is None:
            raise TreeError("this tree was opened read-only: open it with a Gister to append")
        tokens = self._validate_tokens(tokens)
        for start in range(0, len(tokens), APPEND_PIECE):
            piece = tokens[start : start + APPEND_PIECE]
            self._append_piece(piece)
            if commit:
                self.commit()
            if progress is not None:
                progress(len(piece))

    def commit(self) -> None:
        """Writes and publishes every append so far (a crash leaves the old or the new state)."""
        lengths, committed = list(self._lengths), self.storage.lengths
        if lengths == committed:
            return
        for level, (old, new) in enumerate(zip(committed, lengths, strict=True)):
            if new > old:
                self.storage.write(level, old, self._staged.read(level, old, new))
        self.storage.commit(lengths)
        self._staged = MemoryStorage(self.meta, offsets=lengths)

    def _validate_tokens(self, tokens) -> np.ndarray:
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"tokens must be a 1-D sequence of ids, got shape {array.shape}")
        if array.size and array.dtype.kind not in "iu":
            raise ValueError(f"tokens must be integer ids, got dtype {array.dtype}")
        bad = (array < 0) | (array >= self.meta.vocab_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"token {int(array[i])} at offset {i} is outside the vocabulary "
                f"[0, {self.meta.vocab_size})"
            )
        return array.astype(np.int32)

    def _append_piece(self, tokens: np.ndarray) -> None:
        # Rows go to the staging area; ``_lengths``, assigned last, makes them part of the tree,
        # so an interrupted piece leaves nothing behind but rows past the lengths.
        k, staged = self.block_size, self._staged
        lengths = self._lengths
        total = lengths[0] + len(tokens)
        staged.write(0, lengths[0], tokens)
        new_lengths = [total]
        for level in range(1, self.meta.max_level + 1):
            old, new = lengths[level], total // k**level
            if new > old and level == 1:
                # From the start of the first new block's span: a contextual gist reads the
                # span's tokens before it (tokens of the span's earlier blocks are in the tree).
                first = old - old % self.gister.span_blocks
                gists = self.gister.token_gists(first, self._read(0, first * k, new * k))
                staged.write(level, old, gists[old - first :])
            elif new > old:
                children = self._read(level - 1, old * k, new * k).reshape(new - old, k, -1)
                staged.write(level, old, self.gister.gists(level, old, children))
            new_lengths.append(new)
        self._lengths = new_lengths

    # -- checks --------------------------------------------------------------------------------
    def verify(self, deep: bool = False) -> None:
        """Raises ``TreeCorruptError`` unless every invariant holds.

        On disk every committed chunk reads back with its recorded digest, tokens are in the
        vocabulary and gists are finite. ``deep=True`` (needs the Gister) also recomputes every
        gist from its children and requires bit equality. (Lengths are consistent, ``len(l) ==
        len(0) // K^l``, in every tree: ``append`` keeps them so and ``open`` checks them.)
        """
        k, meta = self.block_size, self.meta
        n = self.num_tokens
        self.storage.check_all()
        for start in range(0, n, APPEND_PIECE):
            chunk = self.tokens(start, min(n, start + APPEND_PIECE))
            if ((chunk < 0) | (chunk >= meta.vocab_size)).any():
                raise TreeCorruptError(
                    f"tokens in [{start}, {start + len(chunk)}) leave the vocabulary"
                )
        for level in range(1, meta.max_level + 1):
            gists = self.gists(level, 0, self.length(level)).astype(np.float32)
            if not np.isfinite(gists).all():
                raise TreeCorruptError(f"level {level} holds non-finite gists")
            if deep and len(gists):
                if self.gister is None:
                    raise TreeError("deep verification needs the tree opened with its Gister")
                if level == 1:
                    expected = self.gister.token_gists(0, self.tokens(0, len(gists) * k))
                else:
                    below = self.gists(level - 1, 0, len(gists) * k)
                    expected = self.gister.gists(level, 0, below.reshape(len(gists), k, -1))
                mismatch = np.flatnonzero((expected != self.gists(level, 0, len(gists))).any(-1))
                if mismatch.size:
                    raise TreeCorruptError(
                        f"gist ({level}, {mismatch[0]}) differs from GistNet of its children"
                    )

    def stats(self) -> dict:
        """Levels, lengths and bytes per token (on disk, and the format's ideal)."""
        k, d = self.block_size, self.meta.dim
        gist_bytes = np.dtype(self.meta.dtype(1)).itemsize
        ideal = 4 + sum(gist_bytes * d / k**l for l in range(1, self.meta.max_level + 1))
        stats = {
            "block_size": k,
            "dim": d,
            "gist_dtype": self.meta.gist_dtype,
            "max_level": self.meta.max_level,
            "fingerprint": self.meta.fingerprint,
            "lengths": [self.length(l) for l in range(self.meta.max_level + 1)],
            "ideal_bytes_per_token": ideal,
        }
        size = self.storage.disk_bytes()
        if size is not None:
            stats["disk_bytes"] = size
            stats["disk_bytes_per_token"] = size / max(self.num_tokens, 1)
        return stats


def _check_compatible(meta: TreeMeta, gister: Gister, where: str) -> None:
    if meta.block_size != gister.block_size:
        raise TreeMismatchError(
            f"tree at {where} has block size {meta.block_size}; this model uses {gister.block_size}"
        )
    if meta.dim != gister.dim:
        raise TreeMismatchError(
            f"tree at {where} holds gists of width {meta.dim}; this model's width is {gister.dim}"
        )
    if meta.fingerprint != gister.fingerprint:
        raise TreeMismatchError(
            f"tree at {where} was gisted by other weights (fingerprint {meta.fingerprint}, this "
            f"GistNet {gister.fingerprint}): open it with the checkpoint whose GistNet built it"
        )


def main(argv: list[str]) -> int:
    # The module docstring is reST for readers of the code; the help is plain text of its own.
    parser = argparse.ArgumentParser(
        prog="python -m megacontext_jax.memory.tree",
        description="Checks or describes a MegaContext tree directory on disk.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in (
        ("verify", "check every invariant; exit status 1 and one line if the tree is broken"),
        ("stats", "print levels, lengths and bytes per token as JSON"),
    ):
        command = commands.add_parser(
            name,
            help=summary,
            description=summary,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        command.add_argument("directory", metavar="DIR", help="the tree's directory")
    args = parser.parse_args(argv)
    try:
        tree = Tree.open(args.directory)
        with tree:
            if args.command == "verify":
                tree.verify()
                print(f"ok: {tree.num_tokens} tokens, lengths {tree.stats()['lengths']}")
            else:
                print(json.dumps(tree.stats(), indent=2))
    except TreeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The ``megacontext-tree`` console entry point."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    run()
