"""The config reference: one line per field of ``base_config()``, and what is printed from it.

``FIELDS`` documents every field in one line; ``describe_fields`` (``train.py --help``),
``format_config`` (``--print-config``) and ``markdown_table`` (the README's table, printed by
``python -m megacontext_jax.config_reference --markdown configs/tiny.py``) are made from it, so
the help and the README cannot disagree (tests keep both in step with ``base_config``).
"""

import argparse
import sys
from collections.abc import Sequence

import ml_collections

from megacontext_jax.config import ConfigError, leaves
from megacontext_jax.config_files import load_config

# One line per leaf of ``base_config()``, by dotted key: the reference that ``train.py --help``,
# ``--print-config`` and the README's table are all made from (tests keep it and the README in
# step with ``base_config``). Sections stay contiguous, so each is listed under one heading.
FIELDS: dict[str, str] = {
    "seed": "parameter init and data order",
    "workdir": "checkpoints, config.json, metrics.jsonl, tb/, loss.png; reuse resumes",
    "distributed": "multi-process launch: call jax.distributed.initialize() first",
    "model.family": "gpt (trained here) or llama (imported from model.hf_path)",
    "model.hf_path": "llama: a local Hugging Face directory; its sizes replace model.*",
    "model.vocab_size": "embedding rows: model.num_tokens padded for the accelerator",
    "model.num_tokens": "ids the tokenizer makes (bytes: 256 + PAD, BOS, EOS)",
    "model.pad_id": "padding token id",
    "model.bos_id": "begin-of-document id (every document starts with it)",
    "model.eos_id": "end-of-document id (decoding stops at it)",
    "model.width": "residual width",
    "model.depth": "number of transformer blocks",
    "model.num_heads": "query heads",
    "model.num_kv_heads": "key/value heads (grouped-query attention; divides num_heads)",
    "model.mlp_ratio": "MLP hidden width / width",
    "model.rope_theta": "RoPE base",
    "model.logit_soft_cap": "logits become cap * tanh(logits / cap); 0 disables",
    "model.smear_keys": "gpt: each key mixes in the previous one (a one-layer path to copying)",
    "model.dtype": "activation and matmul-input dtype (bfloat16 on GPU)",
    "model.param_dtype": "parameter dtype",
    "model.attention_impl": "attention implementation: auto (cudnn on a GPU, pallas on a TPU, "
    "reference on CPU), reference, pallas or cudnn",
    "data.source": "stdlib (embedded corpus), a directory of text files, a .jsonl file or one text file",
    "data.jsonl_field": "the text field of JSONL records",
    "data.seq_len": "T: training sequence length in tokens (bytes for the byte tokenizer)",
    "data.val_fraction": "fraction of documents held out for validation (by name)",
    "data.passkey_fraction": "main-phase sequences turned into passkey tasks",
    "data.repeat_fraction": "main-phase sequences with random spans written twice (copying)",
    "train.steps": "optimizer steps, the curriculum's included",
    "train.batch_size": "global batch, divisible by the devices and the processes",
    "train.optimizer": "adamw, or muon (Muon on block matrices, AdamW elsewhere)",
    "train.lr": "peak learning rate",
    "train.warmup_steps": "linear warmup steps, then cosine decay",
    "train.min_lr_ratio": "the cosine decays to lr * min_lr_ratio",
    "train.weight_decay": "AdamW weight decay",
    "train.b1": "Adam beta1",
    "train.b2": "Adam beta2",
    "train.grad_clip": "global gradient-norm clip",
    "train.log_every": "steps between logged metrics",
    "train.eval_every": "steps between validations",
    "train.eval_batches": "batches per validation",
    "train.checkpoint_every": "steps between checkpoints",
    "train.keep_checkpoints": "newest checkpoints kept (and the curriculum's last step)",
    "curriculum.steps": "first steps: the base alone as a plain LM on short sequences; 0: off",
    "curriculum.seq_len": "short sequences, on which a small model learns to copy",
    "curriculum.batch_size": "curriculum global batch (big), like train.batch_size",
    "curriculum.passkey_fraction": "curriculum sequences turned into passkey tasks",
    "curriculum.repeat_fraction": "curriculum sequences with spans written twice (copy practice)",
    "curriculum.reuse_from": "a workdir with this curriculum: start from its last curriculum step",
    "mesh.data": "data-parallel devices (-1: every device the other axes leave)",
    "mesh.fsdp": "> 1 shards parameters and optimizer state over this many devices",
    "mc.enabled": "train the MegaContext model (base, GistNet, LensNet), not a plain LM",
    "mc.mode": "e2e: every part trains; frozen_base: the base is restored and frozen",
    "mc.base_checkpoint": "frozen_base with a gpt base: the workdir of the trained base model",
    "mc.block_size": "K: children per gist (a power of two)",
    "mc.max_level": "coarsest gist level kept in the tree",
    "mc.sigma_scale": "Gaussian-RoPE width of a gist = sigma_scale * span (1/sqrt(12))",
    "mc.positions": "absolute (entries at their span's place in time) or slots (at their WC "
    "slot: distances bounded by W)",
    "mc.gist_dtype": "storage dtype of gists in the tree",
    "mc.ingest_chunk": "blocks per GistNet call while ingesting (a decode refocus gists one)",
    "mc.wc_size": "W: working-context capacity in entries",
    "mc.recent_tail": "R: the newest R context tokens always stay at LOD0",
    "mc.pyramid": "default WC: recent (newest gist expanded first) or proportional",
    "mc.refocus_every": "decode: tokens between refocus steps (0: every K tokens)",
    "mc.scored_tokens": "S: newest tokens of a sequence that every condition scores",
    "mc.min_history": "> 0: training histories drawn from [min_history, T - S] (0: T - S)",
    "mc.num_random_variants": "random expand/collapse variants per training sequence",
    "mc.deep_fraction": "share of baselines and random variants with a block brought to LOD0",
    "mc.needle_variants": "passkey sequences: the first random variant brings the key to LOD0",
    "mc.train_temperature": "allocator exploration of the LensNet-guided variant",
    "mc.train_refocus_steps": "refocus rounds (scores and edits) that make the guided variant",
    "mc.lens_start": "step at which LensNet's loss switches on",
    "mc.pyramid_window": "pyramid pass: entries per level band (0: W / (levels + 1))",
    "mc.loss.lm_tokens": "weight of next-token loss on the raw tokens",
    "mc.loss.lm_wc": "weight of next-token loss on WC entries (label: the token after each)",
    "mc.loss.kl": "weight of KL to the full-token teacher on the scored tokens",
    "mc.loss.lens": "weight of LensNet's preference (Bradley-Terry) loss",
    "mc.loss.lens_margin": "nats: smaller loss differences between variants are no preference",
    "mc.loss.lens_prior": "weight of LensNet's mean squared score (keeps its tanh unsaturated)",
    "mc.loss.lens_rounds": "weight of the preference loss on round-2 contexts (after one refocus)",
    "mc.loss.lens_weighting": "preference pairs count alike (uniform) or by loss gap (gap)",
    "mc.loss.kl_weighting": "uniform, or gap: each scored token's KL weighted by full's gain on it",
    "mc.loss.pyramid": "weight of the pyramid pass (DESIGN 6.2); 0: off",
    "mc.loss.span_kl": "weight of the close-range substitutability pass; 0: off",
    "mc.loss.reconstruct": "weight of the autoencoding term: a span's tokens from its gist; 0: off",
    "mc.span_kl.fractions": "share of level-1, level-2, ... nodes replaced by their gists",
    "mc.span_kl.horizon": "tokens after each gist whose predictions are compared",
    "mc.gist.depth": "GistNet transformer blocks (0: mean-pooled children, the baseline)",
    "mc.gist.num_heads": "GistNet attention heads",
    "mc.gist.mlp_ratio": "GistNet MLP hidden width / width",
    "mc.gist.pooling": "GistNet head: mean, query (a learned query) or cls",
    "mc.gist.projection": "linear or mlp, into the base model's embedding space",
    "mc.gist.shared_levels": "one GistNet for every level, or one per level",
    "mc.gist.read_layer": "LOD1 reads: 0 token embeddings, L the base's stream after L blocks",
    "mc.gist.read_blocks": "blocks per causal base pass a contextual LOD1 reads (aligned)",
    "mc.lens.depth": "LensNet transformer blocks",
    "mc.lens.num_heads": "LensNet attention heads",
    "mc.lens.mlp_ratio": "LensNet MLP hidden width / width",
    "mc.allocator.mode": "thresholds (tau_expand / tau_collapse) or ranked (best gist vs weakest group)",
    "mc.allocator.tau_expand": "expand a gist scoring >= tau_expand",
    "mc.allocator.tau_collapse": "collapse K siblings whose mean score <= -tau_collapse",
    "mc.allocator.max_edits": "edits per refocus",
    "mc.allocator.cooldown": "refocus steps before an edited entry may flip back",
    "mc.allocator.temperature": "> 0: sample among candidates (exploration); 0: greedy",
}


