"""The memory (DESIGN sections 2 and 3): the tree of tokens and gists on TensorStore, its storage,
manifest and lock, the Gister that makes its gists, and its command line (``megacontext-tree``)."""
