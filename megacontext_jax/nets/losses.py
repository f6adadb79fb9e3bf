"""Next-token losses of logits: per-token NLL and the masked cross-entropy sum."""

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """NLL (nats) of each target: logits ``[..., V]`` float32, targets ``[...]`` int."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Sum of token NLL (nats) over ``mask`` and the number of counted tokens.

    logits ``[B, T, V]`` float32, targets ``[B, T]`` int, mask ``[B, T]`` bool.
    """
    return jnp.where(mask, token_nll(logits, targets), 0.0).sum(), mask.sum()
