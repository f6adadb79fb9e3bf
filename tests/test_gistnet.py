import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from megacontext_jax.nets.gistnet import GistNet, build_levels
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
    levels = build_levels(net, x, 4, 3)
    assert [l.shape[0] for l in levels] == [70, 17, 4, 1]
    np.testing.assert_allclose(levels[1][5], net(x[20:24][None], 1)[0], atol=1e-5)
    np.testing.assert_allclose(levels[2][1], net(levels[1][4:8][None], 2)[0], atol=1e-5)

    def loss(net):
        return jnp.sum(build_levels(net, x, 4, 3)[-1] ** 2)

    grads = nnx.grad(loss)(net)
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
    assert all(n > 0 for n in norms)
