"""MegaContext training losses (DESIGN section 8), in one jit-able function.

Per sequence ``tokens [T + 1]`` and host-built contexts (a baseline, the window, random variants
of the baseline; see ``variants.training_contexts``), plus one LensNet-guided variant made in-graph
by the allocator:

* ``lm_tokens``: the ordinary next-token loss of the base model on the raw tokens (e2e only);
* ``lm_wc``: next-token loss on every working-context entry, each labelled with the first token
  after its span, so the base model learns to read gists;
* ``kl``: substitutability, KL(full-token teacher || WC model) on the scored tokens, with a
  stop-gradient teacher; trains GistNet (and the base model in e2e) to make gists stand in for spans;
* ``span_kl`` (optional): substitutability at close range. Whole sequences with random spans
  replaced by their gists (``variants.span_layout``), KL(full-token teacher || that model) on the
  tokens just after each gist: a direct signal to GistNet, and to the base model to read gists,
  that the scored tokens above (R or more tokens after any gist) give only weakly;
* ``pyramid`` (optional, DESIGN section 6.2): every token and gist of the sequence in one pass of
  the base model under the pyramid mask, each entry labelled with the first token after its span:
  the base model learns to read gists at every position, not only at the scored ones;
* ``lens``: Bradley–Terry preference loss: for two variants a, b of the baseline with measured loss
  L_a < L_b, ``-log sigmoid(u_a - u_b)`` where u is LensNet's utility of the variant's edits
  (sum of scores of expanded gists minus mean scores of collapsed groups), each pair weighted
  by 1 or by its loss gap (``lens_weighting``), plus
  ``lens_prior`` times the mean squared score (a pull towards 0, "leave as is").
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from kernels.mixed_attention import Entries, MaskSpec
from megacontext_jax.allocator import AllocatorConfig
from megacontext_jax.megacontext import (
    MegaContext,
    entry_labels,
    focus_rounds,
    gather_entries,
    lens_scores,
    node_layout,
    node_table,
    wc_positions,
    with_tail,
)
from megacontext_jax.model import cross_entropy, token_nll
from megacontext_jax.working_context import WorkingContext

sg = jax.lax.stop_gradient


def _masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0), axis) / jnp.maximum(jnp.sum(mask, axis), 1)


def ignored(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """Label ids that are never targets: the tokenizer's PAD and BOS."""
    return config.model.pad_id, config.model.bos_id


def pyramid_spec(config: ml_collections.ConfigDict) -> MaskSpec:
    mc = config.mc
    window = mc.pyramid_window or mc.wc_size // (mc.max_level + 1)
    return MaskSpec("pyramid", window=window, block_size=mc.block_size, max_level=mc.max_level)


def pyramid_pass(
    model: MegaContext, table: jax.Array, tokens: jax.Array, config: ml_collections.ConfigDict
) -> jax.Array:
    """Mean next-token loss of every node of ``node_table`` (``table [B, M, D]``) read in one
    pass under the pyramid mask; ``tokens [B, T + 1]`` give the labels."""
    b, t = tokens.shape[0], tokens.shape[1] - 1
    k = config.mc.block_size
    lod, start = (jnp.broadcast_to(a, (b, len(a))) for a in node_layout(t, k, config.mc.max_level))
    valid = jnp.ones(lod.shape, bool)
    meta = Entries.make(lod, start, valid, k, config.mc.sigma_scale)
    logits = model.base(
        embeddings=table, mu=meta.mu, sigma=meta.sigma, entries=(meta, pyramid_spec(config))
    )
    labels, label_mask = entry_labels(tokens, lod, start, valid, k, ignored(config))
    return _masked_mean(token_nll(logits, labels), label_mask)


def span_kl(
    model: MegaContext, table, offsets, full_logits: jax.Array, tokens: jax.Array, batch, config
) -> tuple[jax.Array, jax.Array]:
    """KL(teacher || model) and the NLL it adds, on the ``span_scored`` tokens of sequences whose
    ``span_lod``/``span_start [B, L]`` entries replace random spans by their gists.

    ``full_logits [B, T, V]``: the full-token model (the stop-gradient teacher), row t predicting
    token t + 1.
    """
    k = config.mc.block_size
    lod, start, scored = batch["span_lod"], batch["span_start"], batch["span_scored"]
    valid = jnp.ones(lod.shape, bool)
    emb = gather_entries(table, offsets, lod, start, valid, k)
    mu, sigma = wc_positions(lod, start, config)
    logits = model.base(embeddings=emb, mu=mu, sigma=sigma, kv_valid=valid)
    labels, label_mask = entry_labels(tokens, lod, start, valid, k, ignored(config))
    mask = scored & label_mask
    # Only token entries are scored: row ``start`` of the teacher predicts the same label.
    ref = sg(jax.nn.log_softmax(jnp.take_along_axis(full_logits, start[..., None], axis=1), -1))
    log_student = jax.nn.log_softmax(logits, axis=-1)
    kl = _masked_mean(jnp.sum(jnp.exp(ref) * (ref - log_student), axis=-1), mask)

    def nll(log_probs):
        return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]

    return kl, _masked_mean(nll(log_student) - nll(ref), mask)


