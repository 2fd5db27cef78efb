"""ViT / ViT-Lite / CVT / CCT: parameter counts, shapes, pooling, position tables, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer import models
from effformer.models.vit import VisionTransformer, interpolate_position_embedding
from effformer.nn.position import sinusoidal_table
from effformer.nn.tokenizers import ConvTokenizer


@functools.partial(jax.jit, static_argnums=0)
def _init_jit(model):
    return model.init(jax.random.PRNGKey(0), **model.dummy_inputs(1))


def _param_count(model) -> int:
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs(1)))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


# ---------------------------------------------------------------- expected counts, by hand
# Written from Compact-Transformers' TransformerClassifier / Tokenizer and timm's ViT,
# independently of the model code.


def _encoder_layer(dim: int, hidden: int, qkv_bias: bool) -> int:
    norms = 2 * (2 * dim)  # pre_norm and norm1 (CCT) / norm1 and norm2 (ViT): scale + bias
    qkv = 3 * dim * dim + (3 * dim if qkv_bias else 0)
    proj = dim * dim + dim
    ffn = dim * hidden + hidden + hidden * dim + dim
    return norms + qkv + proj + ffn


def _conv_side(size: int, kernel: int, conv_layers: int) -> int:
    stride, padding = max(1, kernel // 2 - 1), max(1, kernel // 2)
    for _ in range(conv_layers):
        size = (size + 2 * padding - kernel) // stride + 1  # Conv2d
        size = (size + 2 - 3) // 2 + 1  # MaxPool2d(3, 2, 1)
    return size


def _cct_count(layers, dim, mlp_ratio, kernel, conv_layers, image, classes, channels=3):
    tokens = _conv_side(image, kernel, conv_layers) ** 2
    widths = [channels] + [64] * (conv_layers - 1) + [dim]
    tokenizer = sum(kernel * kernel * a * b for a, b in zip(widths, widths[1:], strict=False))
    encoder = layers * _encoder_layer(dim, int(dim * mlp_ratio), qkv_bias=False)
    # positional_emb [1, N, D]; final LayerNorm; attention_pool Linear(D, 1); fc.
    return tokenizer + tokens * dim + encoder + 2 * dim + (dim + 1) + dim * classes + classes


def _patch_count(layers, dim, mlp_ratio, patch, image, classes, *, class_token, qkv_bias, ch=3):
    tokens = (image // patch) ** 2
    embed = patch * patch * ch * dim + dim  # Conv2d(kernel=stride=patch) with bias
    extra = 1 if class_token else 0
    pooling = 0 if class_token else dim + 1  # SeqPool's Linear(D, 1) with bias
    encoder = layers * _encoder_layer(dim, int(dim * mlp_ratio), qkv_bias)
    return (
        (embed + extra * dim + (tokens + extra) * dim + encoder + 2 * dim + pooling)
        + dim * classes
        + classes
    )


COUNTS = [
    # (name, create kwargs, expected, published in Compact-Transformers' README / timm)
    ("cct_2_3x2", {}, _cct_count(2, 128, 1, 3, 2, 32, 10), 283_723),  # "0.284M"
    ("cct_4_3x2", {}, _cct_count(4, 128, 1, 3, 2, 32, 10), 482_123),  # "0.482M"
    ("cct_6_3x1", {}, _cct_count(6, 256, 2, 3, 1, 32, 10), 3_233_803),
    ("cct_6_3x2", {}, _cct_count(6, 256, 2, 3, 2, 32, 10), 3_326_923),  # "3.327M"
    ("cct_7_3x1", {}, _cct_count(7, 256, 2, 3, 1, 32, 10), 3_760_139),  # "3.760M"
    ("cct_7_3x1", {"num_classes": 100}, _cct_count(7, 256, 2, 3, 1, 32, 100), 3_783_269),
    ("cct_7_3x2", {}, _cct_count(7, 256, 2, 3, 2, 32, 10), 3_853_259),  # "3.853M"
    ("cct_7_7x2", {}, _cct_count(7, 256, 2, 7, 2, 224, 102), 4_573_735),
    ("cct_14_7x2", {}, _cct_count(14, 384, 3, 7, 2, 224, 1000), 22_367_273),
    ("cct_14_7x2", {"image_size": 384}, _cct_count(14, 384, 3, 7, 2, 384, 1000), 22_513_193),
    (
        "cvt_7_4",
        {},
        _patch_count(7, 256, 2, 4, 32, 10, class_token=False, qkv_bias=False),
        3_716_619,  # "3.717M"
    ),
    (
        "vit_lite_7_4",
        {},
        _patch_count(7, 256, 2, 4, 32, 10, class_token=True, qkv_bias=False),
        3_716_874,  # "3.717M"
    ),
    (
        "vit_tiny",
        {},
        _patch_count(12, 192, 4, 16, 224, 1000, class_token=True, qkv_bias=True),
        5_717_416,  # timm vit_tiny_patch16_224
    ),
    (
        "vit_tiny",
        dict(patch_size=1, image_size=8, num_channels=1, num_classes=10),
        _patch_count(12, 192, 4, 1, 8, 10, class_token=True, qkv_bias=True, ch=1),
        5_353_738,
    ),
    (
        "vit_small",
        {},
        _patch_count(12, 384, 4, 16, 224, 1000, class_token=True, qkv_bias=True),
        22_050_664,  # timm vit_small_patch16_224
    ),
    (
        "vit_base",
        {},
        _patch_count(12, 768, 4, 16, 224, 1000, class_token=True, qkv_bias=True),
        86_567_656,  # timm vit_base_patch16_224
    ),
    (
        "vit_digits",
        {},
        _patch_count(4, 64, 2, 2, 8, 10, class_token=True, qkv_bias=True, ch=1),
        136_138,
    ),
]


@pytest.mark.parametrize(
    "name,kwargs,expected,stated", COUNTS, ids=[f"{c[0]}-{i}" for i, c in enumerate(COUNTS)]
)
def test_parameter_count_equals_the_original(name, kwargs, expected, stated):
    assert expected == stated  # the arithmetic above gives the number in the docstring
    assert _param_count(models.create(name, **kwargs)) == expected
    assert f"{stated:,}" in models.get_spec(name).builder.__doc__


def test_sinusoidal_option_has_no_table_parameters():
    learned = _param_count(models.create("cct_7_3x1"))
    sine = _param_count(models.create("cct_7_3x1", position_embedding="sinusoidal"))
    assert learned - sine == 256 * 256


def test_compact_patch_projection_is_initialised_as_the_originals_tokenizer():
    """CVT / ViT-Lite: Compact-Transformers' Tokenizer inits the patch conv with
    kaiming_normal_ (std sqrt(2 / fan_in)) and leaves PyTorch's default bias, uniform in
    +-1/sqrt(fan_in); ViT's lecun normal (std sqrt(1 / fan_in)) and zero bias were used."""
    fan_in = 4 * 4 * 3  # 4x4 patches of 3 channels; 4x4 images: one token, a cheap model
    model = models.create("cvt_7_4", tiny=True, embed_dim=64, image_size=4)
    params = jax.jit(_init_jit, static_argnums=0)(model)["params"]["tokenizer"]
    assert np.std(params["kernel"]) == pytest.approx(np.sqrt(2 / fan_in), rel=0.08)  # 3,072
    bias = np.asarray(params["bias"])
    assert np.all(np.abs(bias) <= 1 / np.sqrt(fan_in)) and np.std(bias) > 0.05