def describe_fields(config: ml_collections.ConfigDict) -> str:
    """``config``'s fields under their section headings, a line each: key, value, meaning."""
    values = leaves(config)
    width = max(map(len, FIELDS))
    lines, section = [], ""  # the top-level fields come first, under no heading
    for key, meaning in FIELDS.items():
        parent = key.rpartition(".")[0]
        if parent != section:
            section = parent
            lines += ["", f"{parent}:"]
        lines.append(f"  {key:<{width}}  {values[key]!r:<16} {meaning}")
    return "\n".join(lines)


def format_config(config: ml_collections.ConfigDict) -> str:
    """``config`` as ``key = value`` lines in ``FIELDS`` order (the values as Python literals)."""
    values = leaves(config)
    return "\n".join(f"{key} = {values[key]!r}" for key in FIELDS)


def markdown_table(config: ml_collections.ConfigDict) -> str:
    """The README's field table: every field with its value in ``config`` and its meaning."""
    values = leaves(config)
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for key, meaning in FIELDS.items():
        cells = (f"`{key}`", f"`{values[key]!r}`", meaning)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megacontext_jax.config_reference",
        description="Prints the README's table of config fields (README.md, train.py section).",
    )
    parser.add_argument(
        "--markdown", metavar="FILE[:ARG]", required=True, help="the config whose defaults it shows"
    )
    args = parser.parse_args(argv)
    try:
        print(markdown_table(load_config(args.markdown)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
