import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.nn.pooling import ClassToken, SeqPool, mean_pool


def _tokens():
    return jax.random.normal(jax.random.key(0), (2, 5, 4))


@pytest.mark.parametrize("placement", ["first", "last"])
def test_class_token_placement_and_readout(placement):
    x = _tokens()
    module = ClassToken(placement, token_init=jax.nn.initializers.normal(1.0))
    variables = module.init(jax.random.key(1), x)
    token = np.asarray(variables["params"]["token"])[0, 0]
    out = module.apply(variables, x)
    assert out.shape == (2, 6, 4)
    where = 0 if placement == "first" else -1
    rest = slice(1, None) if placement == "first" else slice(None, -1)
    np.testing.assert_array_equal(out[:, where], np.broadcast_to(token, (2, 4)))
    np.testing.assert_array_equal(out[:, rest], x)
    # pool reads the class token's position: mark it and read it back.
    marked = out.at[:, where].set(7.0)
    np.testing.assert_array_equal(module.apply(variables, marked, method="pool"), 7.0)


def test_class_token_bad_placement():
    with pytest.raises(ValueError, match="placement must be 'first' or 'last', got 'middle'"):
        ClassToken("middle").init(jax.random.key(0), _tokens())


def test_seqpool_by_hand():
    x = _tokens()
    module = SeqPool(kernel_init=jax.nn.initializers.normal(1.0))
    variables = module.init(jax.random.key(1), x)
    w = np.asarray(variables["params"]["attention_pool"]["kernel"], np.float64)[:, 0]
    b = float(variables["params"]["attention_pool"]["bias"][0])
    xs = np.asarray(x, np.float64)
    want = np.zeros((2, 4))
    for i in range(2):
        logits = xs[i] @ w + b
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        want[i] = weights @ xs[i]
    np.testing.assert_allclose(module.apply(variables, x), want, atol=1e-5)
    # A token mask removes padding: equal to pooling the unpadded prefix.
    mask = jnp.array([[True] * 3 + [False] * 2, [True] * 5])
    masked = module.apply(variables, x, mask)
    np.testing.assert_allclose(masked[0], module.apply(variables, x[:1, :3])[0], atol=1e-6)
    np.testing.assert_allclose(masked[1], want[1], atol=1e-5)


def test_mean_pool_with_and_without_mask():
    x = _tokens()
    np.testing.assert_allclose(mean_pool(x), np.asarray(x).mean(1), atol=1e-6)
    mask = jnp.array([[True, False, True, False, False], [False] * 5])
    got = mean_pool(x, mask)
    np.testing.assert_allclose(got[0], (x[0, 0] + x[0, 2]) / 2, atol=1e-6)
    np.testing.assert_array_equal(got[1], 0.0)  # no real token: zeros, not NaN
    with pytest.raises(ValueError, match=r"token_mask must have shape \(2, 5\), got \(2, 4\)"):
        mean_pool(x, mask[:, :4])


def test_a_non_boolean_token_mask_is_named():
    # An int 0/1 mask crashed SeqPool inside jnp.max; mean_pool took a float one as weights.
    x = _tokens()
    mask = jnp.array([[1, 0, 1, 0, 0], [1] * 5])
    pool = SeqPool()
    variables = pool.init(jax.random.key(0), x)
    for dtype in (jnp.int32, jnp.float32):
        message = rf"token_mask must be boolean \(True = real token\), got dtype {dtype.dtype}"
        with pytest.raises(ValueError, match=message):
            pool.apply(variables, x, mask.astype(dtype))
        with pytest.raises(ValueError, match=message):
            mean_pool(x, mask.astype(dtype))
