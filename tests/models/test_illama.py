"""iLLaMA: parameter counts, a float64 transcription of the original forward pass,
the soft mask, causality, the post-sequence class token, schedules, resolution change."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer import models
from effformer.models.illama import ILlama, attention_maps, interpolate_position_embedding
from effformer.ops.attention import dot_product_attention
from effformer.ops.masks import AttentionMask
from effformer.train.config import load_config_file, validate_config
from effformer.train.schedules import eval_kwargs, train_kwargs_fn

SMALL = dict(
    image_size=8,
    num_channels=3,
    patch_size=2,
    embed_dim=16,
    num_layers=2,
    num_heads=2,
    ffn_multiple_of=16,
    num_classes=5,
)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(model, seed=0):
    return model.init(jax.random.PRNGKey(seed), **model.dummy_inputs(1))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, images, soft_mask_ratio=0.0):
    return model.apply(variables, images, soft_mask_ratio=soft_mask_ratio)


@pytest.fixture(scope="module")
def small_params():
    """SMALL's parameters, initialised once: mask, class_token and the attention
    implementation change no parameter, so every SMALL variant shares them."""
    params = _init(ILlama(**SMALL))["params"]
    for variant in (dict(mask="causal", class_token="first"), dict(mask="bidirectional")):
        shapes = jax.eval_shape(functools.partial(_init, ILlama(**SMALL, **variant)))
        assert jax.tree.map(jnp.shape, shapes["params"]) == jax.tree.map(jnp.shape, params)
    return params


def _images(model, batch=2, seed=1, dtype=jnp.float32):
    shape = (batch, model.image_size, model.image_size, model.num_channels)
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


# ---------------------------------------------------------------------------- parameter counts


def _original_count(dim, depth, hidden, patches=196, classes=1000, patch=16, channels=3):
    # techmonsterwang/iLLaMA models/illama.py, sum(p.numel() for p in model.parameters()).
    block = (
        dim  # norm1 (RMSNorm weight)
        + 3 * dim * dim
        + 3 * dim  # qkv Linear with bias
        + dim * dim
        + dim  # proj Linear with bias
        + dim  # norm2
        + 3 * dim * hidden  # fc1, fc2, fc3 without bias
    )
    embed = patch * patch * channels * dim + dim  # Conv2d with bias
    return depth * block + embed + dim + (patches + 1) * dim + dim + dim * classes + classes
    #                              cls    pos_embed (N + 1)   norm  head with bias


@pytest.mark.parametrize(
    "name, dim, depth, hidden, expected",
    [
        # hidden = int(2 * int(4 D) / 3) rounded up to a multiple of 256.
        ("illama_tiny", 192, 12, 512, 5_701_096),
        ("illama_small", 384, 12, 1024, 22_018_024),
        ("illama_base", 768, 12, 2048, 86_502_376),
        ("illama_large", 1024, 24, 2816, 310_445_032),
    ],
)
def test_parameter_counts_equal_the_original(name, dim, depth, hidden, expected):
    assert _original_count(dim, depth, hidden) == expected
    model = models.create(name, num_classes=1000, image_size=224, num_channels=3)
    assert model.ffn_hidden_dim == hidden
    shapes = jax.eval_shape(lambda: _init(model))["params"]
    assert sum(x.size for x in jax.tree.leaves(shapes)) == expected
    assert shapes["position_embedding"]["embedding"].shape == (197, dim)
    assert shapes["cls"]["token"].shape == (1, 1, dim)
    assert shapes["head"]["bias"].shape == (1000,)


# ---------------------------------------------------------------------------- the reference


def _rms_norm(x, scale, eps=1e-6):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def _reference_forward(
    params, images, *, num_heads, ratio, mode="soft", class_last=True, class_rope_position=None
):
    """The original forward pass transcribed with loops and complex RoPE (freqs_cis).

    Returns (logits [B, classes], per-layer attention [layers, B, H, L, L]).
    """
    kernel, bias = params["patch_embed"]["kernel"], params["patch_embed"]["bias"]
    patch = kernel.shape[0]
    grid = images.shape[1] // patch
    tokens = [
        jnp.einsum(
            "bhwc,hwcd->bd",
            images[:, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch],
            kernel,
        )
        + bias
        for r in range(grid)
        for c in range(grid)
    ]
    x = jnp.stack(tokens, axis=1)
    batch, _, dim = x.shape
    cls = jnp.broadcast_to(params["cls"]["token"], (batch, 1, dim))
    x = jnp.concatenate([x, cls] if class_last else [cls, x], axis=1)
    x = x + params["position_embedding"]["embedding"][None]
    length = x.shape[1]

    head_dim = dim // num_heads
    freqs = 1.0 / 10000.0 ** (jnp.arange(0, head_dim, 2, dtype=x.dtype) / head_dim)
    t = jnp.arange(length, dtype=x.dtype)
    if class_rope_position is not None:
        t = t.at[length - 1 if class_last else 0].set(class_rope_position)
    freqs_cis = jnp.exp(1j * jnp.outer(t, freqs))  # [L, Dh/2], torch.polar

    def rope(z):  # [B, L, H, Dh]: adjacent pairs as complex numbers, times freqs_cis
        zc = z.reshape(*z.shape[:-1], -1, 2)
        zc = (zc[..., 0] + 1j * zc[..., 1]) * freqs_cis[None, :, None, :]
        return jnp.stack([zc.real, zc.imag], -1).reshape(z.shape)

    tril = jnp.tril(jnp.ones((length, length), x.dtype))
    maps = []
    for i in range(sum(name.startswith("block_") for name in params)):
        p = params[f"block_{i}"]
        h = _rms_norm(x, p["norm1"]["scale"])
        q, k, v = (
            jnp.einsum("bld,dhk->blhk", h, p["mixer"][n]["kernel"]) + p["mixer"][n]["bias"]
            for n in ("query", "key", "value")
        )
        q, k = rope(q), rope(k)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
        if mode == "causal":
            logits = jnp.where(tril > 0, logits, -jnp.inf)
        attn = jax.nn.softmax(logits, axis=-1)
        if mode == "soft":
            attn = attn * (ratio * jnp.ones_like(tril) + (1 - ratio) * tril)
        maps.append(attn)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
        x = (
            x
            + jnp.einsum("bqhd,hdD->bqD", out, p["mixer"]["out"]["kernel"])
            + p["mixer"]["out"]["bias"]
        )
        h = _rms_norm(x, p["norm2"]["scale"])
        f = p["ffn"]
        x = x + (jax.nn.silu(h @ f["w1"]["kernel"]) * (h @ f["w3"]["kernel"])) @ f["w2"]["kernel"]
    x = _rms_norm(x, params["norm"]["scale"])
    pooled = x[:, -1] if class_last else x[:, 0]
    return pooled @ params["head"]["kernel"] + params["head"]["bias"], jnp.stack(maps)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _compare(model, with_grads, params, images, ratio, class_rope_position):
    """Model vs transcription in one compiled program (ratio and the class token's RoPE
    position are traced, so every ratio and position reuses it): logits, attention maps
    and, with ``with_grads``, the parameter gradients of a random projection of the logits.
    """
    kwargs = dict(
        num_heads=model.num_heads,
        ratio=ratio,
        mode=model.mask,
        class_last=model.class_token == "last",
        class_rope_position=class_rope_position,
    )
    ratio_kw = dict(soft_mask_ratio=ratio) if model.mask == "soft" else {}
    logits = model.apply({"params": params}, images, **ratio_kw)
    expected, expected_maps = _reference_forward(params, images, **kwargs)
    maps = attention_maps(model, {"params": params}, images, **ratio_kw)
    out = dict(logits=logits, expected=expected, maps=maps, expected_maps=expected_maps)
    if with_grads:
        weights = jax.random.normal(jax.random.PRNGKey(3), logits.shape, logits.dtype)
        loss = lambda p: jnp.sum(model.apply({"params": p}, images, **ratio_kw) * weights)
        reference_loss = lambda p: jnp.sum(_reference_forward(p, images, **kwargs)[0] * weights)
        out["grads"] = jax.grad(loss)(params)
        out["expected_grads"] = jax.grad(reference_loss)(params)
    return out


# One compiled program per mask: both soft ratios share one (the ratio is traced);
# gradients for the soft mask (checked at a ratio strictly inside (0, 1), and at 0)
# and for the causal mode.
@pytest.mark.parametrize(
    "ratio, mode, class_token",
    [
        (0.0, "soft", "last"),
        (0.4, "soft", "last"),
        (0.0, "causal", "first"),
        (0.0, "bidirectional", "last"),
    ],
)
def test_model_equals_the_original_transcription(x64, small_params, ratio, mode, class_token):
    model = ILlama(
        **SMALL, mask=mode, class_token=class_token, attention_implementation="reference"
    )
    params = jax.tree.map(lambda a: a.astype(jnp.float64), small_params)
    images = _images(model, dtype=jnp.float64)
    # The class token's own RoPE position, as in the original (N when last, 0 when first).
    position = model.sequence_length - 1 if class_token == "last" else 0
    out = _compare(model, mode != "bidirectional", params, images, ratio, float(position))

    # RMSNorm and RoPE compute in float32 by design (as the original does), so a
    # float64 run agrees with the float64 transcription to float32 rounding only.
    np.testing.assert_allclose(out["logits"], out["expected"], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(out["maps"], out["expected_maps"], atol=1e-6)
    if mode == "bidirectional":
        return
    leaves = zip(jax.tree.leaves(out["grads"]), jax.tree.leaves(out["expected_grads"]), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # float32 norm/RoPE, as above


def test_rope_rotates_the_class_token_at_position_n(x64, small_params):
    model = ILlama(**SMALL, attention_implementation="reference")
    # Sharper attention (q, k scaled up) so that a wrong rotation shows clearly.
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            a.astype(jnp.float64)
            * (10.0 if any(getattr(k, "key", None) in ("query", "key") for k in path) else 1.0)
        ),
        small_params,
    )
    images = _images(model, dtype=jnp.float64)
    n = model.sequence_length - 1
    # The same compiled program as the soft case above, with the transcription's class
    # token rotated at position n, then at 0.
    at_n = _compare(model, True, params, images, 0.3, float(n))
    at_0 = _compare(model, True, params, images, 0.3, 0.0)
    logits = at_n["logits"]
    np.testing.assert_allclose(logits, at_n["expected"], rtol=2e-5, atol=1e-7)  # float32 RoPE
    assert (
        np.abs(np.asarray(logits - at_0["expected"])).max()
        > 100 * np.abs(np.asarray(logits - at_n["expected"])).max()
    )


# ---------------------------------------------------------------------------- the soft mask


@jax.jit
def _attention_on_equal_logits(ratio, length=6):
    q = jnp.zeros((1, length, 1, 4))  # every logit equal
    v = jnp.ones((1, length, 1, 4))  # so the output is the row sum of the probabilities
    return dot_product_attention(q, q, v, mask=AttentionMask(soft_causal_ratio=ratio))


@functools.partial(jax.jit, static_argnums=0)
def _attention_maps(model, params, images, ratio):
    return attention_maps(model, {"params": params}, images, soft_mask_ratio=ratio)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_soft_mask_on_equal_logits_gives_row_sums(small_params, ratio):
    # The ratio is traced: the three cases share one compiled program each.
    length = 6
    out = _attention_on_equal_logits(ratio)
    rows = np.arange(1, length + 1) / length  # r = 0: 1/N, 2/N, ..., 1
    np.testing.assert_allclose(out[0, :, 0, 0], ratio + (1 - ratio) * rows, rtol=1e-6)

    # The same through the model: zero q/k projections make every logit equal.
    model = ILlama(**SMALL)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            jnp.zeros_like(a)
            if any(getattr(key, "key", None) in ("query", "key") for key in path)
            else a
        ),
        small_params,
    )
    images = _images(model)
    maps = _attention_maps(model, params, images, ratio)
    n = model.sequence_length
    np.testing.assert_allclose(
        maps.sum(-1),
        jnp.broadcast_to(ratio + (1 - ratio) * np.arange(1, n + 1) / n, maps.shape[:-1]),
        rtol=1e-5,
    )


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _patch_gradients(model, params, images, positions, ratio):
    """|d output[position] / d image| summed over each patch, from the last block's output,
    for each of ``positions``: one VJP per position (a one-hot cotangent), one program.

    Returns [len(positions), patches].
    """
    last = f"block_{model.num_layers - 1}"

    def output(images):  # [B, L]: the last block's output summed over channels
        _, state = model.apply(
            {"params": params},
            images,
            soft_mask_ratio=ratio,
            capture_intermediates=lambda m, _: m.name == last,
            mutable=["intermediates"],
        )
        return jnp.sum(state["intermediates"][last]["__call__"][0], -1)

    hidden, vjp = jax.vjp(output, images)
    cotangents = jax.nn.one_hot(jnp.array(positions), hidden.shape[1], dtype=hidden.dtype)
    g = jax.vmap(lambda c: vjp(jnp.broadcast_to(c, hidden.shape))[0])(cotangents)
    g = jnp.abs(g)  # [P, B, H, W, C]
    p, grid = model.patch_size, model.grid_size
    return (
        g.reshape(len(positions), g.shape[1], grid, p, grid, p, -1)
        .sum((1, 3, 5, 6))
        .reshape(len(positions), -1)
    )


def test_causal_outputs_ignore_later_patches_and_the_class_token_sees_all(small_params):
    model = ILlama(**SMALL, mask="causal")
    images = _images(model)
    n = model.grid_size**2
    positions = (0, 5, n - 1, n)  # n: the class token
    grads = np.asarray(_patch_gradients(model, small_params, images, positions, 0.0))
    for i, per_patch in zip(positions[:-1], grads[:-1], strict=True):
        assert np.all(per_patch[i + 1 :] == 0.0), i
        assert np.all(per_patch[: i + 1] > 0.0), i
    assert np.all(grads[-1] > 0.0)  # the class token


def test_original_mask_at_zero_leaks_through_the_softmax_normaliser(small_params):
    # iLLaMA's r = 0 zeroes future probabilities AFTER the softmax: a patch's output
    # still depends on later patches through the normaliser (documented behaviour).
    model = ILlama(**SMALL, mask="soft")
    per_patch = _patch_gradients(model, small_params, _images(model), (0,), 0.0)[0]
    assert np.all(per_patch[1:] > 0.0)


def test_class_token_first_under_a_causal_mask_sees_no_patch(small_params):
    model = ILlama(**SMALL, mask="causal", class_token="first")
    grads = jax.jit(jax.grad(lambda x: jnp.sum(model.apply({"params": small_params}, x))))(
        _images(model)
    )
    assert np.all(grads == 0.0)


# ---------------------------------------------------------------------------- schedules and configs


def test_schedule_values_at_chosen_steps():
    schedules = ml_collections.ConfigDict()
    schedules.constant = dict(kind="constant", start=1.0, end=0.0, cutoff_steps=3)
    schedules.linear = dict(kind="linear", start=1.0, end=0.0, cutoff_epochs=2, eval_value=0.0)
    values = train_kwargs_fn(schedules, steps_per_epoch=5.0)
    got = {step: {k: float(v) for k, v in values(step).items()} for step in (0, 2, 3, 5, 10, 20)}
    assert [got[s]["constant"] for s in (0, 2, 3, 5)] == [1.0, 1.0, 0.0, 0.0]
    assert [got[s]["linear"] for s in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    assert eval_kwargs(schedules, 5.0, num_train_steps=30) == {"constant": 0.0, "linear": 0.0}


def test_trainer_passes_the_soft_mask_schedule(tmp_path):
    from effformer.train import train_and_evaluate

    config = load_config_file("experiments/illama/digits.py:c")
    config.model.tiny = True
    config.model.kwargs = ml_collections.ConfigDict(dict(patch_size=4))
    config.num_epochs = 0.0
    config.num_train_steps = 4
    config.optimizer.warmup_steps = 0
    config.mesh.num_devices = 1
    config.model_schedules.soft_mask_ratio = dict(
        kind="constant", start=1.0, end=0.0, cutoff_steps=2, eval_value=0.0
    )
    seen = {}
    result = train_and_evaluate(
        config,
        tmp_path,
        on_step=lambda step, m: seen.update({step: float(m["schedule/soft_mask_ratio"])}),
    )
    assert [seen[s] for s in sorted(seen)] == [1.0, 1.0, 0.0, 0.0]
    assert np.isfinite(result["eval"]["loss"])


@pytest.mark.parametrize(
    "variant, model_name, dim",
    [("tiny", "illama_tiny", 192), ("small", "illama_small", 384), ("base", "illama_base", 768)],
)
def test_imagenet_configs_validate_and_build(variant, model_name, dim):
    config = load_config_file(f"experiments/illama/imagenet.py:{variant}")
    validate_config(config)
    assert config.model.name == model_name and config.global_batch_size == 4096
    model = models.create(
        config.model.name,
        num_classes=1000,
        image_size=224,
        num_channels=3,
        **config.model.kwargs.to_dict(),
    )
    shapes = jax.eval_shape(lambda: _init(model))["params"]
    assert shapes["position_embedding"]["embedding"].shape == (197, dim)


@pytest.mark.parametrize("arm", ["a", "b", "c", "d", "a_strict"])
def test_ablation_configs_validate(arm):
    validate_config(load_config_file(f"experiments/illama/digits.py:{arm}"))


def test_bad_schedules_are_refused():
    config = load_config_file("experiments/illama/digits.py:c")
    config.model_schedules.soft_mask_ratio.cutoff_epochs = -1.0
    with pytest.raises(ValueError, match="cutoff_epochs must be >= 0"):
        validate_config(config)
    config = load_config_file("experiments/illama/digits.py:c")
    config.model_schedules.soft_mask_ratio.kind = "cosine"
    with pytest.raises(ValueError, match="kind must be one of"):
        validate_config(config)
    config = load_config_file("experiments/illama/digits.py:c")
    config.model_schedules.soft_mask_ratio.start = 1.5
    with pytest.raises(ValueError, match=r"start must be in \[0.0, 1.0\]"):
        validate_config(config)


# ---------------------------------------------------------------------------- resolution change


@pytest.mark.parametrize("class_token", ["last", "first"])
def test_position_interpolation_keeps_the_class_row_in_place(small_params, class_token):
    source = ILlama(**SMALL, class_token=class_token)
    target = source.clone(image_size=16)
    params = small_params
    table = params["position_embedding"]["embedding"]
    new = interpolate_position_embedding(params, source, target)
    new_table = new["position_embedding"]["embedding"]
    assert new_table.shape == (target.sequence_length, source.embed_dim)
    class_row = -1 if class_token == "last" else 0
    np.testing.assert_array_equal(new_table[class_row], table[class_row])
    logits = _apply(target, {"params": new}, _images(target))
    assert logits.shape == (2, source.num_classes) and np.isfinite(logits).all()

    # Same size: identity. A constant image table stays constant (the cubic kernel sums to 1).
    same = interpolate_position_embedding(params, source, source)
    np.testing.assert_allclose(same["position_embedding"]["embedding"], table, atol=1e-6)
    image_rows = slice(0, -1) if class_token == "last" else slice(1, None)
    flat = dict(params, position_embedding={"embedding": table.at[image_rows].set(0.25)})
    resized = interpolate_position_embedding(flat, source, target)["position_embedding"][
        "embedding"
    ]
    np.testing.assert_allclose(resized[image_rows], 0.25, rtol=1e-6)


def test_position_interpolation_refuses_mismatched_models(small_params):
    source = ILlama(**SMALL)
    params = small_params
    with pytest.raises(ValueError, match="place the class token alike"):
        interpolate_position_embedding(
            params, source, source.clone(image_size=16, class_token="first")
        )
    with pytest.raises(ValueError, match="differ in shape"):
        interpolate_position_embedding(params, source, source.clone(image_size=16, embed_dim=32))


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    # NumPy / JAX scalars outside [0, 1] passed as if traced.
    "ratio",
    [1.5, -0.1, True, float("nan"), np.float32(1.5), jnp.float32(-0.5), jnp.array(2.0)],
)
def test_soft_mask_ratio_outside_unit_interval_is_refused(small_params, ratio):
    model = ILlama(**SMALL)
    variables = {"params": small_params}
    with pytest.raises(ValueError, match="soft_mask_ratio must be"):
        model.apply(variables, _images(model), soft_mask_ratio=ratio)


def test_other_bad_inputs(small_params):
    model = ILlama(**SMALL)
    variables = {"params": small_params}
    images = _images(model)
    with pytest.raises(ValueError, match=r"soft_mask_ratio must be a scalar, got shape \(2,\)"):
        model.apply(variables, images, soft_mask_ratio=jnp.array([0.5, 0.5]))
    with pytest.raises(
        ValueError, match=r"inputs must have shape \[B, 8, 8, 3\], got \(2, 8, 8, 1\)"
    ):
        model.apply(variables, images[..., :1])
    causal = model.clone(mask="causal")
    with pytest.raises(ValueError, match="read only by mask='soft'"):
        causal.apply(variables, images, soft_mask_ratio=0.5)
    for field, value, message in [
        ("mask", "sliding", "mask must be one of"),
        ("class_token", "middle", "class_token must be one of"),
        ("patch_size", 3, "patch_size must divide image_size=8"),
        ("num_heads", 3, "num_heads must divide embed_dim=16"),
        # These crashed with a division by zero, or built a model without blocks, without
        # classes or with dropout that zeroes every token.
        ("num_heads", 0, "num_heads must be a positive int, got 0"),
        ("embed_dim", 0, "embed_dim must be a positive int, got 0"),
        ("ffn_multiple_of", 0, "ffn_multiple_of must be a positive int, got 0"),
        ("num_layers", 0, "num_layers must be a positive int, got 0"),
        ("num_classes", 0, "num_classes must be a positive int, got 0"),
        ("image_size", 0, "image_size must be a positive int, got 0"),
        ("num_heads", True, "num_heads must be a positive int, got True"),
        ("dropout_rate", 1.5, r"dropout_rate must be in \[0, 1\), got 1.5"),
    ]:
        with pytest.raises(ValueError, match=message):
            _init(model.clone(**{field: value}))


def test_dropout_and_drop_path_use_the_dropout_stream(small_params):
    model = ILlama(**SMALL, drop_path_rate=0.5, dropout_rate=0.2)
    variables = {"params": small_params}
    images = _images(model)
    run = jax.jit(
        lambda seed: model.apply(
            variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(seed)}
        )
    )
    assert not np.allclose(run(0), run(1))
    np.testing.assert_array_equal(run(0), run(0))
    np.testing.assert_array_equal(
        _apply(model, variables, images), _apply(model, variables, images)
    )
