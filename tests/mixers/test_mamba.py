"""Tests of the Mamba mixer: decoding equals the parallel forward, causality, padding, init."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.mixers.mamba import MambaMixer
from effformer.ops.masks import AttentionMask

BATCH, LENGTH, D_MODEL = 2, 9, 8


# Compilation is the cost of these tests on CPU: op-by-op (eager) Flax code compiles a
# small program per primitive and shape, so every module call below is jitted, and the
# tests share one initialisation (implementation and chunk_size do not change the params).


@functools.cache
def _initial_variables():
    """params and the decode cache of MambaMixer(D_MODEL, d_state=4), float32, one jit."""
    mixer = MambaMixer(d_model=D_MODEL, d_state=4)
    token = jnp.zeros((BATCH, 1, D_MODEL))
    return jax.jit(lambda key, x: mixer.init(key, x, decode=True))(jax.random.key(0), token)


def _cast(tree, dtype):
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, dtype)), tree)  # no compilation


def make(x64=False, **kwargs):
    mixer = MambaMixer(d_model=D_MODEL, d_state=4, **kwargs)
    dtype = np.float64 if x64 else np.float32
    x = np.random.default_rng(1).normal(size=(BATCH, LENGTH, D_MODEL))
    params = _cast(_initial_variables()["params"], dtype)
    return mixer, params, jnp.asarray(x.astype(dtype))


def initial_cache(dtype):
    """The decode cache as init makes it, in the computation dtype of the tests."""
    return _cast(_initial_variables()["cache"], dtype)


def padding_mask(segment_ids) -> AttentionMask:
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    return AttentionMask(q_segment_ids=segment_ids, kv_segment_ids=segment_ids)


@pytest.mark.parametrize("implementation", ["reference", "chunked"])
def test_decode_token_by_token_equals_parallel_forward(x64, implementation):
    mixer, params, x = make(x64=True, implementation=implementation, chunk_size=4)
    parallel, intermediates = jax.jit(
        lambda x: mixer.apply({"params": params}, x, mutable=["intermediates"])
    )(x)
    cache = initial_cache(np.float64)
    assert cache["conv_state"].shape == (BATCH, 2 * D_MODEL, 4)
    assert cache["ssm_state"].shape == (BATCH, 2 * D_MODEL, 4)
    np.testing.assert_array_equal(cache["ssm_state"], 0.0)
    step = jax.jit(lambda cache, token: mixer.apply({"params": params, "cache": cache}, token,
                                                     decode=True, mutable=["cache"]))  # fmt: skip
    outputs = []
    for t in range(LENGTH):
        out, variables = step(cache, x[:, t : t + 1])
        cache = variables["cache"]
        outputs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), parallel, rtol=1e-10, atol=1e-12)
    (ssm_state,) = intermediates["intermediates"]["ssm_state"]
    (conv_state,) = intermediates["intermediates"]["conv_state"]
    np.testing.assert_allclose(cache["ssm_state"], ssm_state, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cache["conv_state"], conv_state, rtol=1e-12, atol=1e-12)


def test_output_never_depends_on_later_inputs(x64):
    mixer, params, x = make(x64=True, implementation="chunked", chunk_size=4)
    jacobian = jax.jit(jax.jacrev(lambda x: mixer.apply({"params": params}, x)))(x[:1])
    # [1, L, D, 1, L', D] -> influence of input t' on output t, summed over features.
    influence = np.abs(np.asarray(jacobian)[0, :, :, 0]).sum(axis=(1, 3))
    future = np.triu(np.ones((LENGTH, LENGTH), bool), k=1)
    np.testing.assert_array_equal(influence[future], 0.0)
    assert np.all(influence[~future] > 0)  # every earlier token reaches the output


def real_tokens(side: str, lengths) -> np.ndarray:
    """[BATCH, LENGTH] bool: row b has lengths[b] real tokens, padded on ``side``; "holes"
    puts its padding inside the row (one, then two padded tokens among real ones)."""
    lengths = np.asarray(lengths)
    positions = np.arange(LENGTH)[None, :]
    if side == "right":
        return positions < lengths[:, None]
    if side == "left":
        return positions >= LENGTH - lengths[:, None]
    real = np.ones((BATCH, LENGTH), bool)
    for row, length in enumerate(lengths):
        holes = LENGTH - length
        real[row, 2 : 2 + min(holes, 1)] = False  # a single padded token at position 2
        real[row, 5 : 5 + holes - min(holes, 1)] = False  # the rest from position 5
    return real


# "holes": regression; the parallel conv saw a zero at a padded token inside the row
# while decoding skips it, so the outputs after a hole differed from both decoding
# and the sequence run unpadded.
@pytest.mark.parametrize("side", ["right", "left", "holes"])
def test_padded_batch_equals_unpadded_sequences(x64, side):
    mixer, params, x = make(x64=True, chunk_size=4)
    lengths = [LENGTH - 1, 5]
    real = real_tokens(side, lengths)
    assert real.sum(axis=1).tolist() == lengths
    x = jnp.where(real[..., None], x, 7.0)  # garbage in the padding
    apply = jax.jit(lambda x, mask=None: mixer.apply({"params": params}, x, mask=mask))
    out = apply(x, padding_mask(real.astype(np.int32)))
    for b in range(BATCH):
        alone = apply(x[b : b + 1, real[b]])
        np.testing.assert_allclose(out[b, real[b]], alone[0], rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(out[b, ~real[b]], 0.0)


@pytest.mark.parametrize("side", ["right", "left", "holes"])
def test_sown_states_of_a_padded_batch_equal_the_decode_cache(x64, side):
    # Regression: the sown conv_state was the last d_conv slots of the row, i.e. the
    # zeroed right padding, while decoding keeps the last real tokens.
    mixer, params, x = make(x64=True, chunk_size=4)
    real = real_tokens(side, [LENGTH - 2, 3])  # row 1 shorter than d_conv + its padding
    mask = padding_mask(real.astype(np.int32))
    _, sown = jax.jit(
        lambda x: mixer.apply({"params": params}, x, mask=mask, mutable=["intermediates"])
    )(x)
    step = jax.jit(lambda cache, token, step_mask: mixer.apply(
        {"params": params, "cache": cache}, token, mask=step_mask, decode=True, mutable=["cache"]
    ))  # fmt: skip
    cache = initial_cache(np.float64)
    for t in range(LENGTH):
        _, variables = step(
            cache, x[:, t : t + 1], padding_mask(real[:, t : t + 1].astype(np.int32))
        )
        cache = variables["cache"]
    for name in ("conv_state", "ssm_state"):
        (state,) = sown["intermediates"][name]
        np.testing.assert_allclose(state, cache[name], rtol=1e-10, atol=1e-12)


def test_padded_token_in_decode_leaves_the_cache_unchanged(x64):
    mixer, params, x = make(x64=True)

    @jax.jit
    def run(params, cache, x, mask):
        variables = {"params": params, "cache": cache}
        _, updated = mixer.apply(variables, x[:, :1], decode=True, mutable=["cache"])
        variables["cache"] = updated["cache"]
        out, after = mixer.apply(variables, x[:, 1:2], decode=True, mutable=["cache"],
                                 mask=mask)  # fmt: skip
        return out, updated, after

    out, updated, after = run(params, initial_cache(np.float64), x, padding_mask([[0], [1]]))
    np.testing.assert_array_equal(out[0], 0.0)
    for name in ("conv_state", "ssm_state"):
        np.testing.assert_array_equal(after["cache"][name][0], updated["cache"][name][0])
        assert not np.allclose(after["cache"][name][1], updated["cache"][name][1])


def test_implementations_agree_and_gradients_are_finite():
    mixer, params, x = make(implementation="reference")
    fast = MambaMixer(d_model=D_MODEL, d_state=4, implementation="chunked", chunk_size=4)

    @jax.jit
    def run(params, x):
        loss = lambda p: jnp.sum(fast.apply({"params": p}, x) ** 2)
        return (
            fast.apply({"params": params}, x),
            mixer.apply({"params": params}, x),
            jax.grad(loss)(params),
        )

    got, want, grads = run(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(grad)) and np.any(grad != 0), path


@functools.cache
def _default_and_floored_params():
    """Params of MambaMixer(64) with the defaults, and of one whose dt range lies below
    the floor, initialised in one jit (one compilation for both tests)."""
    default = MambaMixer(d_model=64)
    floored = MambaMixer(d_model=D_MODEL, dt_min=1e-6, dt_max=2e-6)

    @jax.jit
    def init(key):
        return (
            default.init(key, jnp.zeros((1, 3, 64)))["params"],
            floored.init(key, jnp.zeros((1, 2, D_MODEL)))["params"],
        )

    return init(jax.random.key(0))


def test_initialisation_follows_the_original():
    d_model, d_state = 64, 16
    params = _default_and_floored_params()[0]
    E, R = 2 * d_model, math.ceil(d_model / 16)
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {
        "in_proj": {"kernel": (d_model, 2 * E)},
        "conv_kernel": (4, E),
        "conv_bias": (E,),
        "x_proj": {"kernel": (E, R + 2 * d_state)},
        "dt_proj_kernel": (R, E),
        "dt_proj_bias": (E,),
        "A_log": (E, d_state),
        "D": (E,),
        "out_proj": {"kernel": (E, d_model)},
    }
    dt = np.asarray(jax.nn.softplus(params["dt_proj_bias"]))
    assert np.all(dt >= 0.001 * (1 - 1e-5)) and np.all(dt <= 0.1 * (1 + 1e-5))
    # log-uniform: log dt is uniform on [log 0.001, log 0.1], mean log(0.01), std 4.6/sqrt(12).
    log_dt = np.log(dt)
    assert abs(log_dt.mean() - math.log(0.01)) < 0.4
    assert abs(log_dt.std() - math.log(100) / math.sqrt(12)) < 0.3
    np.testing.assert_allclose(
        params["A_log"], np.log(np.tile(np.arange(1, 17), (E, 1))), rtol=1e-6
    )
    np.testing.assert_array_equal(params["D"], 1.0)
    dt_limit = R**-0.5
    assert np.all(np.abs(params["dt_proj_kernel"]) <= dt_limit)
    assert np.abs(params["dt_proj_kernel"]).max() > 0.8 * dt_limit
    in_limit = d_model**-0.5  # PyTorch's default Linear init, as the original keeps
    assert np.all(np.abs(params["in_proj"]["kernel"]) <= in_limit)
    assert np.abs(params["in_proj"]["kernel"]).max() > 0.9 * in_limit


def test_dt_floor_applies():
    params = _default_and_floored_params()[1]
    np.testing.assert_allclose(jax.nn.softplus(params["dt_proj_bias"]), 1e-4, rtol=1e-3)


def test_bad_inputs():
    mixer, params, x = make()
    # jax.eval_shape: the errors are raised while tracing; nothing needs compiling.
    apply, mixer = mixer.apply, lambda *a, **k: jax.eval_shape(lambda: apply(*a, **k))
    with pytest.raises(
        ValueError, match=r"x must have shape \[batch, L, d_model=8\], got \(2, 9, 5\)"
    ):
        mixer({"params": params}, x[..., :5])
    with pytest.raises(ValueError, match=r"decode=True advances one token .*got \(2, 9, 8\)"):
        mixer({"params": params}, x, decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match=r"q_segment_ids must have shape \(2, 9\).*got \(2, 4\)"):
        mixer({"params": params}, x, mask=padding_mask(np.ones((BATCH, 4))))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("d_state", 0, "d_state must be a positive int, got 0"),  # was a stateless block
        ("d_conv", 0, "d_conv must be a positive int, got 0"),  # was a ZeroDivisionError
        ("expand", 0, "expand must be a positive int, got 0"),
        ("dt_rank", 0, "dt_rank must be a positive int, got 0"),
        ("dt_min", 0.5, r"0 < dt_min <= dt_max, got dt_min=0.5, dt_max=0.1"),  # was swapped
        ("dt_scale", -1.0, "dt_init_floor and dt_scale must be >= 0"),
    ],
)
def test_bad_configuration_is_named(field, value, message):
    x = jnp.zeros((1, 3, D_MODEL))
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(MambaMixer(d_model=D_MODEL, **{field: value}).init, jax.random.key(0), x)


def test_window_or_soft_causal_mask_is_refused_not_ignored():
    # Regression: a sliding-window or soft-causal mask was silently dropped (the scan
    # always sees the whole prefix), giving a different function from the one asked for.
    mixer, params, x = make()
    apply = lambda **k: jax.eval_shape(lambda: mixer.apply({"params": params}, x, **k))  # noqa: E731
    for mask in (
        AttentionMask(causal=True, window_left=2),
        AttentionMask(soft_causal_ratio=0.5),
    ):
        with pytest.raises(ValueError, match=r"padding \(segment ids\) only; expected window_left"):
            apply(mask=mask)
    apply(mask=AttentionMask(causal=True))  # causal is what the scan computes anyway
