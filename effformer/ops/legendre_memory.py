"""The Legendre Memory Unit's linear memory, recurrent and parallel (FFT).

The LMU (Voelker, Kajić & Eliasmith 2019) keeps a memory ``m_t`` of ``order``
coefficients that represents the last ``theta`` steps of its input ``u`` in the
basis of shifted Legendre polynomials. In continuous time ``theta m'(t) =
A m(t) + B u(t)`` with

    A_ij = (2i + 1) * (-1            if i < j
                       (-1)^(i-j+1)  if i >= j),        B_i = (2i + 1) (-1)^i

(here divided by ``theta``). Discretised with a zero-order hold at step 1
(what the LMU and LMUFormer code do with ``scipy.signal.cont2discrete``):

    Abar = expm(A),   Bbar = A^-1 (expm(A) - I) B,   m_t = Abar m_{t-1} + Bbar u_t.

The memory is linear and time-invariant, so (Chilkuri & Eliasmith 2021,
"Parallelizing Legendre Memory Unit Training") the whole sequence is one causal
convolution with the impulse response ``H_k = Abar^k Bbar``:

    m_t = sum_{j <= t} H_{t-j} u_j,

computed with FFTs of length 2L (no wrap-around), O(L log L) and parallel
over time. Implementations of :func:`legendre_memory`:

* ``"fft"``: the convolution by FFT (the default; LMUFormer's training path);
* ``"scan"``: the recurrence, one step per position (``lax.scan``), which is
  also the decoding step;
* ``"reference"``: the convolution sum written out with a dense Toeplitz
  matrix of impulse responses, for tests.

The matrices and the impulse response are computed in float64 with NumPy/SciPy
at trace time (they depend only on ``order``, ``theta`` and the length) and
cached; they are constants, not parameters (LMUFormer registers them as buffers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax import lax

Array = jax.Array

IMPLEMENTATIONS = ("fft", "scan", "reference")


def legendre_state_space(order: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Continuous-time (A [order, order], B [order]) of the LMU, float64, divided by theta."""
    _check_order_theta("legendre_state_space", order, theta)
    q = np.arange(order, dtype=np.float64)
    scale = (2 * q + 1)[:, None] / theta
    i, j = np.meshgrid(q, q, indexing="ij")
    A = scale * np.where(i < j, -1.0, (-1.0) ** (i - j + 1))
    B = scale[:, 0] * (-1.0) ** q
    return A, B


@functools.lru_cache(maxsize=32)
def discretised_state_space(order: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Zero-order-hold (Abar [order, order], Bbar [order]) at step 1, float64.

    One matrix exponential of the augmented system ``[[A, B], [0, 0]]`` gives
    both: its top-left block is ``expm(A)`` and its top-right column is
    ``A^-1 (expm(A) - I) B`` (without inverting A).
    """
    A, B = legendre_state_space(order, theta)
    augmented = np.zeros((order + 1, order + 1))
    augmented[:order, :order] = A
    augmented[:order, order] = B
    exponential = scipy.linalg.expm(augmented)
    return exponential[:order, :order], exponential[:order, order]


@functools.lru_cache(maxsize=32)
def impulse_response(order: int, theta: float, length: int) -> np.ndarray:
    """``H [length, order]`` with ``H_k = Abar^k Bbar``, float64 (cached; read-only)."""
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"impulse_response: length must be a positive int, got {length!r}.")
    Abar, Bbar = discretised_state_space(order, theta)
    response = np.empty((length, order))
    state = Bbar
    for k in range(length):
        response[k] = state
        state = Abar @ state
    response.flags.writeable = False
    return response


def _check_order_theta(owner: str, order, theta) -> None:
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"{owner}: order must be a positive int, got {order!r}.")
    if not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"{owner}: theta must be a positive number (steps), got {theta!r}.")


def legendre_memory(
    u: Array,
    *,
    order: int,
    theta: float,
    implementation: str = "fft",
) -> Array:
    """The LMU memory of every step: ``m_t = Abar m_{t-1} + Bbar u_t``, ``m_{-1} = 0``.

    Args:
      u: [batch, L, channels] inputs; each channel has its own memory.
      order: memory size per channel (Legendre coefficients).
      theta: the window, in steps, that the memory represents.
      implementation: ``"fft"``, ``"scan"`` or ``"reference"`` (module docstring).
    Returns:
      [batch, L, channels, order] in u's dtype (float32 at least inside).
    """
    _check_order_theta("legendre_memory", order, theta)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"legendre_memory: implementation must be one of {IMPLEMENTATIONS}, "
            f"got {implementation!r}."
        )
    if u.ndim != 3:
        raise ValueError(
            f"legendre_memory: u must have shape [batch, L, channels], got {tuple(u.shape)}."
        )
    batch, length, channels = u.shape
    dtype = jnp.promote_types(u.dtype, jnp.float32)
    u = u.astype(dtype)
    if implementation == "scan":
        Abar, Bbar = (jnp.asarray(a, dtype) for a in discretised_state_space(order, theta))
        state = jnp.zeros((batch, channels, order), dtype)

        def step(state, u_t):  # u_t [batch, channels]
            state = legendre_step(state, u_t, Abar, Bbar)
            return state, state

        _, memory = lax.scan(step, state, jnp.swapaxes(u, 0, 1))
        return jnp.swapaxes(memory, 0, 1)

    response = jnp.asarray(impulse_response(order, theta, length), dtype)  # [L, order]
    if implementation == "reference":
        # Toeplitz [L, L, order]: entry (t, j) = H_{t-j} for j <= t, else 0.
        t, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
        toeplitz = jnp.where(jnp.asarray(t >= j)[..., None], response[np.clip(t - j, 0, None)], 0.0)
        memory = jnp.einsum("tjk,bjc->btck", toeplitz, u)
    else:
        size = 2 * length  # linear (not circular) convolution of two length-L signals
        u_f = jnp.fft.rfft(u, n=size, axis=1)  # [batch, L + 1, channels]
        h_f = jnp.fft.rfft(response, n=size, axis=0)  # [L + 1, order]
        product = u_f[..., None] * h_f[None, :, None, :]
        memory = jnp.fft.irfft(product, n=size, axis=1)[:, :length].astype(dtype)
    return memory


def legendre_step(state: Array, u_t: Array, Abar: Array, Bbar: Array) -> Array:
    """One step: state [batch, channels, order], u_t [batch, channels] -> the next state."""
    return state @ Abar.T + u_t[..., None] * Bbar
