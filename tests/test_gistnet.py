from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from megacontext_jax.config import ConfigError, base_config, leaves, validate
from megacontext_jax.config_files import parse_args
from megacontext_jax.megacontext import make_base
from megacontext_jax.nets.gistnet import GistNet, build_levels, contextual_inputs
from megacontext_jax.nets.specs import GistConfig
from tests.conftest import mc_config


def _gistnet(**gist):
    config = mc_config()
    for key, value in gist.items():
        config.mc.gist[key] = value
    return GistNet(GistConfig.from_config(config), rngs=nnx.Rngs(0)), config


@pytest.mark.parametrize("pooling", ["mean", "query", "cls"])
@pytest.mark.parametrize("projection", ["linear", "mlp"])
def test_every_head_is_bidirectional_and_input_dependent(pooling, projection):
    net, _ = _gistnet(pooling=pooling, projection=projection)
    x = jax.random.normal(jax.random.key(1), (3, 4, 32))
    out = net(x, 1)
    assert out.shape == (3, 32) and out.dtype == jnp.float32
    # Changing the *last* child changes the gist (bidirectional: no causal blind spot) ...
    changed = net(x.at[:, -1].add(1.0), 1)
    assert not np.allclose(changed, out, atol=1e-4)
    # ... and every pooling head depends on its input (the prototype's causal CLS was constant).
    assert not np.allclose(out[0], out[1], atol=1e-4)


def test_order_of_children_matters():
    """Local RoPE gives the block an order: reversing the children changes the gist."""
    net, _ = _gistnet(pooling="mean")
    x = jax.random.normal(jax.random.key(2), (1, 4, 32))
    assert not np.allclose(net(x, 1), net(x[:, ::-1], 1), atol=1e-4)


def test_shared_and_per_level_weights():
    x = jax.random.normal(jax.random.key(3), (2, 4, 32))
    shared, _ = _gistnet(shared_levels=True)
    np.testing.assert_array_equal(shared(x, 1), shared(x, 3))
    per_level, config = _gistnet(shared_levels=False)
    assert len(per_level.levels) == config.mc.max_level
    assert not np.allclose(per_level(x, 1), per_level(x, 2))


def test_build_levels_and_gradients():
    net, _ = _gistnet()
    x = jax.random.normal(jax.random.key(4), (70, 32))
    levels = build_levels(net, x, x, 4, 3)
    assert [l.shape[0] for l in levels] == [70, 17, 4, 1]
    np.testing.assert_allclose(levels[1][5], net(x[20:24][None], 1)[0], atol=1e-5)
    np.testing.assert_allclose(levels[2][1], net(levels[1][4:8][None], 2)[0], atol=1e-5)

    def loss(net):
        return jnp.sum(build_levels(net, x, x, 4, 3)[-1] ** 2)

    grads = nnx.jit(nnx.grad(loss))(net)  # op by op, the gradient takes ~40 s on CPU
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
    assert all(n > 0 for n in norms)


def test_depth_zero_is_the_normalised_mean_through_the_projection():
    net, _ = _gistnet(depth=0, pooling="mean", projection="linear")
    x = 3.0 * jax.random.normal(jax.random.key(5), (3, 4, 32))
    children = x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + 1e-6)
    want = children.mean(axis=1) @ np.asarray(net.levels[0].out.kernel.value)  # no bias
    for level in (1, 2):
        np.testing.assert_allclose(net(x, level), want, rtol=1e-5, atol=1e-6)


def test_depth_zero_params_are_only_the_projection():
    for shared in (True, False):
        net, config = _gistnet(depth=0, pooling="mean", projection="linear", shared_levels=shared)
        params = jax.tree.leaves(nnx.state(net, nnx.Param))
        width, levels = config.model.width, 1 if shared else config.mc.max_level
        assert [p.shape for p in params] == [(width, width)] * levels


