import csv
import importlib
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megacontext_jax import sweep

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_runs_grid_and_tabulates(tmp_path, corpus_dir, capsys, monkeypatch):
    """One real run, trained and evaluated through the CLI (grids of several runs, their order
    and their tables are the fake-stack tests' below)."""
    sweep_file = tmp_path / "one.py"
    sweep_file.write_text('def sweep():\n    return [{"mc.gist.pooling": "cls"}]\n')
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
        "--windows",
        "2",
        "--probes",
        "2",
        "--batch",
        "2",
        "--refocus-steps",
        "1",
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
        "--config.mc.loss.span_kl=0",  # a second objective: a bigger step to compile
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "runs" / "results.csv").open()))
    assert [r["mc.gist.pooling"] for r in rows] == ["cls"]
    assert float(rows[0]["4W mc_static nll"]) > 0
    assert math.isfinite(float(rows[0]["4W mc_static - window se"]))
    assert (tmp_path / "runs" / "results.md").read_text().startswith("| mc.gist.pooling |")
    # The CLI ran above; the same command line again, and a bad one, through its main() here
    # (what ``python -m megacontext_jax.sweep`` exits with), without starting two more Pythons.
    monkeypatch.chdir(ROOT)
    capsys.readouterr()

    def train_again(config, **_):
        raise AssertionError(f"{config.workdir} was finished and is trained again")

    monkeypatch.setattr(
        importlib.import_module("megacontext_jax.training.loop"), "train", train_again
    )
    assert sweep.main(cmd[3:]) == 0
    assert "val loss" not in capsys.readouterr().out  # finished runs are not repeated
    assert sweep.main([*cmd[3:-1], "--config.mc.gist.pooling=max"]) == 2
    assert "config.mc.gist.pooling: must be one of" in capsys.readouterr().err


# -- fast tests: training, restoring and evaluation replaced by instant fakes -------------------


class FakeStack:
    """Stands in for ``train``, ``load_model`` and ``evaluate``: records the workdirs, seeds and
    reused curricula trained and raises ``raises[(stage, config.train.lr)]`` where one is set."""

    def __init__(self):
        self.trained: list[str] = []
        self.seeds: list[int] = []
        self.reused: list[str] = []
        self.raises: dict[tuple[str, float], BaseException] = {}

    def _maybe_raise(self, stage: str, config) -> None:
        if (stage, config.train.lr) in self.raises:
            raise self.raises[stage, config.train.lr]

    def train(self, config, **_):
        self.trained.append(Path(config.workdir).name)
        self.seeds.append(config.seed)
        self.reused.append(Path(config.curriculum.reuse_from).name)
        Path(config.workdir).mkdir(parents=True, exist_ok=True)
        self._maybe_raise("train", config)
        return {"val/bpb": 10.0 * config.mc.gist.depth + config.mc.lens.depth + config.seed}

    def load_model(self, workdir):
        return "model", None

    def evaluate(self, model, config, docs, protocol, **_):
        self._maybe_raise("evaluate", config)
        nll = {"nll": {"mean": config.train.lr}, "key_nll": {"mean": 2 * config.train.lr}}
        text = {"conditions": {"mc_static": nll}, "gap_recovered": {"all": {}}}
        return {"text": {f"{protocol.lengths[0]}W": text}, "retrieval": {}}


@pytest.fixture
def stack(monkeypatch):
    fake = FakeStack()
    # The modules sweep.run_one imports from.
    for module, name in (
        ("training.loop", "train"),
        ("training.restore", "load_model"),
        ("evaluation", "evaluate"),  # sweep.run_one imports it from the package
    ):
        monkeypatch.setattr(
            importlib.import_module(f"megacontext_jax.{module}"), name, getattr(fake, name)
        )
    monkeypatch.chdir(ROOT)
    return fake


def run_sweep(tmp_path, corpus_dir, runs: list[dict], *extra: str) -> int:
    sweep_file = tmp_path / "grid.py"
    sweep_file.write_text(f"def sweep():\n    return {runs!r}\n")
    return sweep.main(
        [
            *("--config", "configs/tiny.py", "--sweep", str(sweep_file)),
            *("--root", str(tmp_path / "runs"), "--lengths", "4"),
            f"--config.data.source={corpus_dir}",
            "--config.data.val_fraction=0.2",
            *extra,
        ]
    )


def table(tmp_path, name: str = "results") -> list[dict]:
    return list(csv.DictReader((tmp_path / "runs" / f"{name}.csv").open()))


def test_a_row_holds_the_paired_differences_with_their_se():
    d = {"mean": 0.02, "se": 0.004}
    text = {
        "conditions": {},
        "gap_recovered": {"all": {}},
        "differences": {"mc_static - window": {"all": d}, "full - window": {"all": d}},
    }
    row = sweep.results_row({"k": 1}, {}, {"text": {"8W": text}, "retrieval": {}})
    assert row == {"k": 1, "8W mc_static - window": 0.02, "8W mc_static - window se": 0.004}


