"""The compute side of ingest: token embeddings and GistNet over blocks, bit-reproducibly.

GistNet runs on fixed-shape chunks of ``ingest_chunk`` blocks aligned at absolute block indices, so a
node's gist never depends on how the history was split into appends: incremental ingest equals a
full rebuild bit for bit. Gists are rounded to the storage dtype before they feed the next level.
"""

import hashlib
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from megacontext_jax.nets.gistnet import GistNet
from megacontext_jax.nets.specs import GistConfig


def fingerprint(embed_table: np.ndarray, gistnet: GistNet, gist: GistConfig) -> str:
    """Identifies the weights that produce gists: GistNet, the token embeddings and their config."""
    h = hashlib.sha256()
    h.update(gist.settings_json().encode())
    h.update(f"K={gist.block_size} D={gist.net.width}".encode())
    h.update(np.ascontiguousarray(embed_table, np.float32).tobytes())
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(gistnet, nnx.Param))[0]:
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()[:16]


@partial(jax.jit, static_argnames=("graphdef", "level"))
def _gist_chunk(graphdef, state, children, level):
    return nnx.merge(graphdef, state)(children, level)


class Gister:
    """Embeds tokens and gists blocks for a tree (host numpy in, host numpy out)."""

    def __init__(
        self, embed_table: jax.Array, gistnet: GistNet, gist: GistConfig, chunk: int, dtype: str
    ):
        """``chunk``: blocks per GistNet call (``mc.ingest_chunk``); ``dtype``: of the stored
        gists (``mc.gist_dtype``)."""
        self.table = np.asarray(embed_table, np.float32)
        self.block_size = gist.block_size
        self.chunk = chunk
        self.dtype = jnp.dtype(dtype)
        self.dim = self.table.shape[1]
        self.graphdef, self.state = nnx.split(gistnet)
        self.fingerprint = fingerprint(self.table, gistnet, gist)

    @classmethod
    def from_config(
        cls, embed_table: jax.Array, gistnet: GistNet, config: ml_collections.ConfigDict
    ) -> "Gister":
        mc = config.mc
        return cls(
            embed_table, gistnet, GistConfig.from_config(config), mc.ingest_chunk, mc.gist_dtype
        )

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids ``[n]`` -> input embeddings ``[n, D]`` float32."""
        return self.table[tokens]

    def gists(self, level: int, first: int, children: np.ndarray) -> np.ndarray:
        """Gists of level ``level`` for blocks ``first .. first + n - 1``.

        Args:
          children: ``[n, K, D]`` embeddings (level 1) or stored gists (level >= 2) of the children.
        Returns:
          ``[n, D]`` in the storage dtype.
        """
        n = children.shape[0]
        out = np.empty((n, self.dim), self.dtype)
        c = self.chunk
        for chunk_start in range((first // c) * c, first + n, c):
            lo, hi = max(first, chunk_start), min(first + n, chunk_start + c)
            batch = np.zeros((c, self.block_size, self.dim), np.float32)
            batch[lo - chunk_start : hi - chunk_start] = children[lo - first : hi - first]
            result = _gist_chunk(self.graphdef, self.state, batch, level)
            out[lo - first : hi - first] = np.asarray(
                result[lo - chunk_start : hi - chunk_start].astype(self.dtype)
            )
        return out
