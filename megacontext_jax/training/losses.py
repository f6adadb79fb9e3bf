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
* ``reconstruct`` (optional): autoencoding, as ICAE and REFRAG pretrain their encoders. Each LOD1
  gist of the history, then its span's first K - 1 tokens placed right after the span (the
  geometry of a gist and the tokens that follow it in a WC), read by the base model, which
  predicts the span's K tokens: the gist must hold what its tokens were, in a form the base reads
  (the base learned to copy from repeats: the span's tokens come again);
* ``lens``: Bradley–Terry preference loss: for two variants a, b of the baseline with measured loss
  L_a < L_b, ``-log sigmoid(u_a - u_b)`` where u is LensNet's utility of the variant's edits
  (sum of scores of expanded gists minus mean scores of collapsed groups), each pair weighted
  by 1 or by its loss gap (``lens_weighting``), plus
  ``lens_prior`` times the mean squared score (a pull towards 0, "leave as is").
"""

import jax
import jax.numpy as jnp

from megacontext_jax.focus.working_context import WorkingContext
from megacontext_jax.kernels.mixed_attention import MaskSpec
from megacontext_jax.megacontext import (
    MegaContext,
    focus_rounds,
    lens_scores,
    node_layout,
    node_table,
    read_wc,
)
from megacontext_jax.nets.losses import cross_entropy, token_nll
from megacontext_jax.specs import MCTraining
from megacontext_jax.training.variants import Rows

sg = jax.lax.stop_gradient


def _masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0), axis) / jnp.maximum(jnp.sum(mask, axis), 1)


def _kl(teacher_log_probs: jax.Array, student_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token KL(teacher || student) and the student's log-probabilities ``[..., V]``."""
    log_student = jax.nn.log_softmax(student_logits, axis=-1)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - log_student), axis=-1)
    return kl, log_student


def pyramid_pass(
    model: MegaContext,
    table: jax.Array,
    offsets: tuple[int, ...],
    tokens: jax.Array,
    spec: MCTraining,
) -> jax.Array:
    """Mean next-token loss of every node of ``node_table`` (``table [B, M, D]``, in its row
    order) read in one pass under the pyramid mask; ``tokens [B, T + 1]`` give the labels."""
    layout = spec.layout
    b, t = tokens.shape[0], tokens.shape[1] - 1
    k = layout.block_size
    lod, start = (jnp.broadcast_to(a, (b, len(a))) for a in node_layout(t, k, layout.max_level))
    wc = WorkingContext(lod, start, jnp.ones(lod.shape, bool))
    mask = MaskSpec("pyramid", window=spec.pyramid_window, block_size=k, max_level=layout.max_level)
    logits, labels, label_mask = read_wc(
        model, table, offsets, wc, tokens, layout, spec.ignore, mask
    )
    return _masked_mean(token_nll(logits, labels), label_mask)


def reconstruction(
    model: MegaContext,
    table: jax.Array,
    offsets: tuple[int, ...],
    tokens: jax.Array,
    cursor: jax.Array,
    spec: MCTraining,
) -> jax.Array:
    """Mean NLL of the K tokens of every LOD1 span (``tokens [B, T + 1]``) that ends by its
    sequence's end (``cursor [B]`` + S), each read by the base model from ``[its gist, its first
    K - 1 tokens]`` (``table`` rows of ``node_table``)."""
    layout = spec.layout
    k = layout.block_size
    b, t = tokens.shape[0], tokens.shape[1] - 1
    n = t // k
    spans = tokens[:, : n * k].reshape(b * n, k)
    gists = table[:, offsets[1] : offsets[1] + n].reshape(b * n, 1, -1)
    inputs = model.base.embed(spans[:, :-1])
    inputs = jnp.concatenate([gists.astype(inputs.dtype), inputs], axis=1)  # [B n, K, D]
    lod = jnp.array([1] + [0] * (k - 1), jnp.int32)
    start = jnp.arange(k - 1, 2 * k - 1, dtype=jnp.int32).at[0].set(0)
    mu, sigma = layout.positions(*(jnp.broadcast_to(a, (b * n, k)) for a in (lod, start)))
    logits = model.base(embeddings=inputs, mu=mu, sigma=sigma)
    ends = (jnp.arange(n) + 1) * k <= (cursor + layout.scored)[:, None]  # [B, n]
    valid = jnp.all(spans[..., None] != jnp.asarray(spec.ignore, spans.dtype), axis=-1)
    valid = valid & ends.reshape(b * n, 1)
    return _masked_mean(token_nll(logits, spans), valid)


