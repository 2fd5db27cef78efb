"""LMUFormer: parameter count from the official layers, the convolutional parts against loop
references in float64, BatchNorm in training and evaluation, the patch embedding's reach,
errors; the spiking model against a float64 loop reference (forward and surrogate gradients),
its parameter count and its spike rates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer import models
from effformer.models.lmuformer import ConvFFN, ConvTokenizer, spike_counts, spike_rates
from effformer.ops.legendre_memory import discretised_state_space
from effformer.ops.lif import spike_function


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


def _gsc_spiking_count(dim=256, in_channels=128, layers=1, mlp_ratio=4, classes=35) -> int:
    """By hand from the official slmu_rnn_ms_conv1d: Conv1d4EBMs, SLMUMs (with
    SpikingLMUFFTCell, memory 2 * dim), ConvFFNMs, head BatchNorm and head."""
    bn = lambda width: 2 * width  # noqa: E731
    memory = 2 * dim
    tokenizer = 3 * in_channels * dim + 3 * (3 * dim * dim) + 4 * bn(dim) + 3 * dim * dim
    cell = (dim + 1) + bn(1) + bn(memory) + ((memory + dim) * dim + dim) + bn(dim)
    lmu = bn(dim) + cell + (dim * dim + dim) + bn(dim)  # prev_bn, cell, proj_conv, proj_bn
    hidden = mlp_ratio * dim
    ffn = bn(dim) + (dim * hidden + hidden) + bn(hidden) + (hidden * dim + dim)
    return tokenizer + layers * (lmu + ffn) + bn(dim) + dim * classes + classes


def test_spiking_parameter_count_follows_the_official_layers():
    """1.69M: the paper's Spiking LMUFormer on Speech Commands. (Eight frames instead of 128:
    the count does not depend on the length, and the memory's impulse response is shorter.)"""
    model = models.create("spiking_lmuformer", seq_len=8)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs(2)))
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == _gsc_spiking_count()
    assert _gsc_spiking_count() == 1_689_894
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("spiking", [False, True])
def test_initialisation_follows_the_original(spiking):
    """Regression: every layer had Flax's default init (LeCun normal, zero biases). The
    original's ConvLMU._init_weights gives its nn.Linear layers (the LMU cell's W_u and W_h,
    the head) truncated N(0, 0.02) and zero biases; its Conv1d layers keep PyTorch's
    default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases included."""
    width, channels, hidden = 16, 4, 64
    model = models.create(
        "spiking_lmuformer" if spiking else "lmuformer", tiny=True, num_conv_layers=2
    )
    assert (model.embed_dim, model.input_dim, int(width * model.mlp_ratio)) == (
        width,
        channels,
        hidden,
    )
    params = jax.jit(model.init)(jax.random.PRNGKey(0), **model.dummy_inputs(2))["params"]
    lmu, ffn, tokenizer = params["block_0_lmu"], params["block_0_ffn"], params["tokenizer"]
    for layer in (lmu["memory_input"], lmu["hidden"], params["head"]):
        # std 0.02 (torch's trunc_normal_ cuts at +-2 in value, far out): a few hundred
        # draws stay within 5 std, where LeCun normal (std >= 0.125 here) would not.
        assert 0 < np.max(np.abs(layer["kernel"])) <= 5 * 0.02
        np.testing.assert_array_equal(layer["bias"], 0.0)
    convs = {  # kernel, fan_in (in_channels * kernel size)
        "tokenizer conv_0": (tokenizer["conv_0"], 3 * channels),
        "tokenizer conv_1": (tokenizer["conv_1"], 3 * width),
        "position_conv": (tokenizer["position_conv"], 3 * width),
        "lmu out_proj": (lmu["out_proj"], width),
        "ffn fc1": (ffn["fc1"], width),
        "ffn fc2": (ffn["fc2"], hidden),
    }
    for name, (layer, fan_in) in convs.items():
        for value in layer.values():  # kernel, and bias where the layer has one
            bound = fan_in**-0.5
            assert np.max(np.abs(value)) <= bound, name
            assert np.max(np.abs(value)) > bound / 2, name  # uniform over the whole range
    assert set(convs["lmu out_proj"][0]) == set(convs["ffn fc1"][0]) == {"kernel", "bias"}


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
        # Regressions: order=0 silently meant the default order; mlp_ratio=0 built an FFN
        # without hidden units.
        (dict(order=0), (2, 16, 4), r"order must be a positive int or None .*got 0"),
        (dict(mlp_ratio=0.0), (2, 16, 4), "mlp_ratio must give the FFN at least one hidden"),
    ],
)
def test_bad_inputs_and_configs_are_named(overrides, shape, message):
    model = models.create("lmuformer", tiny=True, **overrides)
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.PRNGKey(0), jnp.zeros(shape))


