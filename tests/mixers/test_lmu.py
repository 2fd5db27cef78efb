"""Tests of the LMU mixer: recurrent decoding = parallel (FFT), causality, padding, the stack."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.mixers import make_mixer
from effformer.mixers.lmu import LMUMixer
from effformer.ops.masks import AttentionMask

BATCH, LENGTH, D_MODEL, ORDER, THETA = 2, 11, 8, 6, 8.0


def _mixer(**kwargs) -> LMUMixer:
    return LMUMixer(d_model=D_MODEL, order=ORDER, theta=THETA, memory_channels=2, **kwargs)


@functools.cache
def _params():
    x = jnp.zeros((BATCH, 1, D_MODEL))
    variables = jax.jit(lambda key, x: _mixer().init(key, x))(jax.random.key(0), x)
    # Larger memory_input biases make u = relu(.) non-zero on most tokens (else the
    # memory might see almost nothing and the tests would check little).
    params = jax.tree.map(np.asarray, variables["params"])
    params["memory_input"]["bias"] = np.full_like(params["memory_input"]["bias"], 0.5)
    return params


def _inputs(dtype=np.float64):
    x = np.random.default_rng(1).normal(size=(BATCH, LENGTH, D_MODEL))
    params = jax.tree.map(lambda a: jnp.asarray(a.astype(dtype)), _params())
    return params, jnp.asarray(x.astype(dtype))


def _mask(segment_ids) -> AttentionMask:
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    return AttentionMask(q_segment_ids=segment_ids, kv_segment_ids=segment_ids)


def _decode_all(mixer, params, x, mask=None):
    """Feed x one token at a time through decode=True: (outputs [B, L, D], final cache)."""
    cache = {"memory_state": jnp.zeros((BATCH, 2, ORDER), x.dtype)}
    step = jax.jit(
        lambda cache, token, step_mask: mixer.apply(
            {"params": params, "cache": cache},
            token,
            mask=step_mask,
            decode=True,
            mutable=["cache"],
        )
    )
    outputs = []
    for t in range(x.shape[1]):
        step_mask = None if mask is None else _mask(mask.q_segment_ids[:, t : t + 1])
        out, variables = step(cache, x[:, t : t + 1], step_mask)
        cache = variables["cache"]
        outputs.append(out)
    return jnp.concatenate(outputs, axis=1), cache


@pytest.mark.parametrize("implementation", ["fft", "reference"])
def test_decode_token_by_token_equals_parallel_forward(x64, implementation):
    params, x = _inputs()
    mixer = _mixer(implementation=implementation)
    parallel, intermediates = mixer.apply({"params": params}, x, mutable=["intermediates"])
    decoded, cache = _decode_all(_mixer(), params, x)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(parallel), atol=1e-11)
    (sown,) = intermediates["intermediates"]["memory_state"]
    np.testing.assert_allclose(np.asarray(cache["memory_state"]), np.asarray(sown), atol=1e-11)


def test_output_never_depends_on_later_inputs(x64):
    params, x = _inputs()
    mixer = _mixer()
    out = mixer.apply({"params": params}, x)
    changed = x.at[:, 6:].set(jnp.asarray(np.random.default_rng(5).normal(size=(BATCH, 5, 8))))
    out_changed = mixer.apply({"params": params}, changed)
    np.testing.assert_allclose(np.asarray(out_changed[:, :6]), np.asarray(out[:, :6]), atol=1e-12)
    assert not np.allclose(np.asarray(out_changed[:, 6:]), np.asarray(out[:, 6:]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_sequences(x64, side):
    params, x = _inputs()
    mixer = _mixer()
    real = 7
    pad = LENGTH - real
    if side == "right":
        segment_ids = np.array([[1] * real + [0] * pad] * BATCH)
        real_slice = slice(0, real)
    else:
        segment_ids = np.array([[0] * pad + [1] * real] * BATCH)
        real_slice = slice(pad, LENGTH)
    padded_out = mixer.apply({"params": params}, x, mask=_mask(segment_ids))
    alone = mixer.apply({"params": params}, x[:, real_slice])
    np.testing.assert_allclose(np.asarray(padded_out[:, real_slice]), np.asarray(alone), atol=1e-11)
    padding = np.asarray(segment_ids == 0)
    assert np.all(np.asarray(padded_out)[padding] == 0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_sown_state_of_a_padded_batch_equals_the_decode_state(x64, side):
    # Regression: the sown memory_state was the memory at the last slot, which keeps
    # decaying (m = Abar m) through right padding; decoding stops at the last real token.
    params, x = _inputs()
    mixer = _mixer()
    real = np.ones((BATCH, LENGTH), bool)
    real[1, slice(6, None) if side == "right" else slice(0, 5)] = False
    mask = _mask(real.astype(np.int32))
    _, sown = mixer.apply({"params": params}, x, mask=mask, mutable=["intermediates"])
    _, cache = _decode_all(mixer, params, x, mask)
    (state,) = sown["intermediates"]["memory_state"]
    np.testing.assert_allclose(np.asarray(state), np.asarray(cache["memory_state"]), atol=1e-11)


def test_padded_token_in_decode_leaves_the_state_unchanged(x64):
    params, x = _inputs()
    segment_ids = np.ones((BATCH, LENGTH), np.int32)
    segment_ids[0, 4] = 0  # one padded token in the middle of row 0 while decoding
    decoded, cache = _decode_all(_mixer(), params, x, _mask(segment_ids))
    # Row 0 equals its sequence without the padded token, outputs and final state.
    kept = np.r_[0:4, 5:LENGTH]
    alone, alone_cache = _decode_all(_mixer(), params, x[:, kept])
    np.testing.assert_allclose(np.asarray(decoded[0, kept]), np.asarray(alone[0]), atol=1e-11)
    np.testing.assert_allclose(
        np.asarray(cache["memory_state"][0]), np.asarray(alone_cache["memory_state"][0]), atol=1e-11
    )
    assert np.all(np.asarray(decoded[0, 4]) == 0)


def test_padded_hole_in_the_parallel_pass_equals_decode(x64):
    # Regression: the parallel pass fed a padded token in as u = 0, which still advances
    # the memory (m = Abar m); decoding (and the sequence run without it) skip it.
    params, x = _inputs()
    segment_ids = np.ones((BATCH, LENGTH), np.int32)
    segment_ids[0, 4] = 0
    segment_ids[1, 2:4] = 0
    mask = _mask(segment_ids)
    parallel = _mixer().apply({"params": params}, x, mask=mask)
    decoded, _ = _decode_all(_mixer(), params, x, mask)
    np.testing.assert_allclose(np.asarray(parallel), np.asarray(decoded), atol=1e-11)


def test_float32_parallel_matches_decode():
    params, x = _inputs(np.float32)
    parallel = _mixer().apply({"params": params}, x)
    decoded, _ = _decode_all(_mixer(), params, x)
    assert parallel.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(parallel), atol=2e-5)


def test_in_a_decoder_layer_stack():
    """'lmu' is a mixer name for layer patterns, and a bidirectional stack refuses it."""
    from effformer.models import create

    model = create(
        "lm_decoder",
        vocab_size=11,
        num_layers=2,
        embed_dim=8,
        num_heads=2,
        ffn_hidden_dim=16,
        layer_pattern="lmu,global",
        mixer_kwargs={"lmu": {"order": 4, "theta": 8.0}},
    )
    tokens = jnp.ones((1, 6), jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    assert "layer_0_lmu" in str(jax.tree_util.tree_structure(variables["params"]))
    assert model.apply(variables, tokens).shape == (1, 6, 11)
    with pytest.raises(ValueError, match="causal-only mixer"):
        encoder = create(
            "lm_encoder", vocab_size=11, num_layers=1, embed_dim=8, num_heads=2,
            ffn_hidden_dim=16, layer_pattern="lmu",
        )  # fmt: skip
        encoder.init(jax.random.key(0), tokens)


def test_bad_inputs():
    params, x = _inputs(np.float32)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, L, d_model=8\]"):
        _mixer().apply({"params": params}, x[..., :4])
    with pytest.raises(ValueError, match="decode=True advances one token per call"):
        _mixer().apply({"params": params, "cache": {}}, x, decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match="implementation must be one of"):
        _mixer(implementation="conv").apply({"params": params}, x)
    assert isinstance(make_mixer("lmu", d_model=4), LMUMixer)
    # Regression: hidden_dim=0 silently meant d_model.
    with pytest.raises(ValueError, match="hidden_dim must be a positive int or None.*got 0"):
        jax.eval_shape(_mixer(hidden_dim=0).init, jax.random.key(0), x)


def test_window_or_soft_causal_mask_is_refused_not_ignored():
    # Regression: a sliding-window or soft-causal mask was silently dropped.
    params, x = _inputs(np.float32)
    for mask in (
        AttentionMask(causal=True, window_left=2),
        AttentionMask(soft_causal_ratio=0.5),
    ):
        with pytest.raises(ValueError, match=r"padding \(segment ids\) only; expected window_left"):
            _mixer().apply({"params": params}, x, mask=mask)
