import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_runs_grid_and_tabulates(tmp_path, corpus_dir):
    sweep_file = tmp_path / "two.py"
    sweep_file.write_text(
        'def sweep():\n    return [{"mc.gist.pooling": "mean"}, {"mc.gist.pooling": "cls"}]\n'
    )
    cmd = [
        sys.executable,
        "-m",
        "megacontext_jax.sweep",
        "--config",
        "configs/tiny.py",
        "--sweep",
        str(sweep_file),
        "--root",
        str(tmp_path / "runs"),
        "--lengths",
        "4",
        "--docs",
        "2",
        "--probes",
        "2",
        f"--config.data.source={corpus_dir}",
        "--config.data.val_fraction=0.2",
        "--config.data.passkey_fraction=0",
        "--config.data.seq_len=64",
        "--config.train.steps=2",
        "--config.curriculum.steps=0",
        "--config.train.batch_size=2",
        "--config.train.eval_batches=1",
        "--config.model.width=32",
        "--config.model.depth=1",
        "--config.mc.block_size=4",
        "--config.mc.max_level=2",
        "--config.mc.wc_size=24",
        "--config.mc.recent_tail=4",
        "--config.mc.scored_tokens=4",
        "--config.mc.gist.num_heads=2",
        "--config.mc.lens.num_heads=2",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "runs" / "results.csv").open()))
    assert [r["mc.gist.pooling"] for r in rows] == ["mean", "cls"]
    assert all(float(r["4W mc_static nll"]) > 0 for r in rows)
    assert (tmp_path / "runs" / "results.md").read_text().startswith("| mc.gist.pooling |")
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert (
        again.returncode == 0 and "val loss" not in again.stdout
    )  # finished runs are not repeated
    bad = subprocess.run(
        [*cmd[:-1], "--config.mc.gist.pooling=max"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "config.mc.gist.pooling: must be one of" in bad.stderr