def _spiking_reference(p, x, order, theta):
    """The spiking LMUFormer (lmuformer.py's docstring) written out in jax.numpy, one block,
    a two-conv patch embedding, training-mode BatchNorm: LIF neurons and the memory by Python
    loops over time (spikingjelly's charge / fire / hard reset, the sigmoid surrogate, reset
    detached), convolutions by shifted slices, BatchNorm by its formula."""
    length = x.shape[1]

    def bn(z, q):
        mean, var = z.mean((0, 1)), z.var((0, 1))
        return (z - mean) / jnp.sqrt(var + 1e-5) * q["scale"] + q["bias"]

    def lif(z, threshold=1.0):
        v, spikes = jnp.zeros_like(z[:, 0]), []
        for t in range(length):
            h = v + (z[:, t] - v) / 2.0
            spike = spike_function(h - threshold, 4.0)
            v = h * (1 - jax.lax.stop_gradient(spike))
            spikes.append(spike)
        return jnp.stack(spikes, axis=1)

    def conv(z, kernel):
        padded = jnp.pad(z, ((0, 0), (1, 1), (0, 0)))
        return sum(padded[:, k : k + length] @ kernel[k] for k in range(3))

    def dense(z, q):
        return z @ q["kernel"] + q["bias"]

    def memory(u):  # u [B, L, 1] -> [B, L, order]
        Abar, Bbar = discretised_state_space(order, theta)
        state, states = jnp.zeros((u.shape[0], order)), []
        for t in range(length):
            state = state @ Abar.T + u[:, t] * Bbar
            states.append(state)
        return jnp.stack(states, axis=1)

    tok, lmu, ffn = p["tokenizer"], p["block_0_lmu"], p["block_0_ffn"]
    h = conv(x, tok["conv_0"]["kernel"])
    h = conv(lif(bn(h, tok["norm_0"])), tok["conv_1"]["kernel"])
    h = h + conv(lif(bn(h, tok["norm_1"])), tok["position_conv"]["kernel"])
    s = lif(bn(h, lmu["input_norm"]), threshold=0.5)
    u = lif(bn(dense(s, lmu["memory_input"]), lmu["memory_input_norm"]))
    m = lif(bn(memory(u), lmu["memory_norm"]))
    hidden = lif(bn(dense(jnp.concatenate([m, s], -1), lmu["hidden"]), lmu["hidden_norm"]))
    h = h + bn(dense(hidden, lmu["out_proj"]), lmu["out_norm"])
    y = dense(lif(bn(h, ffn["norm1"])), ffn["fc1"])
    h = h + dense(lif(bn(y, ffn["norm2"])), ffn["fc2"])
    return dense(lif(bn(h, p["head_norm"])).mean(1), p["head"])


def test_spiking_model_matches_loop_reference_forward_and_gradients(x64):
    """Training mode, float64, random parameters (BatchNorm scales around 1.5, so that every
    layer fires); also the spike counts the LIF layers sow and the rates made of them."""
    order, theta, batch, length, width = 4, 5.0, 3, 5, 6
    model = models.create(
        "spiking_lmuformer",
        tiny=True,
        embed_dim=width,
        order=order,
        theta=theta,
        num_conv_layers=2,
        input_dim=2,
        num_classes=3,
    )
    rng = np.random.default_rng(0)  # NumPy: no compilation per parameter shape
    x = rng.standard_normal((batch, length, 2))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(1), x)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            1.5 + 0.3 * rng.standard_normal(leaf.shape)
            if "norm" in path[-2].key and path[-1].key == "scale"
            else 0.5 * rng.standard_normal(leaf.shape)
        ),
        shapes,
    )
    weights = rng.standard_normal((batch, 3))

    def model_loss(params):
        # No batch_stats given: training mode creates the running statistics.
        logits, state = model.apply(
            {"params": params}, x, train=True, mutable=["batch_stats", "intermediates"]
        )
        return jnp.sum(weights * logits), (logits, spike_counts(state["intermediates"]))

    def reference_loss(params):
        logits = _spiking_reference(params, x, order, theta)
        return jnp.sum(weights * logits), logits

    (_, (logits, counts)), grads = jax.jit(jax.value_and_grad(model_loss, has_aux=True))(params)
    (_, want_logits), want_grads = jax.jit(jax.value_and_grad(reference_loss, has_aux=True))(params)
    rates = spike_rates(counts)
    assert min(rates.values()) > 0.02, rates  # every layer fires: the test sees spikes
    np.testing.assert_allclose(logits, want_logits, rtol=1e-9, atol=1e-10)
    for (path, grad), want in zip(
        jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads), strict=True
    ):
        np.testing.assert_allclose(grad, want, rtol=1e-8, atol=1e-10, err_msg=str(path))
    assert np.any(grads["tokenizer"]["conv_0"]["kernel"] != 0)  # through every surrogate

    # Every LIF layer's [spikes, neuron-steps]; neuron-steps = batch x length x its width.
    widths = {"lif_0": width, "lif_1": width, "head_lif": width, "lif1": width, "lif2": 4 * width}
    widths.update(input_lif=width, memory_input_lif=1, memory_lif=order, hidden_lif=width)
    names = [f"tokenizer/lif_{i}" for i in range(2)] + ["block_0_ffn/lif1", "block_0_ffn/lif2"]
    names += [f"block_0_lmu/{n}" for n in ("input_lif", "memory_input_lif", "memory_lif")]
    names += ["block_0_lmu/hidden_lif", "head_lif"]
    assert sorted(counts) == sorted(names)
    for name, (spikes, neuron_steps) in counts.items():
        assert neuron_steps == batch * length * widths[name.split("/")[-1]], name
        assert 0 < spikes < neuron_steps and spikes == int(spikes)
    total = sum(np.asarray(c, np.float64) for c in counts.values())
    assert rates["all"] == pytest.approx(total[0] / total[1])
    assert rates["head_lif"] == pytest.approx(counts["head_lif"][0] / counts["head_lif"][1])
    with pytest.raises(ValueError, match="hold no LIF spike counts"):
        spike_counts({"tokenizer": {}})
