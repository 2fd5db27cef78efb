"""The LMU memory: its matrices, its three implementations, and what it represents."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import cont2discrete

from effformer.ops.legendre_memory import (
    discretised_state_space,
    impulse_response,
    legendre_memory,
    legendre_state_space,
)


def _loop_memory(u: np.ndarray, order: int, theta: float) -> np.ndarray:
    """m_t = Abar m_{t-1} + Bbar u_t, step by step in float64: [B, L, C] -> [B, L, C, order]."""
    Abar, Bbar = discretised_state_space(order, theta)
    batch, length, channels = u.shape
    out = np.zeros((batch, length, channels, order))
    for b in range(batch):
        for c in range(channels):
            state = np.zeros(order)
            for t in range(length):
                state = Abar @ state + Bbar * u[b, t, c]
                out[b, t, c] = state
    return out


def test_state_space_matches_the_papers_matrices():
    """Voelker et al. (2019), eq. 2, for order 3 and theta 2, written out by hand."""
    A, B = legendre_state_space(3, 2.0)
    want_A = np.array([[-1, -1, -1], [3, -3, -3], [-5, 5, -5]]) / 2.0
    want_B = np.array([1, -3, 5]) / 2.0
    np.testing.assert_array_equal(A, want_A)
    np.testing.assert_array_equal(B, want_B)


def test_zero_order_hold_matches_scipy_cont2discrete():
    """The papers' code discretises with scipy.signal.cont2discrete(method="zoh")."""
    order, theta = 10, 37.0
    A, B = legendre_state_space(order, theta)
    want_A, want_B, *_ = cont2discrete(
        (A, B[:, None], np.ones((1, order)), np.zeros((1,))), dt=1.0, method="zoh"
    )
    Abar, Bbar = discretised_state_space(order, theta)
    np.testing.assert_allclose(Abar, want_A, atol=1e-13)
    np.testing.assert_allclose(Bbar, want_B[:, 0], atol=1e-13)


def test_impulse_response_is_powers_of_abar_times_bbar():
    Abar, Bbar = discretised_state_space(6, 8.0)
    response = impulse_response(6, 8.0, 5)
    np.testing.assert_allclose(response[3], np.linalg.matrix_power(Abar, 3) @ Bbar, atol=1e-14)
    assert not response.flags.writeable  # cached: callers must not change it


@pytest.mark.parametrize("implementation", ["fft", "scan", "reference"])
def test_every_implementation_equals_the_recurrence(x64, implementation):
    u = np.random.default_rng(0).normal(size=(2, 37, 3))
    got = legendre_memory(jnp.asarray(u), order=8, theta=20.0, implementation=implementation)
    assert got.shape == (2, 37, 3, 8) and got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), _loop_memory(u, 8, 20.0), atol=1e-11)


def test_fft_gradient_equals_the_recurrences(x64):
    """Parallel (FFT) training = recurrent: the same gradients with respect to the inputs."""
    u = jnp.asarray(np.random.default_rng(1).normal(size=(2, 29, 2)))
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(2, 29, 2, 6)))

    def loss(u, implementation):
        memory = legendre_memory(u, order=6, theta=11.0, implementation=implementation)
        return jnp.sum(jnp.sin(memory) * weights)

    fft = jax.grad(loss)(u, "fft")
    scan = jax.grad(loss)(u, "scan")
    np.testing.assert_allclose(np.asarray(fft), np.asarray(scan), atol=1e-11)


def test_float32_fft_error_is_small():
    u = np.random.default_rng(3).normal(size=(1, 256, 1)).astype(np.float32)
    got = legendre_memory(jnp.asarray(u), order=32, theta=64.0)
    assert got.dtype == jnp.float32
    want = _loop_memory(u.astype(np.float64), 32, 64.0)
    # Relative to the memory's scale: FFT round-off of length-512 transforms in float32.
    assert np.abs(np.asarray(got) - want).max() < 1e-5 * np.abs(want).max()


def _shifted_legendre(i: int, r: float) -> float:
    """P~_i(r) = P_i(2r - 1), Voelker et al. eq. 3's decoder weights."""
    return (-1) ** i * sum(math.comb(i, j) * math.comb(i + j, j) * (-r) ** j for j in range(i + 1))


@pytest.mark.parametrize("delay_fraction", [0.0, 0.5, 1.0])
def test_memory_holds_the_last_theta_steps(x64, delay_fraction):
    """The paper's claim: u(t - r theta) ~= sum_i P~_i(r) m_i(t) for a slow enough input.

    A sign or index error in A or B breaks this reconstruction (errors of order 1).
    """
    order, theta, length = 12, 64.0, 400
    t = np.arange(length)
    u = np.sin(2 * np.pi * t / 150.0)  # period > 2 theta: well inside the memory's band
    memory = np.asarray(legendre_memory(jnp.asarray(u[None, :, None]), order=order, theta=theta))
    decoder = np.array([_shifted_legendre(i, delay_fraction) for i in range(order)])
    reconstructed = memory[0, :, 0] @ decoder
    delay = int(delay_fraction * theta)
    start = 200  # after the first theta steps (the memory starts empty)
    error = np.abs(reconstructed[start:] - u[start - delay : length - delay]).max()
    assert error < 0.03


def test_bad_arguments_say_what_is_wrong():
    u = jnp.zeros((1, 4, 1))
    with pytest.raises(ValueError, match="order must be a positive int, got 0"):
        legendre_memory(u, order=0, theta=4.0)
    with pytest.raises(ValueError, match="theta must be a positive number"):
        legendre_memory(u, order=4, theta=-1.0)
    with pytest.raises(ValueError, match="implementation must be one of"):
        legendre_memory(u, order=4, theta=4.0, implementation="conv")
    with pytest.raises(ValueError, match=r"u must have shape \[batch, L, channels\], got \(4, 1\)"):
        legendre_memory(u[0], order=4, theta=4.0)
