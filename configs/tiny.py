"""Tiny MegaContext model on the embedded default corpus (the Python standard library's source),
sized for a 2-core CPU: base GPT, GistNet and LensNet trained together (``e2e``), after a
curriculum in which the base GPT alone learns to copy on short sequences.

    python train.py --config configs/tiny.py
    python train.py --config configs/tiny.py --config.train.steps=300 --config.curriculum.steps=100 \
        --config.workdir=runs/t300
    python train.py --config configs/tiny.py --config.mc.enabled=False   # the plain LM alone
    python train.py --config configs/tiny.py:retrieval   # a shorter raw tail: room for focus
    python train.py --config configs/tiny.py:quick   # a first look: ~5 minutes with decoding
    python train.py --config configs/tiny.py:mean_gist   # the baseline GistNet is measured against
    python train.py --config configs/tiny.py:contextual   # LOD1 gists read the base's states
    python train.py --config configs/tiny.py:wide   # retrieval at W = 128, bounded positions

``quick`` is the same model trained for 300 steps instead of 3,500 (200 of curriculum in batches of
16, then 100 of the whole model, LensNet from step 240): every part trains and decode runs over a
memory with learned focus, but the model is far from what the full run reaches; use it to see the
system work, not to measure it.

``retrieval`` trades next-token loss for passkey retrieval. A working context of W = 64 holds the
S = 16 scored tokens and 48 context entries. The default keeps 40 of them as tokens at 4 W and
8 W (a ``recent`` pyramid over a 32-token tail), which next-token loss on code needs, and that
leaves almost no room to bring a needle's digits to LOD0 (``oracle_fits`` of ``mc_oracle`` in
``megacontext_jax.evaluation``: 2 of 32 probes fit at 4 W, none at 8 W). ``retrieval`` keeps a
16-token tail in a ``proportional`` pyramid (30 of 32 fit at 4 W and 8 W), and it trains LensNet
on deep expansions, on three rounds of guided refocus (as evaluation refocuses), and on 12 random
variants per sequence rather than 3: ``mc_focus`` found 15 / 5 passkeys of 32 at 4 W / 8 W with 3,
15 / 10 with 6, 23 / 13 with 12 and 18 / 14 with 24 (one run each).

``mean_gist`` is the default run with GistNet's transformer taken out (``mc.gist.depth = 0``): each
gist is the mean of its K normalised children through one linear projection, trained the same way
(same steps, data and losses). Evaluated next to the default (``runs/tiny``), it says what the
transformer over the children adds.

``wide`` is ``retrieval`` at twice the budget: W = 128 (T = 1,024, still 8 W), a 32-token tail in
a ``proportional`` pyramid and bounded positions (``mc.positions = slots``). At W = 64 and K = 8 a
needle's digits cannot be brought to LOD0 within the budget once the history passes 8 W: the
pyramid with them at LOD0 (``variants.needle_variant``, what ``mc_oracle`` scores) fits 97%,
100%, 17%, 15% and 3% of random needle positions at 4, 8, 16, 32 and 64 W (``retrieval``), and
none at any length with the default's 32-token ``recent`` tail; at W = 128 it fits all of them
up to 64 W. Slots keep every query-to-entry distance below W however long the history, so 32 W
and 64 W are not positions training never saw. The curriculum is the default's (it reads no
``mc`` field), so ``--config.curriculum.reuse_from`` can start from it; the MegaContext phase
costs about 2.5 times the default's per step.

``contextual`` is the default run with the language model as the LOD1 encoder (issue 24, Deliver
2): GistNet reads the base GPT's residual stream after 2 of its 4 blocks, from causal passes over
spans of 8 blocks (64 tokens, one W) aligned at absolute block indices, not context-free token
embeddings; each level has its own GistNet, since LOD1 now reads states and the levels above read
gists.
"""

import ml_collections

from megacontext_jax.config import ConfigError, base_config