def test_sinusoidal_option_adds_the_interleaved_table():
    # The table is CCT's sinusoidal_embedding: sin at even, cos at odd channels.
    positions = np.arange(4, dtype=np.float64)[:, None]
    channel = np.arange(16)
    angles = positions / 10000 ** (2 * (channel // 2) / 16)
    table = np.where(channel % 2 == 0, np.sin(angles), np.cos(angles))
    np.testing.assert_allclose(
        sinusoidal_table(jnp.arange(4), 16, interleaved=True), table, atol=1e-6
    )
    # ... and it is really used (the original silently built a learned table instead):
    # with the same parameters, "sinusoidal" and "none" give different outputs.
    sine = models.create("cvt_7_4", tiny=True, image_size=8, position_embedding="sinusoidal")
    none = models.create("cvt_7_4", tiny=True, image_size=8, position_embedding="none")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))

    @jax.jit
    def both(x):
        variables = sine.init(jax.random.PRNGKey(0), **sine.dummy_inputs(1))
        return sine.apply(variables, x), none.apply(variables, x)

    assert not np.allclose(*both(x), atol=1e-3)


# ---------------------------------------------------------------- shapes and tokens


@pytest.mark.parametrize(
    "image_size,kernel,conv_layers,tokens",
    [(32, 3, 1, 256), (32, 3, 2, 64), (224, 7, 2, 196), (384, 7, 2, 576), (8, 3, 1, 16)],
)
def test_conv_tokenizer_token_count(image_size, kernel, conv_layers, tokens):
    model = VisionTransformer(
        tokenizer="conv",
        conv_kernel_size=kernel,
        conv_layers=conv_layers,
        image_size=image_size,
        embed_dim=8,
        num_layers=1,
        num_heads=2,
        conv_planes=4,
        pooling="seq_pool",
    )
    assert model.sequence_length == tokens
    conv = ConvTokenizer(8, kernel_size=kernel, num_conv_layers=conv_layers, in_planes=4)
    images = jnp.zeros((1, image_size, image_size, 3))
    (out, _), _ = jax.eval_shape(lambda: conv.init_with_output(jax.random.PRNGKey(0), images))
    assert out.shape == (1, tokens, 8)
    assert model.token_grid[0] * model.token_grid[1] == tokens
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs(1)))
    assert shapes["params"]["position_embedding"]["embedding"].shape == (tokens, 8)


