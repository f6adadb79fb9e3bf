"""The run config: every field with its default (``base_config``), its validation and its JSON.

``validate`` checks every value before any compute; problems raise ``ConfigError`` with one line
naming the field. Config files (``configs/x.py[:arg]``) and ``--config.a.b=v`` overrides are read
by ``config_files``; the one-line meaning of every field, and what ``--help``, ``--print-config``
and the README's table print from it, live in ``config_reference.py``.
"""

import json
import math
from typing import Any

import ml_collections

from megacontext_jax.errors import ConfigError, positive, require
from megacontext_jax.nets.specs import ModelConfig
from megacontext_jax.specs import validate_mc

OPTIMIZERS = ("adamw", "muon")


def base_config() -> ml_collections.ConfigDict:
    """Every field the code reads, with defaults; ``configs/*.py`` start from this and set sizes."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/default"
    c.distributed = False  # multi-process launch: call jax.distributed.initialize() first

    c.model = ml_collections.ConfigDict()
    c.model.family = "gpt"  # "gpt" (trained here) or "llama" (imported from model.hf_path)
    c.model.hf_path = ""  # llama: a local Hugging Face checkpoint directory
    c.model.vocab_size = 320  # the byte tokenizer's 259 ids, padded to a multiple of 64
    c.model.num_tokens = 259  # ids the tokenizer produces (the rest of vocab_size is padding)
    c.model.pad_id, c.model.bos_id, c.model.eos_id = 256, 257, 258
    c.model.width = 128
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 4
    c.model.mlp_ratio = 4
    c.model.rope_theta = 10000.0
    c.model.logit_soft_cap = 15.0  # 0 disables the cap
    c.model.smear_keys = False  # gpt: keys mix in the previous one (learned per-head gate)
    c.model.dtype = "float32"  # activations / matmul inputs
    c.model.param_dtype = "float32"
    # "auto": cuDNN on a GPU (the Pallas kernels where its masks do not reach), the Pallas kernels
    # on a TPU, the jnp reference on CPU; or "reference", "pallas", "cudnn" (kernels/attention.py)
    c.model.attention_impl = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.source = "stdlib"  # "stdlib", a directory of text files, or a .jsonl file
    c.data.jsonl_field = "text"
    c.data.seq_len = 256
    c.data.val_fraction = 0.05  # fraction of documents (by file) held out for validation
    c.data.passkey_fraction = 0.0  # main-phase sequences turned into passkey tasks (tasks.py)
    c.data.repeat_fraction = 0.0  # main-phase sequences with spans written twice (copying)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 16  # global, across all devices and processes
    c.train.optimizer = "adamw"
    c.train.lr = 3e-3
    c.train.warmup_steps = 100
    c.train.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
    c.train.weight_decay = 0.1
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.grad_clip = 1.0
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.eval_batches = 8
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 2

    # A length curriculum: the first ``steps`` steps train the base model alone, as a plain LM on
    # short sequences in big batches, where a small model learns to copy (induction) in hundreds
    # of steps rather than not at all; the rest of the run trains on ``data.seq_len``.
    c.curriculum = ml_collections.ConfigDict()
    c.curriculum.steps = 0  # 0: no curriculum
    c.curriculum.seq_len = 128
    c.curriculum.batch_size = 32  # global, like train.batch_size
    # The curriculum's data mix (data.passkey_fraction / data.repeat_fraction are the main
    # phase's), so the base can practise copying without the MC phase spending its signal on it
    c.curriculum.passkey_fraction = 0.0
    c.curriculum.repeat_fraction = 0.0
    # A workdir whose curriculum this run shares (training/shared_curriculum.py): the run starts
    # at step curriculum.steps from that run's checkpoint there, as if it had trained it itself.
    c.curriculum.reuse_from = ""

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: every device not used by the other axes
    c.mesh.fsdp = 1  # > 1 shards parameters and optimizer state over this many devices

    c.mc = ml_collections.ConfigDict()
    c.mc.block_size = 32  # K: children per gist (DESIGN section 2)
    c.mc.max_level = 4  # coarsest gist level kept in the tree (K^4 = 1M tokens per node at K=32)
    c.mc.sigma_scale = 12**-0.5  # gist RoPE width = sigma_scale * span (std of a uniform span)
    # "absolute": entries at their span's place in time; "slots": at their WC slot, so every
    # distance is below W however long the history (focus.positions).
    c.mc.positions = "absolute"
    c.mc.gist_dtype = "bfloat16"  # storage dtype of gists in the tree
    c.mc.ingest_chunk = 64  # blocks per GistNet call while ingesting (fixed shape, aligned)
    c.mc.wc_size = 512  # W: working-context capacity in entries
    c.mc.recent_tail = 64  # R: the newest R tokens always stay at LOD0
    # The default WC's shape (focus.rules.expand_priority): "proportional" expands the gist
    # with the largest span / (distance + span), which leaves LOD1 gists in the middle for focus
    # to expand; "recent" the newest gist first (more raw tokens). Decode ages it the other way.
    c.mc.pyramid = "proportional"
    c.mc.refocus_every = 0  # decode: tokens between refocus steps (0: every K tokens)

    c.mc.gist = ml_collections.ConfigDict()
    c.mc.gist.depth = 2  # 0: no transformer, the mean-pooled baseline (needs pooling "mean")
    c.mc.gist.num_heads = 4
    c.mc.gist.mlp_ratio = 4
    c.mc.gist.pooling = "query"  # "mean", "query" (learned query) or "cls"
    c.mc.gist.projection = "mlp"  # "linear" or "mlp" into the base model's embedding space
    c.mc.gist.shared_levels = True  # one GistNet for every level, or one per level
    # LOD1's input: 0 reads token embeddings; L >= 1 the base model's residual stream after its
    # first L blocks, from causal passes over read_blocks blocks aligned at absolute block indices
    # (the language model as the encoder; incremental ingest still equals a full rebuild).
    c.mc.gist.read_layer = 0
    c.mc.gist.read_blocks = 8

    c.mc.enabled = False  # train the MegaContext model (base + GistNet + LensNet), not a plain LM
    c.mc.mode = "e2e"  # "e2e": all parts from scratch; "frozen_base": base restored and frozen
    c.mc.base_checkpoint = ""  # frozen_base: workdir of a trained base model
    c.mc.scored_tokens = 32  # S: newest tokens whose predictions every condition scores
    # > 0: each MC training sequence ends at a random point, so its history before the S
    # scored tokens is drawn uniformly from [min_history, T - S] (0: always T - S)
    c.mc.min_history = 0
    c.mc.num_random_variants = 3  # counterfactual variants per training sequence
    # Of training baselines and random variants: deep ones (K tokens under gists brought to LOD0,
    # a level at a time: variants.deep_variant)
    c.mc.deep_fraction = 0.0
    # Of each passkey sequence: the first random variant brings the key's digits to LOD0 where
    # the budget allows, so every such sequence gives LensNet a variant that answers it
    c.mc.needle_variants = False
    c.mc.train_temperature = 0.5  # allocator exploration for the LensNet-guided variant
    c.mc.train_refocus_steps = 1  # refocus rounds that make the guided variant
    c.mc.lens_start = 0  # step at which the LensNet loss switches on
    c.mc.loss = ml_collections.ConfigDict()
    c.mc.loss.lm_tokens = 1.0
    c.mc.loss.lm_wc = 1.0
    c.mc.loss.kl = 1.0
    c.mc.loss.lens = 1.0
    c.mc.loss.lens_margin = 0.002  # nats: smaller loss differences are not preferences
    # Weight of the mean squared LensNet score: a pull towards 0 ("leave as is") that keeps its tanh
    # from saturating.
    c.mc.loss.lens_prior = 0.0
    # Weight of the same preference loss on LensNet's scores of the context after the first
    # refocus round (what it scores in round 2: which child of an expansion to open next); 0 off.
    c.mc.loss.lens_rounds = 0.0
    # Preference pairs weighted alike, or each by its loss gap, what misordering it costs ("gap"
    # needs lens_prior, or the scores saturate).
    c.mc.loss.lens_weighting = "uniform"
    # The KL on the scored tokens with tokens alike, or each weighted by how much the full
    # context beats the window on it (as LongCE): the few tokens distant context predicts.
    c.mc.loss.kl_weighting = "uniform"
    c.mc.loss.pyramid = 0.0  # weight of the pyramid pass (DESIGN 6.2); 0 leaves it out
    c.mc.loss.span_kl = 0.0  # weight of the close-range substitutability pass; 0 leaves it out
    # Weight of the autoencoding term (ICAE, REFRAG): each LOD1 gist, then its span again, read by
    # the base model, which must predict the span's tokens from the gist; 0 leaves it out.
    c.mc.loss.reconstruct = 0.0
    c.mc.span_kl = ml_collections.ConfigDict()
    c.mc.span_kl.fractions = (0.25, 0.25)  # of a sequence's level-1, level-2, ... nodes: gists
    c.mc.span_kl.horizon = 64  # tokens after each gist whose predictions are compared
    c.mc.pyramid_window = 0  # pyramid pass: entries per level band (0: wc_size // (levels + 1))

    c.mc.lens = ml_collections.ConfigDict()
    c.mc.lens.depth = 2
    c.mc.lens.num_heads = 4
    c.mc.lens.mlp_ratio = 4

    c.mc.allocator = ml_collections.ConfigDict()
    # "thresholds": the edits below; "ranked": no thresholds, the best-scoring gist expands
    # while it fits or beats the weakest collapsible group (which collapses to make room)
    c.mc.allocator.mode = "thresholds"
    c.mc.allocator.tau_expand = 0.2  # expand a gist scoring >= tau_expand
    c.mc.allocator.tau_collapse = 0.2  # collapse K siblings whose mean score <= -tau_collapse
    c.mc.allocator.max_edits = 8  # per refocus
    c.mc.allocator.cooldown = 2  # refocus steps before an edited entry may flip back
    c.mc.allocator.temperature = 0.0  # > 0: sample among candidates (exploration in training)
    return c


def leaves(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Every leaf value of ``config`` by dotted key."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out |= {f"{key}.{k}": v for k, v in leaves(value).items()}
        else:
            out[key] = value
    return out


def normalized(value: Any) -> Any:
    """A field's value as it compares after a JSON round trip (tuples come back as lists)."""
    return list(value) if isinstance(value, tuple) else value


