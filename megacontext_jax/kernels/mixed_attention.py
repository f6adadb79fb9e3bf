"""Mixed-resolution attention (DESIGN section 6): the public face of the Pallas kernels.

``mixed_attention`` is attention over entries (tokens and gists) under a mask that their metadata
alone decides (``kernels.mask``: ``Entries``, ``MaskSpec`` and the ``wc_causal`` / ``decode`` /
``pyramid`` rules); ``mixed_attention_reference`` is the same function in plain jnp. By default
q and k come rotated, as the model passes them; with ``rope=True`` both rotate q and k themselves
(Gaussian RoPE from ``mu`` / ``sigma``, half-split pairs as ``kernels.rope``; fused into the
Triton kernels, which then rebuild the rotary tables on every tile they visit). Logits, softmax and accumulation are
float32; GQA maps query head h to key head ``h // (Hq // Hkv)``. A query that sees no key returns
zeros.

Here the inputs are checked and padded (lengths to whole tiles, each rotary half to a power of
two) and the kernels wrapped in a ``custom_vjp``; the layers below are ``kernels.tiles`` (the
block-sparse tile lists: which tiles are visited, with or without a mask), and two kernel families
of the same contract (``TARGETS``): ``triton`` (GPU: ``kernels.mixed_kernels``, the kernel bodies,
and ``kernels.mixed_launch``, their ``pallas_call`` launches) and ``tpu`` (Mosaic TPU:
``kernels.mixed_tpu``), which a TPU backend gets by default.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from megacontext_jax.kernels import mixed_launch, mixed_tpu
from megacontext_jax.kernels.mask import FAR, Entries, MaskSpec, visible
from megacontext_jax.kernels.mixed_kernels import BlockSizes, KernelConfig
from megacontext_jax.kernels.reference import masked_attention
from megacontext_jax.kernels.rope import gaussian_rope

__all__ = ["BlockSizes", "Entries", "MaskSpec", "mixed_attention", "mixed_attention_reference"]

# The kernel families: (forward, backward) launchers of one contract.
TARGETS = {
    "triton": (mixed_launch.forward, mixed_launch.backward),
    "tpu": (mixed_tpu.forward, mixed_tpu.backward),
}


def _pad_to(x, axis: int, size: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value) if size > x.shape[axis] else x


def _pad_halves(x, half: int):
    """``[..., Dh]`` -> ``[..., 2 * half]``: each rotary half zero-padded on its own."""
    h = x.shape[-1] // 2
    return jnp.concatenate([_pad_to(x[..., :h], -1, half), _pad_to(x[..., h:], -1, half)], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, q_meta, k_meta, cfg, interpret, target):
    return TARGETS[target][0](q, k, v, q_meta, k_meta, cfg, interpret)[0]


def _attention_fwd(q, k, v, q_meta, k_meta, cfg, interpret, target):
    out, lse = TARGETS[target][0](q, k, v, q_meta, k_meta, cfg, interpret)
    return out, (q, k, v, q_meta, k_meta, out, lse)


def _attention_bwd(cfg, interpret, target, residuals, do):
    q, k, v, q_meta, k_meta, out, lse = residuals
    dq, dk, dv = TARGETS[target][1](q, k, v, q_meta, k_meta, out, lse, do, cfg, interpret)
    return dq, dk, dv, q_meta.zero_cotangent(), k_meta.zero_cotangent()


_attention.defvjp(_attention_fwd, _attention_bwd)


def mixed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_meta: Entries,
    k_meta: Entries,
    spec: MaskSpec = MaskSpec(),
    *,
    rope: bool = False,
    theta: float = 10000.0,
    blocks: BlockSizes = BlockSizes(),
    interpret: bool | None = None,
    target: str | None = None,
) -> jax.Array:
    """Attention of ``q [B, Tq, Hq, Dh]`` over ``k, v [B, Tk, Hkv, Dh]`` under ``spec``'s mask.

    Metadata is ``[B, Tq]`` / ``[B, Tk]``, or ``[1, T]`` for one layout shared by every row.

    Differentiable in q, k and v (Pallas backward). Lengths are padded to the tiles and head
    halves to powers of two here. ``interpret=None`` interprets on CPU and compiles elsewhere.
    ``target`` names the kernel family (``TARGETS``; None: ``tpu`` on a TPU backend, else
    ``triton``); the TPU kernels take q and k rotated, so with ``rope=True`` they are rotated
    here first.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if target is None:
        target = "tpu" if jax.default_backend() == "tpu" else "triton"
    if target not in TARGETS:
        raise ValueError(f"unknown kernel target {target!r}; expected one of {tuple(TARGETS)}")
    tq, hq, dh = q.shape[1:]
    tk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {hkv}")
    if dh % 2:
        raise ValueError(f"head_dim must be even (rotary halves), got {dh}")
    b = q.shape[0]
    q_meta, k_meta = q_meta.fit(b, tq, "query"), k_meta.fit(b, tk, "key")
    if rope and target == "tpu":
        q = gaussian_rope(q, q_meta.mu, q_meta.sigma, theta)
        k = gaussian_rope(k, k_meta.mu, k_meta.sigma, theta)
        rope = False
    half = max(8, pl.next_power_of_2(dh // 2))
    step_q = math.lcm(blocks.block_q, blocks.block_q_bwd)
    step_k = math.lcm(blocks.block_k, blocks.block_k_bwd)
    tq_p, tk_p = -(-tq // step_q) * step_q, -(-tk // step_k) * step_k
    cfg = KernelConfig(spec, blocks, rope, theta, dh, dh**-0.5, jnp.dtype(q.dtype))
    qp = _pad_to(_pad_halves(q, half), 1, tq_p)
    kp = _pad_to(_pad_halves(k, half), 1, tk_p)
    vp = _pad_to(_pad_to(v, -1, 2 * half), 1, tk_p)
    out = _attention(
        qp, kp, vp, q_meta.padded(tq_p, -1), k_meta.padded(tk_p, FAR), cfg, interpret,
        target,
    )  # fmt: skip
    return out[:, :tq, :, :dh]


def mixed_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_meta: Entries,
    k_meta: Entries,
    spec: MaskSpec = MaskSpec(),
    *,
    rope: bool = False,
    theta: float = 10000.0,
) -> jax.Array:
    """The same function as ``mixed_attention``, in plain jnp (float32 logits and softmax).

    Args:
      q: ``[B, Tq, Hq, Dh]``; k, v: ``[B, Tk, Hkv, Dh]``; metadata ``[B, Tq]`` / ``[B, Tk]``.
    Returns:
      ``[B, Tq, Hq, Dh]`` in q.dtype.
    """
    if rope:
        q = gaussian_rope(q, q_meta.mu, q_meta.sigma, theta)
        k = gaussian_rope(k, k_meta.mu, k_meta.sigma, theta)
    mask = visible(q_meta.end, k_meta.lod, k_meta.start, k_meta.end, k_meta.valid, spec)
    return masked_attention(q, k, v, mask)
