import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.nn.dense_sparse import (
    DenseSparseLinear,
    compact_coefficients,
    dense_sparse_apply,
    dense_sparse_kernel,
    dense_sparse_param_count,
    factorize,
    low_rank,
    low_rank_param_count,
    masked_project,
    shapes_for_compression,
    sparse_project,
    top_k_mask,
)


def _normal(seed, shape):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float64)


def _reference_top_k(latent, k):
    """The k largest |latent| of every row, by a sort (ties do not occur in random data)."""
    out = np.zeros_like(latent)
    for i, row in enumerate(latent):
        keep = np.argsort(-np.abs(row))[:k]
        out[i, keep] = row[keep]
    return out


def test_sparse_project_keeps_top_k_and_passes_the_full_gradient(x64):
    latent = _normal(0, (5, 7))
    weights = _normal(1, (5, 7))
    projected = np.asarray(sparse_project(jnp.asarray(latent), 3))
    np.testing.assert_array_equal(projected, _reference_top_k(latent, 3))
    assert np.all(np.count_nonzero(projected, axis=1) == 3)
    # Straight-through: d/dlatent sum(w * project(latent)) = w, also off the pattern.
    grad = jax.grad(lambda c: jnp.sum(jnp.asarray(weights) * sparse_project(c, 3)))(latent)
    np.testing.assert_array_equal(grad, weights)
    # A fixed pattern passes the gradient only on the kept entries.
    mask = top_k_mask(jnp.asarray(latent), 3)
    grad = jax.grad(lambda c: jnp.sum(jnp.asarray(weights) * masked_project(c, mask)))(latent)
    np.testing.assert_array_equal(grad, weights * (projected != 0))


@pytest.mark.parametrize("sparse_side", ["out", "in"])
def test_dense_sparse_linear_matches_dense_reference(x64, sparse_side):
    d_in, d_out, rank, k = (6, 9, 4, 2) if sparse_side == "out" else (9, 6, 4, 2)
    layer = DenseSparseLinear(d_out, rank, k, param_dtype=jnp.float64)
    x = _normal(2, (2, 3, d_in))
    params = layer.init(jax.random.key(3), jnp.asarray(x))["params"]
    params = dict(params, bias=_normal(4, (d_out,)))
    upstream = _normal(5, (2, 3, d_out))

    def loss(p, x):
        return jnp.sum(layer.apply({"params": p}, x) * upstream)

    value, (grads, grad_x) = jax.value_and_grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    # Reference: the kernel W formed densely, float64, and its gradients by hand.
    basis = np.asarray(params["basis"])
    sparse = _reference_top_k(np.asarray(params["coefficients"]), k)
    kernel = basis @ sparse.T if sparse_side == "out" else sparse @ basis.T
    assert kernel.shape == (d_in, d_out)
    np.testing.assert_allclose(value, np.sum((x @ kernel + params["bias"]) * upstream), rtol=1e-12)
    grad_kernel = np.einsum("bli,blo->io", x, upstream)
    if sparse_side == "out":
        want_basis, want_coefficients = grad_kernel @ sparse, grad_kernel.T @ basis
    else:
        want_basis, want_coefficients = grad_kernel.T @ sparse, grad_kernel @ basis
    np.testing.assert_allclose(grads["basis"], want_basis, rtol=1e-10, atol=1e-12)
    # Straight-through: the latent gets the whole gradient of the projected matrix.
    np.testing.assert_allclose(grads["coefficients"], want_coefficients, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["bias"], upstream.sum((0, 1)), rtol=1e-12)
    np.testing.assert_allclose(grad_x, upstream @ kernel.T, rtol=1e-10, atol=1e-12)
    # The compact inference form (gather / scatter-add) computes the same product.
    values, indices = compact_coefficients(params["coefficients"], k)
    compact = dense_sparse_apply(
        jnp.asarray(x), basis, values, indices, sparse_side=sparse_side, bias=params["bias"]
    )
    np.testing.assert_allclose(compact, x @ kernel + params["bias"], rtol=1e-12, atol=1e-12)
    kernel_fn = dense_sparse_kernel(params["basis"], params["coefficients"], k, sparse_side)
    np.testing.assert_allclose(kernel_fn, kernel, rtol=1e-12)