def test_run_names_are_unique_per_override_set():
    assert sweep.run_name({"mc.gist.depth": 2}) == "mc.gist.depth=2"
    assert sweep.run_name({"mc.lens.depth": 2}) == "mc.lens.depth=2"
    assert sweep.run_name({"train.lr": 3e-3}) != sweep.run_name({"train.lr": 0.0030001})
    assert sweep.run_name({"a.x": 1, "b.y": 2}) == sweep.run_name({"b.y": 2, "a.x": 1})
    unsafe = sweep.run_name({"data.source": "/data/my corpus", "mc.gist.depth": 2})
    assert unsafe == "data.source=_data_my_corpus,mc.gist.depth=2-761e3aba"  # stable across runs
    long = {f"mc.gist.option_{i}": "value" for i in range(8)}
    name = sweep.run_name(long)
    assert len(name) <= sweep.NAME_MAX and re.fullmatch(r"[A-Za-z0-9._+=,-]+-[0-9a-f]{8}", name)
    assert name != sweep.run_name({**long, "mc.gist.option_7": "other"})


def test_runs_differing_in_a_parent_key_get_their_own_workdirs(tmp_path, corpus_dir, stack):
    assert run_sweep(tmp_path, corpus_dir, [{"mc.gist.depth": 3}, {"mc.lens.depth": 3}]) == 0
    assert stack.trained == ["mc.gist.depth=3", "mc.lens.depth=3"]
    assert [float(r["val/bpb"]) for r in table(tmp_path)] == [32.0, 23.0]
    assert "seed" not in table(tmp_path)[0]  # one seed: the tables of before --seeds
    assert not (tmp_path / "runs" / "results_by_config.csv").exists()


def test_one_seed_keeps_the_run_names_and_several_get_a_seed_part_each():
    runs = [{"mc.gist.depth": 3}, {}]
    assert sweep.seed_runs(runs, 7, 1) == [("mc.gist.depth=3", runs[0]), ("base", {})]
    assert sweep.seed_runs(runs, 7, 2) == [
        ("mc.gist.depth=3,seed=7", {"mc.gist.depth": 3, "seed": 7}),
        ("mc.gist.depth=3,seed=8", {"mc.gist.depth": 3, "seed": 8}),
        ("base,seed=7", {"seed": 7}),
        ("base,seed=8", {"seed": 8}),
    ]


def test_seeds_run_apart_resume_and_are_tabulated_by_config(tmp_path, corpus_dir, stack, capsys):
    runs = [{"train.lr": 0.001}, {"train.lr": 0.002}]
    assert run_sweep(tmp_path, corpus_dir, runs, "--seeds", "3", "--config.seed=5") == 0
    assert stack.trained == [f"train.lr={lr},seed={s}" for lr in (0.001, 0.002) for s in (5, 6, 7)]
    assert stack.seeds == [5, 6, 7] * 2
    rows = table(tmp_path)
    assert [r["seed"] for r in rows] == ["5", "6", "7"] * 2
    by_config = table(tmp_path, "results_by_config")
    assert [(r["train.lr"], r["seeds"], r["failed"], r["n"]) for r in by_config] == [
        ("0.001", "3", "0", "3"),
        ("0.002", "3", "0", "3"),
    ]
    # val/bpb is the fake's constant + seed: mean that of seed 6, std 1.
    assert float(by_config[0]["val/bpb mean"]) == float(rows[1]["val/bpb"])
    assert float(by_config[0]["val/bpb std"]) == 1.0
    assert float(by_config[0]["val/bpb se"]) == pytest.approx(1 / math.sqrt(3))
    assert float(by_config[1]["4W mc_static nll mean"]) == 0.002
    assert "| train.lr | seeds | failed | n | val/bpb mean |" in capsys.readouterr().out
    stack.trained.clear()
    assert run_sweep(tmp_path, corpus_dir, runs, "--seeds", "3", "--config.seed=5") == 0
    assert stack.trained == []  # every seed run finished: none is repeated
    assert run_sweep(tmp_path, corpus_dir, [{"seed": 1}], "--seeds", "2") == 2
    err = capsys.readouterr().err
    assert err == "error: --seeds 2 sets every run's seed, but run 1 of sweep() sets seed itself\n"


def test_runs_share_the_curriculum_of_the_first_run_that_trains_it(tmp_path, corpus_dir, stack):
    runs = [{}, {"mc.lens.depth": 3}, {"train.lr": 0.001}, {"data.repeat_fraction": 0.25}]
    assert run_sweep(tmp_path, corpus_dir, runs, "--seeds", "2", "--share-curriculum") == 0
    trained = dict(zip(stack.trained, stack.reused, strict=True))
    assert trained == {
        "base,seed=0": "",
        "base,seed=1": "",
        "mc.lens.depth=3,seed=0": "base,seed=0",
        "mc.lens.depth=3,seed=1": "base,seed=1",
        "train.lr=0.001,seed=0": "",  # the optimizer shapes the curriculum too
        "train.lr=0.001,seed=1": "",
        "data.repeat_fraction=0.25,seed=0": "base,seed=0",  # the main phase's data mix only
        "data.repeat_fraction=0.25,seed=1": "base,seed=1",
    }
    stack.reused.clear()
    (tmp_path / "plain").mkdir()
    assert run_sweep(tmp_path / "plain", corpus_dir, runs[1:2]) == 0
    assert stack.reused == [""]  # without the flag every run trains its own curriculum


