"""N:M semi-structured sparsity: the baseline DSFormer compares its factorisation with.

A kernel ``W`` [d_in, d_out] is N:M sparse when, for every output unit, every
group of ``m`` consecutive input weights holds at most ``n`` non-zeros (NVIDIA's
2:4 sparsity when n = 2, m = 4: the layout sparse tensor cores accelerate). It
stores ``d_in * d_out * n / m`` values (plus a small index per kept value, not
counted here, as the dense-sparse counters of ``effformer.nn.dense_sparse`` do
not count theirs), so 2:4 is a 2x compression and 2:6 a 3x one.

:func:`n_m_mask` is one-shot magnitude pruning, the usual starting point: in each
group keep the ``n`` weights of largest magnitude. Fine-tuning then keeps the
mask fixed (multiply the kernel by it in the forward pass, so the pruned weights
get no gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_n_m(owner: str, n: int, m: int) -> None:
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}.")
    if n > m:
        raise ValueError(f"{owner}: n must be <= m={m}, got n={n}.")


def _check(kernel: Array, n: int, m: int) -> None:
    _check_n_m("n_m_mask", n, m)
    if kernel.ndim != 2:
        raise ValueError(
            f"n_m_mask: kernel must be a matrix [d_in, d_out], got shape {tuple(kernel.shape)}."
        )
    if kernel.shape[0] % m:
        raise ValueError(
            f"n_m_mask: the kernel's input dimension must be a multiple of m={m} (groups of m "
            f"consecutive inputs), got kernel.shape={tuple(kernel.shape)}."
        )


def n_m_mask(kernel: Array, n: int, m: int) -> Array:
    """kernel [d_in, d_out] -> bool [d_in, d_out]: the n largest |w| of every m consecutive inputs.

    Groups run along the input axis, separately for every output unit (column);
    ties go to the earlier input.
    """
    _check(kernel, n, m)
    d_in, d_out = kernel.shape
    groups = jnp.abs(kernel).reshape(d_in // m, m, d_out)
    # Rank within the group: how many weights are larger, or equal and earlier.
    larger = groups[:, None, :, :] > groups[:, :, None, :]  # [g, i, j, d_out]: |w_j| > |w_i|
    tied_before = (groups[:, None, :, :] == groups[:, :, None, :]) & (
        jnp.arange(m)[None, :] < jnp.arange(m)[:, None]
    )[None, :, :, None]
    rank = jnp.sum(larger | tied_before, axis=2)  # [g, m, d_out]
    return (rank < n).reshape(d_in, d_out)


def n_m_param_count(d_in: int, d_out: int, n: int, m: int) -> int:
    """Values an N:M sparse [d_in, d_out] kernel stores: d_in * d_out * n / m."""
    _check_n_m("n_m_param_count", n, m)
    if d_in % m:
        raise ValueError(f"n_m_param_count: d_in must be a multiple of m={m}, got d_in={d_in}.")
    return d_in * d_out * n // m