@pytest.mark.parametrize(
    "name,image_size,channels",
    [("cct_7_3x1", 16, 3), ("cct_7_3x1", 8, 1), ("cvt_7_4", 12, 2), ("vit_tiny", 8, 1)],
)
def test_output_shapes_for_several_input_sizes(name, image_size, channels):
    model = models.create(
        name, tiny=True, image_size=image_size, num_channels=channels, num_classes=7
    )
    inputs = model.dummy_inputs(3)
    rng = jax.random.PRNGKey(1)
    x = jax.random.normal(rng, inputs["inputs"].shape)

    @jax.jit
    def init_and_train_apply(x):  # one compiled program
        variables = model.init(jax.random.PRNGKey(0), **inputs)
        return model.apply(variables, x, train=True, rngs={"dropout": rng})

    logits = init_and_train_apply(x)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_any_patch_size_down_to_one_pixel(patch_size):
    model = models.create(
        "vit_tiny", tiny=True, image_size=8, num_channels=1, num_classes=10, patch_size=patch_size
    )
    assert model.sequence_length == (8 // patch_size) ** 2 + 1
    variables, logits = jax.eval_shape(
        lambda: model.init_with_output(jax.random.PRNGKey(0), **model.dummy_inputs(2))[::-1]
    )
    table = variables["params"]["position_embedding"]["embedding"]
    assert table.shape[0] == model.sequence_length
    assert logits.shape == (2, 10)


def test_class_token_is_what_the_head_reads():
    model = models.create("vit_lite_7_4", tiny=True, image_size=8)
    variables = _init_jit(model)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    logits, state = jax.jit(
        lambda v, x: model.apply(v, x, capture_intermediates=lambda m, _: m.name == "final_norm")
    )(variables, x)
    tokens = state["intermediates"]["final_norm"]["__call__"][0]
    assert tokens.shape == (2, 4 + 1, 16)
    head = variables["params"]["head"]
    np.testing.assert_allclose(logits, tokens[:, 0] @ head["kernel"] + head["bias"], atol=1e-5)


# ---------------------------------------------------------------- SeqPool


def test_seq_pool_weights_sum_to_one_and_pool_the_tokens():
    model = models.create("cct_7_3x1", tiny=True, image_size=8, num_channels=1)
    variables = _init_jit(model)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
    _, state = jax.jit(
        lambda v, x: model.apply(
            v, x, capture_intermediates=lambda m, _: m.name in ("final_norm", "seq_pool")
        )
    )(variables, x)
    tokens = state["intermediates"]["final_norm"]["__call__"][0]
    pooled = state["intermediates"]["seq_pool"]["__call__"][0]
    pool = variables["params"]["seq_pool"]["attention_pool"]
    logits = np.asarray(tokens, np.float64) @ np.asarray(pool["kernel"], np.float64)[:, 0]
    logits += float(pool["bias"][0])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-12)
    assert np.all(weights > 0)
    np.testing.assert_allclose(pooled, np.einsum("bn,bnd->bd", weights, tokens), atol=1e-5)


