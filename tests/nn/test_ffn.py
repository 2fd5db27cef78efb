import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.nn.ffn import ACTIVATIONS, MLP, GatedMLP, llama_hidden_dim, make_ffn

erf = np.vectorize(math.erf)


def _gelu_exact(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _silu(x):
    return x / (1 + np.exp(-x))


def _inputs(dim=6):
    return np.asarray(jax.random.normal(jax.random.key(0), (2, 3, dim)), np.float64)


def test_mlp_matches_manual_gelu():
    x = _inputs()
    module = MLP(hidden_dim=10)
    variables = module.init(jax.random.key(1), jnp.asarray(x, jnp.float32))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    want = (
        _gelu_exact(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"]
        + p["fc2"]["bias"]
    )
    got = module.apply(variables, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_activations_match_their_formulas():
    x = np.linspace(-4, 4, 41)
    tanh_gelu = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    want = {
        "gelu": _gelu_exact(x),
        "gelu_tanh": tanh_gelu,
        "relu": np.maximum(x, 0),
        "silu": _silu(x),
    }
    for name, expected in want.items():
        got = ACTIVATIONS[name](jnp.asarray(x, jnp.float32))
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=name)
    # exact and tanh GELU differ by more than float32 noise somewhere in [-4, 4]
    assert np.max(np.abs(_gelu_exact(x) - tanh_gelu)) > 1e-4


def test_swiglu_matches_manual():
    x = _inputs()
    module = make_ffn("swiglu", 8, out_dim=5)
    variables = module.init(jax.random.key(1), jnp.asarray(x, jnp.float32))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    assert set(p) == {"w1", "w2", "w3"} and "bias" not in p["w1"]  # LLaMA: no biases
    want = (_silu(x @ p["w1"]["kernel"]) * (x @ p["w3"]["kernel"])) @ p["w2"]["kernel"]
    got = module.apply(variables, jnp.asarray(x, jnp.float32))
    assert got.shape == (2, 3, 5)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_geglu_with_biases_matches_manual():
    x = _inputs()
    module = make_ffn("geglu", 8, use_bias=True, bias_init=jax.nn.initializers.normal(1.0))
    variables = module.init(jax.random.key(1), jnp.asarray(x, jnp.float32))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    lin = lambda name, h: h @ p[name]["kernel"] + p[name]["bias"]
    want = lin("w2", _gelu_exact(lin("w1", x)) * lin("w3", x))
    np.testing.assert_allclose(
        module.apply(variables, jnp.asarray(x, jnp.float32)), want, atol=1e-5
    )


@pytest.mark.parametrize("cls", [MLP, GatedMLP])
def test_hidden_width_equals_sliced_weights(cls):
    """MatFormer nesting: width m == a full-size module whose weights are the first m units."""
    x = jnp.asarray(_inputs(), jnp.float32)
    big = cls(hidden_dim=12, use_bias=True, bias_init=jax.nn.initializers.normal(1.0))
    variables = big.init(jax.random.key(1), x)
    m = 5
    sliced = {}
    for name, layer in variables["params"].items():
        if name in ("fc2", "w2"):  # hidden -> out: keep the first m rows
            sliced[name] = {"kernel": layer["kernel"][:m], "bias": layer["bias"]}
        else:  # in -> hidden: keep the first m columns
            sliced[name] = {"kernel": layer["kernel"][:, :m], "bias": layer["bias"][:m]}
    small = cls(hidden_dim=m, use_bias=True)
    want = small.apply({"params": sliced}, x)
    got = big.apply(variables, x, hidden_width=m)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got, big.apply(variables, x), atol=1e-3)
    with pytest.raises(ValueError, match="hidden_width must be in \\[1, hidden_dim=12\\], got 13"):
        big.apply(variables, x, hidden_width=13)


def test_dropout_placement():
    """With dropout, two rngs differ; deterministic ignores dropout."""
    x = jnp.asarray(_inputs(), jnp.float32)
    module = MLP(hidden_dim=10, dropout_rate=0.5)
    variables = module.init(jax.random.key(1), x)
    det = module.apply(variables, x)
    np.testing.assert_allclose(det, MLP(hidden_dim=10).apply(variables, x))
    a = module.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    b = module.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(a, b)
    # The output dropout zeroes whole output entries (after W2).
    assert np.any(np.asarray(a) == 0.0)


def test_llama_hidden_dim():
    assert llama_hidden_dim(192) == 512  # int(8*192/3) = 512
    assert llama_hidden_dim(384) == 1024
    assert llama_hidden_dim(768) == 2048
    assert llama_hidden_dim(100) == 512  # int(266.67) = 266, rounded up to 2 * 256
    assert llama_hidden_dim(100, multiple_of=8) == 272


def test_unknown_ffn_and_activation():
    with pytest.raises(ValueError, match="'mish'.*geglu.*swiglu"):
        make_ffn("mish", 4)
    with pytest.raises(ValueError, match="activation: unknown name 'tanh'"):
        MLP(4, activation="tanh").init(jax.random.key(0), jnp.ones((1, 2)))
