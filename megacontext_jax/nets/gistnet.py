"""GistNet: compresses K embeddings into one gist that can stand in for them (DESIGN section 7).

A small *bidirectional* transformer over one block of K children (local RoPE: child j at position j),
a pooling head (``mean``, learned ``query``, or a ``cls`` entry), and a ``linear`` or ``mlp``
projection into the base model's input-embedding space. One set of weights serves every level, or one
set per level (``mc.gist.shared_levels``). With ``mc.gist.depth = 0`` there is no transformer: the
gist is the mean of the normalised children through the projection, the baseline that says what the
transformer adds.

LOD1's children are token embeddings, or (``mc.gist.read_layer = L > 0``) the base model's residual
stream after its first L blocks (``contextual_inputs``): each token read in the causal context of
its own span of ``mc.gist.read_blocks`` blocks, spans aligned at absolute block indices, so a
block's gist depends on its span's tokens up to its own end and on nothing else, and incremental
ingest equals a full rebuild (DESIGN section 7).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from megacontext_jax import kernels
from megacontext_jax.nets.decoder import DecoderLM
from megacontext_jax.nets.layers import Block, linear, rms_norm
from megacontext_jax.nets.specs import GistConfig


class GistLevel(nnx.Module):
    """One GistNet: ``[N, K, D]`` children -> ``[N, D]`` gists."""

    def __init__(self, gist: GistConfig, rngs: nnx.Rngs):
        cfg = gist.net
        d, k = cfg.width, gist.block_size
        self.pooling, self.projection = gist.pooling, gist.projection
        self.head_dim = d // cfg.num_heads
        self.rope_theta = cfg.rope_theta
        # The blocks' compute dtype (what their q projection computes in), held here because with
        # depth 0 there is no block to read it from.
        self.dtype = jnp.dtype(cfg.dtype)
        self.blocks = nnx.List([Block(cfg, rngs, causal=False) for _ in range(cfg.depth)])
        init = nnx.initializers.normal(1.0)
        if self.pooling == "cls":
            self.cls = nnx.Param(init(rngs.params(), (d,), jnp.dtype(cfg.param_dtype)))
            # The cls entry stands for the whole block: centre and width of a level-1 span.
            self.cls_position = ((k - 1) / 2, gist.sigma_scale * k)
        elif self.pooling == "query":
            self.query = nnx.Param(init(rngs.params(), (d,), jnp.dtype(cfg.param_dtype)))
            self.key = linear(d, d, d**-0.5, cfg, rngs)
        if self.projection == "mlp":
            self.up = linear(d, 4 * d, d**-0.5, cfg, rngs)
            self.down = linear(4 * d, d, (4 * d) ** -0.5, cfg, rngs)
        else:
            self.out = linear(d, d, d**-0.5, cfg, rngs)

    def __call__(self, children: jax.Array) -> jax.Array:
        d = children.shape[-1]
        x = children.astype(self.dtype)
        # Without blocks the norm before them and the one after collapse into one (RMSNorm is
        # idempotent up to its eps): the projection still sees unit-RMS children, token embeddings
        # at level 1 and gists above alike, as it does behind the transformer, so the baseline
        # lacks only the mixing of the children.
        x = (self._mix(x) if self.blocks else rms_norm(x)).astype(jnp.float32)
        if self.pooling == "mean":
            pooled = x.mean(axis=1)
        elif self.pooling == "cls":
            pooled = x[:, -1]
        else:
            logits = self.key(x).astype(jnp.float32) @ self.query.value.astype(jnp.float32)
            pooled = jnp.einsum("nk,nkd->nd", jax.nn.softmax(logits * d**-0.5, axis=-1), x)
        if self.projection == "mlp":
            return self.down(jnp.square(jax.nn.relu(self.up(pooled)))).astype(jnp.float32)
        return self.out(pooled).astype(jnp.float32)

    def _mix(self, x: jax.Array) -> jax.Array:
        """The transformer over the children (and a cls entry), normalised before and after."""
        n, k, d = x.shape
        mu = jnp.arange(k, dtype=jnp.float32)
        sigma = jnp.zeros(k, jnp.float32)
        if self.pooling == "cls":
            x = jnp.concatenate([x, jnp.broadcast_to(self.cls.value.astype(x.dtype), (n, 1, d))], 1)
            mu = jnp.append(mu, self.cls_position[0])
            sigma = jnp.append(sigma, self.cls_position[1])
        cos, sin = kernels.rope_tables(
            jnp.broadcast_to(mu, (n, mu.size)),
            jnp.broadcast_to(sigma, (n, mu.size)),
            self.head_dim,
            self.rope_theta,
        )
        x = rms_norm(x)
        for block in self.blocks:
            x, _ = block(x, cos, sin, None, None, 0)
        return rms_norm(x)


class GistNet(nnx.Module):
    """Gists for any level: shared weights, or one ``GistLevel`` per level 1..max_level."""

    def __init__(self, gist: GistConfig, *, rngs: nnx.Rngs):
        num = 1 if gist.shared_levels else gist.max_level
        self.levels = nnx.List([GistLevel(gist, rngs) for _ in range(num)])

    def __call__(self, children: jax.Array, level: int) -> jax.Array:
        """``children [N, K, D]`` (embeddings of level ``level - 1``) -> gists ``[N, D]`` float32."""
        return self.levels[min(level, len(self.levels)) - 1](children)


def contextual_inputs(base: DecoderLM, tokens: jax.Array, layer: int, span: int) -> jax.Array:
    """A contextual LOD1's children: ``[B, T]`` ids -> ``[B, T, D]`` float32, each token's stream
    after ``layer`` blocks of a causal pass over its own span of ``span`` tokens (spans start at
    multiples of ``span``; a partial last span is padded after its tokens, which causality hides).

    No gradient flows into the base: it learns from its own losses, and the encoder reads its
    states as they are (as with a frozen imported base).
    """
    b, t = tokens.shape
    n = -(-t // span)
    padded = jnp.pad(tokens, ((0, 0), (0, n * span - t)))
    x = base.hidden(padded.reshape(b * n, span), layer).reshape(b, n * span, -1)[:, :t]
    return jax.lax.stop_gradient(x.astype(jnp.float32))


def build_levels(
    gistnet: GistNet,
    embeddings: jax.Array,
    reads: jax.Array,
    block_size: int,
    max_level: int,
) -> list[jax.Array]:
    """Every complete node of a sequence, all levels, batched: ``[N, D]`` -> ``[[N // K^l, D]]``.

    Entry 0 is ``embeddings`` itself; LOD1 gists read ``reads [N, D]`` (``embeddings``, or
    ``contextual_inputs``), each level above the one below. Jit-able (N is static); used
    in-graph by training.
    """
    levels = [embeddings]
    for level in range(1, max_level + 1):
        below = reads if level == 1 else levels[-1]
        n = below.shape[0] // block_size
        if n == 0:
            break
        children = below[: n * block_size].reshape(n, block_size, below.shape[-1])
        levels.append(gistnet(children, level))
    return levels