VARIANTS = ("retrieval", "quick", "mean_gist", "contextual", "wide")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    if variant not in (None, *VARIANTS):
        raise ConfigError(f"configs/tiny.py: unknown variant {variant!r}; known: {VARIANTS}")
    c = base_config()
    c.workdir = "runs/tiny"
    c.model.width = 128
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.smear_keys = True  # a one-layer path to copying (nets/layers.py)
    c.data.seq_len = 512  # T = 8 W: a training sequence's history is 8x the working context
    c.data.passkey_fraction = 0.5  # retrieval practice for LensNet and GistNet
    c.data.repeat_fraction = 1.0  # copy practice: without it the base never learns to look back
    c.train.batch_size = 8
    c.train.steps = 3500
    c.train.lr = 3e-3
    c.train.warmup_steps = 80
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    # At T = 512 and B = 8 a model this small does not learn to copy at all (benchmarks/induction.py);
    # on short sequences in big batches it does. A passkey's first digit needs the whole
    # "pass key is " match, not just the previous token: on 128-token sequences the base learns
    # it only for 128 tokens and loses it at T = 512; on 256-token ones it keeps it, and then
    # finds passkeys at 8 W under `full` (held-out bpb 1.46 against 1.81 with 128 x 32).
    c.curriculum.steps = 2000
    c.curriculum.seq_len = 256
    c.curriculum.batch_size = 32
    c.curriculum.passkey_fraction = c.data.passkey_fraction  # the same mix in both phases
    c.curriculum.repeat_fraction = c.data.repeat_fraction
    c.mc.enabled = True
    c.mc.block_size = 8
    c.mc.max_level = 3
    c.mc.wc_size = 64
    # 16 blocks per GistNet call: a decode refocus gists one new block in a fixed-shape chunk, so
    # a small chunk keeps that cheap (bulk ingest pays ~25% more dispatches than with 64).
    c.mc.ingest_chunk = 16
    c.mc.recent_tail = 32  # focus never collapses the 32 newest context tokens
    # Detail to the present first: the pyramid keeps 40 of the window's 48 context tokens as
    # tokens at 4 W and 8 W, where "proportional" keeps 32 and spends 10 entries on LOD1 gists,
    # which are worth far less than the raw tokens they displace (benchmarks/gist_value.py). At
    # 8 W mc_static trails window by 0.025 against 0.068, and mc_focus is 0.012 better.
    c.mc.pyramid = "recent"
    c.mc.lens_start = 2300  # LensNet learns once GistNet and the base have 300 MC steps
    # Preference pairs weighed by their loss gap, and the prior that keeps tanh unsaturated under
    # them: at 8 W mc_focus - mc_static was -0.043 against -0.028 with uniform pairs (with the
    # "proportional" pyramid, which leaves focus more to do than "recent"). Gap weights
    # alone saturate every score within 100 LensNet steps; with uniform pairs, the prior holds the
    # scores so near 0 that focus makes no edit at all.
    c.mc.loss.lens_weighting = "gap"
    c.mc.loss.lens_prior = 1.0
    # Gists trained only through the scored tokens (R or more tokens after any gist) recover 18%
    # of what dropping their span costs; with this close-range KL, ~50% (LOD1).
    c.mc.loss.span_kl = 1.0
    c.mc.scored_tokens = 16
    c.mc.gist.num_heads = 4
    c.mc.lens.num_heads = 4
    if variant in ("retrieval", "wide"):
        c.workdir = "runs/tiny_retrieval"
        c.mc.recent_tail = 16
        c.mc.pyramid = "proportional"  # LOD1 gists for focus to expand, and LOD1 groups to collapse
        c.mc.deep_fraction = 0.5
        c.mc.train_refocus_steps = 3
        c.mc.num_random_variants = 12
    if variant == "wide":
        c.workdir = "runs/tiny_wide"
        c.mc.wc_size = 128
        c.data.seq_len = 1024
        c.mc.recent_tail = 32
        c.mc.positions = "slots"
    if variant == "quick":
        c.workdir = "runs/tiny_quick"
        c.train.steps = 300
        c.train.warmup_steps = 30
        c.train.eval_every = 100
        c.train.checkpoint_every = 100
        c.curriculum.steps = 200
        c.curriculum.batch_size = 16
        c.mc.lens_start = 240
    if variant == "mean_gist":
        c.workdir = "runs/tiny_mean_gist"
        c.mc.gist.depth = 0
        c.mc.gist.pooling = "mean"
        c.mc.gist.projection = "linear"
    if variant == "contextual":
        c.workdir = "runs/tiny_contextual"
        c.mc.gist.read_layer = 2
        c.mc.gist.read_blocks = 8
        c.mc.gist.shared_levels = False
    return c
