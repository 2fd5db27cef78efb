import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.nn.droppath import DropPath


def test_identity_when_deterministic_or_rate_zero():
    x = jax.random.normal(jax.random.key(0), (4, 3, 2))
    assert DropPath(0.5).apply({}, x, deterministic=True) is x
    assert DropPath(0.0).apply({}, x, deterministic=False) is x


def test_drops_whole_examples_and_rescales():
    x = jnp.ones((64, 3, 2))
    out = DropPath(0.25).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    per_example = np.asarray(out).reshape(64, -1)
    # Each example is either all zero or all 1 / (1 - rate).
    for row in per_example:
        assert np.all(row == 0.0) or np.allclose(row, 1 / 0.75)
    assert 0 < np.sum(per_example[:, 0] == 0) < 64


def test_expectation_is_preserved():
    # Mean of N Bernoulli(0.7)/0.7 samples: std = sqrt(0.3/0.7/N) ~ 0.0065 for N=10000;
    # 5 standard deviations is a bound a correct layer fails with probability ~6e-7.
    n, rate = 10_000, 0.3
    x = jnp.ones((n, 1))
    out = DropPath(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    std = np.sqrt(rate / (1 - rate) / n)
    assert abs(float(out.mean()) - 1.0) < 5 * std


def test_call_time_rate_overrides_and_can_be_traced():
    x = jnp.ones((256, 2))

    @jax.jit
    def run(rate):
        return DropPath(0.0).apply(
            {}, x, deterministic=False, rate=rate, rngs={"dropout": jax.random.key(3)}
        )

    out = np.asarray(run(jnp.float32(0.5)))
    assert set(np.unique(out)) == {0.0, 2.0}


def test_rate_out_of_range():
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\), got 1.0"):
        DropPath(1.0).apply({}, jnp.ones((2, 2)), deterministic=False)
