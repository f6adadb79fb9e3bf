"""Every shipped config, and every variant it declares, gets through the checks ``train.py`` runs
before any compute: ``parse_args`` for all of them, and for ``configs/imported.py:DIR`` also the
checkpoint's sizes (``llama.sync_config``) against the MegaContext settings (``validate``), as the
trainer does first. Variants are read from each file's ``VARIANTS``, so new ones are covered."""

from pathlib import Path

import pytest

from megacontext_jax.config import validate
from megacontext_jax.config_files import apply_override, config_module, parse_args
from megacontext_jax.nets.llama import sync_config
from megacontext_jax.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.py"))
NEEDS_ARG = {"imported.py"}  # get_config(hf_path): parsed below with a generated checkpoint


def specs() -> list[str]:
    out = []
    for path in CONFIGS:
        if path.name in NEEDS_ARG:
            continue
        variants = getattr(config_module(str(path)), "VARIANTS", ())
        out += [str(path), *(f"{path}:{variant}" for variant in variants)]
    return out


def test_every_config_file_is_covered():
    assert {p.name for p in CONFIGS} >= {"tiny.py", "small.py", *NEEDS_ARG}
    assert f"{ROOT / 'configs' / 'tiny.py'}:retrieval" in specs()


@pytest.mark.parametrize("spec", specs(), ids=lambda s: Path(s).name)
def test_shipped_config_parses(spec):
    _, rest = parse_args(["--config", spec])
    assert rest == []


def test_imported_config_parses_and_fits_its_checkpoint(hf_dir):
    config, rest = parse_args(["--config", f"{ROOT / 'configs' / 'imported.py'}:{hf_dir}"])
    assert rest == []
    assert (config.model.family, config.mc.mode) == ("llama", "frozen_base")
    assert config.model.hf_path == str(hf_dir)
    sync_config(config)
    validate(config)
    assert (config.model.width, config.model.depth, config.model.num_tokens) == (32, 2, 300)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_points_are_valid_tiny_configs(path):
    for overrides in load_sweep(str(path)):
        config, _ = parse_args(["--config", str(ROOT / "configs" / "tiny.py")])
        for key, value in overrides.items():
            apply_override(config, key, str(value))
        validate(config)
