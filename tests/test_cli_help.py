"""The CLIs explain themselves: ``--help`` is plain text, lists subcommands, shows defaults."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import decode
from megacontext_jax.evaluation import cli as evaluation_cli
from megacontext_jax.memory import tree

ROOT = Path(__file__).resolve().parents[1]


def help_text(capsys, argv: list[str], main=tree.main) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_decode_help_shows_the_ingest_subcommand_and_defaults(capsys):
    out = help_text(capsys, ["--help"], decode.main)
    assert "decode.py ingest --checkpoint DIR --memory MEMDIR --file FILE" in out
    for option, default in (("--max-new-tokens", 256), ("--temperature", 0.8), ("--top-p", 1.0)):
        assert re.search(rf"{option} \S+\s+.*?\(default: {default}\)", out, re.S), option
    assert "(default: None)" not in out
    ingest = help_text(capsys, ["ingest", "--help"], decode.main)
    assert ingest.startswith("usage: decode.py ingest")


def test_evaluation_help_shows_defaults(capsys):
    out = help_text(capsys, ["--help"], evaluation_cli.main)
    assert "(default: 4,8,16)" in out and "(default: 512)" in out
    assert "--quick" in out and "windows=48" in out  # what --quick changes


@pytest.mark.parametrize(
    "command",
    [
        "megacontext-train",
        "megacontext-decode",
        "megacontext-eval",
        "megacontext-sweep",
        "megacontext-tree",
    ],
)
def test_console_entry_points_work_from_any_directory(tmp_path, command):
    script = Path(sys.executable).with_name(command)
    if not script.exists():
        pytest.skip(f"{command} is not installed beside {sys.executable}")
    result = subprocess.run(
        [str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:")


def test_train_entry_point_finds_the_shipped_configs_from_any_directory(tmp_path):
    script = Path(sys.executable).with_name("megacontext-train")
    if not script.exists():
        pytest.skip(f"megacontext-train is not installed beside {sys.executable}")
    result = subprocess.run(
        [str(script), "--config", "configs/tiny.py:quick", "--print-config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "workdir = 'runs/tiny_quick'" in result.stdout.splitlines()


def test_tree_help_is_plain_text_and_lists_both_commands(capsys):
    out = help_text(capsys, ["--help"])
    assert "``" not in out and "Tree.in_memory" not in out  # no reST from the module docstring
    assert re.search(r"\n\s+verify\s+check every invariant", out), out
    assert re.search(r"\n\s+stats\s+print levels, lengths and bytes per token", out), out


@pytest.mark.parametrize("command", ["verify", "stats"])
def test_each_tree_command_has_its_own_help(capsys, command):
    out = help_text(capsys, [command, "--help"])
    assert out.startswith(f"usage: python -m megacontext_jax.memory.tree {command} [-h] DIR")
    assert re.search(r"\n\s+DIR\s+the tree's directory", out), out
