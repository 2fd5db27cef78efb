"""LMUFormer: parameter count from the official layers, the convolutional parts against loop
references in float64, BatchNorm in training and evaluation, the patch embedding's reach,
errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer import models
from effformer.models.lmuformer import ConvFFN, ConvTokenizer


def _gsc_count(dim=256, in_channels=128, layers=1, mlp_ratio=4, classes=35) -> int:
    """By hand from the official lmu_rnn_conv1d: Tokenizer, LMU, ConvFFN, head."""
    bn = 2 * dim  # weight and bias; running statistics are buffers
    tokenizer = 3 * in_channels * dim + 3 * (3 * dim * dim) + 4 * bn + 3 * dim * dim
    lmu = (dim + 1) + ((dim + dim) * dim + dim) + (dim * dim + dim) + bn  # W_u, W_h, proj, bn
    hidden = mlp_ratio * dim
    ffn = (dim * hidden + hidden) + 2 * hidden + (hidden * dim + dim) + bn
    return tokenizer + layers * (lmu + ffn) + dim * classes + classes


def test_parameter_count_follows_the_official_layers():
    model = models.create("lmuformer")
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs(2)))
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == _gsc_count() == 1_621_796
    assert set(variables) == {"params", "batch_stats"}


def _conv1d_reference(x, kernel):
    """Centred kernel-3 convolution with zero padding, by loops: x [B, L, C], kernel [3, C, D]."""
    batch, length, _ = x.shape
    out = np.zeros((batch, length, kernel.shape[-1]))
    for t in range(length):
        for k in range(3):
            s = t + k - 1
            if 0 <= s < length:
                out[:, t] += x[:, s] @ kernel[k]
    return out


def _batch_norm_reference(x):
    """Training-mode BatchNorm over batch and positions, fresh affine (scale 1, bias 0)."""
    mean, var = x.mean((0, 1)), x.var((0, 1))
    return (x - mean) / np.sqrt(var + 1e-5)


def test_tokenizer_matches_loop_reference_in_training(x64):
    layer = ConvTokenizer(6, num_conv_layers=2, dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 4), jnp.float64)
    variables = layer.init(jax.random.PRNGKey(1), x)
    out, updated = layer.apply(variables, x, deterministic=False, mutable=["batch_stats"])
    params = jax.tree.map(np.asarray, variables["params"])
    h = np.asarray(x)
    for i in range(2):
        h = _batch_norm_reference(
            np.maximum(_conv1d_reference(h, params[f"conv_{i}"]["kernel"]), 0)
        )
    expected = h + _conv1d_reference(h, params["position_conv"]["kernel"])
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-9)
    # The first norm's running mean moved by 0.1 of the batch mean of its input.
    first = np.maximum(_conv1d_reference(np.asarray(x), params["conv_0"]["kernel"]), 0)
    np.testing.assert_allclose(
        updated["batch_stats"]["norm_0"]["mean"], 0.1 * first.mean((0, 1)), rtol=1e-9
    )


def test_the_patch_embedding_looks_ahead(x64):
    """Five centred kernel-3 convs: position t sees inputs up to t + 5 (the paper's delay;
    the LMU mixer itself is causal: tests/mixers/test_lmu.py)."""
    layer = ConvTokenizer(4, dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 2), jnp.float64)
    variables = layer.init(jax.random.PRNGKey(1), x)
    forward = lambda x: layer.apply(variables, x)[0, :, 0]
    jacobian = np.asarray(jax.jit(jax.jacobian(forward))(x)[:, 0, :, 0])
    reach = [max(np.flatnonzero(np.abs(row) > 0)) - t for t, row in enumerate(jacobian)]
    assert reach[:10] == [5] * 10


def test_conv_ffn_matches_reference_and_uses_running_statistics_in_evaluation(x64):
    layer = ConvFFN(8, dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3), jnp.float64)
    variables = layer.init(jax.random.PRNGKey(1), x)
    p = jax.tree.map(np.asarray, variables["params"])
    gelu = lambda z: np.asarray(jax.nn.gelu(jnp.asarray(z), approximate=False))
    dense = lambda z, name: z @ p[name]["kernel"] + p[name]["bias"]

    def reference(norm):
        y = gelu(norm(dense(np.asarray(x), "fc1")))
        return np.maximum(norm(dense(y, "fc2")), 0)

    train_out, _ = layer.apply(variables, x, deterministic=False, mutable=["batch_stats"])
    np.testing.assert_allclose(train_out, reference(_batch_norm_reference), rtol=1e-9, atol=1e-9)
    # Evaluation with fresh running statistics (mean 0, variance 1). They are stored in
    # float32, so variance + epsilon is a float32 sum.
    eval_out = layer.apply(variables, x, deterministic=True)
    scale = 1 / np.sqrt(np.float64(np.float32(1) + np.float32(1e-5)))
    np.testing.assert_allclose(eval_out, reference(lambda z: z * scale), rtol=1e-9, atol=1e-9)


def test_tiny_model_trains_and_reads_images_pixel_by_pixel():
    model = models.create("lmuformer", tiny=True, image_size=4, num_channels=1, num_classes=3)
    inputs = jax.random.normal(jax.random.PRNGKey(0), (4, 4, 4, 1))
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), inputs)

    def loss(params):
        logits, updated = model.apply(
            {**variables, "params": params}, inputs, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), updated

    grads, updated = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads["tokenizer"]))
    assert jax.tree.structure(updated["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )
    logits = model.apply(variables, inputs)  # evaluation: the running statistics
    assert logits.shape == (4, 3)


@pytest.mark.parametrize(
    "overrides, shape, message",
    [
        (dict(), (2, 16, 3), r"signals \[B, L, input_dim=4\], got \(2, 16, 3\)"),
        (dict(image_size=4, num_channels=1), (2, 4, 5, 1), r"images \[B, 4, 4, 1\]"),
        (dict(num_layers=0), (2, 16, 4), "num_layers must be a positive int, got 0"),
    ],
)
def test_bad_inputs_and_configs_are_named(overrides, shape, message):
    model = models.create("lmuformer", tiny=True, **overrides)
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.PRNGKey(0), jnp.zeros(shape))
