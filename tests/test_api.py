"""The Python API (``import megacontext_jax as mcj``): loading, sessions, sampling, the README's
example."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import megacontext_jax as mcj
from megacontext_jax.data.tokenizer import HFTokenizer
from megacontext_jax.memory.tree import Tree
from megacontext_jax.runtime.sampling import sample_logits

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## From Python") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(mc_checkpoint, tmp_path):
    """The README's "From Python" block, as written, on a trained run at its path."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(mc_checkpoint)
    result = subprocess.run(
        [sys.executable, "-c", readme_example()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"\d+ tokens in the memory", lines[-3]), result.stdout
    assert lines[-1].endswith("nats/token")
    tree = Tree.open(mc_checkpoint / "memory")
    assert tree.num_tokens == int(lines[-3].split()[0])  # everything decoded was committed
    tree.close()


def test_a_session_commits_and_releases_the_memory_on_an_exception(mc_checkpoint, tmp_path):
    model = mcj.load(mc_checkpoint)
    memory = tmp_path / "memory"
    with pytest.raises(RuntimeError, match="boom"), model.session(memory) as s:
        s.ingest_text("the quick")
        ids = list(s.stream_ids(max_new_tokens=5, temperature=0))
        raise RuntimeError("boom")
    with model.session(memory) as again:  # the lock was released
        assert again.num_tokens == 1 + len("the quick") + len(ids)
        with pytest.raises(mcj.TreeError, match="locked by another writer"):
            model.session(memory)
    with pytest.raises(mcj.SessionError, match="is closed"):
        again.ingest_text("x")


def test_text_and_ids_agree(mc_checkpoint, tmp_path):
    model = mcj.load(mc_checkpoint)
    assert model.is_megacontext and model.step == 3
    ids = model.tokenizer.encode("the qu", bos=True)
    greedy = list(model.stream_ids(ids, max_new_tokens=12, temperature=0))
    assert model.generate("the qu", max_new_tokens=12, temperature=0) == model.tokenizer.decode(
        greedy
    )
    with model.session(tmp_path / "a") as a, model.session(tmp_path / "b") as b:
        text = a.generate("fox", max_new_tokens=10, temperature=0)
        assert text == model.tokenizer.decode(b.stream_ids(b.encode("fox"), **_greedy(10)))


def _greedy(n: int) -> dict:
    return {"max_new_tokens": n, "temperature": 0}


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0, got inf"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
        ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
    ],
)
def test_bad_sampling_parameters_are_one_line_errors(mc_checkpoint, tmp_path, sampling, message):
    model = mcj.load(mc_checkpoint)
    with pytest.raises(ValueError, match=message):
        model.generate("x", **sampling)
    with model.session(tmp_path / "memory") as s:
        s.ingest_text("the quick")
        before = s.num_tokens
        with pytest.raises(ValueError, match=message):
            s.generate(**sampling)
        assert s.num_tokens == before  # nothing was sampled into the memory


def test_top_p_keeps_the_smallest_set_holding_that_mass():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    allowed = jnp.ones(4, bool)
    draws = {
        top_p: {
            int(sample_logits(logits, jax.random.key(i), allowed, 1.0, 0, top_p)[0])
            for i in range(200)
        }
        for top_p in (0.5, 0.6, 0.9, 1.0)
    }
    assert draws == {0.5: {0}, 0.6: {0, 1}, 0.9: {0, 1, 2}, 1.0: {0, 1, 2, 3}}


def test_a_hugging_face_directory_loads_as_a_plain_decoder(hf_dir, tmp_path):
    model = mcj.load(hf_dir)
    assert not model.is_megacontext and model.step is None
    text = model.generate("the quick", max_new_tokens=8, temperature=0)
    assert isinstance(text, str)
    with pytest.raises(mcj.SessionError, match="holds a plain language model"):
        model.session(tmp_path / "memory")


def test_hf_streaming_decode_equals_a_whole_decode(hf_dir):
    tokenizer = HFTokenizer(hf_dir, pad_id=1, bos_id=0, eos_id=1)
    text = "naïve café — the quick brown fox 🦊 jumps"
    ids = tokenizer.encode(text)
    feed = tokenizer.stream_decoder()
    assert "".join(feed(i) for i in ids) == tokenizer.decode(ids) == text


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(mcj.CheckpointError, match=f"^no checkpoint at {tmp_path}: config.json"):
        mcj.load(tmp_path)


def test_a_token_decoding_may_not_draw_is_never_committed(mc_checkpoint, tmp_path, monkeypatch):
    from megacontext_jax.runtime import session as session_module

    model = mcj.load(mc_checkpoint)
    with model.session(tmp_path / "memory") as s:
        s.ingest_text("the quick")
        before = s.num_tokens
        pad = model.config.model.pad_id
        monkeypatch.setattr(session_module, "_sample", lambda *a: jnp.array([pad]))
        with pytest.raises(mcj.SessionError, match=f"drew id {pad}, which is not a token"):
            s.generate(max_new_tokens=3)
        assert s.num_tokens == before
    tree = Tree.open(tmp_path / "memory")
    assert tree.num_tokens == before and pad not in tree.tokens(0, before)
    tree.close()