# ---------------------------------------------------------------- stochastic depth


def test_stochastic_depth_grows_linearly_with_depth():
    model = models.create(
        "cct_7_3x1",
        tiny=True,
        image_size=8,
        num_layers=5,
        drop_path_rate=0.4,
        attention_dropout_rate=0.0,
    )
    variables = model.init(jax.random.PRNGKey(0), **model.dummy_inputs(1))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    eval_logits = model.apply(variables, x)
    # No randomness at eval; dropped paths change the training output.
    train_logits = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(eval_logits, train_logits)
    # A call-time rate of 0 (a trainer schedule) turns it off entirely.
    no_drop = model.apply(
        variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)}, drop_path_rate=0.0
    )
    np.testing.assert_allclose(no_drop, eval_logits, atol=1e-6)
    # Block i's rate is 0.4 * i / 4: block 0 never drops, so its output at train time
    # equals eval whatever the key.
    _, state = model.apply(
        variables,
        x,
        train=True,
        rngs={"dropout": jax.random.PRNGKey(3)},
        capture_intermediates=lambda m, _: m.name == "block_0",
    )
    _, eval_state = model.apply(
        variables, x, capture_intermediates=lambda m, _: m.name == "block_0"
    )
    np.testing.assert_allclose(
        state["intermediates"]["block_0"]["__call__"][0],
        eval_state["intermediates"]["block_0"]["__call__"][0],
        atol=1e-6,
    )


# ---------------------------------------------------------------- position tables


def test_interpolation_is_the_identity_at_the_same_size():
    model = models.create("vit_lite_7_4", tiny=True, image_size=16)
    params = _init_jit(model)["params"]
    same = interpolate_position_embedding(params, model, model)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_interpolation_to_another_size():
    source = models.create("cct_14_7x2", tiny=True, image_size=32)  # 2x2 grid
    target = models.create("cct_14_7x2", tiny=True, image_size=64)  # 4x4 grid
    assert source.token_grid == (2, 2) and target.token_grid == (4, 4)
    params = _init_jit(source)["params"]
    table = np.asarray(params["position_embedding"]["embedding"]).reshape(2, 2, -1)
    resized = interpolate_position_embedding(params, source, target)
    new_table = np.asarray(resized["position_embedding"]["embedding"]).reshape(4, 4, -1)
    # Half-pixel bilinear (PyTorch align_corners=False): corners copy the corner rows,
    # and new row 1 lies a quarter of the way from old row 0 to old row 1.
    np.testing.assert_allclose(new_table[0, 0], table[0, 0], atol=1e-6)
    np.testing.assert_allclose(new_table[3, 3], table[1, 1], atol=1e-6)
    np.testing.assert_allclose(new_table[1, 0], 0.75 * table[0, 0] + 0.25 * table[1, 0], atol=1e-6)
    logits = jax.eval_shape(
        lambda p: target.apply({"params": p}, **target.dummy_inputs(2)), resized
    )
    assert logits.shape == (2, 1000)


