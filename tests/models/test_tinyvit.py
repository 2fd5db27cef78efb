"""TinyViT: parameter counts, windowed attention against a loop reference, shapes, training, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effformer import models
from effformer.models.tinyvit import (
    ConvNorm,
    MBConv,
    TinyViT,
    TinyViTBlock,
    WindowAttention,
    attention_bias_index,
)
from effformer.nn.norms import LayerNorm

# ---------------------------------------------------------------- expected counts, by hand
# Written from microsoft/Cream TinyViT/models/tiny_vit.py, independently of the model
# code. Every Conv2d_BN is a bias-free conv plus BatchNorm's weight and bias (running
# statistics are buffers, not parameters); here the same 2 per channel are the channel
# norm's scale and offset.


def _conv_bn(cin: int, cout: int, kernel: int = 1, groups: int = 1) -> int:
    return kernel * kernel * (cin // groups) * cout + 2 * cout


def _tinyvit_count(dims, depths, heads, windows, classes=1000, channels=3) -> int:
    total = _conv_bn(channels, dims[0] // 2, 3) + _conv_bn(dims[0] // 2, dims[0], 3)  # stem
    for stage, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
        for _ in range(depth):
            if stage == 0:  # MBConv, expand ratio 4
                hidden = 4 * dim
                total += (
                    _conv_bn(dim, hidden)
                    + _conv_bn(hidden, hidden, 3, hidden)
                    + _conv_bn(hidden, dim)
                )
            else:
                attention = 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim)
                attention += heads[stage] * windows[stage] ** 2  # one bias per |offset|
                mlp = 2 * dim + (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)
                total += attention + _conv_bn(dim, dim, 3, dim) + mlp
        if stage + 1 < len(dims):  # PatchMerging
            out = dims[stage + 1]
            total += _conv_bn(dim, out) + _conv_bn(out, out, 3, out) + _conv_bn(out, out)
    return total + 2 * dims[-1] + dims[-1] * classes + classes  # norm_head, head


def _param_count(model) -> int:
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs(1)))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


WINDOWS = (7, 7, 14, 7)
COUNTS = [
    # name, expected from the original's config, exact, the README's published figure
    ("tinyvit_5m", _tinyvit_count((64, 128, 160, 320), (2, 2, 6, 2), (2, 4, 5, 10), WINDOWS),
     5_392_764, 5.4e6),
    ("tinyvit_11m", _tinyvit_count((64, 128, 256, 448), (2, 2, 6, 2), (2, 4, 8, 14), WINDOWS),
     10_996_972, 11e6),
    ("tinyvit_21m", _tinyvit_count((96, 192, 384, 576), (2, 2, 6, 2), (3, 6, 12, 18), WINDOWS),
     21_198_568, 21e6),
]  # fmt: skip


@pytest.mark.parametrize("name, by_hand, exact, published", COUNTS)
def test_parameter_counts_equal_the_original(name, by_hand, exact, published):
    assert by_hand == exact
    assert round(exact / 1e6, 1 if exact < 1e7 else 0) * 1e6 == published
    assert _param_count(models.create(name)) == exact


def test_batch_norm_variant_has_the_original_parameters_and_running_statistics():
    model = models.create("tinyvit_5m", conv_norm="batch_norm")
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs(1)))
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == COUNTS[0][2]
    # Every Conv2d_BN keeps a running mean and variance per output channel of its conv.
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    conv_channels = sum(
        leaf.shape[-1]
        for path, leaf in flat
        if jax.tree_util.keystr(path).endswith("['conv']['kernel']")
    )
    assert sum(x.size for x in jax.tree.leaves(variables["batch_stats"])) == 2 * conv_channels


def test_conv_norm_batch_norm_uses_batch_statistics_in_training_and_running_ones_after():
    layer = ConvNorm(3, kernel_size=1, norm="batch_norm")
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 5)) * 3.0 + 1.0
    variables = layer.init(jax.random.PRNGKey(1), x)
    kernel = np.asarray(variables["params"]["conv"]["kernel"], np.float64)[0, 0]
    conv = np.einsum("bhwc,cd->bhwd", np.asarray(x, np.float64), kernel)
    mean, var = conv.mean((0, 1, 2)), conv.var((0, 1, 2))
    y, updated = layer.apply(variables, x, deterministic=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, (conv - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
    stats = updated["batch_stats"]["batch_norm"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
    # Evaluation: the running statistics (fresh: mean 0, variance 1), not the batch's.
    y_eval = layer.apply(variables, x, deterministic=True)
    np.testing.assert_allclose(y_eval, conv / np.sqrt(1 + 1e-5), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- window attention


def test_bias_index_follows_the_originals_offset_enumeration():
    # The original numbers the distinct (|dy|, |dx|) in order of first appearance over
    # all (query, key) pairs, row-major.
    for window in (1, 2, 3, 5):
        points = list(itertools.product(range(window), range(window)))
        first_seen: dict[tuple[int, int], int] = {}
        expected = np.zeros((len(points), len(points)), np.int32)
        for i, (y1, x1) in enumerate(points):
            for j, (y2, x2) in enumerate(points):
                offset = (abs(y1 - y2), abs(x1 - x2))
                expected[i, j] = first_seen.setdefault(offset, len(first_seen))
        np.testing.assert_array_equal(attention_bias_index(window), expected)
        assert len(first_seen) == window * window


def _layer_norm(x, params):
    # effformer's LayerNorm computes in float32 whatever the input dtype (effformer/nn/norms.py,
    # tested there), float64 included: a float64 reference norm would differ by float32
    # rounding, amplified by the random weights. The reference uses the same norm so that
    # float64 checks everything else exactly.
    return LayerNorm(1e-5).apply({"params": params}, x)


def _window_attention_reference(params, x, num_heads, window):
    """Explicit loops over images, windows and heads; a dense bias table from offsets."""
    batch, height, width, channels = x.shape
    head_dim = channels // num_heads
    pad_h, pad_w = -height % window, -width % window
    padded = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))  # zeros, then the norm
    cells = list(itertools.product(range(window), range(window)))
    biases = params["attention_biases"]
    table = jnp.stack(
        [
            jnp.stack([biases[:, abs(a[0] - b[0]) * window + abs(a[1] - b[1])] for b in cells], -1)
            for a in cells
        ],
        1,
    )  # [heads, N, N]: entry (i, j) looked up from the offset of cell i to cell j
    out = jnp.zeros_like(padded)
    for image in range(batch):
        for top in range(0, height + pad_h, window):
            for left in range(0, width + pad_w, window):
                tokens = padded[image, top : top + window, left : left + window].reshape(
                    -1, channels
                )
                tokens = _layer_norm(tokens, params["norm"])
                qkv = tokens @ params["qkv"]["kernel"] + params["qkv"]["bias"]
                heads = []
                for h in range(num_heads):
                    # The original views qkv as [N, heads, 3 * head_dim] and splits q, k, v.
                    part = qkv[:, h * 3 * head_dim : (h + 1) * 3 * head_dim]
                    q, k, v = jnp.split(part, 3, axis=-1)
                    logits = q @ k.T / np.sqrt(head_dim) + table[h]
                    heads.append(jax.nn.softmax(logits, axis=-1) @ v)
                mixed = (
                    jnp.concatenate(heads, -1) @ params["proj"]["kernel"] + params["proj"]["bias"]
                )
                out = out.at[image, top : top + window, left : left + window].set(
                    mixed.reshape(window, window, channels)
                )
    return out[:, :height, :width]


def _random_params(module, x, seed=0):
    # Every parameter random (biases, norm affine and attention biases included), so none
    # can be ignored; drawn with numpy from the parameter shapes (no init to compile).
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), x.dtype), shapes)


def test_window_attention_matches_loop_reference(x64):
    # A 3x3 grid in 2x2 windows: padded at the bottom and the right to 4x4 (four windows).
    height, width, window, num_heads, channels = 3, 3, 2, 2, 8
    x = jax.random.normal(jax.random.PRNGKey(2), (1, height, width, channels), jnp.float64)
    module = WindowAttention(num_heads, window)
    params = _random_params(module, x)
    weights = jax.random.normal(jax.random.PRNGKey(3), x.shape, jnp.float64)

    fast = lambda p, x: module.apply({"params": p}, x)
    slow = lambda p, x: _window_attention_reference(p, x, num_heads, window)
    np.testing.assert_allclose(
        jax.jit(fast)(params, x), jax.jit(slow)(params, x), rtol=1e-10, atol=1e-10
    )

    def grads(fn):
        return jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x) * weights), argnums=(0, 1)))(
            params, x
        )

    (fast_params, fast_x), (slow_params, slow_x) = grads(fast), grads(slow)
    np.testing.assert_allclose(fast_x, slow_x, rtol=1e-9, atol=1e-10)
    for path, got in jax.tree_util.tree_flatten_with_path(fast_params)[0]:
        want = _get(slow_params, path)
        # The norm's own parameters get float32 gradients (the norm computes in float32).
        rtol = 1e-5 if "norm" in jax.tree_util.keystr(path) else 1e-9
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-10, err_msg=str(path))


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_relative_bias_is_shared_across_windows_and_depends_only_on_offsets():
    num_heads, window = 2, 2
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 4, 4))  # two windows side by side
    module = WindowAttention(num_heads, window)
    params = _random_params(module, x)
    # Same weights and bias in every window: swapping the windows' contents swaps the outputs.
    swapped = jnp.concatenate([x[:, :, 2:], x[:, :, :2]], axis=2)
    both = jax.jit(module.apply)({"params": params}, jnp.concatenate([x, swapped]))
    out, out_swapped = both[:1], both[1:]
    np.testing.assert_allclose(out_swapped[:, :, :2], out[:, :, 2:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_swapped[:, :, 2:], out[:, :, :2], rtol=1e-5, atol=1e-6)
    # The dense table holds window**2 distinct values per head, one per (|dy|, |dx|).
    table = np.asarray(module.bias_table(params["attention_biases"]))
    cells = list(itertools.product(range(window), range(window)))
    for (i, a), (j, b) in itertools.product(enumerate(cells), repeat=2):
        offset = abs(a[0] - b[0]) * window + abs(a[1] - b[1])
        np.testing.assert_array_equal(table[:, i, j], params["attention_biases"][:, offset])
    assert all(len(np.unique(table[h])) == window * window for h in range(num_heads))


# ---------------------------------------------------------------- the model


def _tiny_model(**overrides) -> TinyViT:
    """Four narrow stages at 32x32: grids 8, 4, 2, 1; stage 2 pads 4 -> 6, stage 4 1 -> 2."""
    four_stages = dict(
        image_size=32,
        embed_dims=(8, 16, 16, 16),
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 2, 2),
        window_sizes=(1, 3, 2, 2),
    )
    return models.create("tinyvit_5m", num_classes=10, **{**four_stages, **overrides})


def test_output_and_stage_shapes():
    model = _tiny_model()
    inputs = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

    def forward(inputs):
        variables = model.init(jax.random.PRNGKey(1), inputs)
        is_block = lambda module, _: isinstance(module, MBConv | TinyViTBlock)
        return model.apply(variables, inputs, capture_intermediates=is_block)

    logits, state = jax.eval_shape(forward, inputs)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    blocks = state["intermediates"]
    shapes = [blocks[f"stage_{s}_block_0"]["__call__"][0].shape for s in range(4)]
    assert model.stage_grids == (8, 4, 2, 1)
    assert shapes == [(2, 8, 8, 8), (2, 4, 4, 16), (2, 2, 2, 16), (2, 1, 1, 16)]


def test_tiny_model_trains_one_step_on_digits():
    # The trainer's experiment (registry, image_classification task, optimizer) and input
    # pipeline, one step of the task's loss; the trainer's loop is tested in tests/train.
    from effformer.data import create_input_pipeline
    from effformer.train import default_config
    from effformer.train.experiment import build_experiment

    config = default_config()
    config.model.name = "tinyvit_5m"
    config.model.tiny = True  # 8x8, two stages: stem -> 2x2 -> 1x1 padded to a 2x2 window
    config.data.name = "digits"
    config.task.name = "image_classification"
    config.num_train_steps = 1
    config.global_batch_size = 16
    config.mesh.num_devices = 1
    exp = build_experiment(config)
    model, task = exp.model, exp.task
    assert (model.image_size, model.num_channels, model.num_classes) == (8, 1, 10)
    pipeline = create_input_pipeline(
        config.data, split=exp.info.train_split, global_batch_size=16, train=True, seed=0
    )
    batch = next(iter(pipeline))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), **model.dummy_inputs(1))["params"]
    # MBConv's projection norm starts at zero (the original's bn_weight_init=0).
    np.testing.assert_array_equal(params["stage_0_block_0"]["project"]["scale"], 0.0)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(params):
            prepared = task.prepare_batch(batch, jax.random.PRNGKey(1), train=True)
            logits = model.apply({"params": params}, **task.model_inputs(prepared), train=True)
            loss_sum, count, _ = task.loss_and_metrics(logits, prepared)
            return loss_sum / count

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = exp.tx.update(grads, opt_state, params)
        return loss, optax.apply_updates(params, updates)

    loss, new_params = step(params, exp.tx.init(params), batch)
    assert np.isfinite(float(loss))
    changed = jax.tree_util.tree_flatten_with_path(
        jax.tree.map(lambda a, b: bool(np.any(a != b)), params, new_params)
    )[0]
    unchanged = {jax.tree_util.keystr(path) for path, moved in changed if not moved}
    # Only what lies behind the zero scale gets no gradient at the first step: MBConv's
    # expansion and depthwise conv, and the projection's conv kernel.
    behind_zero = {
        f"['stage_0_block_0']['{layer}']{leaf}"
        for layer in ("expand", "depthwise")
        for leaf in ("['bias']", "['scale']", "['conv']['kernel']")
    } | {"['stage_0_block_0']['project']['conv']['kernel']"}
    assert unchanged == behind_zero


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=30), r"image_size must be a multiple of 4 \* 2\*\*\(stages - 1\) = 32"),
        (dict(image_size=16), r"= 32 .*got image_size=16"),
        (dict(num_heads=(1, 3, 2, 2)), r"num_heads\[1\] must be a positive divisor of embed_dims"),
        (dict(window_sizes=(1, 2, 2)), r"window_sizes must have one entry per stage \(4"),
        (dict(window_sizes=(1, 0, 2, 2)), r"window_sizes\[1\] must be a positive int, got 0"),
        (dict(embed_dims=(7, 16, 16, 16)), r"embed_dims\[0\] must be even"),
        (dict(conv_norm="group_norm"), r"conv_norm must be one of \('layer_norm', 'batch_norm'\)"),
        # These built a model with an MLP 0 wide, dropout that zeroes all, a local conv
        # that grows the grid by one (even kernel), or crashed with a division by zero.
        (dict(mlp_ratio=0.0), r"mlp_ratio must be a positive number .* got 0.0"),
        (dict(mbconv_expand_ratio=0.0), r"mbconv_expand_ratio must be a positive .* got 0.0"),
        (dict(mlp_ratio=float("nan")), r"mlp_ratio must be a positive number .* got nan"),
        (dict(local_conv_size=2), r"local_conv_size must be a positive odd int, got 2"),
        (dict(local_conv_size=0), r"local_conv_size must be a positive odd int, got 0"),
        (dict(dropout_rate=1.5), r"dropout_rate must be in \[0, 1\), got 1.5"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\), got 1.0"),
        (dict(num_heads=(1, True, 2, 2)), r"num_heads\[1\] must be a positive divisor"),
    ],
)
def test_bad_configurations_name_the_field(overrides, message):
    model = _tiny_model(**overrides)
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.PRNGKey(0), **model.dummy_inputs(1))


def test_bad_input_shape_names_the_expected_shape():
    model = _tiny_model()
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs(1)))
    with pytest.raises(
        ValueError, match=r"inputs must be \[B, 32, 32, 3\].*got shape \(1, 64, 64, 3\)"
    ):
        model.apply(variables, jnp.zeros((1, 64, 64, 3)))