def span_kl(
    model: MegaContext,
    table: jax.Array,
    offsets: tuple[int, ...],
    full_logits: jax.Array,
    tokens: jax.Array,
    batch: dict[str, jax.Array],
    spec: MCTraining,
) -> tuple[jax.Array, jax.Array]:
    """KL(teacher || model) and the NLL it adds, on the ``span_scored`` tokens of sequences whose
    ``span_lod``/``span_start [B, L]`` entries replace random spans by their gists.

    ``full_logits [B, T, V]``: the full-token model (the stop-gradient teacher), row t predicting
    token t + 1.
    """
    wc = WorkingContext.from_batch(batch, "span_")
    logits, labels, label_mask = read_wc(
        model, table, offsets, wc, tokens, spec.layout, spec.ignore
    )
    mask = batch["span_scored"] & label_mask
    # Only token entries are scored: row ``start`` of the teacher predicts the same label.
    ref = sg(jax.nn.log_softmax(jnp.take_along_axis(full_logits, wc.start[..., None], axis=1), -1))
    kl_tok, log_student = _kl(ref, logits)
    kl = _masked_mean(kl_tok, mask)

    def nll(log_probs):
        return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]

    return kl, _masked_mean(nll(log_student) - nll(ref), mask)


def guided_contexts(
    model: MegaContext,
    table: jax.Array,
    offsets: tuple[int, ...],
    baseline: WorkingContext,
    cursor: jax.Array,
    spec: MCTraining,
    key: jax.Array,
) -> tuple[WorkingContext, jax.Array, jax.Array, WorkingContext]:
    """LensNet scores of the baselines ``[B, W]`` (whose contexts end at ``cursor [B]``) and
    ``spec.refocus_steps`` rounds of the allocator's refocus of them (as at evaluation, where a
    needle descends a level per round).

    Returns the refocused contexts followed by the scored tail ``[B, W]``, the scores ``[B, W]``,
    the number of edits per example and the contexts after the first round ``[B, W - S]``.
    """
    layout = spec.layout
    scores = lens_scores(model, table, offsets, baseline, cursor, layout)
    wc_cap = layout.context_capacity
    wc, edits, first = focus_rounds(
        model,
        table,
        offsets,
        baseline.only_context(wc_cap),
        cursor,
        layout,
        spec.allocator,
        spec.refocus_steps,
        key,
        scores[:, :wc_cap],
    )
    return wc.with_tail(cursor, layout.scored, layout.capacity), scores, edits, first


def utilities(
    scores: jax.Array,
    base_lod: jax.Array,
    base_start: jax.Array,
    base_ctx: jax.Array,
    lod: jax.Array,
    start: jax.Array,
    ctx: jax.Array,
    block_size: int,
) -> jax.Array:
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


def _scored_rows(contexts: WorkingContext, s_len: int) -> jax.Array:
    """``[B, V, S]`` WC index of each variant's scored tokens (they follow its context)."""
    return contexts.context.sum(-1)[..., None] + jnp.arange(s_len)


def _scored_kl(logits, scored_mask, contexts: WorkingContext, teacher_logits, weights=None):
    """KL(full-token teacher || WC model) on the S scored tokens of every variant: logits
    ``[B, V, W, V]``, the teacher's on the scored tokens ``teacher_logits [B, S, V]``;
    ``weights [B, S]``: each scored token's weight (None: alike)."""
    rows = _scored_rows(contexts, teacher_logits.shape[1])
    student = jnp.take_along_axis(logits, rows[..., None], axis=2)
    teacher = sg(jax.nn.log_softmax(teacher_logits, axis=-1))[:, None]
    kl_tok, _ = _kl(teacher, student)
    mask = jnp.take_along_axis(scored_mask, rows, axis=2)
    if weights is None:
        return _masked_mean(kl_tok, mask)
    w = jnp.where(mask, weights[:, None], 0.0)
    return jnp.sum(jnp.where(w > 0, kl_tok, 0.0) * w) / jnp.maximum(jnp.sum(w), 1e-6)