def guided_contexts(
    model: MegaContext, table, offsets, arrays, cursor: int, config, key
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """LensNet scores of the baseline (variant 0) and ``mc.train_refocus_steps`` rounds of the
    allocator's refocus of it (as at evaluation, where a needle descends a level per round).

    Returns the refocused context followed by the scored tail (``[B, 1, W]`` arrays), the scores
    ``[B, W]`` and the number of edits per example.
    """
    w, wc_cap = config.mc.wc_size, config.mc.wc_size - config.mc.scored_tokens
    lod, start, ctx = arrays["lod"][:, 0], arrays["start"][:, 0], arrays["context"][:, 0]
    scores = lens_scores(model, table, offsets, lod, start, ctx, cursor, config)
    cfg = dataclasses.replace(
        AllocatorConfig.from_config(config), temperature=config.mc.train_temperature
    )
    wc = WorkingContext(lod[:, :wc_cap], start[:, :wc_cap], ctx[:, :wc_cap])
    wc, edits = focus_rounds(
        model,
        table,
        offsets,
        wc,
        cursor,
        config,
        cfg,
        config.mc.train_refocus_steps,
        key,
        scores[:, :wc_cap],
    )
    guided = with_tail(wc, cursor, config.mc.scored_tokens, w)
    return {k: v[:, None] for k, v in guided.items()}, scores, edits


def utilities(scores, base_lod, base_start, base_ctx, lod, start, ctx, block_size):
    """LensNet utility ``[B, V]`` of each variant's edits relative to the baseline entries.

    A baseline entry is expanded in a variant when the entry covering its start there is finer,
    collapsed when it is coarser. ``u = sum(score * expanded) - sum(score * collapsed) / K``.
    """
    big = jnp.iinfo(jnp.int32).max
    var_start = jnp.where(ctx, start, big)

    def cover(var_start_row, var_lod_row, base_start_row):
        idx = jnp.searchsorted(var_start_row, base_start_row, side="right") - 1
        return var_lod_row[jnp.clip(idx, 0, var_lod_row.shape[0] - 1)]

    covering = jax.vmap(jax.vmap(cover, (0, 0, None)), (0, 0, 0))(var_start, lod, base_start)
    expanded = (covering < base_lod[:, None]) & base_ctx[:, None]
    collapsed = (covering > base_lod[:, None]) & base_ctx[:, None]
    s = scores[:, None]
    return (
        jnp.sum(jnp.where(expanded, s, 0.0), -1)
        - jnp.sum(jnp.where(collapsed, s, 0.0), -1) / block_size
    )


def preference_loss(
    losses: jax.Array, u: jax.Array, margin: float, gap_weighted: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Bradley–Terry loss of utilities ``u [B, V]`` against measured variant ``losses [B, V]``.

    Every pair a, b of one example with ``L_a < L_b - margin`` adds ``-log sigmoid(u_a - u_b)``.
    ``gap_weighted`` weighs a pair by ``L_b - L_a``, what misordering it costs: a variant that
    brings a needle back (a gap of nats) then outweighs the many near-ties of ordinary text.
    Returns the loss (weighted mean over pairs), ``prefer [B, V, V]`` (1 where a is preferred to
    b) and ``du [B, V, V] = u_a - u_b``.
    """
    gap = losses[:, None, :] - losses[:, :, None]
    prefer = (gap > margin).astype(jnp.float32)
    weight = prefer * gap if gap_weighted else prefer
    du = u[:, :, None] - u[:, None, :]
    loss = jnp.sum(weight * jax.nn.softplus(-du)) / jnp.maximum(weight.sum(), 1e-9)
    return loss, prefer, du


def mc_loss(
    model: MegaContext,
    batch: dict[str, jax.Array],
    step: jax.Array,
    key: jax.Array,
    config: ml_collections.ConfigDict,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and metrics. ``batch``: ``tokens [B, T+1]``, contexts ``[B, V, W]``,
    ``expand_lod [B, V - 3]`` and ``from_pyramid [B]`` (as ``trainer.mc_batch`` builds them)."""
    mc, weights = config.mc, config.mc.loss
    k, s_len = mc.block_size, mc.scored_tokens
    tokens = batch["tokens"]
    b, t = tokens.shape[0], tokens.shape[1] - 1
    cursor = t - s_len
    inputs = tokens[:, :t]

    full_logits = model.base(inputs)
    targets = tokens[:, 1:]
    target_mask = batch["mask"]
    nll_sum, count = cross_entropy(full_logits, targets, target_mask)
    lm_tokens = nll_sum / jnp.maximum(count, 1)

    table, offsets = node_table(model.gistnet, model.base.embed(inputs), k, mc.max_level)
    host = {name: batch[name] for name in ("lod", "start", "valid", "context")}
    guided, scores, edits = guided_contexts(model, table, offsets, host, cursor, config, key)
    arrays = {name: jnp.concatenate([host[name], guided[name]], axis=1) for name in host}
    lod, start, valid, ctx = (arrays[n] for n in ("lod", "start", "valid", "context"))
    v = lod.shape[1]

    emb = gather_entries(table, offsets, lod, start, valid, k)
    mu, sigma = wc_positions(lod, start, config)
    w = lod.shape[-1]
    logits = model.base(
        embeddings=emb.reshape(b * v, w, -1),
        mu=mu.reshape(b * v, w),
        sigma=sigma.reshape(b * v, w),
        kv_valid=valid.reshape(b * v, w),
    ).reshape(b, v, w, -1)
    labels, label_mask = entry_labels(tokens, lod, start, valid, k, ignored(config))
    nll = token_nll(logits, labels)
    lm_wc = _masked_mean(nll, label_mask)
    scored_mask = label_mask & ~ctx
    variant_loss = _masked_mean(nll, scored_mask, axis=-1)  # [B, V]

    # Substitutability: the scored tokens under each WC vs under the full-token teacher.
    first = ctx.sum(-1)  # [B, V]: index of the first scored entry
    rows = first[..., None] + jnp.arange(s_len)  # [B, V, S]
    student = jnp.take_along_axis(logits, rows[..., None], axis=2)
    teacher = sg(jax.nn.log_softmax(full_logits[:, cursor:t], axis=-1))[:, None]
    log_student = jax.nn.log_softmax(student, axis=-1)
    kl_tok = jnp.sum(jnp.exp(teacher) * (teacher - log_student), axis=-1)
    kl_mask = jnp.take_along_axis(scored_mask, rows, axis=2)
    kl = _masked_mean(kl_tok, kl_mask)
    teacher_nll = _masked_mean(
        token_nll(full_logits[:, cursor:t], targets[:, cursor:t]), target_mask[:, cursor:t]
    )

    # LensNet preferences among the baseline and its variants (all but the window, index 1).
    pyramid_like = jnp.array([i for i in range(v) if i != 1])
    u = utilities(
        scores,
        lod[:, 0],
        start[:, 0],
        ctx[:, 0],
        lod[:, pyramid_like],
        start[:, pyramid_like],
        ctx[:, pyramid_like],
        k,
    )
    losses = sg(variant_loss[:, pyramid_like])
    lens, prefer, du = preference_loss(
        losses, u, mc.loss.lens_margin, mc.loss.lens_weighting == "gap"
    )
    # Scores default to 0 ("leave as is") where preferences give no evidence: without this pull,
    # Adam drives the tanh scores to saturation (every entry at +1 or -1), where no gradient is left.
    score_ms = _masked_mean(jnp.square(scores), ctx[:, 0])
    agreement = jnp.sum(prefer * (du > 0)) / jnp.maximum(prefer.sum(), 1.0)
    gain = (losses[:, :1] - losses)[:, 1:].reshape(-1)
    util = u[:, 1:].reshape(-1)
    corr = jnp.mean((gain - gain.mean()) * (util - util.mean())) / (
        jnp.std(gain) * jnp.std(util) + 1e-9
    )

    lens_on = (step >= mc.lens_start).astype(jnp.float32)
    total = (
        weights.lm_tokens * lm_tokens
        + weights.lm_wc * lm_wc
        + weights.kl * kl
        + weights.lens * lens_on * (lens + weights.lens_prior * score_ms)
    )
    extra = {}
    if weights.span_kl > 0:
        extra["span_kl"], extra["span_kl/delta_nll"] = span_kl(
            model, table, offsets, full_logits, tokens, batch, config
        )
        total = total + weights.span_kl * extra["span_kl"]
    if weights.pyramid > 0:
        extra["loss/pyramid"] = pyramid_pass(model, table, tokens, config)
        total = total + weights.pyramid * extra["loss/pyramid"]
    delta = variant_loss[:, 2:-1] - variant_loss[:, :1]  # random variants vs their baseline
    # The condition metrics average the examples whose baseline is the pyramid (``deep_fraction``).
    from_pyramid = batch["from_pyramid"]
    on_pyramid = jnp.where(from_pyramid.any(), 0.0, jnp.nan)
    metrics = {
        "loss": total,
        "lm_tokens": lm_tokens,
        "lm_wc": lm_wc,
        "kl": kl,
        "lens": lens,
        "loss/full": teacher_nll,
        "loss/mc_static": _masked_mean(variant_loss[:, 0], from_pyramid) + on_pyramid,
        "loss/window": variant_loss[:, 1].mean(),
        "loss/random": variant_loss[:, 2:-1].mean(),
        "loss/mc_focus": _masked_mean(variant_loss[:, -1], from_pyramid) + on_pyramid,
        "lens/agreement": agreement,
        "lens/correlation": corr,
        "lens/pairs": prefer.sum(),
        "lens/score_rms": jnp.sqrt(score_ms),
        "swap_rate": jnp.mean(edits) / jnp.maximum(ctx[:, 0].sum(-1).mean(), 1),
        **extra,
    }
    for level in range(1, mc.max_level + 1):
        hit = batch["expand_lod"] == level
        metrics[f"delta_nll/lod{level}"] = jnp.where(hit.any(), _masked_mean(delta, hit), jnp.nan)
    return total, metrics
