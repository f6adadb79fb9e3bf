"""The attention entry point every model calls.

``attention`` dispatches on ``impl``: ``auto`` (the default: ``cudnn`` on a GPU, ``pallas`` on a
TPU, ``reference`` on CPU), ``reference`` (pure jnp, ``kernels.reference``),
``pallas`` (the mixed-resolution kernels of ``kernels.mixed_attention`` with pre-rotated q/k;
interpreted on CPU, compiled on GPU), or ``cudnn`` (``jax.nn.dot_product_attention``: cuDNN on a
GPU, XLA elsewhere) where it applies (``cudnn_applies``: a full pass with valid keys packed at the
front, and on a GPU fp16/bf16 inputs) and the Pallas kernels for the rest (decode, metadata masks,
float32 on a GPU). A few queries over a longer KV cache (``kernels.decode.decode_applies``) go to
the split-KV decode kernel (``kernels.decode``) on a GPU or CPU, and to ``mixed_attention`` on a
TPU, which has no split-KV kernel yet.

Masks: ``causal=True`` is the WC-causal mask (query i sees key j iff j <= i + q_offset); with
``q_offset = kv_len - q_len`` it is the decode mask over a KV cache. ``causal=False`` is bidirectional
(GistNet, LensNet). ``kv_valid`` masks key padding in both.
"""

import jax
import jax.numpy as jnp

from megacontext_jax.kernels.decode import decode_applies, decode_attention
from megacontext_jax.kernels.mask import Entries, MaskSpec
from megacontext_jax.kernels.mixed_attention import mixed_attention, mixed_attention_reference
from megacontext_jax.kernels.reference import attention_reference

IMPLS = ("auto", "reference", "pallas", "cudnn")
# What ``auto`` is on each backend: cuDNN on a GPU (the Pallas kernels where its masks do not
# reach), the Pallas kernels on a TPU, the jnp reference on CPU (where the kernels only interpret).
AUTO = {"gpu": "cudnn", "tpu": "pallas"}


def resolve(impl: str, backend: str | None = None) -> str:
    """The implementation ``impl`` names on ``backend`` (default: JAX's): ``auto`` resolved."""
    if impl != "auto":
        return impl
    return AUTO.get(backend or jax.default_backend(), "reference")


def cudnn_applies(
    q: jax.Array,
    k: jax.Array,
    q_offset: jax.Array | int,
    entries: tuple | None,
    backend: str | None = None,
) -> bool:
    """Whether ``jax.nn.dot_product_attention`` can take this call on ``backend`` (default: JAX's).

    Its masks cover a full pass only (``q_offset`` 0, as many queries as keys, no metadata mask);
    cuDNN itself takes fp16/bf16 alone (float32 raises NotImplementedError on a GPU), while XLA's
    implementation elsewhere takes any dtype.
    """
    full_pass = isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1]
    backend = backend or jax.default_backend()
    dtype_ok = backend != "gpu" or q.dtype in (jnp.bfloat16, jnp.float16)
    return entries is None and full_pass and dtype_ok


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    kv_valid: jax.Array | None = None,
    q_offset: jax.Array | int = 0,
    impl: str = "auto",
    entries=None,
) -> jax.Array:
    """Dispatches to the implementation named by ``impl`` (see ``IMPLS``).

    ``entries = (meta, spec)`` (``kernels.mask.Entries`` of the sequence and a
    ``MaskSpec``) replaces ``causal`` / ``kv_valid`` / ``q_offset`` by the metadata-driven mask
    of self-attention over entries, e.g. the pyramid mask.
    """
    impl = resolve(impl)
    if impl == "cudnn" and cudnn_applies(q, k, q_offset, entries):
        lengths = None if kv_valid is None else kv_valid.sum(-1).astype(jnp.int32)
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            is_causal=causal,
            key_value_seq_lengths=lengths,
            implementation="cudnn" if jax.default_backend() == "gpu" else None,
        )
    if impl == "cudnn":
        impl = "pallas"
    if entries is not None:
        meta, spec = entries
        fn = mixed_attention if impl == "pallas" else mixed_attention_reference
        if impl not in IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
        return fn(q, k, v, meta, meta, spec, rope=False)
    if impl == "reference":
        return attention_reference(q, k, v, causal=causal, kv_valid=kv_valid, q_offset=q_offset)
    if impl == "pallas":
        b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
        # Entries in order: key j ends at j + 1, query i at q_offset + i + 1 (or never, when
        # bidirectional), so the metadata rule "end_k <= end_q" is the causal mask.
        q_meta = Entries.tokens(b, tq, q_offset)
        if not causal:
            q_meta.end = jnp.full_like(q_meta.end, tk)
        k_meta = Entries.tokens(b, tk)
        if kv_valid is not None:
            k_meta.valid = kv_valid
        if jax.default_backend() != "tpu" and decode_applies(q, k):
            return decode_attention(q, k, v, q_meta, k_meta, MaskSpec("decode"))
        return mixed_attention(q, k, v, q_meta, k_meta, rope=False)
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
