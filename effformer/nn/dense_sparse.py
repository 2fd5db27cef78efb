"""DSFormer's dense x semi-structured-sparse weight factorisation and its Straight-Through Factorizer.

Chand, Prabhu and Kumar, 2023, "DSFormer: Effective Compression of
Text-Transformers by Dense-Sparse Weight Factorization" (arXiv 2312.13211)
replace a Transformer's weight matrices by the product of a small dense matrix
and a semi-structured sparse one, and learn all the factorisations jointly on
the task loss with their Straight-Through Factorizer (STF) instead of fixing
them by a task-unaware initialisation.

What comes from the paper's text available here (its abstract and third-party
summaries of it; no official code is known):

* a weight matrix is approximated as a small dense basis times a sparse
  coefficient matrix with a fixed number of non-zeros per row (semi-structured
  sparsity): every row of the coefficients picks a few of the basis vectors;
* it is compared with low-rank factorisation at equal compression (the abstract:
  "up to 40% better compression than the state-of-the-art low-rank factorizers"),
  at 2x, 2.8x and 3.57x;
* existing factorizers depend on a task-unaware initialisation; STF learns all
  the factorisations jointly to maximise the task accuracy, refining the
  discrete sparsity pattern during fine-tuning.

Choices made here because that text does not give them:

* **Layout.** A kernel ``W`` [d_in, d_out] (Flax's layout) is factorised on the
  side of its larger dimension ``q``: the ``q`` "signals" (the output units'
  weight vectors when ``d_out >= d_in``, ``sparse_side="out"``; else the input
  units' fan-out vectors, ``sparse_side="in"``) are each a combination of
  ``nonzeros_per_row`` (k) of ``rank`` (r) dense basis vectors of the other
  dimension ``p``. ``"out"``: ``W = D @ C^T`` with basis ``D`` [d_in, r] and
  coefficients ``C`` [d_out, r]; ``"in"``: ``W = C @ D^T`` with ``C`` [d_in, r],
  ``D`` [d_out, r]. Every row of ``C`` keeps k entries. The sparse factor on the
  large side is what makes the factorisation cheaper than low rank at equal
  parameters; with the sparse factor on the small side it cannot beat it.
* **Parameter count.** The stored values: ``p * r + q * k``
  (:func:`dense_sparse_param_count`); the k column indices of each row are not
  counted (``q * k`` integers of ``ceil(log2 r)`` bits, reported apart by the
  experiment). Low rank at rank r stores ``(p + q) * r``; it is the special case
  k = r of the same code.
* **STF's projection and gradient.** The coefficients are a dense latent
  matrix; the forward pass keeps the k largest magnitudes of every row
  (:func:`sparse_project`, a hard top-k) and the backward pass is the
  straight-through estimator: the gradient of the projected matrix is passed to
  the whole latent, unmasked, so that a coefficient outside the pattern can grow
  and enter it. The basis gets its ordinary gradient.
* **Task-unaware initialisation** (:func:`factorize`): start from the truncated
  SVD (``D`` = the top r left singular vectors of the signals), then alternate
  (a) coefficients: per row, least-squares coefficients in the basis, keep the
  top k by magnitude, refit those k by least squares (and keep the previous
  support where it fits better, so no step increases the error); (b) basis:
  least squares given the coefficients. Finally every basis vector and its
  coefficient column are rescaled to equal norms (the product is unchanged).
  This is the alternating sparse-coding / least-squares scheme of dictionary
  learning (MOD-like); the paper's exact initialiser is not known here.

:class:`DenseSparseLinear` computes ``y = (x @ D) @ top_k(C)^T + b`` (``"out"``)
without forming ``W``: ``d_in * r + r * d_out`` multiply-adds per token with the
masked coefficients as a dense matrix, which training needs anyway for the
straight-through gradient. :func:`compact_coefficients` and
:func:`dense_sparse_apply` are the inference form: the k values and indices of
every row, ``d_in * r + d_out * k`` multiply-adds per token (a gather, or a
scatter-add for ``"in"``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

SPARSE_SIDES = ("out", "in")


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}.")


def check_factor_shape(owner: str, rank: int, nonzeros_per_row: int, basis_dim: int) -> None:
    """Refuse a rank outside [1, basis_dim] or k outside [1, rank], naming the argument."""
    _check_positive_int(owner, "rank", rank)
    _check_positive_int(owner, "nonzeros_per_row", nonzeros_per_row)
    if rank > basis_dim:
        raise ValueError(
            f"{owner}: rank must be <= {basis_dim} (the smaller dimension of the matrix, "
            f"which the basis spans), got rank={rank}."
        )
    if nonzeros_per_row > rank:
        raise ValueError(
            f"{owner}: nonzeros_per_row must be in [1, rank={rank}], got {nonzeros_per_row}."
        )


def sparse_side_for(d_in: int, d_out: int) -> str:
    """``"out"`` if d_out >= d_in else ``"in"``: the sparse coefficients cover the larger side."""
    return "out" if d_out >= d_in else "in"


def _side_dims(d_in: int, d_out: int, sparse_side: str) -> tuple[int, int]:
    """(p, q): the basis dimension and the number of coefficient rows."""
    if sparse_side not in SPARSE_SIDES:
        raise ValueError(f"sparse_side: expected one of {SPARSE_SIDES}, got {sparse_side!r}.")
    return (d_in, d_out) if sparse_side == "out" else (d_out, d_in)


# ---------------------------------------------------------------------------- projection


def top_k_mask(latent: Array, k: int) -> Array:
    """latent [..., n] -> bool [..., n], True at the k largest |latent| of every row.

    Ties are broken by position (``jax.lax.top_k``), so every row has exactly k.
    """
    n = latent.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"top_k_mask: k must be an int in [1, {n}] (the rows' length), got {k!r}.")
    _, indices = jax.lax.top_k(jnp.abs(latent), k)
    mask = jnp.zeros(latent.shape, bool)
    return jnp.put_along_axis(mask, indices, True, axis=-1, inplace=False)


def sparse_project(latent: Array, k: int) -> Array:
    """STF's projection: the k largest-magnitude entries of every row, straight-through.

    latent: [..., n] the dense latent coefficients; k in [1, n].
    Returns [..., n]: ``latent`` where :func:`top_k_mask` is True, 0 elsewhere. The
    gradient with respect to ``latent`` is the identity (the straight-through
    estimator): the full, unmasked gradient of the output.
    """
    projected = jnp.where(top_k_mask(latent, k), latent, jnp.zeros((), latent.dtype))
    return latent + jax.lax.stop_gradient(projected - latent)


def masked_project(latent: Array, mask: Array) -> Array:
    """``latent * mask`` with a fixed pattern: the gradient reaches only the kept entries.

    The conventional alternative to STF (fine-tuning the values of a sparsity
    pattern fixed at initialisation). latent, mask: [..., n].
    """
    if mask.shape != latent.shape:
        raise ValueError(
            f"masked_project: mask must have the latent's shape {latent.shape}, got {mask.shape}."
        )
    return jnp.where(mask, latent, jnp.zeros((), latent.dtype))


# ---------------------------------------------------------------------------- products


def dense_sparse_kernel(
    basis: Array, coefficients: Array, k: int, sparse_side: str = "out"
) -> Array:
    """The kernel [d_in, d_out] of the factors, with STF's projection of the coefficients.

    basis: [p, r]; coefficients (dense latent): [q, r]. ``"out"``: ``D @ top_k(C)^T``
    ([p = d_in, q = d_out]); ``"in"``: ``top_k(C) @ D^T`` ([q = d_in, p = d_out]).
    """
    _check_factors("dense_sparse_kernel", basis, coefficients)
    sparse = sparse_project(coefficients, k)
    return basis @ sparse.T if sparse_side == "out" else sparse @ basis.T


def _check_factors(owner: str, basis: Array, coefficients: Array) -> None:
    if basis.ndim != 2 or coefficients.ndim != 2 or basis.shape[1] != coefficients.shape[1]:
        raise ValueError(
            f"{owner}: expected basis [p, r] and coefficients [q, r] with the same r, got "
            f"basis {basis.shape} and coefficients {coefficients.shape}."
        )


def compact_coefficients(coefficients: Array, k: int) -> tuple[Array, Array]:
    """The inference form of the coefficients: (values [q, k], indices int32 [q, k]).

    The k kept entries of every row (:func:`top_k_mask`), in decreasing magnitude;
    coefficients [q, r], k in [1, r].
    """
    if coefficients.ndim != 2:
        raise ValueError(
            f"compact_coefficients: coefficients must be [q, r], got shape {coefficients.shape}."
        )
    rank = coefficients.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= rank:
        raise ValueError(f"compact_coefficients: k must be an int in [1, r={rank}], got {k!r}.")
    _, indices = jax.lax.top_k(jnp.abs(coefficients), k)
    return jnp.take_along_axis(coefficients, indices, axis=-1), indices.astype(jnp.int32)


def dense_sparse_apply(
    x: Array,
    basis: Array,
    values: Array,
    indices: Array,
    *,
    sparse_side: str = "out",
    bias: Array | None = None,
) -> Array:
    """``x @ W + b`` from the compact factors, without forming W or a dense coefficient matrix.

    x: [..., d_in]; basis: [p, r]; values, indices: [q, k] (:func:`compact_coefficients`).
    ``"out"`` (d_in = p, d_out = q): ``h = x @ D`` [..., r], then
    ``y_j = sum_t values[j, t] * h[indices[j, t]]`` (a gather). ``"in"`` (d_in = q,
    d_out = p): ``h_a = sum_{i, t: indices[i, t] = a} x_i * values[i, t]`` (a
    scatter-add), then ``y = h @ D^T``. Returns [..., d_out].
    """
    if values.shape != indices.shape or values.ndim != 2:
        raise ValueError(
            f"dense_sparse_apply: values and indices must both be [q, k], got values "
            f"{values.shape} and indices {indices.shape}."
        )
    p, rank = basis.shape
    q = values.shape[0]
    d_in = p if sparse_side == "out" else q
    _side_dims(d_in, q if sparse_side == "out" else p, sparse_side)
    if x.shape[-1] != d_in:
        raise ValueError(
            f"dense_sparse_apply: x must be [..., {d_in}] (d_in of the factors), got {x.shape}."
        )
    if sparse_side == "out":
        h = x @ basis  # [..., r]
        y = jnp.sum(h[..., indices] * values, axis=-1)  # [..., q, k] -> [..., q]
    else:
        contributions = x[..., :, None] * values  # [..., q, k]
        h = jnp.zeros((*x.shape[:-1], rank), jnp.result_type(x, values))
        h = h.at[..., indices].add(contributions)
        y = h @ basis.T
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------- parameter counts


def dense_sparse_param_count(d_in: int, d_out: int, rank: int, nonzeros_per_row: int) -> int:
    """Stored values of a dense-sparse factorisation of a [d_in, d_out] kernel: ``p r + q k``.

    The sparse coefficients cover the larger side q (:func:`sparse_side_for`); their
    ``q * k`` indices are not counted. k = r gives low rank, ``(p + q) r``.
    """
    p, q = _side_dims(d_in, d_out, sparse_side_for(d_in, d_out))
    check_factor_shape("dense_sparse_param_count", rank, nonzeros_per_row, p)
    return p * rank + q * nonzeros_per_row


def low_rank_param_count(d_in: int, d_out: int, rank: int) -> int:
    """Stored values of a rank-r factorisation of a [d_in, d_out] kernel: ``(d_in + d_out) r``."""
    return dense_sparse_param_count(d_in, d_out, rank, rank)


def shapes_for_compression(
    d_in: int, d_out: int, compression: float, density: float
) -> dict[str, tuple[int, int]]:
    """Factor shapes with at most ``d_in * d_out / compression`` values each.

    Returns ``{"low_rank": (r, r), "dense_sparse": (r, k)}``: the largest rank of
    low rank within the budget, and the largest rank (at most p) of a dense-sparse
    factorisation whose rows keep ``k = max(1, floor(density * r))`` entries and
    that fits in the budget. compression > 1; density in (0, 1].
    """
    if not compression > 1:
        raise ValueError(f"shapes_for_compression: compression must be > 1, got {compression}.")
    if not 0 < density <= 1:
        raise ValueError(f"shapes_for_compression: density must be in (0, 1], got {density}.")
    p, q = _side_dims(d_in, d_out, sparse_side_for(d_in, d_out))
    budget = d_in * d_out / compression
    low_rank = int(budget // (p + q))
    if low_rank < 1:
        raise ValueError(
            f"shapes_for_compression: a [{d_in}, {d_out}] kernel cannot be compressed "
            f"{compression}x with rank >= 1 (budget {budget:.0f} values)."
        )
    best = None
    for rank in range(1, p + 1):
        k = max(1, math.floor(density * rank))
        if p * rank + q * k <= budget:
            best = (rank, k)
    if best is None:
        raise ValueError(
            f"shapes_for_compression: no dense-sparse factorisation of a [{d_in}, {d_out}] "
            f"kernel with density {density} fits {compression}x (budget {budget:.0f} values)."
        )
    return {"low_rank": (low_rank, low_rank), "dense_sparse": best}


# ---------------------------------------------------------------------------- initialisation


def _refit_on_support(signals: Array, basis: Array, mask: Array, k: int) -> Array:
    """Least-squares coefficients [q, r] of every signal (rows of signals [q, p]) on its support.

    mask: bool [q, r] with k True per row. Each row solves its k x k normal
    equations (with a ridge of one machine epsilon of the Gram matrix's scale, so
    that a degenerate support still solves).
    """
    _, indices = jax.lax.top_k(mask.astype(signals.dtype), k)  # [q, k]
    chosen = jnp.moveaxis(basis[:, indices], 1, 0)  # [q, p, k]
    gram = jnp.einsum("qpk,qpl->qkl", chosen, chosen)
    scale = jnp.trace(gram, axis1=-2, axis2=-1)[:, None, None] / k
    ridge = jnp.finfo(signals.dtype).eps * jnp.maximum(scale, jnp.finfo(signals.dtype).tiny)
    gram = gram + ridge * jnp.eye(k, dtype=signals.dtype)
    rhs = jnp.einsum("qpk,qp->qk", chosen, signals)
    values = jnp.linalg.solve(gram, rhs[..., None])[..., 0]
    coefficients = jnp.zeros(mask.shape, signals.dtype)
    return jnp.put_along_axis(coefficients, indices, values, axis=-1, inplace=False)


def _squared_error(signals: Array, basis: Array, coefficients: Array) -> Array:
    return jnp.sum((signals - coefficients @ basis.T) ** 2)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _svd_start(signals: Array, rank: int, k: int) -> tuple[Array, Array, Array, Array]:
    u, _, _ = jnp.linalg.svd(signals.T, full_matrices=False)
    basis = u[:, :rank]  # orthonormal: the least-squares coefficients are projections
    mask = top_k_mask(signals @ basis, k)
    coefficients = _refit_on_support(signals, basis, mask, k)
    return basis, coefficients, mask, _squared_error(signals, basis, coefficients)


@functools.partial(jax.jit, static_argnums=(3,))
def _alternating_step(
    signals: Array, coefficients: Array, mask: Array, k: int
) -> tuple[Array, Array, Array, Array]:
    # (b) the basis given the coefficients: least squares over all signals.
    basis = (jnp.linalg.pinv(coefficients) @ signals).T
    # (a) the coefficients given the basis: top-k of the least-squares coefficients,
    # refitted on that support; a row keeps its previous support where that fits
    # better, so the error cannot increase.
    new_mask = top_k_mask(jnp.linalg.lstsq(basis, signals.T)[0].T, k)
    new = _refit_on_support(signals, basis, new_mask, k)
    old = _refit_on_support(signals, basis, mask, k)
    row_error = lambda c: jnp.sum((signals - c @ basis.T) ** 2, axis=-1)
    better = (row_error(new) < row_error(old))[:, None]
    coefficients = jnp.where(better, new, old)
    mask = jnp.where(better, new_mask, mask)
    return basis, coefficients, mask, _squared_error(signals, basis, coefficients)


def factorize(
    kernel: Array, rank: int, nonzeros_per_row: int, iters: int = 10
) -> tuple[Array, Array, Array]:
    """DSFormer's task-unaware initialisation of one kernel (module docstring).

    kernel: [d_in, d_out]; rank: r in [1, min(d_in, d_out)]; nonzeros_per_row: k in
    [1, r]; iters: alternating steps after the SVD start (0: the SVD start only,
    which for k = r is the truncated SVD, the best rank-r approximation).
    Returns (basis [p, r], coefficients [q, r] with k non-zeros per row, errors
    [iters + 1]): the relative Frobenius errors ``||W - W_hat|| / ||W||`` after the
    start and after each step, never increasing. The sparse side is
    :func:`sparse_side_for` ``(d_in, d_out)``; :func:`dense_sparse_kernel` of the
    result with the same k is ``W_hat``.
    """
    if kernel.ndim != 2:
        raise ValueError(f"factorize: kernel must be [d_in, d_out], got shape {kernel.shape}.")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"factorize: iters must be an int >= 0, got {iters!r}.")
    d_in, d_out = kernel.shape
    side = sparse_side_for(d_in, d_out)
    p, _ = _side_dims(d_in, d_out, side)
    check_factor_shape("factorize", rank, nonzeros_per_row, p)
    signals = kernel.T if side == "out" else kernel  # [q, p]: one signal per row
    norm = jnp.sqrt(jnp.sum(signals**2))
    basis, coefficients, mask, error = _svd_start(signals, rank, nonzeros_per_row)
    errors = [error]
    for _ in range(iters):
        basis, coefficients, mask, error = _alternating_step(
            signals, coefficients, mask, nonzeros_per_row
        )
        errors.append(error)
    # Equal norms of every basis vector and its coefficient column (product unchanged).
    basis_norm = jnp.linalg.norm(basis, axis=0)
    coefficient_norm = jnp.linalg.norm(coefficients, axis=0)
    usable = (basis_norm > 0) & (coefficient_norm > 0)
    scale = jnp.sqrt(jnp.where(usable, coefficient_norm, 1.0) / jnp.where(usable, basis_norm, 1.0))
    basis, coefficients = basis * scale, coefficients / scale
    return basis, coefficients, jnp.sqrt(jnp.stack(errors)) / norm


def low_rank(kernel: Array, rank: int) -> tuple[Array, Array, Array]:
    """The truncated-SVD baseline in the same layout: ``factorize(kernel, rank, rank, iters=0)``.

    Returns (basis [p, r], coefficients [q, r], relative error [1]); the product is
    the best rank-r approximation of ``kernel`` [d_in, d_out].
    """
    return factorize(kernel, rank, rank, iters=0)


# ---------------------------------------------------------------------------- the layer


class DenseSparseLinear(nn.Module):
    """``y = x @ (dense x sparse) + b``, computed as ``(x @ D) @ top_k(C)^T`` (module docstring).

    Attributes:
      features: d_out.
      rank: r, the number of dense basis vectors, in [1, min(d_in, d_out)].
      nonzeros_per_row: k in [1, r], kept coefficients per row of C (STF's top-k of
        the dense latent C, straight-through gradient).
      sparse_side: ``"out"`` (C [d_out, r], D [d_in, r]) or ``"in"`` (C [d_in, r],
        D [d_out, r], ``y = (x @ top_k(C)) @ D^T``); ``None`` picks the larger side
        (:func:`sparse_side_for`), as :func:`factorize` does.
      use_bias: a bias [d_out].

    Parameters: ``basis`` [p, r], ``coefficients`` [q, r] (the dense latent),
    ``bias`` [d_out]; the stored model keeps ``p r + q k`` values
    (:func:`dense_sparse_param_count`) plus ``d_out`` for the bias.
    """

    features: int
    rank: int
    nonzeros_per_row: int
    sparse_side: str | None = None
    use_bias: bool = True
    basis_init: Initializer = nn.initializers.lecun_normal()
    coefficients_init: Initializer = nn.initializers.normal(stddev=1.0)
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., d_in] -> [..., features]."""
        _check_positive_int("DenseSparseLinear", "features", self.features)
        d_in = x.shape[-1]
        side = self.sparse_side or sparse_side_for(d_in, self.features)
        p, q = _side_dims(d_in, self.features, side)
        check_factor_shape("DenseSparseLinear", self.rank, self.nonzeros_per_row, p)
        basis = self.param("basis", self.basis_init, (p, self.rank), self.param_dtype)
        # Coefficients scaled so that a row of k unit-variance entries keeps the variance.
        coefficients = self.param(
            "coefficients",
            lambda key, shape, dtype: (
                self.coefficients_init(key, shape, dtype) / math.sqrt(self.nonzeros_per_row)
            ),
            (q, self.rank),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, basis, coefficients, bias = nn.dtypes.promote_dtype(
            x, basis, coefficients, bias, dtype=self.dtype
        )
        sparse = sparse_project(coefficients, self.nonzeros_per_row)
        y = (x @ basis) @ sparse.T if side == "out" else (x @ sparse) @ basis.T
        return y if bias is None else y + bias
