"""Issue 24's levers, one at a time against the default (``{}``), each behind its config field.

    python -m megacontext_jax.sweep --config configs/tiny.py --sweep configs/sweeps/memory_levers.py \\
        --root runs/sweep_levers --share-curriculum [--seeds 3]

Each run is the default run (about 40 minutes on 2 idle cores; with ``--share-curriculum`` the
levers train only their MC phase from the default's curriculum checkpoint) with one change:

* ``mc.positions = slots``: bounded positions, every entry at its WC slot (``focus.positions``);
* ``mc.min_history = 128``: training histories drawn from 128 to T - S tokens, not always T - S;
* ``mc.needle_variants``: a variant that brings a passkey's digits to LOD0 in every passkey
  sequence;
* ``mc.loss.kl_weighting = gap``: the KL weighted by what full context gains on each token;
* ``mc.allocator.mode = ranked``: the best gist against the weakest group, no thresholds;
* ``data.passkey_fraction / data.repeat_fraction = 0.25``: less synthetic text in the MC phase
  (the curriculum keeps ``configs/tiny.py``'s mix);
* ``mc.gist.depth = 0``: the mean-pooled gist baseline (``configs/tiny.py:mean_gist``);
* ``mc.gist.shared_levels = False``: one GistNet per level;
* ``mc.gist.read_layer = 2`` with one GistNet per level: LOD1 reads the base's states
  (``configs/tiny.py:contextual``), against the row before it;
* ``mc.loss.reconstruct = 0.5``: the autoencoding term (each LOD1 gist, then its span again).
"""


def sweep() -> list[dict]:
    return [
        {},
        {"mc.positions": "slots"},
        {"mc.min_history": 128},
        {"mc.needle_variants": True},
        {"mc.loss.kl_weighting": "gap"},
        {"mc.allocator.mode": "ranked"},
        {"data.passkey_fraction": 0.25, "data.repeat_fraction": 0.25},
        {"mc.gist.depth": 0, "mc.gist.pooling": "mean", "mc.gist.projection": "linear"},
        {"mc.gist.shared_levels": False},
        {"mc.gist.read_layer": 2, "mc.gist.shared_levels": False},
        {"mc.loss.reconstruct": 0.5},
    ]
