import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from effformer.models import create
from effformer.nn.dense_sparse import dense_sparse_apply, sparse_project
from effformer.train.dense_sparse_compression import (
    compress_lm_params,
    compressed_param_count,
    export_compact,
    materialize,
    support_masks,
    target_kernels,
)

EMBED = 16


@pytest.fixture(scope="module")
def lm():
    model = create(
        "lm_decoder",
        vocab_size=18,
        embed_dim=EMBED,
        num_heads=2,
        ffn_hidden_dim=48,
        num_layers=1,
        max_length=8,
        position_encoding="learned",
    )
    inputs = jax.random.randint(jax.random.key(0), (2, 8), 0, 18)
    params = model.init(jax.random.key(1), inputs=inputs)["params"]
    logits = jax.jit(lambda p: model.apply({"params": p}, inputs=inputs))
    return model, inputs, params, logits


def _size(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_full_rank_factors_give_the_original_logits(lm):
    _, _, params, logits = lm
    full = lambda d_in, d_out: (min(d_in, d_out), min(d_in, d_out))
    compressed, specs, errors = compress_lm_params(
        params, embed_dim=EMBED, compression=2.0, parts=("ffn", "attention"), factor_shape=full
    )
    # fc1, fc2 and the four attention projections, each replaced by its factors.
    assert {path[-1] for path in specs} == {"fc1", "fc2", "query", "key", "value", "out"}
    assert not target_kernels(compressed, ("ffn", "attention"))
    assert max(errors.values()) < 1e-5
    rebuilt = materialize(compressed, specs)
    np.testing.assert_allclose(logits(rebuilt), logits(params), atol=1e-5, rtol=1e-5)


def test_compressed_tree_counts_and_projections(lm):
    _, inputs, params, logits = lm
    compressed, specs, _ = compress_lm_params(
        params, embed_dim=EMBED, compression=2.0, density=0.25, iters=0
    )
    kernels = target_kernels(params)
    original, factorised = _size(params), sum(spec.param_count for spec in specs.values())
    # The counter: everything else in full, each kernel's p r + q k values, within 2x.
    count = compressed_param_count(compressed, specs)
    assert count == original - _size(kernels) + factorised
    assert factorised <= _size(kernels) / 2
    # ... which is what the tree holds: the bases and the non-zeros of the projection.
    flat = traverse_util.flatten_dict(compressed)
    stored = sum(
        np.count_nonzero(sparse_project(value, specs[path[:-1]].nonzeros_per_row))
        if path[-1] == "coefficients"
        else math.prod(value.shape)
        for path, value in flat.items()
    )
    assert stored == count
    # STF passes gradient to every latent coefficient, the fixed pattern only to its own.
    masks = support_masks(compressed, specs)
    fc1 = ("decoder", "layer_0_ffn", "fc1")

    # One backward pass of the LM (to the kernels), then each projection's own vjp.
    rebuilt = materialize(compressed, specs)
    grad_kernels = jax.grad(lambda p: jnp.mean(logits(p) ** 2))(rebuilt)

    def grads(projection):
        rebuild = lambda p: materialize(p, specs, projection=projection, masks=masks)
        _, vjp = jax.vjp(rebuild, compressed)
        return traverse_util.flatten_dict(vjp(grad_kernels)[0])

    stf, fixed = grads("stf"), grads("fixed")
    off = ~np.asarray(masks[fc1])
    assert np.all(np.asarray(fixed[(*fc1, "coefficients")])[off] == 0)
    assert np.count_nonzero(np.asarray(stf[(*fc1, "coefficients")])[off]) > 0
    np.testing.assert_allclose(fixed[(*fc1, "basis")], stf[(*fc1, "basis")], rtol=1e-5)
    # The compact inference form computes the rebuilt kernel's product.
    x = jax.random.normal(jax.random.key(2), (3, EMBED))
    compact = export_compact(compressed, specs)[fc1]
    kernel = materialize(compressed, specs)["decoder"]["layer_0_ffn"]["fc1"]["kernel"]
    got = dense_sparse_apply(x, **compact, sparse_side=specs[fc1].sparse_side)
    np.testing.assert_allclose(got, x @ kernel, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused(lm):
    _, _, params, _ = lm
    with pytest.raises(ValueError, match=r"method: expected one of .* got 'svd'"):
        compress_lm_params(params, embed_dim=EMBED, compression=2.0, method="svd")
    with pytest.raises(ValueError, match=r"parts: expected a non-empty subset"):
        compress_lm_params(params, embed_dim=EMBED, compression=2.0, parts=("mlp",))
    with pytest.raises(ValueError, match=r"nonzeros_per_row must be in \[1, rank=4\], got 6"):
        compress_lm_params(
            params, embed_dim=EMBED, compression=2.0, factor_shape=lambda a, b: (4, 6)
        )


def test_factored_lm_runs_the_compressed_params_as_materialize_does(lm):
    model, inputs, params, logits = lm
    compressed, specs, _ = compress_lm_params(
        params, embed_dim=EMBED, compression=2.0, density=0.25, iters=2
    )
    (shape,) = {(spec.rank, spec.nonzeros_per_row) for spec in specs.values()}
    factored = model.clone(ffn_dense_sparse=shape)
    # The factored model's own parameters have the compressed tree's structure and shapes.
    initial = jax.eval_shape(lambda: factored.init(jax.random.key(1), inputs=inputs)["params"])
    shapes = lambda tree: jax.tree.map(lambda leaf: tuple(leaf.shape), tree)
    assert shapes(initial) == shapes(compressed)

    # Computing (x @ D) @ top_k(C)^T in the layers equals forming the kernel first,
    # forward and in every gradient (STF's straight-through one included).
    factored_logits = lambda p: factored.apply({"params": p}, inputs=inputs)
    rebuilt_logits = lambda p: model.apply({"params": materialize(p, specs)}, inputs=inputs)

    def logits_and_grads(logits_fn):
        def loss(p):
            y = logits_fn(p)
            return jnp.mean(jnp.sin(y)), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(compressed)
        return y, traverse_util.flatten_dict(grads)

    got_logits, got = logits_and_grads(factored_logits)
    want_logits, want = logits_and_grads(rebuilt_logits)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    fc2 = ("decoder", "layer_0_ffn", "fc2", "coefficients")
    compressed_fc2, k = traverse_util.flatten_dict(compressed)[fc2], shape[1]
    # STF's gradient reaches coefficients outside the top k too.
    assert np.count_nonzero(got[fc2]) > np.count_nonzero(sparse_project(compressed_fc2, k))
    assert got.keys() == want.keys()
    for path, value in want.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_factored_ffn_refuses_bad_shapes_and_nested_widths(lm):
    model, inputs, _, _ = lm
    with pytest.raises(ValueError, match=r"dense_sparse must be None or \(rank, nonzeros_per_row"):
        model.clone(ffn_dense_sparse=(8,)).init(jax.random.key(0), inputs=inputs)
    with pytest.raises(ValueError, match=r"nonzeros_per_row must be in \[1, rank=4\], got 5"):
        model.clone(ffn_dense_sparse=(4, 5)).init(jax.random.key(0), inputs=inputs)
    with pytest.raises(ValueError, match=r"hidden_width .* needs dense kernels"):
        model.clone(ffn_dense_sparse=(4, 2), ffn_widths=24).init(jax.random.key(0), inputs=inputs)
