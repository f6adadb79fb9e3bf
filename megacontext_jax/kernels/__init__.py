"""Attention kernels and the rotary (Gaussian RoPE) math they fuse. Depends on jax alone."""

from megacontext_jax.kernels.attention import attention, cudnn_applies
from megacontext_jax.kernels.reference import attention_reference, attention_weights
from megacontext_jax.kernels.rope import (
    apply_rotary,
    gaussian_rope,
    rope_frequencies,
    rope_tables,
    span_positions,
)

__all__ = [
    "apply_rotary",
    "attention",
    "attention_reference",
    "attention_weights",
    "cudnn_applies",
    "gaussian_rope",
    "rope_frequencies",
    "rope_tables",
    "span_positions",
]