def test_factorize_errors_fall_and_full_factors_are_exact(x64):
    kernel = _normal(6, (8, 12))
    basis, coefficients, errors = factorize(jnp.asarray(kernel), 6, 2, iters=6)
    errors = np.asarray(errors)
    assert np.all(np.diff(errors) <= 1e-12) and errors[-1] < errors[0] - 1e-3
    assert np.all(np.count_nonzero(np.asarray(coefficients), axis=1) <= 2)
    approx = dense_sparse_kernel(basis, coefficients, 2, "out")
    np.testing.assert_allclose(
        np.linalg.norm(kernel - approx) / np.linalg.norm(kernel), errors[-1], rtol=1e-9
    )
    # Full rank and k = rank reproduce W exactly, on either sparse side.
    for matrix in (kernel, kernel.T):
        p = min(matrix.shape)
        side = "out" if matrix.shape[1] >= matrix.shape[0] else "in"
        basis, coefficients, errors = factorize(jnp.asarray(matrix), p, p, iters=0)
        np.testing.assert_allclose(
            dense_sparse_kernel(basis, coefficients, p, side), matrix, atol=1e-12
        )
        assert errors[-1] < 1e-12
    # Low rank is the truncated SVD: the Eckart-Young error.
    singular = np.linalg.svd(kernel, compute_uv=False)
    _, _, error = low_rank(jnp.asarray(kernel), 3)
    np.testing.assert_allclose(error[-1], np.sqrt(np.sum(singular[3:] ** 2) / np.sum(singular**2)))


def test_parameter_counts_match_the_parameter_tree():
    for d_in, d_out in ((16, 40), (40, 16)):
        shapes = shapes_for_compression(d_in, d_out, compression=2.0, density=0.25)
        rank, k = shapes["dense_sparse"]
        assert dense_sparse_param_count(d_in, d_out, rank, k) <= d_in * d_out / 2
        assert low_rank_param_count(d_in, d_out, shapes["low_rank"][0]) <= d_in * d_out / 2
        layer = DenseSparseLinear(d_out, rank, k, use_bias=False)
        params = layer.init(jax.random.key(0), jnp.zeros((1, d_in)))["params"]
        kept = np.count_nonzero(np.asarray(sparse_project(params["coefficients"], k)))
        assert params["basis"].size + kept == dense_sparse_param_count(d_in, d_out, rank, k)
    # 2x of a [16, 40] kernel: 16 * 12 + 40 * 3 = 312 <= 320 values; rank 13 needs 351.
    assert shapes_for_compression(16, 40, 2.0, 0.25) == {
        "low_rank": (5, 5),
        "dense_sparse": (12, 3),
    }


def test_bad_rank_and_k_are_refused():
    x = jnp.zeros((2, 6))
    with pytest.raises(ValueError, match=r"rank must be <= 6 .* got rank=7"):
        DenseSparseLinear(9, 7, 2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"nonzeros_per_row must be in \[1, rank=4\], got 5"):
        DenseSparseLinear(9, 4, 5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="nonzeros_per_row must be a positive int, got 0"):
        DenseSparseLinear(9, 4, 0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"factorize: rank must be <= 6"):
        factorize(jnp.zeros((6, 9)), 8, 2)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\].*got 6"):
        sparse_project(jnp.zeros((3, 5)), 6)
    with pytest.raises(ValueError, match=r"cannot be compressed 100.0x"):
        shapes_for_compression(6, 9, 100.0, 0.25)


@pytest.mark.parametrize("k", [0, 5, True])
def test_compact_coefficients_refuses_k_outside_the_rank(k):
    # k = 0 returned empty factors without a word; k > r failed inside lax.top_k.
    with pytest.raises(ValueError, match=r"compact_coefficients: k must be an int in \[1, r=4\]"):
        compact_coefficients(jnp.ones((6, 4)), k)


@pytest.mark.parametrize("iters", [-1, True, 2.5])
def test_factorize_refuses_iters_that_are_not_a_count(iters):
    # The message named iters + 1 (and -1 read as "got 0"); True ran one step.
    with pytest.raises(ValueError, match=rf"factorize: iters must be an int >= 0, got {iters!r}"):
        factorize(jnp.ones((4, 6)), 2, 1, iters)
