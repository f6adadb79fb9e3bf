"""Typed configs of the parts, built once from the ``ConfigDict`` at the entry points: the
working-context layout, the loss weights, the allocator and the MegaContext objective here, the
networks in ``nets.specs``.

The ``ConfigDict`` of ``config.py`` is what users write and override. Below the entry points
(the training loop, evaluation, the decode session, benchmarks) every part receives one of these frozen
dataclasses or plain scalars: only the fields it reads. They are hashable, so a jitted function
that takes one as a static argument recompiles when a field it reads changes and never otherwise
(``train.log_every`` does not recompile the evaluation; ``tests/test_evaluate.py``).

Each group's checks live with its dataclass (``validate``); ``config.validate`` runs them all
and raises ``ConfigError`` naming the first field that is wrong.
"""

import dataclasses

from megacontext_jax.errors import ConfigError, Group, positive, require
from megacontext_jax.focus import positions
from megacontext_jax.nets.specs import DTYPES, GistConfig, LensConfig

LENS_WEIGHTINGS = ("uniform", "gap")
KL_WEIGHTINGS = ("uniform", "gap")  # training.losses.gap_weights
ALLOCATOR_MODES = ("thresholds", "ranked")  # focus.allocator
PYRAMIDS = ("recent", "proportional")  # focus.rules.expand_priority's shapes


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static sizes and positions of the working contexts of one training or evaluation setting
    (DESIGN sections 4 and 5)."""

    block_size: int  # K
    max_level: int
    capacity: int  # W: total entries (context + scored tail)
    scored: int  # S: newest tokens whose predictions are scored
    recent_tail: int  # R: context tokens kept at LOD0 before the cursor
    pyramid: str = "proportional"  # the baseline's shape (PYRAMIDS)
    sigma_scale: float = 12**-0.5  # a gist's RoPE width per token of its span
    position_mode: str = "absolute"  # focus.positions.MODES

    @property
    def context_capacity(self) -> int:
        return self.capacity - self.scored

    @property
    def positions(self) -> positions.Positions:
        """How the entries of these WCs get their Gaussian-RoPE ``(mu, sigma)``."""
        return positions.Positions(self.position_mode, self.block_size, self.sigma_scale)

    def with_capacity(self, capacity: int) -> "Layout":
        """This layout at a budget of ``capacity`` entries, the same S scored tokens, and a
        tail that keeps its share of the context, as far as the budget leaves room for two
        blocks of gists beside it (a budget curve's points; ``ValueError`` where
        ``capacity`` cannot hold the scored tokens and two blocks)."""
        context = capacity - self.scored
        k = self.block_size
        if context < 2 * k:
            raise ValueError(
                f"a budget of {capacity} leaves {context} context entries beside S={self.scored} "
                f"scored tokens: needs >= 2K = {2 * k}"
            )
        tail = min(round(self.recent_tail * context / self.context_capacity), context - 2 * k)
        return dataclasses.replace(self, capacity=capacity, recent_tail=tail)

    @classmethod
    def from_config(cls, config: Group) -> "Layout":
        mc = config.mc
        return cls(
            mc.block_size,
            mc.max_level,
            mc.wc_size,
            mc.scored_tokens,
            mc.recent_tail,
            mc.pyramid,
            mc.sigma_scale,
            mc.positions,
        )

    @staticmethod
    def validate(mc: Group, seq_len: int) -> None:
        """``config.mc``'s tree and working-context sizes (``seq_len``: ``data.seq_len``)."""
        positive(mc, "mc", "block_size", "max_level", "ingest_chunk", "wc_size")
        k = mc.block_size
        require(
            k >= 2 and (k & (k - 1)) == 0, "mc.block_size", f"must be a power of two >= 2, got {k}"
        )
        require(mc.sigma_scale >= 0, "mc.sigma_scale", f"must be >= 0, got {mc.sigma_scale}")
        modes = positions.MODES
        require(mc.positions in modes, "mc.positions", f"must be one of {modes}")
        # The pyramid pass holds every token and gist of a sequence at once: entries have no
        # working-context slots to sit at.
        require(
            mc.positions == "absolute" or mc.loss.pyramid == 0,
            "mc.loss.pyramid",
            f"needs mc.positions='absolute' (the pass has no WC slots), got {mc.positions!r}",
        )
        require(mc.gist_dtype in DTYPES, "mc.gist_dtype", f"must be one of {DTYPES}")
        require(
            0 <= mc.recent_tail < mc.wc_size,
            "mc.recent_tail",
            f"must be in [0, mc.wc_size={mc.wc_size}), got {mc.recent_tail}",
        )
        require(mc.pyramid in PYRAMIDS, "mc.pyramid", f"must be one of {PYRAMIDS}")
        require(
            mc.wc_size >= mc.recent_tail + 2 * k,
            "mc.wc_size",
            f"{mc.wc_size} leaves no room for gists beside a tail of {mc.recent_tail} "
            "(needs >= tail + 2K)",
        )
        require(mc.pyramid_window >= 0, "mc.pyramid_window", "must be >= 0 (0: W / (levels + 1))")
        require(mc.refocus_every >= 0, "mc.refocus_every", "must be >= 0 (0: every K tokens)")
        every = mc.refocus_every or k
        require(
            mc.wc_size - every >= mc.recent_tail + 2 * k,
            "mc.refocus_every",
            f"{every} tokens between refocus steps leave W={mc.wc_size} too little room for a "
            f"tail of {mc.recent_tail} and gists (needs W - refocus_every >= tail + 2K)",
        )
        if mc.enabled:
            require(
                mc.wc_size >= mc.scored_tokens + mc.recent_tail + 2 * k,
                "mc.scored_tokens",
                f"{mc.scored_tokens} scored + {mc.recent_tail} tail tokens leave W={mc.wc_size} "
                f"no room for gists (needs W >= S + R + 2K)",
            )
            require(
                seq_len > mc.scored_tokens + mc.recent_tail,
                "data.seq_len",
                f"{seq_len} must exceed mc.scored_tokens + mc.recent_tail",
            )
            require(mc.scored_tokens >= 1, "mc.scored_tokens", "must be >= 1")
            longest = seq_len - mc.scored_tokens
            require(
                mc.min_history == 0 or mc.recent_tail < mc.min_history <= longest,
                "mc.min_history",
                f"must be 0 or in (mc.recent_tail={mc.recent_tail}, data.seq_len - "
                f"mc.scored_tokens={longest}], got {mc.min_history}",
            )