def gap_weights(window_nll: jax.Array, teacher_nll: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B, S]`` weights of the scored tokens by how much the full context beats the window on
    each, ``max(window - full, 0)`` (stop-gradient, as LongCE weighs tokens), scaled to mean 1
    over the ``mask``ed tokens; alike where no token has a gap."""
    gap = jnp.maximum(sg(window_nll - teacher_nll), 0.0) * mask
    mean = gap.sum() / jnp.maximum(mask.sum(), 1.0)
    return jnp.where(mean > 0, gap / jnp.where(mean > 0, mean, 1.0), mask.astype(jnp.float32))


def _lens_terms(
    scores: jax.Array,
    base: WorkingContext,
    contexts: WorkingContext,
    variant_loss: jax.Array,
    rows: Rows,
    spec: MCTraining,
    prefix: str = "lens",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LensNet's preference loss over the variants made from the baseline (``rows``), their
    utilities taken from its ``scores [B, Wb]`` of the contexts ``base`` (the baseline, or a
    later round's context), its score prior and metrics (named ``prefix``)."""
    weights = spec.weights
    edited = jnp.array(rows.edits_of_baseline)
    u = utilities(
        scores,
        base.lod,
        base.start,
        base.context_mask,
        contexts.lod[:, edited],
        contexts.start[:, edited],
        contexts.context[:, edited],
        spec.layout.block_size,
    )
    losses = sg(variant_loss[:, edited])
    lens, prefer, du = preference_loss(
        losses, u, weights.lens_margin, weights.lens_weighting == "gap"
    )
    # Scores default to 0 ("leave as is") where preferences give no evidence: without this pull,
    # Adam drives the tanh scores to saturation (every entry at +1 or -1), where no gradient is left.
    score_ms = _masked_mean(jnp.square(scores), base.context_mask)
    gain = (losses[:, :1] - losses)[:, 1:].reshape(-1)
    util = u[:, 1:].reshape(-1)
    corr = jnp.mean((gain - gain.mean()) * (util - util.mean())) / (
        jnp.std(gain) * jnp.std(util) + 1e-9
    )
    metrics = {
        prefix: lens,
        f"{prefix}/agreement": jnp.sum(prefer * (du > 0)) / jnp.maximum(prefer.sum(), 1.0),
        f"{prefix}/correlation": corr,
        f"{prefix}/pairs": prefer.sum(),
        f"{prefix}/score_rms": jnp.sqrt(score_ms),
    }
    return lens + weights.lens_prior * score_ms, metrics


def _condition_metrics(variant_loss, batch, rows: Rows, max_level: int) -> dict[str, jax.Array]:
    """Each condition's loss on the scored tokens, and the random variants' gain by level."""
    # The pyramid conditions average the examples whose baseline is the pyramid (deep_fraction).
    from_pyramid = batch["from_pyramid"]
    on_pyramid = jnp.where(from_pyramid.any(), 0.0, jnp.nan)
    metrics = {
        "loss/mc_static": _masked_mean(variant_loss[:, rows.baseline], from_pyramid) + on_pyramid,
        "loss/window": variant_loss[:, rows.window].mean(),
        "loss/random": variant_loss[:, rows.random].mean(),
        "loss/mc_focus": _masked_mean(variant_loss[:, rows.guided], from_pyramid) + on_pyramid,
    }
    delta = variant_loss[:, rows.random] - variant_loss[:, rows.baseline, None]
    for level in range(1, max_level + 1):
        hit = batch["expand_lod"] == level
        metrics[f"delta_nll/lod{level}"] = jnp.where(hit.any(), _masked_mean(delta, hit), jnp.nan)
    return metrics


