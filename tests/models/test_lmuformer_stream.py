"""LMUFormer's step-by-step inference against its parallel forward (float64, evaluation-mode
BatchNorm with random running statistics): the flushed stream equals the parallel model on
every prefix, the prediction after each step equals the running mean of the parallel
per-position logits of the tokens read so far (the original's ``all_seq``), causality,
non-spiking and spiking; errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer import models
from effformer.models.lmuformer import spike_counts, spike_rates
from effformer.models.lmuformer_stream import (
    init_stream,
    stream_delay,
    stream_predictions,
    stream_step,
)

TINY = dict(tiny=True, embed_dim=6, order=4, theta=5.0, num_conv_layers=2)
TINY.update(num_classes=3, dtype=jnp.float64)


def _trained_like(model, x, seed=0):
    """Random float64 parameters and running statistics (BatchNorm scales 1.5 ± 0.3, means
    0.3 N(0, 1), variances in [0.2, 0.7]: far from the fresh 0 and 1, and every LIF fires)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":
            return 1.5 + 0.3 * rng.standard_normal(leaf.shape)
        if name == "var":
            return 0.2 + 0.5 * rng.random(leaf.shape)
        return (0.3 if name == "mean" else 0.5) * rng.standard_normal(leaf.shape)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def _streamed(model):
    return jax.jit(functools.partial(stream_predictions, model, flush_each_step=True))


def _models():
    """Non-spiking with two blocks; spiking with one (random weights that make every LIF fire)."""
    plain = models.create("lmuformer", **TINY, num_layers=2, input_dim=2)
    return plain, models.create("spiking_lmuformer", **TINY, num_layers=1, input_dim=2)


@pytest.mark.parametrize("spiking", [False, True])
def test_stream_equals_the_parallel_model_on_prefixes(x64, spiking):
    """After step n: flushed = model(inputs[:, :n + 1]); not flushed = the mean of the
    parallel per-position logits of tokens 0 .. n - delay (the head's bias before any)."""
    model = _models()[spiking]
    x = np.random.default_rng(0).standard_normal((3, 9, 2))
    variables = _trained_like(model, x, seed=1)
    logits, flushed = _streamed(model)(variables, x)
    per_position, state = model.apply(
        variables, x, per_position=True, mutable=["intermediates"]
    )  # [B, L, classes]
    np.testing.assert_allclose(per_position.mean(1), model.apply(variables, x), rtol=1e-12)
    if spiking:
        rates = spike_rates(spike_counts(state["intermediates"]))
        assert min(rates.values()) > 0.05, rates  # every LIF layer fires: the test sees spikes
    delay = stream_delay(model)
    assert delay == 3
    for n in (1, 8):  # shorter than the delay, the whole sequence
        want = model.apply(variables, x[:, : n + 1])
        np.testing.assert_allclose(flushed[:, n], want, rtol=1e-9, atol=1e-9, err_msg=str(n))
    bias = np.broadcast_to(variables["params"]["head"]["bias"], (3, 3))
    for n in range(9):
        want = per_position[:, : n + 1 - delay].mean(1) if n >= delay else bias
        np.testing.assert_allclose(logits[:, n], want, rtol=1e-9, atol=1e-9, err_msg=str(n))
    assert np.ptp(np.asarray(logits[0, delay:]), axis=0).max() > 1e-3  # predictions move


def test_step_by_step_api_is_causal_and_counts_tokens(x64):
    model = _models()[0]
    x = np.random.default_rng(0).standard_normal((3, 9, 2))
    variables = _trained_like(model, x, seed=1)
    logits, _ = _streamed(model)(variables, x)
    changed = x.copy()
    changed[:, 4:] += 1.0  # later inputs cannot change the predictions up to step 3
    np.testing.assert_array_equal(logits[:, :4], _streamed(model)(variables, changed)[0][:, :4])
    step = jax.jit(functools.partial(stream_step, model))
    state = init_stream(model, 3, jnp.float64)
    for n in range(9):
        state, step_logits, tokens = step(variables, state, x[:, n])
        assert int(tokens) == max(0, n + 1 - stream_delay(model))
        np.testing.assert_allclose(step_logits, logits[:, n], rtol=1e-12, atol=1e-12)


def test_bad_inputs_are_named():
    model = models.create("lmuformer", tiny=True, num_layers=1, num_conv_layers=1)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 16, 4)))
    state = init_stream(model, 2)
    with pytest.raises(ValueError, match=r"x_t must have shape \[B=2, channels=4\].*got \(2, 3\)"):
        stream_step(model, variables, state, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"x_t must have shape \[B=2.*got \(3, 4\)"):
        stream_step(model, variables, state, jnp.zeros((3, 4)))
    with pytest.raises(
        ValueError, match="must hold 'params' and 'batch_stats'.*got \\['params'\\]"
    ):
        stream_step(model, {"params": variables["params"]}, state, jnp.zeros((2, 4)))
    spiking = models.create("spiking_lmuformer", tiny=True, num_layers=1, num_conv_layers=1)
    with pytest.raises(ValueError, match="state does not fit this model"):
        stream_step(spiking, variables, state, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="model must be an LMUFormer, got MambaClassifier"):
        init_stream(models.create("mamba_classifier", tiny=True), 2)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        init_stream(model, 0)
    with pytest.raises(ValueError, match=r"signals \[B, L, input_dim=4\], got \(2, 5\)"):
        stream_predictions(model, variables, jnp.zeros((2, 5)))