def test_aggregate_leaves_failed_runs_out_of_the_statistics():
    rows = [
        {"train.lr": 0.01, "seed": 0, "val/bpb": 1.0, "4W full nll": 2, "note": "x"},
        {"train.lr": 0.01, "seed": 1, "val/bpb": 2.0, "4W full nll": 4},
        {"train.lr": 0.01, "seed": 2, "error": "RuntimeError: boom"},
        {"train.lr": 0.01, "seed": 3, "val/bpb": 6.0, "4W full nll": 6},
    ]
    assert sweep.aggregate({"train.lr": 0.01}, rows) == pytest.approx(
        {
            **{"train.lr": 0.01, "seeds": 4, "failed": 1, "n": 3},
            **{"val/bpb mean": 3.0, "val/bpb std": math.sqrt(7), "val/bpb se": math.sqrt(7 / 3)},
            **{"4W full nll mean": 4.0, "4W full nll std": 2.0},
            "4W full nll se": 2 / math.sqrt(3),
        }
    )
    one = sweep.aggregate({}, [{"seed": 0, "m": 1.5}, {"seed": 1, "error": "E"}])
    assert (one["n"], one["m mean"]) == (1, 1.5) and math.isnan(one["m std"])
    assert sweep.aggregate({}, [{"seed": 0, "error": "E"}]) == {"seeds": 1, "failed": 1, "n": 0}


@pytest.mark.parametrize(
    "runs",
    [
        [{"mc.gist.depth": 3}, {"train.lr": 0.01}, {"mc.gist.depth": 3}],
        [{"train.lr": 0.01, "mc.gist.depth": 3}, {"mc.gist.depth": "3", "train.lr": 0.01}],
    ],
)
def test_an_override_set_listed_twice_is_refused(tmp_path, corpus_dir, stack, capsys, runs):
    assert run_sweep(tmp_path, corpus_dir, runs) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: sweep\(\) in .* lists the same overrides twice .*\n", err), err
    assert stack.trained == []


def test_a_failed_run_is_tabulated_and_the_sweep_goes_on(tmp_path, corpus_dir, stack, capsys):
    from megacontext_jax.data.pipeline import DataError

    runs = [{"train.lr": lr} for lr in (0.001, 0.002, 0.003, 0.004)]
    stack.raises[("train", 0.002)] = RuntimeError("boom\nsecond line")
    stack.raises[("evaluate", 0.003)] = DataError("no held-out documents")
    assert run_sweep(tmp_path, corpus_dir, runs) == 1
    err = capsys.readouterr().err
    errors = ["", "RuntimeError: boom", "DataError: no held-out documents", ""]
    assert [r["error"] for r in table(tmp_path)] == errors
    assert [r["4W mc_static nll"] for r in table(tmp_path)] == ["0.001", "", "", "0.004"]
    assert "| RuntimeError: boom |" in (tmp_path / "runs" / "results.md").read_text()
    assert "2 of 4 runs failed" in err and "  train.lr=0.003: DataError" in err
    assert err.count("Traceback") == 1  # only the unexpected error's
    # Failed runs are not marked finished: the same command retries them, and only them.
    stack.raises.clear()
    stack.trained.clear()
    assert run_sweep(tmp_path, corpus_dir, runs) == 0
    assert stack.trained == ["train.lr=0.002", "train.lr=0.003"]
    assert [r.get("error", "") for r in table(tmp_path)] == [""] * 4


def test_an_interrupt_stops_the_sweep(tmp_path, corpus_dir, stack, capsys):
    stack.raises[("train", 0.001)] = KeyboardInterrupt()
    assert run_sweep(tmp_path, corpus_dir, [{"train.lr": 0.001}, {"train.lr": 0.002}]) == 130
    assert stack.trained == ["train.lr=0.001"]
    assert "interrupted" in capsys.readouterr().err


def test_help_shows_the_config_flags_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0
    assert "--config PATH[:ARG]" in out and "--config.FIELD=VALUE" in out
    assert "multiples of W (default: 8)" in out and "windows per length (default: 64)" in out
    assert "per task and length (default: 16)" in out
    assert "(default: runs/sweep_<sweep file stem>)" in out
    assert "seeds config.seed + 0..N-1" in out and "per override set (default: 1)" in out
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--config", "configs/tiny.py", "--sweep", "x.py", "--seeds", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert "--seeds: must be an integer >= 1, got '0'" in err
