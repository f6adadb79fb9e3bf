"""MegaContext JAX: a language model reading a fixed-size working context of tokens and gists.

    import megacontext_jax as mcj
    model = mcj.load("runs/tiny")
    with model.session("runs/tiny/memory") as s:
        print(s.generate("def main():", max_new_tokens=64))

See ``megacontext_jax.api`` for the whole front door. The names below are imported on first use,
so importing one submodule (``megacontext_jax.config`` for ``train.py --help``) does not load the
model, the tree and the runtime too.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load": "megacontext_jax.api",
    "evaluate": "megacontext_jax.api",
    "Model": "megacontext_jax.api",
    "MemorySession": "megacontext_jax.api",
    "CheckpointError": "megacontext_jax.training.checkpoint",
    "SessionError": "megacontext_jax.runtime.session",
    "TreeError": "megacontext_jax.memory.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megacontext_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
