"""decode.py over a persistent memory: decoding, continuing, interactive turns, ingest, errors."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

import decode
from megacontext_jax.data.tokenizer import BOS, ByteTokenizer
from megacontext_jax.memory.manifest import read_manifest
from megacontext_jax.memory.tree import APPEND_PIECE, Tree
from megacontext_jax.testing import random_gister
from megacontext_jax.training.loop import train
from tests.conftest import signal_when, tiny_config, tiny_mc_config

ROOT = Path(__file__).resolve().parents[1]


def _decode(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "decode.py", *map(str, args)],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_decode_grows_a_memory_across_runs(mc_checkpoint, tmp_path):
    memory = tmp_path / "memory"
    common = ["--checkpoint", mc_checkpoint, "--memory", memory, "--temperature", "0"]
    first = _decode(*common, "--prompt", "the quick", "--max-new-tokens", 20)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("the quick")
    lengths = read_manifest(memory)["lengths"]
    assert lengths[0] == 1 + len("the quick") + 20  # BOS, the prompt, every decoded token
    records = [json.loads(l) for l in (memory / "telemetry" / "refocus.jsonl").open()]
    assert records and all(r["count"] <= 24 for r in records)
    assert (memory / "telemetry" / "lod_map.png").is_file()

    second = _decode(*common, "--interactive", "--max-new-tokens", 8, stdin="fox\njumps\n\n")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"memory {memory}: {lengths[0]} tokens" in second.stderr
    assert read_manifest(memory)["lengths"][0] == lengths[0] + len("fox\njumps\n") + 2 * 8

    tree = Tree.open(memory)
    tokens = tree.tokens(0, tree.num_tokens)
    tree.close()
    assert tokens[0] == BOS and ByteTokenizer().decode(tokens[1:10]) == "the quick"
    assert ByteTokenizer().decode(tokens[30:34]) == "fox\n"  # the first turn follows run one


def test_bad_input_is_one_line(mc_checkpoint, tmp_path, capsys, corpus_dir):
    memory = tmp_path / "memory"

    def error(*args):
        assert decode.main([*map(str, args)]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err, err
        return err

    base = ["--checkpoint", mc_checkpoint, "--memory", memory]
    assert error(*base, "--prompt", "") == "error: the prompt is empty"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    assert (
        error(*base, "--prompt-file", bad)
        == f"error: prompt file {bad} is not UTF-8 text (bad byte at 3)"
    )
    assert (
        error("ingest", *base, "--file", bad)
        == f"error: file {bad} is not UTF-8 text (bad byte at 3)"
    )
    assert (
        error(*base, "--prompt", "x\udcff")
        == "error: the prompt holds bytes that are not UTF-8 (at 1)"
    )
    missing = tmp_path / "nope"
    assert error("--checkpoint", missing, "--memory", memory, "--prompt", "x") == (
        f"error: no checkpoint at {missing}: config.json not found"
    )
    other = tiny_mc_config(tmp_path, corpus_dir)
    Tree.create(tmp_path / "other", random_gister(other, seed=7), 2, 320).close()
    assert re.fullmatch(
        r"error: tree at .*other was gisted by other weights .* open it with the checkpoint whose "
        r"GistNet built it\)?",
        error("--checkpoint", mc_checkpoint, "--memory", tmp_path / "other", "--prompt", "x"),
    )
    plain = tmp_path / "plain"
    train(tiny_config(plain, corpus_dir, steps=1), progress=False)
    assert error("--checkpoint", plain, "--memory", memory, "--prompt", "x") == (
        f"error: {plain} holds a plain language model: a memory needs a MegaContext checkpoint "
        "(trained with --config.mc.enabled=true)"
    )
    held = Tree.create(memory, random_gister(other, seed=7), 2, 320)
    try:
        assert re.fullmatch(
            rf"error: tree at {memory} is locked by another writer \(pid {os.getpid()}\)",
            error(*base, "--prompt", "x"),
        )
    finally:
        held.close()


def test_interrupted_ingest_keeps_what_was_committed(mc_checkpoint, tmp_path):
    memory = tmp_path / "memory"
    text = "".join(chr(97 + i % 26) for i in range(10 * APPEND_PIECE))
    big = tmp_path / "big.txt"
    big.write_text(text)
    # Ctrl-C in a terminal: where this runner ignores SIGINT (a shell's background job), the
    # child would inherit that; a handler here is reset to the default action by exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "decode.py",
                "ingest",
                "--checkpoint",
                mc_checkpoint,
                "--memory",
                memory,
                "--file",
                big,
            ],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    one_piece = r"\b(6[5-9]|[7-9]\d|\d{3})\.?\d*k/"  # one piece committed
    status, seen = signal_when(process, one_piece, signal.SIGINT)
    assert status == 130, seen[-2000:]
    assert "interrupted: the memory keeps everything committed so far" in seen
    tree = Tree.open(memory)
    n = tree.num_tokens
    tree.verify()
    stored = tree.tokens(0, n)
    tree.close()
    assert 0 < n < 1 + len(text) and n % APPEND_PIECE == 0
    np.testing.assert_array_equal(stored, ByteTokenizer().encode(text, bos=True)[:n])


def test_non_finite_sampling_parameters_are_refused_before_the_memory_is_touched(
    mc_checkpoint, tmp_path, capsys
):
    memory = tmp_path / "memory"
    base = ["--checkpoint", mc_checkpoint, "--memory", memory, "--prompt", "x"]
    for flag, value, message in (
        ("--temperature", "inf", "error: --temperature must be a finite number >= 0, got inf"),
        ("--temperature", "nan", "error: --temperature must be a finite number >= 0, got nan"),
        ("--top-p", "0", "error: --top-p must be in (0, 1] (1 keeps all), got 0.0"),
    ):
        assert decode.main([*map(str, base), flag, value]) == 2
        assert capsys.readouterr().err.strip() == message
        assert not memory.exists()


def test_ingest_refuses_a_memory_that_lost_its_manifest(mc_checkpoint, tmp_path, capsys):
    memory = tmp_path / "memory"
    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox " * 10)
    args = ["ingest", "--checkpoint", mc_checkpoint, "--memory", memory, "--file", text]
    assert decode.main([*map(str, args)]) == 0
    (memory / "manifest.json").unlink()
    before = sorted((p.name, p.stat().st_size) for p in (memory / "level_0").rglob("*"))
    capsys.readouterr()
    assert decode.main([*map(str, args)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds tree data (level_0, level_1, level_2) but no" in err
    assert sorted((p.name, p.stat().st_size) for p in (memory / "level_0").rglob("*")) == before
