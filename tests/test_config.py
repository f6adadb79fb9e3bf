import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from megacontext_jax.config import ConfigError, load_config, parse_args
from megacontext_jax.model import GPT, count_params

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def test_overrides_are_typed():
    config, rest = parse_args(
        ["--config", TINY, "--config.train.steps=7000", "--config.train.lr", "0.01", "--x"]
    )
    assert config.train.steps == 7000 and config.train.lr == 0.01
    assert rest == ["--x"]
    config, _ = parse_args([f"--config={TINY}", "--config.distributed=true"])
    assert config.distributed is True


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.train.stpes=3", "unknown config key 'train.stpes'.*did you mean 'train.steps'"),
        ("--config.nope.x=3", "unknown config key 'nope.x'"),
        ("--config.model.width=-8", r"config.model.width: must be positive, got -8"),
        ("--config.model.num_heads=3", "3 heads do not divide model.width=128"),
        ("--config.model.num_kv_heads=3", "config.model.num_kv_heads: 3 does not divide"),
        ("--config.mc.block_size=24", "config.mc.block_size: must be a power of two"),
        ("--config.train.steps=ten", "config.train.steps: expected an integer, got 'ten'"),
        ("--config.model.dtype=float8", "config.model.dtype: must be one of"),
        ("--config.train.optimizer=sgd", "config.train.optimizer: must be one of"),
        ("--config.data.val_fraction=1.5", r"config.data.val_fraction: must be in \(0, 1\)"),
        ("--config.model=3", "config.model is a group of fields"),
        ("--config.mc.sigma_scale=-1", r"config.mc.sigma_scale: must be >= 0, got -1.0"),
        ("--config.mc.deep_fraction=1.5", r"config.mc.deep_fraction: must be in \[0, 1\]"),
        ("--config.mc.loss.lens_weighting=loss", "config.mc.loss.lens_weighting: must be one of"),
        ("--config.data.seq_len=100", "passkey tasks need data.seq_len >= 128, got 100"),
        ("--config.curriculum.steps=99999", r"config.curriculum.steps: must be in \[0, train"),
        ("--config.curriculum.steps=1 --config.curriculum.seq_len=64", "need sequences of >= 128"),
        ("--config.curriculum.steps=1 --config.mc.mode=frozen_base", "keeps frozen"),
        (
            "--config.mc.span_kl.fractions=(0.6,0.5)",
            "config.mc.span_kl.fractions: 512 tokens hold only 31 free level-1 nodes, 38 asked",
        ),
        ("--config.mc.span_kl.fractions=(0.1,0.1,0.1,0.1)", "max_level=3 fractions in"),
        ("--config.data.seq_len=128 --config.mc.span_kl.fractions=(0,0.25)", "make no gist"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", TINY, *override.split()])


def test_tiny_retrieval_variant_changes_only_focus_fields():
    default, _ = parse_args(["--config", TINY])
    retrieval, _ = parse_args(["--config", f"{TINY}:retrieval"])
    assert retrieval.mc.recent_tail < default.mc.recent_tail
    assert retrieval.mc.deep_fraction == 0.5 and retrieval.mc.train_refocus_steps == 3
    assert retrieval.mc.num_random_variants > default.mc.num_random_variants
    assert (default.mc.pyramid, retrieval.mc.pyramid) == ("recent", "proportional")
    changed = {
        "workdir",
        "mc.recent_tail",
        "mc.pyramid",
        "mc.deep_fraction",
        "mc.train_refocus_steps",
        "mc.num_random_variants",
    }

    def flat(c, prefix=""):
        out = {}
        for k, v in c.items():
            out |= flat(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}": v}
        return out

    a, b = flat(default), flat(retrieval)
    assert {k for k in a if a[k] != b[k]} == changed
    with pytest.raises(ConfigError, match="unknown variant 'fast'; known: \\('retrieval',\\)"):
        load_config(f"{TINY}:fast")


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/nope.py")
    with pytest.raises(ConfigError, match="missing --config"):
        parse_args([])


def test_train_cli_reports_one_line_and_exits_before_compute(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--config", TINY, "--config.train.stpes=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'train.stpes': no field 'stpes' under 'train' "
        "(did you mean 'train.steps'?)"
    ]


def test_small_config_is_about_100m_parameters():
    config = load_config(str(ROOT / "configs" / "small.py"))
    model = nnx.eval_shape(lambda: GPT(config.model, rngs=nnx.Rngs(0)))
    n = count_params(nnx.state(model, nnx.Param))
    assert 90e6 < n < 110e6, n
    assert jax.numpy.dtype(config.model.dtype) == jax.numpy.bfloat16
