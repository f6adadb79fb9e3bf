"""Sampling from a GPT with a KV cache: greedy, temperature, top-k and top-p (nucleus).

This is the plain language model's decoder (a context of at most ``capacity`` tokens; when the cache
is full the newest half is re-encoded and decoding goes on). The MegaContext runtime decodes over a
working context of tokens and gists instead.
"""

import math
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megacontext_jax.nets.decoder import DecoderLM


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    allowed: jax.Array,
    temperature: float,
    top_k: int,
    top_p: float = 1.0,
) -> jax.Array:
    """Draws ids from ``logits [B, V]`` among ``allowed [V]`` (``tokenizer.sampleable``: never
    PAD, BOS or padding rows of the vocabulary): greedy when ``temperature == 0``; ``top_k == 0``
    keeps all; ``top_p < 1`` keeps the most likely ids whose probabilities sum to ``top_p`` (the
    first id always, and the id that crosses ``top_p``)."""
    logits = jnp.where(allowed, logits, -jnp.inf)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ranked = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely ids
        smallest = jnp.min(jnp.where(before < top_p, ranked, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < smallest, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int = 0
) -> None:
    """Raises ``ValueError`` (one line) for sampling parameters that are not numbers in range:
    a non-finite temperature would sample PAD or print NUL bytes."""
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 keeps all), got {top_k!r}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1 keeps all), got {top_p!r}")
    # JAX keeps a seed's low 32 bits: 2**32 would draw what 0 draws, 2**64 cannot be converted.
    if not (isinstance(seed, int) and 0 <= seed < 1 << 32):
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")


SAMPLING_ARGS = ("temperature", "top_k", "top_p")  # static arguments of the jitted samplers


@partial(nnx.jit, static_argnames=SAMPLING_ARGS)
def _prefill(model: DecoderLM, cache, tokens, length, key, allowed, temperature, top_k, top_p):
    logits, cache = model.decode(cache, 0, tokens)
    return sample_logits(logits[:, length - 1], key, allowed, temperature, top_k, top_p), cache


@partial(nnx.jit, static_argnames=SAMPLING_ARGS)
def _step(model: DecoderLM, cache, token, index, key, allowed, temperature, top_k, top_p):
    logits, cache = model.decode(cache, index, token[:, None])
    return sample_logits(logits[:, 0], key, allowed, temperature, top_k, top_p), cache


def generate(
    model: DecoderLM,
    prompt: np.ndarray,
    max_new_tokens: int,
    *,
    allowed: np.ndarray,
    capacity: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Iterator[int]:
    """Yields up to ``max_new_tokens`` ids continuing ``prompt`` (int ids ``[P]``), one at a time,
    drawn among ``allowed [V]`` ids.

    Shapes are fixed (prefill ``[1, capacity]``, step ``[1, 1]``), so each compiles once.
    """
    if capacity < 2:
        raise ValueError(f"capacity must be at least 2, got {capacity}")
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    key = jax.random.key(seed)
    context = [int(t) for t in prompt]

    def prefill(context: list[int], key):
        buffer = np.zeros((1, capacity), np.int32)
        buffer[0, : len(context)] = context
        cache = model.init_cache(1, capacity)
        return _prefill(model, cache, buffer, len(context), key, allowed, temperature, top_k, top_p)

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
                model, cache, token, len(context) - 1, sub, allowed, temperature, top_k, top_p
            )
