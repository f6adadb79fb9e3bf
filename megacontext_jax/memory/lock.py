"""The writer lock of a tree directory: one writer at a time, readers never blocked.

``lock_directory`` takes an exclusive, non-blocking ``flock`` on the tree's directory itself, which
cannot be unlinked while the tree exists (a lock on a file would be lost with its file, and a
second writer would lock a new file of the same name), or raises ``TreeLockedError`` at once.
``writer.lock`` in the directory only names the holder's pid, for the next writer's message; it
is never trusted as the lock. The lock lasts until ``unlock`` or the end of the process, so a
writer killed at any moment leaves nothing to clean up.
"""

import fcntl
import os
import stat
from pathlib import Path

from megacontext_jax.memory.errors import TreeError, TreeLockedError

LOCK = "writer.lock"


def lock_directory(path: Path) -> int:
    """Takes the writer lock of the tree directory ``path`` and records this process's pid in
    ``writer.lock``; raises ``TreeLockedError`` if another writer holds it. Returns the
    descriptor to ``unlock``."""
    fd, note = os.open(path, os.O_RDONLY | os.O_DIRECTORY), Path(path) / LOCK
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = note.read_text(errors="replace").strip() if _plain_or_absent(note) else ""
        except OSError:
            holder = ""
        raise TreeLockedError(
            f"tree at {path} is locked by another writer (pid {holder if holder.isdecimal() else '?'})"
        ) from None
    # The note is only a note: a writer.lock that is not a plain file (a directory someone made,
    # a link) is left as it is and the writer goes on, still the only one. Writing through a
    # link would overwrite what it points to, and removing a directory could lose its contents.
    if _plain_or_absent(note):
        try:
            note.write_text(str(os.getpid()))
        except OSError as e:
            unlock(fd)
            raise TreeError(f"tree at {path}: cannot write {LOCK} ({e.strerror})") from None
    return fd


def unlock(fd: int) -> None:
    """Releases the lock ``lock_directory`` returned (``writer.lock`` stays: it is only a note)."""
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _plain_or_absent(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True