def test_interpolation_keeps_the_class_token_row():
    source = models.create("vit_tiny", tiny=True, image_size=16, patch_size=8)
    target = models.create("vit_tiny", tiny=True, image_size=32, patch_size=8)
    params = _init_jit(source)["params"]
    resized = interpolate_position_embedding(params, source, target)
    np.testing.assert_array_equal(
        resized["position_embedding"]["embedding"][0], params["position_embedding"]["embedding"][0]
    )
    assert resized["position_embedding"]["embedding"].shape == (17, 16)


def test_interpolation_refuses_models_that_differ_elsewhere():
    source = models.create("vit_tiny", tiny=True, image_size=16, patch_size=8)
    params = _init_jit(source)["params"]
    wider = models.create("vit_tiny", tiny=True, image_size=32, patch_size=8, num_classes=5)
    with pytest.raises(ValueError, match=r"\['head'\]\['bias'\].*\(1000,\).*\(5,\)"):
        interpolate_position_embedding(params, source, wider)
    seq_pool = models.create("vit_tiny", tiny=True, image_size=32, patch_size=8, pooling="seq_pool")
    with pytest.raises(ValueError, match="class token"):
        interpolate_position_embedding(params, source, seq_pool)


# ---------------------------------------------------------------- bad input


def _init(model):
    return model.init(jax.random.PRNGKey(0), **model.dummy_inputs(1))


def test_patch_size_that_does_not_divide_the_image():
    model = models.create("vit_tiny", tiny=True, image_size=10, patch_size=4)
    with pytest.raises(
        ValueError,
        match=r"patch_size must be a positive divisor of image_size=10, got patch_size=4",
    ):
        _init(model)


def test_image_size_must_be_positive():
    model = models.create("cct_14_7x2", tiny=True, image_size=0)
    with pytest.raises(ValueError, match=r"image_size must be a positive int, got 0"):
        _init(model)


