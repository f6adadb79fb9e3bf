"""Ablation: GistNet pooling head x Gaussian-RoPE width of gists.

    python -m megacontext_jax.sweep --config configs/tiny.py --sweep configs/sweeps/gist_pooling_sigma.py

``mc.sigma_scale = 0`` places a gist at its span's centre as a point (no frequency damping);
``12**-0.5`` (the default) gives it the standard deviation of a uniform span.
"""


def sweep() -> list[dict]:
    return [
        {"mc.gist.pooling": pooling, "mc.sigma_scale": sigma}
        for pooling in ("mean", "query", "cls")
        for sigma in (0.0, 12**-0.5)
    ]
