"""Evaluation: does MegaContext beat a plain context window at the same budget? (DESIGN section 8)

    python -m megacontext_jax.evaluation --checkpoint runs/tiny [--quick]

Modules: ``protocol`` (what is measured: ``Protocol``, ``evaluate``), ``windows`` (the held-out
text scored), ``scoring`` (the conditions over one batch), ``text`` (NLL rows, key tokens, the
budget curve, substitutability), ``retrieval`` (planted facts), ``stats`` (clustered standard
errors and intervals), ``report`` (tables and PNGs) and ``cli``.
"""

from megacontext_jax.evaluation.protocol import Protocol, config_hash, evaluate

__all__ = ["Protocol", "config_hash", "evaluate"]