def config_diff(
    config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict
) -> dict[str, tuple[Any, Any]]:
    """``{field: (default, value)}`` of the leaf fields where ``config`` differs from ``defaults``."""
    old = leaves(defaults)
    return {
        k: (old.get(k), v)
        for k, v in leaves(config).items()
        if normalized(old.get(k)) != normalized(v)
    }


def _validate_data(d: ml_collections.ConfigDict) -> None:
    positive(d, "data", "seq_len")
    require(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
    require(0.0 <= d.passkey_fraction <= 1.0, "data.passkey_fraction", "must be in [0, 1]")
    require(0.0 <= d.repeat_fraction <= 1.0, "data.repeat_fraction", "must be in [0, 1]")
    require(
        d.passkey_fraction == 0 or d.seq_len >= 128,
        "data.passkey_fraction",
        f"passkey tasks need data.seq_len >= 128, got {d.seq_len}",
    )


def _validate_train(t: ml_collections.ConfigDict) -> None:
    positive(t, "train", "batch_size", "lr", "grad_clip", "log_every", "eval_every")
    positive(t, "train", "eval_batches", "checkpoint_every", "keep_checkpoints")
    require(t.steps >= 0, "train.steps", f"must be >= 0, got {t.steps}")
    require(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
    require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    require(t.optimizer in OPTIMIZERS, "train.optimizer", f"must be one of {OPTIMIZERS}")
    require(math.isfinite(t.lr), "train.lr", "must be finite")


def _validate_curriculum(config: ml_collections.ConfigDict) -> None:
    cur, steps = config.curriculum, config.train.steps
    positive(cur, "curriculum", "seq_len", "batch_size")
    require(
        0 <= cur.steps <= steps,
        "curriculum.steps",
        f"must be in [0, train.steps={steps}], got {cur.steps} (0 turns the curriculum off)",
    )
    for field in ("passkey_fraction", "repeat_fraction"):
        require(0.0 <= cur[field] <= 1.0, f"curriculum.{field}", "must be in [0, 1]")
    require(
        cur.steps == 0 or cur.passkey_fraction == 0 or cur.seq_len >= 128,
        "curriculum.seq_len",
        f"passkey tasks need sequences of >= 128 tokens, got {cur.seq_len}",
    )
    require(
        not cur.reuse_from or cur.steps > 0,
        "curriculum.reuse_from",
        "needs curriculum.steps > 0 (the step it starts from)",
    )
    require(
        cur.steps == 0 or not (config.mc.enabled and config.mc.mode == "frozen_base"),
        "curriculum.steps",
        "trains the base model, which mc.mode=frozen_base keeps frozen",
    )


def _validate_mesh(mesh: ml_collections.ConfigDict) -> None:
    require(mesh.fsdp >= 1, "mesh.fsdp", f"must be >= 1, got {mesh.fsdp}")
    require(
        mesh.data == -1 or mesh.data >= 1,
        "mesh.data",
        f"must be -1 (all remaining devices) or >= 1, got {mesh.data}",
    )


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every value the training and decode code relies on; raises ``ConfigError``.

    One validator per group; the parts' own groups are checked by their typed configs
    (``specs``)."""
    ModelConfig.validate(config.model)
    _validate_data(config.data)
    _validate_train(config.train)
    _validate_curriculum(config)
    validate_mc(config)
    _validate_mesh(config.mesh)


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """A saved config, over today's defaults: fields added since it was written get defaults.
    Raises ``ConfigError`` naming the first field of the wrong type or out of range."""
    config = base_config()

    def merge(node: ml_collections.ConfigDict, saved, prefix: str) -> None:
        if not isinstance(saved, dict):
            where = f"config.{prefix[:-1]}" if prefix else "the config"
            raise ConfigError(f"{where} must be a JSON object, got {saved!r}")
        for key, value in saved.items():
            if key not in node:
                continue  # a field this version no longer has
            if isinstance(node[key], ml_collections.ConfigDict):
                merge(node[key], value, f"{prefix}{key}.")
                continue
            try:
                if value is None and node[key] is not None:
                    raise TypeError  # ConfigDict takes None for any field
                node[key] = value
            except TypeError:
                raise ConfigError(
                    f"config.{prefix}{key}: expected {type(node[key]).__name__}, got {value!r}"
                ) from None

    merge(config, json.loads(text), "")
    config.lock()
    validate(config)
    return config