def mc_loss(
    model: MegaContext,
    batch: dict[str, jax.Array],
    step: jax.Array,
    key: jax.Array,
    spec: MCTraining,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and metrics. ``batch``: ``tokens [B, T+1]``, ``cursor [B]`` (where each
    sequence's S scored tokens start), contexts ``[B, V, W]`` in the order of
    ``variants.Rows``, ``expand_lod [B, V - 2]`` and ``from_pyramid [B]`` (as
    ``training.loop.mc_batch`` builds them)."""
    layout, weights = spec.layout, spec.weights
    tokens, cursor = batch["tokens"], batch["cursor"]
    t = tokens.shape[1] - 1
    inputs = tokens[:, :t]

    full_logits = model.base(inputs)
    targets, target_mask = tokens[:, 1:], batch["mask"]
    nll_sum, count = cross_entropy(full_logits, targets, target_mask)
    lm_tokens = nll_sum / jnp.maximum(count, 1)
    scored_at = cursor[:, None] + jnp.arange(layout.scored)  # [B, S]
    teacher_logits = jnp.take_along_axis(full_logits, scored_at[..., None], axis=1)
    teacher_tok = token_nll(teacher_logits, jnp.take_along_axis(targets, scored_at, axis=1))
    teacher_mask = jnp.take_along_axis(target_mask, scored_at, axis=1)
    teacher_nll = _masked_mean(teacher_tok, teacher_mask)

    table, offsets = node_table(model, inputs, layout.block_size, layout.max_level)
    host = WorkingContext.from_batch(batch)
    rows = Rows(num_random=host.lod.shape[1] - 2)
    baseline = jax.tree.map(lambda a: a[:, rows.baseline], host)
    guided, scores, edits, first = guided_contexts(
        model, table, offsets, baseline, cursor, spec, key
    )
    contexts = jax.tree.map(lambda h, g: jnp.concatenate([h, g[:, None]], 1), host, guided)

    logits, labels, label_mask = read_wc(
        model, table, offsets, contexts, tokens, layout, spec.ignore
    )
    nll = token_nll(logits, labels)
    lm_wc = _masked_mean(nll, label_mask)
    scored_mask = label_mask & ~contexts.context
    variant_loss = _masked_mean(nll, scored_mask, axis=-1)  # [B, V]
    kl_weights = None
    if weights.kl_weighting == "gap":
        rows_s = _scored_rows(contexts, layout.scored)[:, rows.window]  # [B, S]
        window_nll = jnp.take_along_axis(nll[:, rows.window], rows_s, axis=1)
        kl_weights = gap_weights(window_nll, teacher_tok, teacher_mask)
    kl = _scored_kl(logits, scored_mask, contexts, teacher_logits, kl_weights)
    lens, lens_metrics = _lens_terms(scores, baseline, contexts, variant_loss, rows, spec)
    if weights.lens_rounds > 0:
        # Round 2's scores: the same variants' measured losses rank LensNet's utilities taken
        # from its scores of the context the first round made.
        later = lens_scores(model, table, offsets, first, cursor, layout)
        rounds, rounds_metrics = _lens_terms(
            later, first, contexts, variant_loss, rows, spec, "lens_rounds"
        )
        lens = lens + weights.lens_rounds * rounds
        lens_metrics |= rounds_metrics

    lens_on = (step >= spec.lens_start).astype(jnp.float32)
    total = (
        weights.lm_tokens * lm_tokens
        + weights.lm_wc * lm_wc
        + weights.kl * kl
        + weights.lens * lens_on * lens
    )
    extra = {}
    if weights.span_kl > 0:
        extra["span_kl"], extra["span_kl/delta_nll"] = span_kl(
            model, table, offsets, full_logits, tokens, batch, spec
        )
        total = total + weights.span_kl * extra["span_kl"]
    if weights.pyramid > 0:
        extra["loss/pyramid"] = pyramid_pass(model, table, offsets, tokens, spec)
        total = total + weights.pyramid * extra["loss/pyramid"]
    if weights.reconstruct > 0:
        extra["loss/reconstruct"] = reconstruction(model, table, offsets, tokens, cursor, spec)
        total = total + weights.reconstruct * extra["loss/reconstruct"]
    metrics = {
        "loss": total,
        "lm_tokens": lm_tokens,
        "lm_wc": lm_wc,
        "kl": kl,
        "loss/full": teacher_nll,
        **lens_metrics,
        **_condition_metrics(variant_loss, batch, rows, layout.max_level),
        "swap_rate": jnp.mean(edits) / jnp.maximum(contexts.context[:, 0].sum(-1).mean(), 1),
        **extra,
    }
    return total, metrics
