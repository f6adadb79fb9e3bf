"""Typed configs of the networks: the blocks' sizes, the GPT base model, GistNet and LensNet.

Frozen and hashable like every typed config (``specs``); each checks its own group
(``validate``) with one-line ``ConfigError``s.
"""

import dataclasses
import json

from megacontext_jax.errors import Group, positive, require
from megacontext_jax.kernels.attention import IMPLS as ATTENTION_IMPLS

DTYPES = ("float32", "bfloat16", "float16")
POOLINGS = ("mean", "query", "cls")
PROJECTIONS = ("linear", "mlp")


def _even_heads(width: int, heads: int) -> bool:
    return width % heads == 0 and (width // heads) % 2 == 0


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """A stack of transformer blocks (``nets.layers.Block``): the base GPT's, or GistNet's and
    LensNet's at the base model's width."""

    width: int
    depth: int
    num_heads: int
    num_kv_heads: int
    mlp_ratio: int
    rope_theta: float
    dtype: str
    param_dtype: str
    attention_impl: str
    smear_keys: bool = False

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @classmethod
    def sub(cls, model: Group, net: Group) -> "BlockConfig":
        """A small bidirectional net (GistNet, LensNet) at the base model's width: ``net`` gives
        its depth, heads and MLP ratio, the rest follows ``model`` (``config.model``)."""
        return cls(
            width=model.width,
            depth=net.depth,
            num_heads=net.num_heads,
            num_kv_heads=net.num_heads,
            mlp_ratio=net.mlp_ratio,
            rope_theta=model.rope_theta,
            dtype=model.dtype,
            param_dtype=model.param_dtype,
            attention_impl=model.attention_impl,
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig(BlockConfig):
    """The GPT base model (``config.model``, family ``gpt``)."""

    vocab_size: int = 320
    logit_soft_cap: float = 15.0  # 0 disables the cap

    @classmethod
    def from_config(cls, model: Group) -> "ModelConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: model[name] for name in names})

    @staticmethod
    def validate(m: Group) -> None:
        """``config.model``, whatever the family (an imported model's sizes fill it)."""
        families = ("gpt", "llama")
        require(m.family in families, "model.family", f"must be one of {families}")
        require(
            m.family == "gpt" or not m.smear_keys,
            "model.smear_keys",
            "is a gpt option (an imported model keeps its own attention)",
        )
        require(
            m.family != "llama" or bool(m.hf_path),
            "model.hf_path",
            "model.family=llama needs a Hugging Face checkpoint directory",
        )
        require(
            m.attention_impl in ATTENTION_IMPLS,
            "model.attention_impl",
            f"must be one of {ATTENTION_IMPLS}, got {m.attention_impl!r}",
        )
        positive(m, "model", "vocab_size", "width", "depth", "num_heads", "num_kv_heads")
        positive(m, "model", "mlp_ratio", "rope_theta")
        require(
            m.width % m.num_heads == 0,
            "model.num_heads",
            f"{m.num_heads} heads do not divide model.width={m.width}",
        )
        require(
            (m.width // m.num_heads) % 2 == 0, "model.num_heads", "head dim must be even (RoPE)"
        )
        require(
            m.num_heads % m.num_kv_heads == 0,
            "model.num_kv_heads",
            f"{m.num_kv_heads} does not divide model.num_heads={m.num_heads}",
        )
        require(m.logit_soft_cap >= 0, "model.logit_soft_cap", "must be >= 0 (0 disables it)")
        for field in ("dtype", "param_dtype"):
            require(
                m[field] in DTYPES, f"model.{field}", f"must be one of {DTYPES}, got {m[field]!r}"
            )
        require(
            m.vocab_size >= m.num_tokens,
            "model.vocab_size",
            f"{m.vocab_size} is smaller than the tokenizer's {m.num_tokens} ids (model.num_tokens)",
        )


@dataclasses.dataclass(frozen=True)
class GistConfig:
    """GistNet (``config.mc.gist`` and the tree's K and top level)."""

    net: BlockConfig
    block_size: int
    max_level: int
    sigma_scale: float
    pooling: str
    projection: str
    shared_levels: bool
    read_layer: int = 0  # 0: LOD1 reads token embeddings; L: the base's stream after L blocks
    read_blocks: int = 1  # blocks per causal pass of the base that LOD1 reads (read_layer > 0)

    @property
    def contextual(self) -> bool:
        """Whether LOD1 gists read the base model's hidden states (``nets.gistnet``)."""
        return self.read_layer > 0

    @classmethod
    def from_config(cls, config: Group) -> "GistConfig":
        mc = config.mc
        return cls(
            net=BlockConfig.sub(config.model, mc.gist),
            block_size=mc.block_size,
            max_level=mc.max_level,
            sigma_scale=mc.sigma_scale,
            pooling=mc.gist.pooling,
            projection=mc.gist.projection,
            shared_levels=mc.gist.shared_levels,
            read_layer=mc.gist.read_layer,
            read_blocks=mc.gist.read_blocks,
        )

    def settings_json(self) -> str:
        """The ``config.mc.gist`` group as ``config.to_json`` writes it (part of the tree's
        GistNet fingerprint: a tree made by other settings is refused)."""
        net = self.net
        group = {
            "depth": net.depth,
            "mlp_ratio": net.mlp_ratio,
            "num_heads": net.num_heads,
            "pooling": self.pooling,
            "projection": self.projection,
            "shared_levels": self.shared_levels,
        }
        # Only a contextual GistNet names what it reads: trees made before these fields existed
        # read token embeddings, and keep their fingerprint.
        if self.contextual:
            group |= {"read_blocks": self.read_blocks, "read_layer": self.read_layer}
        return json.dumps(group, indent=2, sort_keys=True)

    @staticmethod
    def validate(gist: Group, width: int, base_depth: int, ingest_chunk: int) -> None:
        """``config.mc.gist`` (``base_depth``: ``model.depth``; ``ingest_chunk``:
        ``mc.ingest_chunk``, which the causal passes of a contextual GistNet must tile)."""
        require(gist.depth >= 0, "mc.gist.depth", f"must be >= 0, got {gist.depth}")
        require(
            0 <= gist.read_layer <= base_depth,
            "mc.gist.read_layer",
            f"must be in [0, model.depth={base_depth}] (0: token embeddings), got {gist.read_layer}",
        )
        positive(gist, "mc.gist", "read_blocks")
        require(
            gist.read_layer == 0 or ingest_chunk % gist.read_blocks == 0,
            "mc.gist.read_blocks",
            f"{gist.read_blocks} must divide mc.ingest_chunk={ingest_chunk} (an ingest call holds "
            "whole causal passes)",
        )
        positive(gist, "mc.gist", "num_heads", "mlp_ratio")
        require(gist.pooling in POOLINGS, "mc.gist.pooling", f"must be one of {POOLINGS}")
        # Depth 0 is the mean-pooled baseline: a learned query over children no block has mixed
        # is another model, and a cls entry that nothing attends to would carry no input at all.
        require(
            gist.depth > 0 or gist.pooling == "mean",
            "mc.gist.pooling",
            f"must be 'mean' with mc.gist.depth=0 (no transformer blocks), got {gist.pooling!r}",
        )
        require(
            gist.projection in PROJECTIONS,
            "mc.gist.projection",
            f"must be one of {PROJECTIONS}",
        )
        require(
            _even_heads(width, gist.num_heads),
            "mc.gist.num_heads",
            f"{gist.num_heads} heads must divide model.width={width} into even head dims",
        )


@dataclasses.dataclass(frozen=True)
class LensConfig:
    """LensNet (``config.mc.lens``; its features read K, the top level and the position mode)."""

    net: BlockConfig
    block_size: int
    max_level: int
    position_mode: str = "absolute"  # focus.positions.MODES: how distances are measured

    @classmethod
    def from_config(cls, config: Group) -> "LensConfig":
        mc = config.mc
        net = BlockConfig.sub(config.model, mc.lens)
        return cls(net, mc.block_size, mc.max_level, mc.positions)

    @staticmethod
    def validate(lens: Group, width: int) -> None:
        positive(lens, "mc.lens", "depth", "num_heads", "mlp_ratio")
        require(
            _even_heads(width, lens.num_heads),
            "mc.lens.num_heads",
            f"{lens.num_heads} heads must divide model.width={width} into even head dims",
        )