def test_depth_zero_needs_mean_pooling():
    config = base_config()
    config.mc.gist.depth = 0
    config.mc.gist.pooling = "mean"
    validate(config)
    config.mc.gist.pooling = "query"
    with pytest.raises(ConfigError, match=r"^config\.mc\.gist\.pooling: must be 'mean' with"):
        validate(config)
    config.mc.gist.depth = -1
    with pytest.raises(ConfigError, match=r"^config\.mc\.gist\.depth: must be >= 0, got -1$"):
        validate(config)


def test_default_settings_keep_their_fingerprint_bytes():
    """Part of a tree's GistNet fingerprint: other bytes and every existing tree is refused."""
    settings = GistConfig.from_config(base_config()).settings_json()
    assert settings == (
        '{\n  "depth": 2,\n  "mlp_ratio": 4,\n  "num_heads": 4,\n  "pooling": "query",\n'
        '  "projection": "mlp",\n  "shared_levels": true\n}'
    )


@pytest.mark.parametrize(
    "variant,changed",
    [
        (
            "mean_gist",
            {"mc.gist.depth": 0, "mc.gist.pooling": "mean", "mc.gist.projection": "linear"},
        ),
        ("contextual", {"mc.gist.read_layer": 2, "mc.gist.shared_levels": False}),
    ],
)
def test_tiny_gist_variants_are_the_default_run_with_another_gistnet(variant, changed):
    """Each variant is trained the same way: only its GistNet and its workdir differ."""
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    default, _ = parse_args(["--config", tiny])
    other, _ = parse_args(["--config", f"{tiny}:{variant}"])
    a, b = leaves(default), leaves(other)
    assert {k: b[k] for k in a if a[k] != b[k]} == {"workdir": f"runs/tiny_{variant}", **changed}


def _contextual_config(read_layer: int = 1, read_blocks: int = 2, depth: int = 2):
    config = mc_config()
    config.model.depth = depth
    config.mc.gist.read_layer, config.mc.gist.read_blocks = read_layer, read_blocks
    validate(config)
    return config


def test_contextual_inputs_read_their_own_span_causally():
    """A token's state depends on the tokens before it in its span and on nothing else: not on
    later tokens, not on another span's (spans of 8 tokens, aligned at multiples of 8)."""
    config = _contextual_config()
    base = make_base(config, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(6), (1, 21), 0, 256)
    states = np.asarray(contextual_inputs(base, tokens, 1, 8))
    assert states.shape == (1, 21, 32) and states.dtype == np.float32

    def changed_rows(at: int) -> set[int]:
        other = np.asarray(contextual_inputs(base, tokens.at[0, at].add(1), 1, 8))
        return {int(i) for i in np.flatnonzero(np.abs(other - states).max(-1)[0] > 1e-6)}

    assert changed_rows(9) == set(range(9, 16))
    assert changed_rows(7) == {7}
    assert changed_rows(20) == {20}  # the padded last span
    # One block of the base: the stream after it, as the whole model computes it on one span.
    np.testing.assert_allclose(states[0, 8:16], base.hidden(tokens[:, 8:16], 1)[0], atol=1e-6)


def test_contextual_inputs_pass_no_gradient_into_the_base():
    config = _contextual_config()
    base = make_base(config, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(7), (2, 16), 0, 256)
    grads = nnx.grad(lambda b: jnp.sum(contextual_inputs(b, tokens, 1, 8) ** 2))(base)
    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads))


def test_read_layer_and_read_blocks_are_checked():
    _contextual_config(read_layer=2, read_blocks=8)  # mc_config's ingest_chunk is 8
    with pytest.raises(
        ConfigError, match=r"^config\.mc\.gist\.read_layer: must be in \[0, model\.depth=2\]"
    ):
        _contextual_config(read_layer=3)
    with pytest.raises(ConfigError, match=r"^config\.mc\.gist\.read_blocks: 3 must divide"):
        _contextual_config(read_blocks=3)
    with pytest.raises(
        ConfigError, match=r"^config\.mc\.gist\.read_blocks: must be positive, got 0$"
    ):
        _contextual_config(read_blocks=0)