def gistable(num_tokens: int, block_size: int) -> int:
    """Tokens ``[0, n)`` whose spans the span-KL pass may gist: every complete block but the
    last, so that tokens follow every gist."""
    return max(num_tokens // block_size * block_size - block_size, 0)


def span_counts(num_tokens: int, fractions: tuple[float, ...], block_size: int) -> tuple[int, ...]:
    """Gists per level (1, 2, ...) of a span-KL sequence (``variants.span_layout``):
    ``fractions[l - 1]`` of its level-l nodes. Raises ``ValueError`` when they cannot all fit
    beside each other."""
    k = block_size
    counts = tuple(int(f * (num_tokens // k ** (l + 1))) for l, f in enumerate(fractions))
    usable = gistable(num_tokens, k)
    for level in range(len(counts), 0, -1):
        coarser = sum(counts[m - 1] * k ** (m - level) for m in range(level + 1, len(counts) + 1))
        free = usable // k**level - coarser
        if free < counts[level - 1]:
            raise ValueError(
                f"{num_tokens} tokens hold only {free} free level-{level} nodes, "
                f"{counts[level - 1]} asked for"
            )
    return counts


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The MegaContext objective's terms (``config.mc.loss``; ``training.losses``)."""

    lm_tokens: float
    lm_wc: float
    kl: float
    lens: float
    lens_margin: float
    lens_prior: float
    lens_rounds: float
    lens_weighting: str
    kl_weighting: str
    pyramid: float
    span_kl: float
    reconstruct: float

    @classmethod
    def from_config(cls, loss: Group) -> "LossWeights":
        return cls(**{f.name: loss[f.name] for f in dataclasses.fields(cls)})

    @staticmethod
    def validate(mc: Group, seq_len: int) -> None:
        loss = mc.loss
        require(loss.lens_prior >= 0, "mc.loss.lens_prior", "must be >= 0")
        require(loss.lens_rounds >= 0, "mc.loss.lens_rounds", "must be >= 0 (0 leaves it out)")
        require(
            loss.lens_rounds == 0 or mc.train_refocus_steps >= 2,
            "mc.loss.lens_rounds",
            "needs mc.train_refocus_steps >= 2 (a second round to score)",
        )
        require(
            loss.lens_weighting in LENS_WEIGHTINGS,
            "mc.loss.lens_weighting",
            f"must be one of {LENS_WEIGHTINGS}",
        )
        require(
            loss.kl_weighting in KL_WEIGHTINGS,
            "mc.loss.kl_weighting",
            f"must be one of {KL_WEIGHTINGS}",
        )
        require(loss.pyramid >= 0, "mc.loss.pyramid", "must be >= 0 (0 leaves the pass out)")
        require(loss.span_kl >= 0, "mc.loss.span_kl", "must be >= 0 (0 leaves the pass out)")
        require(loss.reconstruct >= 0, "mc.loss.reconstruct", "must be >= 0 (0 leaves it out)")
        if loss.span_kl <= 0:
            return
        fractions = tuple(mc.span_kl.fractions)
        require(
            0 < len(fractions) <= mc.max_level and all(0 <= f <= 1 for f in fractions),
            "mc.span_kl.fractions",
            f"needs 1 to mc.max_level={mc.max_level} fractions in [0, 1] (levels 1, 2, ...), "
            f"got {fractions}",
        )
        try:
            counts = span_counts(seq_len, fractions, mc.block_size)
        except ValueError as e:
            raise ConfigError(f"config.mc.span_kl.fractions: {e}") from None
        require(
            sum(counts) > 0,
            "mc.span_kl.fractions",
            f"{fractions} make no gist in a sequence of data.seq_len={seq_len} tokens",
        )
        require(mc.span_kl.horizon >= 1, "mc.span_kl.horizon", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class AllocatorConfig:
    """The focus allocator's rules (``config.mc.allocator``, K, the top level and the tail)."""

    block_size: int
    max_level: int
    recent_tail: int
    tau_expand: float = 0.2
    tau_collapse: float = 0.2
    max_edits: int = 8
    cooldown: int = 2
    temperature: float = 0.0
    mode: str = "thresholds"  # ALLOCATOR_MODES
    # What a collapse costs against an expansion in ``ranked`` mode: the group's mean score
    # (LensNet's per-entry utilities) or its sum (scores that are shares of the base's
    # attention, ``megacontext.attention_scores``: K entries read as much as their sum).
    group_cost: str = "mean"

    @classmethod
    def from_config(cls, config: Group) -> "AllocatorConfig":
        a = config.mc.allocator
        return cls(
            block_size=config.mc.block_size,
            max_level=config.mc.max_level,
            recent_tail=config.mc.recent_tail,
            tau_expand=a.tau_expand,
            tau_collapse=a.tau_collapse,
            max_edits=a.max_edits,
            cooldown=a.cooldown,
            temperature=a.temperature,
            mode=a.mode,
        )

    @staticmethod
    def validate(a: Group) -> None:
        modes = ALLOCATOR_MODES
        require(a.mode in modes, "mc.allocator.mode", f"must be one of {modes}")
        positive(a, "mc.allocator", "tau_expand", "tau_collapse")
        require(a.max_edits >= 0, "mc.allocator.max_edits", "must be >= 0")
        require(a.cooldown >= 0, "mc.allocator.cooldown", "must be >= 0")
        require(a.temperature >= 0, "mc.allocator.temperature", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class MCTraining:
    """What the MegaContext objective reads (``training.losses.mc_loss``): a static argument."""

    layout: Layout
    weights: LossWeights
    allocator: AllocatorConfig  # of the LensNet-guided variant (its exploration temperature)
    refocus_steps: int  # rounds that make the guided variant
    lens_start: int  # step at which the LensNet loss switches on
    pyramid_window: int  # the pyramid pass's entries per level band
    ignore: tuple[int, ...]  # label ids that are never targets: PAD and BOS

    @classmethod
    def from_config(cls, config: Group) -> "MCTraining":
        mc = config.mc
        allocator = dataclasses.replace(
            AllocatorConfig.from_config(config), temperature=mc.train_temperature
        )
        return cls(
            layout=Layout.from_config(config),
            weights=LossWeights.from_config(mc.loss),
            allocator=allocator,
            refocus_steps=mc.train_refocus_steps,
            lens_start=mc.lens_start,
            pyramid_window=mc.pyramid_window or mc.wc_size // (mc.max_level + 1),
            ignore=ignored(config),
        )

    @staticmethod
    def validate(mc: Group) -> None:
        modes = ("e2e", "frozen_base")
        if mc.enabled:
            require(mc.mode in modes, "mc.mode", f"must be one of {modes}")
        require(0 <= mc.deep_fraction <= 1, "mc.deep_fraction", "must be in [0, 1]")
        require(mc.train_refocus_steps >= 1, "mc.train_refocus_steps", "must be >= 1")


def ignored(config: Group) -> tuple[int, int]:
    """Label ids that are never targets: the tokenizer's PAD and BOS."""
    return config.model.pad_id, config.model.bos_id


def validate_mc(config: Group) -> None:
    """Every group of ``config.mc`` (checked whether or not ``mc.enabled``: decode reads them)."""
    mc, width, seq_len = config.mc, config.model.width, config.data.seq_len
    Layout.validate(mc, seq_len)
    shortest = mc.min_history + mc.scored_tokens + 1  # a passkey is planted into stop + 1 tokens
    require(
        not mc.enabled
        or mc.min_history == 0
        or config.data.passkey_fraction == 0
        or shortest >= 128,
        "mc.min_history",
        f"passkey tasks need sequences of >= 128 tokens: min_history + scored_tokens + 1 is "
        f"{shortest}",
    )
    GistConfig.validate(mc.gist, width, config.model.depth, mc.ingest_chunk)
    LensConfig.validate(mc.lens, width)
    LossWeights.validate(mc, seq_len)
    MCTraining.validate(mc)
    AllocatorConfig.validate(mc.allocator)
