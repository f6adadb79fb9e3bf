"""Config loading, overrides and validation; the field reference (``FIELDS``) against
``base_config()`` and the README; ``train.py``'s one-line errors, ``--help`` and ``--print-config``."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from megacontext_jax.config import ConfigError, base_config, leaves
from megacontext_jax.config_files import load_config, parse_args
from megacontext_jax.config_reference import FIELDS, format_config, markdown_table
from megacontext_jax.nets.decoder import count_params
from megacontext_jax.nets.gpt import GPT
from megacontext_jax.nets.specs import ModelConfig

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
        ("--config.mc.positions=relative", "config.mc.positions: must be one of"),
        ("--config.mc.min_history=600", r"config.mc.min_history: must be 0 or in \(mc.recent_tail"),
        ("--config.mc.min_history=40", "passkey tasks need sequences of >= 128 tokens: min_hist"),
        (
            "--config.mc.positions=slots --config.mc.loss.pyramid=0.5",
            "config.mc.loss.pyramid: needs mc.positions='absolute' .* got 'slots'",
        ),
        ("--config.mc.deep_fraction=1.5", r"config.mc.deep_fraction: must be in \[0, 1\]"),
        ("--config.mc.loss.lens_weighting=loss", "config.mc.loss.lens_weighting: must be one of"),
        ("--config.mc.loss.lens_rounds=1", "lens_rounds: needs mc.train_refocus_steps >= 2"),
        ("--config.data.seq_len=100", "passkey tasks need data.seq_len >= 128, got 100"),
        ("--config.curriculum.steps=99999", r"config.curriculum.steps: must be in \[0, train"),
        ("--config.curriculum.steps=1 --config.curriculum.seq_len=64", "need sequences of >= 128"),
        ("--config.curriculum.steps=1 --config.mc.mode=frozen_base", "keeps frozen"),
        (
            "--config.curriculum.steps=0 --config.curriculum.reuse_from=runs/tiny",
            r"config.curriculum.reuse_from: needs curriculum.steps > 0",
        ),
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
    a, b = leaves(default), leaves(retrieval)
    assert {k for k in a if a[k] != b[k]} == changed
    with pytest.raises(
        ConfigError,
        match="unknown variant 'fast'; known: \\('retrieval', 'quick', 'mean_gist', 'contextual', 'wide'\\)",
    ):
        load_config(f"{TINY}:fast")


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/nope.py")
    with pytest.raises(ConfigError, match="missing --config"):
        parse_args([])


def test_config_file_with_a_misspelt_field_is_one_line(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        "from megacontext_jax.config import base_config\n\n\n"
        "def get_config():\n    c = base_config()\n    c.train.stpes = 3\n    return c\n"
    )
    with pytest.raises(
        ConfigError, match=f"{path}: unknown config key 'train.stpes'.*'train.steps'"
    ):
        load_config(str(path))
    path.write_text(
        "import ml_collections\n\n\ndef get_config():\n    return ml_collections.ConfigDict()\n"
    )
    with pytest.raises(ConfigError, match=r"config.curriculum.batch_size is missing \(start from"):
        load_config(str(path))


def test_every_field_has_one_line_of_documentation():
    assert set(FIELDS) == set(leaves(base_config()))
    assert all(meaning and "\n" not in meaning for meaning in FIELDS.values())
    sections = [key.rpartition(".")[0] for key in FIELDS]
    runs = [s for i, s in enumerate(sections) if i == 0 or s != sections[i - 1]]
    assert len(runs) == len(set(runs)), f"a section's fields are not contiguous in FIELDS: {runs}"


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_readme_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### `train.py`", 1)[1].split("\n### ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    regenerate = "python -m megacontext_jax.config_reference --markdown configs/tiny.py"
    assert table == markdown_table(load_config(TINY)), f"README.md is stale: paste {regenerate}"
    result = cli("-m", "megacontext_jax.config_reference", "--markdown", "configs/tiny.py")
    assert (result.returncode, result.stdout.strip()) == (0, table)


def test_train_cli_reports_one_line_and_exits_before_compute():
    result = cli("train.py", "--config", TINY, "--config.train.stpes=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'train.stpes': no field 'stpes' under 'train' "
        "(did you mean 'train.steps'?)"
    ]
    result = cli("train.py", "--config", TINY, "--print-config", "--bogus")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.strip().splitlines() == ["error: unexpected arguments: --bogus"]


@pytest.mark.parametrize("spec", [None, TINY])
def test_train_help_lists_every_field_with_its_default(spec):
    config = load_config(spec) if spec else base_config()
    result = cli("train.py", *(["--config", spec] if spec else []), "--help")
    assert (result.returncode, result.stderr) == (0, "")
    out = result.stdout
    assert out.startswith("usage: python train.py --config FILE[:ARG] [--config.FIELD=VALUE ...]")
    assert f"fields (defaults of {spec or 'base_config()'}" in out
    listed = {}  # key -> "value  meaning"
    for line in out.splitlines():
        key, _, rest = line.strip().partition(" ")
        if key in FIELDS:
            listed[key] = rest.strip()
    assert list(listed) == list(FIELDS)
    for key, value in leaves(config).items():
        assert listed[key].startswith(f"{value!r} ") and listed[key].endswith(FIELDS[key]), key
    assert "\nmc.gist:\n" in out  # grouped under section headings


def test_train_print_config_is_the_resolved_config_without_compute():
    args = ["--config", TINY, "--config.train.steps=7000", "--config.mc.pyramid=proportional"]
    # A backend that cannot start: any compute would fail.
    result = cli("train.py", *args, "--print-config", JAX_PLATFORMS="no_such_platform")
    assert (result.returncode, result.stderr) == (0, "")
    config, _ = parse_args(args)
    assert result.stdout == format_config(config) + "\n"
    assert (
        "train.steps = 7000\n" in result.stdout and "mc.pyramid = 'proportional'\n" in result.stdout
    )


def test_small_config_is_about_100m_parameters():
    config = load_config(str(ROOT / "configs" / "small.py"))
    model = nnx.eval_shape(lambda: GPT(ModelConfig.from_config(config.model), rngs=nnx.Rngs(0)))
    n = count_params(nnx.state(model, nnx.Param))
    assert 90e6 < n < 110e6, n
    assert jax.numpy.dtype(config.model.dtype) == jax.numpy.bfloat16
