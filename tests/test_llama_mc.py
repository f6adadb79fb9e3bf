"""An imported Llama-family base (random weights, BPE tokenizer) under frozen-base MegaContext
training, decoding over a memory and evaluation. No torch needed: the checkpoint is written here."""

import jax
import numpy as np
import pytest
from flax import nnx

import decode
from megacontext_jax.data import pipeline as data
from megacontext_jax.data.tokenizer import tokenizer_for
from megacontext_jax.evaluation import Protocol, evaluate
from megacontext_jax.nets.hf_weights import load_pretrained, save_pretrained
from megacontext_jax.nets.llama import Llama
from megacontext_jax.testing import random_checkpoint, train_tokenizer
from megacontext_jax.training.loop import train
from megacontext_jax.training.restore import load_model
from tests.conftest import HF_CONFIG, tiny_mc_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus_dir):
    directory = tmp_path_factory.mktemp("llama")
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    train_tokenizer(directory, texts, vocab_size=300)
    random_checkpoint(directory, HF_CONFIG, shard_bytes=20_000)
    assert (directory / "model.safetensors.index.json").is_file()  # sharded
    return directory


def test_save_pretrained_round_trips(checkpoint, tmp_path):
    model, _ = load_pretrained(checkpoint)
    save_pretrained(model, tmp_path, checkpoint)
    again, _ = load_pretrained(tmp_path)
    for a, b in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_frozen_imported_base_trains_decodes_and_evaluates(
    checkpoint, tmp_path, corpus_dir, capsys
):
    config = tiny_mc_config(tmp_path / "run", corpus_dir, steps=3)
    config.unlock()
    config.model.family, config.model.hf_path = "llama", str(checkpoint)
    config.model.smear_keys = False
    config.mc.mode = "frozen_base"
    # A contextual GistNet: LOD1 reads the frozen Llama's own states, in training, in the
    # decode session's ingest and in evaluation (token-embedding gists share every other path).
    config.mc.gist.read_layer = 1
    config.lock()
    summary = train(config, progress=False)
    assert np.isfinite(summary["val/bpb"])

    model, restored = load_model(tmp_path / "run")
    assert isinstance(model.base, Llama)
    m = restored.model
    assert (m.width, m.depth, m.bos_id, m.eos_id, m.pad_id, m.num_tokens) == (32, 2, 0, 1, 1, 300)
    reference, _ = load_pretrained(checkpoint)
    for a, b in zip(
        jax.tree.leaves(nnx.state(reference)), jax.tree.leaves(nnx.state(model.base)), strict=True
    ):
        np.testing.assert_array_equal(a, b)  # frozen, and restored from the checkpoint itself

    capsys.readouterr()
    run = ["--checkpoint", str(tmp_path / "run"), "--memory", str(tmp_path / "memory")]
    assert decode.main([*run, "--prompt", "the quick", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.startswith("the quick")

    tokenizer = tokenizer_for(restored.model)
    docs = data.evaluation_documents(restored.data, tokenizer)
    assert docs[0].data.dtype == np.int32 and docs[0].data.max() < 300  # BPE ids, not bytes
    protocol = Protocol(lengths=(4,), windows=2, budgets=(), retrieval_lengths=(4,), probes=2)
    row = evaluate(model, restored, docs, protocol, progress=False)["text"]["4W"]["conditions"]
    assert {"full", "window", "mc_static", "mc_focus"} <= set(row)
    # Bits per byte: a BPE token covers more than one byte.
    assert row["full"]["bpb"] < row["full"]["nll"]["mean"] / np.log(2)


def test_hf_tokenizer_specials_streaming_and_tasks(checkpoint, tmp_path):
    import json

    from megacontext_jax.data import tasks
    from megacontext_jax.data.tokenizer import HFTokenizer, sampleable, special_ids

    ids = special_ids(checkpoint)
    assert ids == {"pad_id": 1, "bos_id": 0, "eos_id": 1}  # no pad token: EOS pads
    tokenizer = HFTokenizer(checkpoint, **ids)
    text = "def f(x):\n    return x  # é, 日本"
    encoded = tokenizer.encode(text, bos=True)
    assert encoded[0] == 0 and tokenizer.decode(encoded) == text
    feed = tokenizer.stream_decoder()
    assert "".join(feed(int(i)) for i in encoded[1:]) == text  # multi-byte characters included
    assert tokenizer.token_bytes()[:2].tolist() == [0, 0]  # specials stand for no text

    model = tiny_mc_config("/unused", "/unused").model
    model.unlock()
    model.vocab_size, model.num_tokens, model.pad_id, model.bos_id, model.eos_id = 320, 300, 1, 0, 1
    allowed = sampleable(model)
    assert allowed[1] and not allowed[0] and allowed[299] and not allowed[300:].any()

    filler = tokenizer.encode(" ".join(["lorem ipsum dolor"] * 80))
    probe = tasks.passkey(filler, 200, np.random.default_rng(0), tokenizer=tokenizer)
    answer = tokenizer.decode(probe.tokens[probe.answer])
    assert len(answer) == 5 and answer.isdigit() and answer in tokenizer.decode(probe.tokens[:190])
    probe = tasks.mqar(filler, 200, np.random.default_rng(1), tokenizer=tokenizer)
    values = tokenizer.decode(probe.tokens[probe.answer])
    assert len(values) == 4 and values.isdigit()  # two queried two-digit values

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    assert special_ids(tmp_path) == {"pad_id": 7, "bos_id": 7, "eos_id": 7}
