"""Multi-step leaky integrate-and-fire (LIF) neurons over a sequence axis, with a surrogate gradient.

The neuron of spikingjelly's ``MultiStepLIFNode`` (``spikingjelly.clock_driven``,
version 0.0.0.0.14, which LMUFormer's spiking models use with ``tau=2.0,
detach_reset=True`` and otherwise the defaults). Every element of ``x`` off the
time axis is one neuron; along the time axis, with ``V_{-1} = V_reset`` (0 for a
soft reset):

    charge   H_t = V_{t-1} + (X_t - (V_{t-1} - V_reset)) / tau      decay_input=True (default)
             H_t = V_{t-1} - (V_{t-1} - V_reset) / tau + X_t        decay_input=False
    fire     S_t = Heaviside(H_t - V_th)                             1 where H_t >= V_th, else 0
    reset    V_t = H_t (1 - S_t) + V_reset S_t                       hard reset (v_reset a number)
             V_t = H_t - V_th S_t                                    soft reset (v_reset=None;
                                                                     the charge then uses V_reset = 0)

The output is the spikes ``S`` (0 or 1, in x's dtype). Gradients: the Heaviside
step's derivative is replaced by spikingjelly's default surrogate
(``surrogate.Sigmoid``, alpha = 4):

    dS_t/dH_t := alpha * sigmoid(alpha (H_t - V_th)) * (1 - sigmoid(alpha (H_t - V_th)))

``detach_reset=True`` treats the spike in the reset as a constant (PyTorch's
``spike.detach()``): the gradient still reaches H_t through ``S_t`` itself and
through the kept membrane ``H_t (1 - S_t)``, but not through the reset's
dependence on ``S_t``. The recurrence runs with ``lax.scan`` (one step per
position: the neuron is nonlinear, so there is no parallel form), in float32 at
least; spikes at step t depend on ``X_0 .. X_t`` only.

:func:`lif_step` is one step of the same neuron, for streaming; ``initial_v`` and
``return_state`` of :func:`multi_step_lif` continue a sequence from a carried
membrane potential.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def spike_function(x: Array, alpha: float = 4.0) -> Array:
    """Heaviside(x) (1 where x >= 0) forward; sigmoid-derivative surrogate (slope ``alpha``) backward."""
    return (x >= 0).astype(x.dtype)


@spike_function.defjvp
def _spike_function_jvp(alpha, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    sigmoid = jax.nn.sigmoid(alpha * x)
    return spike_function(x, alpha), x_dot * (alpha * sigmoid * (1 - sigmoid))


def _check_neuron(
    owner: str,
    tau,
    v_threshold,
    v_reset,
    surrogate_alpha,
) -> None:
    if not isinstance(tau, numbers.Real) or not tau > 1:
        raise ValueError(
            f"{owner}: tau must be a number > 1 (spikingjelly's condition), got {tau!r}."
        )
    if not isinstance(v_threshold, numbers.Real):
        raise ValueError(f"{owner}: v_threshold must be a number, got {v_threshold!r}.")
    if v_reset is not None and not isinstance(v_reset, numbers.Real):
        raise ValueError(
            f"{owner}: v_reset must be a number (hard reset) or None (soft reset), got {v_reset!r}."
        )
    if not isinstance(surrogate_alpha, numbers.Real) or not surrogate_alpha > 0:
        raise ValueError(
            f"{owner}: surrogate_alpha must be a positive number, got {surrogate_alpha!r}."
        )


def lif_step(
    v: Array,
    x_t: Array,
    *,
    tau: float = 2.0,
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    decay_input: bool = True,
    detach_reset: bool = True,
    surrogate_alpha: float = 4.0,
) -> tuple[Array, Array]:
    """One step of every neuron: (V_{t-1}, X_t) -> (V_t, S_t), any equal shapes (module docstring)."""
    rest = 0.0 if v_reset is None else v_reset
    # Charge: the input is divided by tau (decay_input) or added whole.
    h = v + (x_t - (v - rest)) / tau if decay_input else v - (v - rest) / tau + x_t
    spike = spike_function(h - v_threshold, surrogate_alpha)
    held = lax.stop_gradient(spike) if detach_reset else spike
    # Reset: subtract the threshold (soft) or set the fired neurons to v_reset (hard).
    v_next = h - v_threshold * held if v_reset is None else h * (1 - held) + v_reset * held
    return v_next, spike


def multi_step_lif(
    x: Array,
    *,
    time_axis: int = 1,
    tau: float = 2.0,
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    decay_input: bool = True,
    detach_reset: bool = True,
    surrogate_alpha: float = 4.0,
    initial_v: Array | None = None,
    return_state: bool = False,
) -> Array | tuple[Array, Array]:
    """Spikes of LIF neurons driven by ``x`` along ``time_axis`` (module docstring).

    Args:
      x: inputs (the charge X_t), e.g. [batch, L, channels] with ``time_axis=1``;
        every element off ``time_axis`` is one neuron.
      time_axis: the axis of steps.
      tau, v_threshold, v_reset, decay_input, detach_reset: the neuron (spikingjelly's
        names and defaults, except ``detach_reset=True`` as LMUFormer sets it);
        ``v_reset=None`` is a soft reset.
      surrogate_alpha: slope of the sigmoid surrogate gradient.
      initial_v: membrane potential before the first step, x's shape without
        ``time_axis`` (None: V_reset, or 0 for a soft reset).
      return_state: also return the membrane potential after the last step.
    Returns:
      spikes, x's shape and dtype (0 or 1); with ``return_state``, (spikes, V_last)
      with V_last in float32 at least.
    """
    _check_neuron("multi_step_lif", tau, v_threshold, v_reset, surrogate_alpha)
    if x.ndim < 1:
        raise ValueError("multi_step_lif: x must have a time axis, got a scalar.")
    if not -x.ndim <= time_axis < x.ndim:
        raise ValueError(
            f"multi_step_lif: time_axis must index x of shape {tuple(x.shape)}, got {time_axis}."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"multi_step_lif: x must be floating point, got {x.dtype}.")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    steps = jnp.moveaxis(x, time_axis, 0).astype(dtype)
    if initial_v is None:
        rest = 0.0 if v_reset is None else v_reset
        v0 = jnp.full(steps.shape[1:], rest, dtype)
    else:
        if tuple(initial_v.shape) != tuple(steps.shape[1:]):
            raise ValueError(
                f"multi_step_lif: initial_v must have x's shape without time_axis, "
                f"{tuple(steps.shape[1:])}, got {tuple(initial_v.shape)}."
            )
        v0 = initial_v.astype(dtype)
    step = functools.partial(
        lif_step,
        tau=tau,
        v_threshold=v_threshold,
        v_reset=v_reset,
        decay_input=decay_input,
        detach_reset=detach_reset,
        surrogate_alpha=surrogate_alpha,
    )
    v_last, spikes = lax.scan(step, v0, steps)
    spikes = jnp.moveaxis(spikes, 0, time_axis).astype(x.dtype)
    return (spikes, v_last) if return_state else spikes
