"""The compute side of ingest: token embeddings and GistNet over blocks, bit-reproducibly.

GistNet runs on fixed-shape chunks of ``ingest_chunk`` blocks aligned at absolute block indices, so a
node's gist never depends on how the history was split into appends: incremental ingest equals a
full rebuild bit for bit. Gists are rounded to the storage dtype before they feed the next level.
A contextual GistNet (``mc.gist.read_layer > 0``) reads the base model's states from causal passes
over spans of ``mc.gist.read_blocks`` blocks that tile each chunk; a span's later tokens never
reach an earlier block's gist, so a block is gisted once, when it completes, from its span's
tokens so far (``token_gists``).
"""

import hashlib
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from megacontext_jax.nets.decoder import DecoderLM
from megacontext_jax.nets.gistnet import GistNet, contextual_inputs
from megacontext_jax.nets.specs import GistConfig


def _hash_params(h, module: nnx.Module, keep=lambda path: True) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Param))[0]:
        if keep(path):
            h.update(jax.tree_util.keystr(path).encode())
            h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())


def fingerprint(
    embed_table: np.ndarray, gistnet: GistNet, gist: GistConfig, base: DecoderLM | None = None
) -> str:
    """Identifies the weights that produce gists: GistNet, the token embeddings and their config,
    and for a contextual GistNet the base model's weights outside the blocks it does not read."""
    h = hashlib.sha256()
    h.update(gist.settings_json().encode())
    h.update(f"K={gist.block_size} D={gist.net.width}".encode())
    h.update(np.ascontiguousarray(embed_table, np.float32).tobytes())
    _hash_params(h, gistnet)
    if gist.contextual:

        def read(path) -> bool:  # blocks past read_layer never reach a gist
            names = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
            return not (names[0] == "blocks" and int(names[1]) >= gist.read_layer)

        _hash_params(h, base, read)
    return h.hexdigest()[:16]


@partial(jax.jit, static_argnames=("graphdef", "level"))
def _gist_chunk(graphdef, state, children, level):
    return nnx.merge(graphdef, state)(children, level)


@partial(jax.jit, static_argnames=("graphdef", "base_graphdef", "layer", "span"))
def _contextual_chunk(graphdef, state, base_graphdef, base_state, tokens, layer, span):
    # tokens [c, K] -> LOD1 gists [c, D], the chunk's spans read as training reads them.
    c, k = tokens.shape
    reads = contextual_inputs(
        nnx.merge(base_graphdef, base_state), tokens.reshape(1, -1), layer, span
    )
    return nnx.merge(graphdef, state)(reads.reshape(c, k, -1), 1)


class Gister:
    """Embeds tokens and gists blocks for a tree (host numpy in, host numpy out)."""

    def __init__(
        self,
        embed_table: jax.Array,
        gistnet: GistNet,
        gist: GistConfig,
        chunk: int,
        dtype: str,
        base: DecoderLM | None = None,
    ):
        """``chunk``: blocks per GistNet call (``mc.ingest_chunk``); ``dtype``: of the stored
        gists (``mc.gist_dtype``); ``base``: the base model a contextual GistNet reads."""
        if gist.contextual and base is None:
            raise ValueError("a contextual GistNet (mc.gist.read_layer > 0) needs its base model")
        self.table = np.asarray(embed_table, np.float32)
        self.block_size = gist.block_size
        self.chunk = chunk
        self.dtype = jnp.dtype(dtype)
        self.dim = self.table.shape[1]
        self.graphdef, self.state = nnx.split(gistnet)
        # Blocks whose tokens a LOD1 gist may read: those of its span (1: its own).
        self.span_blocks = gist.read_blocks if gist.contextual else 1
        self.read_layer = gist.read_layer
        self.base = nnx.split(base) if gist.contextual else None
        self.fingerprint = fingerprint(self.table, gistnet, gist, base)

    @classmethod
    def from_config(
        cls,
        embed_table: jax.Array,
        gistnet: GistNet,
        config: ml_collections.ConfigDict,
        base: DecoderLM | None = None,
    ) -> "Gister":
        mc = config.mc
        gist = GistConfig.from_config(config)
        return cls(embed_table, gistnet, gist, mc.ingest_chunk, mc.gist_dtype, base)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids ``[n]`` -> input embeddings ``[n, D]`` float32."""
        return self.table[tokens]

    def token_gists(self, first: int, tokens: np.ndarray) -> np.ndarray:
        """LOD1 gists of blocks ``first .. first + n - 1`` from their tokens ``[n * K]``.

        ``first`` must start a span (a multiple of ``span_blocks``): a contextual gist reads the
        tokens before it in its span. Returns ``[n, D]`` in the storage dtype.
        """
        if first % self.span_blocks:
            raise ValueError(f"block {first} does not start a span of {self.span_blocks} blocks")
        blocks = np.asarray(tokens, np.int32).reshape(-1, self.block_size)
        if self.base is None:
            children = self.table[blocks]
            return self._chunks(
                first, children, partial(_gist_chunk, self.graphdef, self.state, level=1)
            )
        run = partial(
            _contextual_chunk,
            self.graphdef,
            self.state,
            *self.base,
            layer=self.read_layer,
            span=self.span_blocks * self.block_size,
        )
        return self._chunks(first, blocks, run)

    def gists(self, level: int, first: int, children: np.ndarray) -> np.ndarray:
        """Gists of level ``level >= 2`` for blocks ``first .. first + n - 1``.

        Args:
          children: ``[n, K, D]`` stored gists of the children.
        Returns:
          ``[n, D]`` in the storage dtype.
        """
        if level < 2:
            raise ValueError("LOD1 gists are made from tokens (token_gists)")
        run = partial(_gist_chunk, self.graphdef, self.state, level=level)
        return self._chunks(first, np.asarray(children, np.float32), run)

    def _chunks(self, first: int, rows: np.ndarray, run) -> np.ndarray:
        # rows [n, ...] in fixed-shape, aligned chunks of ``chunk`` rows, zeros around them.
        n = rows.shape[0]
        out = np.empty((n, self.dim), self.dtype)
        c = self.chunk
        for chunk_start in range((first // c) * c, first + n, c):
            lo, hi = max(first, chunk_start), min(first + n, chunk_start + c)
            batch = np.zeros((c, *rows.shape[1:]), rows.dtype)
            batch[lo - chunk_start : hi - chunk_start] = rows[lo - first : hi - first]
            result = run(batch)
            out[lo - first : hi - first] = np.asarray(
                result[lo - chunk_start : hi - chunk_start].astype(self.dtype)
            )
        return out
