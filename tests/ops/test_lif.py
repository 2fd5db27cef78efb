"""Multi-step LIF neurons: forward and surrogate gradients against float64 loops, hard and soft
reset, detach_reset, causality, streaming, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.ops.lif import lif_step, multi_step_lif, spike_function


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _loop_lif(x, weights, *, tau, v_threshold, v_reset, decay_input, detach_reset, alpha):
    """spikingjelly's charge / fire / reset step by step in float64, time on axis 0, and the
    gradient of sum(weights * spikes) by hand-written backpropagation through time with the
    sigmoid surrogate dS/dH = alpha sigma(alpha (H - V_th)) (1 - sigma(alpha (H - V_th)))."""
    steps = x.shape[0]
    rest = 0.0 if v_reset is None else v_reset
    v = np.full(x.shape[1:], rest)
    hs, spikes = np.zeros_like(x), np.zeros_like(x)
    for t in range(steps):
        h = v + (x[t] - (v - rest)) / tau if decay_input else v - (v - rest) / tau + x[t]
        s = (h - v_threshold >= 0).astype(np.float64)
        v = h - v_threshold * s if v_reset is None else h * (1 - s) + v_reset * s
        hs[t], spikes[t] = h, s
    grad_x = np.zeros_like(x)
    grad_v = np.zeros(x.shape[1:])  # dL/dV_t, from the steps after t
    for t in reversed(range(steps)):
        h, s = hs[t], spikes[t]
        sig = _sigmoid(alpha * (h - v_threshold))
        surrogate = alpha * sig * (1 - sig)
        if v_reset is None:  # V_t = H_t - V_th S_t
            dv_dh = 1.0 - (0.0 if detach_reset else v_threshold * surrogate)
        else:  # V_t = H_t (1 - S_t) + V_reset S_t
            dv_dh = (1 - s) + (0.0 if detach_reset else (v_reset - h) * surrogate)
        grad_h = weights[t] * surrogate + grad_v * dv_dh
        grad_x[t] = grad_h / tau if decay_input else grad_h
        grad_v = grad_h * (1 - 1 / tau)
    return spikes, grad_x


NEURONS = [
    dict(tau=2.0, v_threshold=1.0, v_reset=0.0, decay_input=True),  # LMUFormer's
    dict(tau=2.0, v_threshold=0.5, v_reset=0.0, decay_input=True),  # its input LIF
    dict(tau=3.0, v_threshold=0.7, v_reset=-0.2, decay_input=False),
    dict(tau=1.5, v_threshold=1.0, v_reset=None, decay_input=True),  # soft reset
]


def test_forward_and_surrogate_gradients_match_the_loop(x64):
    """Time on axis 1 of [B, L, C] (the model's layout); the loop runs time on axis 0."""
    key_x, key_w = jax.random.split(jax.random.PRNGKey(0))
    x = np.asarray(1.2 * jax.random.normal(key_x, (2, 12, 3), jnp.float64) + 0.6)
    weights = np.asarray(jax.random.normal(key_w, x.shape, jnp.float64))
    for neuron in NEURONS:
        for detach_reset in (True, False):
            kwargs = dict(neuron, detach_reset=detach_reset, surrogate_alpha=4.0)

            @jax.jit
            def spikes_and_grad(x, weights, kwargs=kwargs):
                spikes, vjp = jax.vjp(lambda x: multi_step_lif(x, time_axis=1, **kwargs), x)
                return spikes, vjp(weights)[0]  # the gradient of sum(weights * spikes)

            spikes, grad = spikes_and_grad(x, weights)
            want_spikes, want_grad = _loop_lif(
                np.swapaxes(x, 0, 1),
                np.swapaxes(weights, 0, 1),
                alpha=4.0,
                detach_reset=detach_reset,
                **neuron,
            )
            assert 0.1 < want_spikes.mean() < 0.9, neuron  # the inputs exercise both branches
            message = f"{neuron}, detach_reset={detach_reset}"
            np.testing.assert_array_equal(spikes, np.swapaxes(want_spikes, 0, 1), err_msg=message)
            np.testing.assert_allclose(
                grad, np.swapaxes(want_grad, 0, 1), rtol=1e-10, atol=1e-12, err_msg=message
            )


def test_detach_reset_changes_only_the_gradient(x64):
    x = 1.5 * jax.random.normal(jax.random.PRNGKey(1), (10, 4), jnp.float64) + 0.8

    @jax.jit
    def spikes_and_grads(x):
        outputs = []
        for detach in (False, True):
            f = functools.partial(multi_step_lif, time_axis=0, detach_reset=detach)
            outputs.append((f(x), jax.grad(lambda x, f=f: jnp.sum(jnp.cos(f(x))))(x)))
        return outputs

    (kept, kept_grad), (detached, detached_grad) = spikes_and_grads(x)
    np.testing.assert_array_equal(kept, detached)
    assert np.max(np.abs(kept_grad - detached_grad)) > 1e-3


def test_constant_input_by_hand():
    """tau 2, X = 1.5: H = 0.75 (silent), then 0.75 + (1.5 - 0.75) / 2 = 1.125 (fires, V -> 0),
    and again: every second step fires. X = 2 reaches H = 1 = V_th at once (Heaviside(0) = 1)."""
    x = jnp.array([[1.5] * 6, [2.0] * 6]).T  # [time, neurons]
    spikes = jax.jit(multi_step_lif, static_argnames="time_axis")(x, time_axis=0)
    np.testing.assert_array_equal(spikes.T, [[0, 1, 0, 1, 0, 1], [1] * 6])


def test_spike_function_surrogate():
    x = jnp.array([-0.5, 0.0, 0.25])
    np.testing.assert_array_equal(spike_function(x, 4.0), [0, 1, 1])
    sig = _sigmoid(4.0 * np.asarray(x, np.float64))
    np.testing.assert_allclose(
        jax.vmap(jax.grad(spike_function))(x), 4 * sig * (1 - sig), rtol=1e-6
    )


def test_spikes_are_causal(x64):
    """dS_t / dX_s = 0 for s > t (surrogate Jacobian), and changing later inputs leaves the
    earlier spikes alone."""
    x = 1.2 * jax.random.normal(jax.random.PRNGKey(2), (9,), jnp.float64) + 0.7
    changed = x.at[5:].set(-x[5:] + 3.0)
    lif = functools.partial(multi_step_lif, time_axis=0)
    jacobian, spikes, changed_spikes = jax.jit(lambda x, y: (jax.jacobian(lif)(x), lif(x), lif(y)))(
        x, changed
    )
    assert np.all(np.triu(jacobian, k=1) == 0)
    assert np.all(np.diag(jacobian) != 0)
    assert np.any(changed_spikes[5:] != spikes[5:])
    np.testing.assert_array_equal(changed_spikes[:5], spikes[:5])


def test_carried_state_streams_the_sequence():
    """Two halves with the membrane carried over, or lif_step one step at a time, equal the
    whole sequence."""
    x = 1.3 * jax.random.normal(jax.random.PRNGKey(3), (2, 10, 3)) + 0.6

    @jax.jit
    def streams(x):
        whole, v_last = multi_step_lif(x, return_state=True)
        first, v_mid = multi_step_lif(x[:, :4], return_state=True)
        second, v_end = multi_step_lif(x[:, 4:], initial_v=v_mid, return_state=True)
        v, stepped = jnp.zeros((2, 3)), []
        for t in range(10):
            v, spike = lif_step(v, x[:, t])
            stepped.append(spike)
        halves = jnp.concatenate([first, second], axis=1)
        return whole, v_last, halves, v_end, jnp.stack(stepped, axis=1)

    whole, v_last, halves, v_end, stepped = streams(x)
    np.testing.assert_array_equal(halves, whole)
    np.testing.assert_allclose(v_end, v_last, rtol=1e-6)
    np.testing.assert_array_equal(stepped, whole)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tau=1.0), "tau must be a number > 1"),
        (dict(v_reset="0"), "v_reset must be a number"),
        (dict(surrogate_alpha=0.0), "surrogate_alpha must be a positive number"),
        (dict(time_axis=3), r"time_axis must index x of shape \(2, 5, 3\), got 3"),
        (dict(initial_v=jnp.zeros((2, 5))), r"initial_v must have .* \(2, 3\), got \(2, 5\)"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        multi_step_lif(jnp.zeros((2, 5, 3)), **kwargs)
