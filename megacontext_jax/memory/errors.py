"""The errors of the MegaContext tree: every one a ``TreeError`` whose message is one line naming
the tree and the problem, so a CLI prints it as it is (``error: <message>``) and exits 1."""


class TreeError(RuntimeError):
    """A tree problem, reported as one line that names it."""


class TreeNotFoundError(TreeError):
    """No tree at the path: no directory there, or no manifest in it (and no tree data)."""


class TreeCorruptError(TreeError):
    """The tree's files are not what was committed: a bad manifest, or rows altered or missing."""


class TreeLockedError(TreeError):
    """Another writer holds the tree, or changed its manifest under this one."""


class TreeMismatchError(TreeError):
    """The tree was built by another model (block size, width or GistNet weights differ)."""
