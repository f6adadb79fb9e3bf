"""Sampling from a GPT with a KV cache: greedy, temperature and top-k.

This is the plain language model's decoder (a context of at most ``capacity`` tokens; when the cache
is full the newest half is re-encoded and decoding goes on). The MegaContext runtime decodes over a
working context of tokens and gists instead.
"""

from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megacontext_jax.model import DecoderLM


def sample_logits(
    logits: jax.Array, key: jax.Array, allowed: jax.Array, temperature: float, top_k: int
) -> jax.Array:
    """Draws ids from ``logits [B, V]`` among ``allowed [V]`` (``tokenizer.sampleable``: never
    PAD, BOS or padding rows of the vocabulary): greedy when ``temperature == 0``; ``top_k == 0``
    keeps all."""
    logits = jnp.where(allowed, logits, -jnp.inf)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@partial(nnx.jit, static_argnames=("temperature", "top_k"))
def _prefill(model: DecoderLM, cache, tokens, length, key, allowed, temperature, top_k):
    logits, cache = model.decode(cache, 0, tokens)
    return sample_logits(logits[:, length - 1], key, allowed, temperature, top_k), cache


@partial(nnx.jit, static_argnames=("temperature", "top_k"))
def _step(model: DecoderLM, cache, token, index, key, allowed, temperature, top_k):
    logits, cache = model.decode(cache, index, token[:, None])
    return sample_logits(logits[:, 0], key, allowed, temperature, top_k), cache


def generate(
    model: DecoderLM,
    prompt: np.ndarray,
    max_new_tokens: int,
    *,
    allowed: np.ndarray,
    capacity: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> Iterator[int]:
    """Yields up to ``max_new_tokens`` ids continuing ``prompt`` (int ids ``[P]``), one at a time,
    drawn among ``allowed [V]`` ids.

    Shapes are fixed (prefill ``[1, capacity]``, step ``[1, 1]``), so each compiles once.
    """
    if capacity < 2:
        raise ValueError(f"capacity must be at least 2, got {capacity}")
    key = jax.random.key(seed)
    context = [int(t) for t in prompt]

    def prefill(context: list[int], key):
        buffer = np.zeros((1, capacity), np.int32)
        buffer[0, : len(context)] = context
        cache = model.init_cache(1, capacity)
        return _prefill(model, cache, buffer, len(context), key, allowed, temperature, top_k)

    context = context[-(capacity - 1) :]
    key, sub = jax.random.split(key)
    token, cache = prefill(context, sub)
    for _ in range(max_new_tokens):
        token_id = int(token[0])
        yield token_id
        context.append(token_id)
        key, sub = jax.random.split(key)
        if len(context) > capacity:
            context = context[-(capacity // 2) :]
            token, cache = prefill(context, sub)
        else:
            token, cache = _step(
                model, cache, token, len(context) - 1, sub, allowed, temperature, top_k
            )
