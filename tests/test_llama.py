"""Llama-family import: logits parity with the transformers PyTorch models, and import errors.

Needs torch and transformers (``pip install -e '.[hf]'``); CI runs these with ``pytest -m hf``.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from megacontext_jax.nets.hf_weights import load_pretrained
from megacontext_jax.nets.llama import PretrainedError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 5000.0,
}
CASES = {
    # name: (config class, model class, extra config, save shard size)
    "llama3_sharded": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3}, "40KB"),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}, None),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}, None),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 1}, None),
}


def _save(directory, case: str):
    config_cls, model_cls, extra, shard = CASES[case]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random everything (norm gains and biases too), not the init's ones
        for p in model.parameters():
            p.normal_(0.0, 0.25)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    reference = _save(tmp_path, case)
    if case == "llama3_sharded":
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model, config = load_pretrained(tmp_path)
    assert config.attention_bias == (case == "qwen2_bias")
    tokens = np.random.default_rng(0).integers(0, 96, (2, 40))
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    assert np.abs(got - expected).max() < 1e-4


def test_bf16_checkpoint_and_kv_cache_decode(tmp_path):
    reference = _save(tmp_path, "llama_tied").to(torch.bfloat16)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = load_pretrained(tmp_path)  # bf16 on disk, float32 in memory
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 96, (1, 12)), jnp.int32)
    full = model(tokens)
    cache = model.init_cache(1, 16)
    first, cache = model.decode(cache, 0, tokens[:, :8])
    rest, _ = model.decode(cache, 8, tokens[:, 8:])
    np.testing.assert_allclose(np.concatenate([first, rest], 1), full, atol=1e-4)


def test_import_errors_name_the_problem(tmp_path):
    _save(tmp_path, "llama_tied")
    config_path = tmp_path / "config.json"
    original = json.loads(config_path.read_text())

    def write(**changes):
        config_path.write_text(json.dumps({**original, **changes}))

    write(num_hidden_layers=3)
    with pytest.raises(PretrainedError, match=r"tensor model\.layers\.2\..* is missing"):
        load_pretrained(tmp_path)
    write(intermediate_size=100)
    with pytest.raises(
        PretrainedError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape"
    ):
        load_pretrained(tmp_path)
    write(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(PretrainedError, match="model type gpt2 .GPT2LMHeadModel. is not supported"):
        load_pretrained(tmp_path)
    with pytest.raises(PretrainedError, match="config.json not found"):
        load_pretrained(tmp_path / "nowhere")