def test_zero_heads_is_named_not_a_division_by_zero():
    model = models.create("cct_14_7x2", tiny=True, num_heads=0)
    with pytest.raises(ValueError, match=r"num_heads must be a positive int, got 0"):
        _init(model)


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        # Each of these crashed deep inside (a division by zero, an MLIR error) or built a
        # model that silently did something else (an FFN 0 wide, dropout that zeroes all).
        ("cct_7_3x1", dict(conv_kernel_size=0), r"conv_kernel_size must be a positive int, got 0"),
        ("cct_7_3x2", dict(conv_planes=0), r"conv_planes must be a positive int, got 0"),
        ("cct_7_3x1", dict(conv_layers=0), r"conv_layers must be a positive int, got 0"),
        ("vit_tiny", dict(patch_size=2.0), r"patch_size must be a positive int, got 2.0"),
        ("vit_tiny", dict(num_heads=True), r"num_heads must be a positive int, got True"),
        ("vit_tiny", dict(mlp_ratio=0.0), r"mlp_ratio must give an FFN at least 1 wide.*got 0.0"),
        ("vit_tiny", dict(mlp_ratio=-1.0), r"mlp_ratio must give .* got -1.0"),
        ("vit_tiny", dict(mlp_ratio=float("nan")), r"mlp_ratio must give .* got nan"),
        ("vit_tiny", dict(dropout_rate=1.5), r"dropout_rate must be in \[0, 1\), got 1.5"),
        ("vit_tiny", dict(attention_dropout_rate=-0.1), r"attention_dropout_rate must be in"),
        ("vit_tiny", dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\), got 1.0"),
        ("vit_tiny", dict(block_ordering="post"), r"block_ordering must be one of .* got 'post'"),
    ],
)
def test_bad_fields_are_named(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        models.create(name, tiny=True, **overrides).check_config()


def test_input_of_another_size_or_channel_count():
    model = models.create("cct_7_3x1", tiny=True)
    variables = jax.eval_shape(lambda: _init(model))  # the check runs at trace time
    apply = lambda x: jax.eval_shape(lambda v: model.apply(v, x), variables)
    with pytest.raises(
        ValueError, match=r"inputs must be \[B, 32, 32, 3\].*got shape \(2, 32, 32, 1\)"
    ):
        apply(jnp.zeros((2, 32, 32, 1)))
    with pytest.raises(
        ValueError, match=r"got shape \(2, 16, 16, 3\).*interpolate_position_embedding"
    ):
        apply(jnp.zeros((2, 16, 16, 3)))


def test_unknown_choices_are_named():
    for field, value in (
        ("pooling", "max"),
        ("tokenizer", "pixels"),
        ("position_embedding", "rope"),
    ):
        model = models.create("vit_tiny", tiny=True, **{field: value})
        with pytest.raises(ValueError, match=f"{field} must be one of .* got '{value}'"):
            _init(model)
    with pytest.raises(ValueError, match="num_heads must divide embed_dim=16, got num_heads=3"):
        _init(models.create("vit_tiny", tiny=True, num_heads=3))
    with pytest.raises(ValueError, match="mixer must be one of .* got 'softmax'"):
        _init(models.create("vit_tiny", tiny=True, mixer="softmax"))


def test_blocks_take_another_mixer_by_name():
    """EcoFormer in every block: the model's heads and q/k/v bias reach it, bidirectional
    (its own default is causal), mixer_kwargs override, and its hash functions form
    their own collection beside the parameters."""
    model = models.create("vit_digits", tiny=True, mixer="ecoformer", mixer_kwargs={"num_bits": 4})
    variables = jax.eval_shape(lambda: _init(model))
    mixer = variables["params"]["block_0"]["mixer"]
    assert set(mixer) == {"qk", "value", "out"} and mixer["qk"]["kernel"].shape == (16, 2, 8)
    assert variables["hashing"]["block_0"]["mixer"]["projection"].shape == (2, 4, 25)
    assert model._mixer_kwargs()["causal"] is False
    hash(model)  # mixer_kwargs are frozen: the module stays hashable


# ---------------------------------------------------------------- training


def test_tiny_cct_trains_on_digits(tmp_path):
    from effformer.train import default_config, train_and_evaluate
    from effformer.train.metric_writers import read_metrics

    config = default_config()
    config.model.name = "cct_7_3x1"
    config.model.tiny = True
    config.data.name = "digits"
    config.data.data_dir = str(tmp_path / "tfds")
    config.task.name = "image_classification"
    config.global_batch_size = 64
    config.num_train_steps = 30
    config.optimizer.learning_rate = 1e-2
    config.log_every_steps = 1
    config.progress_bar = False
    config.checkpoint.async_save = False
    config.mesh.num_devices = 1
    result = train_and_evaluate(config, tmp_path / "work")
    losses = [r["loss"] for r in read_metrics(tmp_path / "work", "train")]
    # ln(10) = 2.30 at chance; a one-layer width-16 model gets well below it in 30 steps.
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    assert result["eval"]["accuracy"] > 0.2


# ---------------------------------------------------------------- experiment configs


def _load(path: str, arg):
    from effformer.train.config import load_config_file

    return load_config_file(f"{path}:{arg}" if arg else path)


@pytest.mark.parametrize(
    "path,arg,image_shape,classes",
    [
        ("experiments/cct/cifar.py", "cifar10_300", (32, 32, 3), 10),
        ("experiments/cct/cifar.py", "cifar10_5000", (32, 32, 3), 10),
        ("experiments/cct/cifar.py", "cifar100_300", (32, 32, 3), 100),
        ("experiments/cct/cifar.py", "cifar100_5000", (32, 32, 3), 100),
        ("experiments/cct/flowers102.py", None, (224, 224, 3), 102),
        ("experiments/cct/imagenet.py", "224", (224, 224, 3), 1000),
        ("experiments/cct/imagenet.py", "finetune384", (384, 384, 3), 1000),
        ("experiments/cct/digits.py", "cct", (8, 8, 1), 10),
        ("experiments/cct/digits.py", "vit_lite", (8, 8, 1), 10),
        ("experiments/patch_scaling/digits.py", "1", (8, 8, 1), 10),
        ("experiments/digits/vit.py", None, (8, 8, 1), 10),
    ],
)
def test_experiment_configs_validate_and_build_their_model(path, arg, image_shape, classes):
    from pathlib import Path

    from effformer.train.config import validate_config
    from effformer.train.init_from import check_init_from_source

    root = Path(__file__).resolve().parents[2]
    config = _load(str(root / path), arg)
    if config.init_from.workdir:
        # A fine-tuning config names its source run, which does not exist here; the trainer
        # checks it when the run makes its first state (tests/train/test_init_from.py).
        validate_config(config)
        with pytest.raises(ValueError, match="config.init_from.workdir"):
            check_init_from_source(config)
        config.init_from.workdir = ""
    validate_config(config)
    # The task passes what the data decides; the datasets themselves need not be prepared.
    height, _, channels = image_shape
    model = models.create(
        config.model.name,
        **config.model.kwargs.to_dict(),
        num_classes=classes,
        image_size=height,
        num_channels=channels,
    )
    logits = jax.eval_shape(
        lambda: model.init_with_output(jax.random.PRNGKey(0), **model.dummy_inputs(2))[0]
    )
    assert logits.shape == (2, classes)


# The original's ymls (SHI-Labs/Compact-Transformers configs/pretrained, configs/finetuned):
# lr, weight decay, batch, warm-up epochs, min lr, random erasing, position embedding. The
# configs had copied the CIFAR-10/300 recipe into every run and guessed ImageNet's.
@pytest.mark.parametrize(
    "path, arg, train_examples, expected",
    [
        ("cifar.py", "cifar10_300", 50_000, (5.5e-4, 6e-2, 128, 10, 1e-5, 0.0, "learned")),
        ("cifar.py", "cifar10_5000", 50_000, (5e-4, 5e-2, 128, 10, 1e-5, 0.25, "sinusoidal")),
        ("cifar.py", "cifar100_300", 50_000, (6e-4, 6e-2, 128, 10, 1e-5, 0.25, "learned")),
        ("cifar.py", "cifar100_5000", 50_000, (5e-4, 5e-2, 128, 10, 1e-5, 0.25, "sinusoidal")),
        ("flowers102.py", None, 1020, (5e-4, 6e-2, 96, 10, 1e-5, 0.25, "sinusoidal")),
        ("imagenet.py", "224", 1_281_167, (5e-4, 5e-2, 1024, 10, 1e-5, 0.25, "learned")),
        ("imagenet.py", "finetune384", 1_281_167, (1e-5, 0.0, 768, 0, 0.0, 0.25, "learned")),
    ],
)
def test_cct_recipe_configs_follow_the_original_ymls(path, arg, train_examples, expected):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    config = _load(str(root / "experiments" / "cct" / path), arg)
    lr, decay, batch, warmup_epochs, min_lr, erasing, positions = expected
    optimizer = config.optimizer
    assert (optimizer.learning_rate, optimizer.weight_decay) == pytest.approx((lr, decay))
    assert config.global_batch_size == batch
    assert optimizer.warmup_steps == warmup_epochs * train_examples // batch
    assert optimizer.learning_rate * optimizer.min_lr_ratio == pytest.approx(min_lr)
    assert config.data.random_erasing == erasing
    kwargs = config.model.kwargs.to_dict()
    assert kwargs.get("position_embedding", "learned") == positions
    assert (config.task.mixup_alpha, config.task.cutmix_alpha) == (0.8, 1.0)
