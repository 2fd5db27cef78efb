import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.nn.norms import LayerNorm, RMSNorm, make_norm


def _random_params(variables, seed=1):
    """Replace ones/zeros inits by random values so scale and bias are exercised."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [jax.random.normal(k, v.shape) for k, v in zip(keys, leaves, strict=True)]
    )


def _layer_norm_np(x, scale, bias, eps):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias)


def _rms_norm_np(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * np.asarray(scale)


def test_layer_norm_matches_formula():
    x = jax.random.normal(jax.random.key(0), (2, 5, 12)) * 3 + 1
    module = LayerNorm(epsilon=1e-5)
    params = _random_params(module.init(jax.random.key(0), x))
    got = module.apply(params, x)
    p = params["params"]
    np.testing.assert_allclose(got, _layer_norm_np(x, p["scale"], p["bias"], 1e-5), atol=1e-5)


def test_rms_norm_matches_formula():
    x = jax.random.normal(jax.random.key(0), (2, 5, 12)) * 3 + 1
    module = RMSNorm(epsilon=1e-6)
    params = _random_params(module.init(jax.random.key(0), x))
    got = module.apply(params, x)
    np.testing.assert_allclose(got, _rms_norm_np(x, params["params"]["scale"], 1e-6), atol=1e-5)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_bfloat16_input_is_normalised_in_float32(name):
    # A large offset makes a bf16 mean/variance useless; computed in float32 the
    # only error left is the final rounding to bf16.
    x = (jax.random.normal(jax.random.key(0), (4, 64)) + 20.0).astype(jnp.bfloat16)
    module = make_norm(name)
    params = _random_params(module.init(jax.random.key(0), x))
    got = module.apply(params, x)
    assert got.dtype == jnp.bfloat16
    p = params["params"]
    x64 = np.asarray(x.astype(jnp.float32))
    if name == "layer_norm":
        want = _layer_norm_np(x64, p["scale"], p["bias"], 1e-5)
    else:
        want = _rms_norm_np(x64, p["scale"], 1e-6)
    # bf16 has a relative precision of 2^-8; allow one rounding step of the output.
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2**-7, atol=2**-7)


def test_epsilon_is_configurable():
    x = jnp.full((1, 4), 1e-3)
    small = RMSNorm(epsilon=1e-12, use_scale=False).apply({}, x)
    large = RMSNorm(epsilon=1.0, use_scale=False).apply({}, x)
    np.testing.assert_allclose(small, 1.0, rtol=1e-4)
    np.testing.assert_allclose(large, 1e-3 / np.sqrt(1e-6 + 1.0), rtol=1e-4)


def test_unknown_norm_name():
    with pytest.raises(ValueError, match="'batch_norm'.*layer_norm.*rms_norm"):
        make_norm("batch_norm")
