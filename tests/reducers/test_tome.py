"""Token merging (ToMe): matching and merging against a loop reference, proportional attention
against duplicated tokens, the block and ViT integration, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effformer import models
from effformer.mixers import MultiHeadAttention
from effformer.nn.block import ResidualBlock
from effformer.nn.ffn import make_ffn
from effformer.nn.norms import LayerNorm
from effformer.nn.pooling import SeqPool
from effformer.nn.position import RotaryPositionEncoding
from effformer.ops.attention import dot_product_attention
from effformer.ops.masks import AttentionMask
from effformer.reducers import tome

# ---------------------------------------------------------------- the slow reference


def _reference_groups(metric: np.ndarray, r: int, num_protected: int) -> list[list[list[int]]]:
    """Per batch row, the output tokens in order, each as the list of input tokens merged
    into it. Python loops over tokens, straight from the paper's description."""
    batch_groups = []
    for m in metric:
        unit = [v / np.linalg.norm(v) for v in m]
        rest = list(range(num_protected, len(m)))
        set_a, set_b = rest[0::2], rest[1::2]
        best = {}  # A token -> (similarity, its most similar B token); first maximum wins
        for i in set_a:
            similarities = [float(unit[i] @ unit[j]) for j in set_b]
            k = max(range(len(set_b)), key=lambda t, s=similarities: s[t])
            best[i] = (similarities[k], set_b[k])
        merged = set(sorted(set_a, key=lambda i: -best[i][0])[:r])  # stable: ties to lower index
        groups = [[i] for i in range(num_protected)]
        groups += [[i] for i in set_a if i not in merged]
        groups += [[j] + [i for i in set_a if i in merged and best[i][1] == j] for j in set_b]
        batch_groups.append(groups)
    return batch_groups


def _reference_merge(x, sizes, batch_groups, weights):
    """Size-weighted means over each group, and the gradient of ``sum(weights * merged)``
    with respect to x (token i of group g gets ``sizes_i / size_g * weights_g``), in loops."""
    merged = np.zeros((x.shape[0], len(batch_groups[0]), x.shape[2]))
    merged_sizes = np.zeros(merged.shape[:2])
    grad = np.zeros(x.shape)
    for b, groups in enumerate(batch_groups):
        for out, group in enumerate(groups):
            total = sum(sizes[b, i] for i in group)
            merged[b, out] = sum(sizes[b, i] * x[b, i] for i in group) / total
            merged_sizes[b, out] = total
            for i in group:
                grad[b, i] = sizes[b, i] / total * weights[b, out]
    return merged, merged_sizes, grad


# Jitted once per shape: eager execution would compile every primitive separately.
_matching = jax.jit(tome.bipartite_soft_matching, static_argnums=1, static_argnames="num_protected")
_merge = jax.jit(tome.merge_tokens, static_argnums=3)


def _random(rng, shape):
    return jnp.asarray(rng.standard_normal(shape))


@pytest.mark.parametrize("num_tokens, num_protected, r", [(9, 1, 4), (12, 2, 3)])
def test_matching_and_merging_match_loop_reference(x64, num_tokens, num_protected, r):
    rng = np.random.default_rng(num_tokens)
    metric, x = _random(rng, (3, num_tokens, 4)), _random(rng, (3, num_tokens, 5))
    sizes = jnp.asarray(rng.integers(1, 5, (3, num_tokens)), jnp.float64)
    weights = _random(rng, (3, num_tokens - r, 5))
    # Exact ties: two identical B tokens (every A token's best match is tied) and two
    # identical A tokens (tied best scores); both must go to the lower index.
    p = num_protected
    metric = metric.at[:, p + 3].set(metric[:, p + 1]).at[:, p + 2].set(metric[:, p])

    destination = _matching(metric, r, num_protected=num_protected)
    groups = _reference_groups(np.asarray(metric), r, num_protected)
    want_destination = np.zeros((3, num_tokens), np.int64)
    for b, row in enumerate(groups):
        for out, group in enumerate(row):
            want_destination[b, group] = out
    np.testing.assert_array_equal(destination, want_destination)

    (merged, merged_sizes), vjp = jax.vjp(
        lambda y: _merge(y, sizes, destination, num_tokens - r), x
    )
    (grad,) = vjp((weights, jnp.zeros_like(merged_sizes)))
    want, want_sizes, want_grad = _reference_merge(
        np.asarray(x), np.asarray(sizes), groups, np.asarray(weights)
    )
    np.testing.assert_allclose(merged, want, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(merged_sizes, want_sizes)
    # Gradients with respect to the tokens (the matching itself is a discrete choice).
    np.testing.assert_allclose(grad, want_grad, rtol=1e-13, atol=1e-13)


def test_merging_preserves_size_weighted_sum_and_protects(x64):
    rng = np.random.default_rng(1)
    metric, x = _random(rng, (3, 9, 4)), _random(rng, (3, 9, 5))
    sizes = jnp.asarray(rng.integers(1, 5, (3, 9)), jnp.float64)
    sizes = sizes.at[:, 0].set(1.0)  # a class token stays of size 1, so it passes exactly
    # The protected token is the exact twin of token 5: still it must not merge.
    metric = metric.at[:, 0].set(metric[:, 5])
    destination = _matching(metric, 4, num_protected=1)  # the most r allows
    merged, merged_sizes = _merge(x, sizes, destination, 5)
    np.testing.assert_allclose(
        jnp.sum(merged * merged_sizes[..., None], axis=1),
        jnp.sum(x * sizes[..., None], axis=1),
        rtol=1e-13,
    )
    np.testing.assert_array_equal(destination[:, 0], 0)
    np.testing.assert_array_equal(jnp.sum(destination == 0, axis=1), 1)
    np.testing.assert_array_equal(merged[:, 0], x[:, 0])


# ---------------------------------------------------------------- proportional attention

SIZES = np.array([1, 3, 1, 2, 1])  # two merged tokens, sizes 3 and 2


def _duplicate(array):
    """Each token repeated by its size (the unmerged sequence the merged one stands for)."""
    return jnp.repeat(array, SIZES, axis=1, total_repeat_length=int(SIZES.sum()))


def _sizes(batch):
    return jnp.broadcast_to(jnp.asarray(SIZES, jnp.float64), (batch, len(SIZES)))


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_proportional_attention_equals_duplicated_keys(x64, implementation):
    rng = np.random.default_rng(2)
    q = _random(rng, (2, 4, 2, 3))
    k, v = _random(rng, (2, len(SIZES), 2, 3)), _random(rng, (2, len(SIZES), 2, 3))
    bias = tome.proportional_attention_bias(_sizes(2))
    assert bias.shape == (2, 1, 1, len(SIZES)) and bias.dtype == jnp.float64
    attend = jax.jit(functools.partial(dot_product_attention, implementation=implementation))
    merged = attend(q, k, v, bias=bias)
    unmerged = attend(q, _duplicate(k), _duplicate(v))
    np.testing.assert_allclose(merged, unmerged, rtol=1e-13, atol=1e-13)


def test_mixer_proportional_attention_equals_duplicated_tokens(x64):
    x = _random(np.random.default_rng(3), (2, len(SIZES), 8))
    mixer = MultiHeadAttention(num_heads=4, num_kv_heads=2, param_dtype=jnp.float64)
    params = jax.jit(mixer.init)(jax.random.key(4), x)
    apply = jax.jit(mixer.apply, static_argnames="return_mean_keys")
    y, mean_keys = apply(params, x, token_sizes=_sizes(2), return_mean_keys=True)
    y_unmerged = apply(params, _duplicate(x))
    np.testing.assert_allclose(_duplicate(y), y_unmerged, rtol=1e-12, atol=1e-13)
    key = params["params"]["key"]  # kernel [D, Hkv, Dh], bias [Hkv, Dh]
    want_keys = jnp.einsum("bld,dhe->ble", x, key["kernel"]) / 2 + jnp.mean(key["bias"], 0)
    np.testing.assert_allclose(mean_keys, want_keys, rtol=1e-12, atol=1e-14)


def test_size_weighted_pooling_equals_duplicated_tokens(x64):
    x = _random(np.random.default_rng(5), (2, len(SIZES), 6))
    np.testing.assert_allclose(
        tome.size_weighted_mean(x, _sizes(2)), jnp.mean(_duplicate(x), axis=1), rtol=1e-13
    )
    pool = tome.SizeWeightedSeqPool(param_dtype=jnp.float64)
    params = jax.jit(pool.init)(jax.random.key(6), x, _sizes(2))
    # SeqPool written out on the duplicated tokens: softmax(x w + b)^T x.
    dense = params["params"]["attention_pool"]
    copies = _duplicate(x)
    weights = jax.nn.softmax(copies @ dense["kernel"][:, 0] + dense["bias"][0], axis=-1)
    want = jnp.einsum("bn,bnd->bd", weights, copies)
    got = jax.jit(pool.apply)(params, x, _sizes(2))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)

    # In float32 with every size 1 it is SeqPool, bit for bit (same parameters).
    x32, ones = x.astype(jnp.float32), jnp.ones((2, len(SIZES)), jnp.float32)
    params32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    np.testing.assert_array_equal(
        jax.jit(tome.SizeWeightedSeqPool().apply)(params32, x32, ones),
        jax.jit(SeqPool().apply)(params32, x32),
    )


# ---------------------------------------------------------------- the block


def _block(ordering="cct"):
    return ResidualBlock(
        mixer="attention",
        mixer_kwargs=dict(num_heads=2, qkv_bias=False),
        ffn="gelu",
        ffn_hidden_dim=16,
        ordering=ordering,
    )


def test_cct_block_merges_by_keys_before_its_norm():
    rng = np.random.default_rng(7)
    x = _random(rng, (2, 9, 8)).astype(jnp.float32)
    sizes = jnp.asarray(rng.integers(1, 4, (2, 9)), jnp.float32)  # as after an earlier merge
    block = _block("cct")
    params = jax.jit(block.init)(jax.random.key(8), x)["params"]
    merged_block = jax.jit(
        lambda p, y, s: block.apply({"params": p}, y, token_sizes=s, merge_r=3, num_protected=1)
    )
    out, out_sizes, destination = merged_block(params, x, sizes)

    @jax.jit
    def by_hand(params, x, sizes):
        """x + mixer(n1(x)) with log-size bias; match on the mean keys; merge; n2; + ffn."""
        norm = lambda name, y: LayerNorm(1e-5).apply({"params": params[name]}, y)
        mixer = MultiHeadAttention(num_heads=2, qkv_bias=False)
        attended, keys = mixer.apply(
            {"params": params["mixer"]}, norm("norm1", x), token_sizes=sizes, return_mean_keys=True
        )
        destination = tome.bipartite_soft_matching(keys, 3, num_protected=1)
        merged, merged_sizes = tome.merge_tokens(x + attended, sizes, destination, 6)
        h = norm("norm2", merged)
        return (
            h + make_ffn("gelu", 16).apply({"params": params["ffn"]}, h),
            merged_sizes,
            destination,
        )

    want, want_sizes, want_destination = by_hand(params, x, sizes)
    np.testing.assert_array_equal(destination, want_destination)
    np.testing.assert_array_equal(out_sizes, want_sizes)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ordering", ["pre_norm", "cct"])
def test_block_with_sizes_and_r0_is_bit_identical(ordering):
    x = _random(np.random.default_rng(9), (2, 7, 8)).astype(jnp.float32)
    block = _block(ordering)
    variables = jax.jit(block.init)(jax.random.key(10), x)
    plain = jax.jit(block.apply)(variables, x)
    out, sizes, destination = jax.jit(
        lambda v, y: block.apply(v, y, token_sizes=jnp.ones((2, 7)), proportional_attention=False)
    )(variables, x)
    np.testing.assert_array_equal(out, plain)
    np.testing.assert_array_equal(sizes, 1.0)
    np.testing.assert_array_equal(destination, np.broadcast_to(np.arange(7), (2, 7)))


# ---------------------------------------------------------------- the ViT family


@functools.cache
def _model(name, **overrides):
    overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    model = models.create(name, tiny=True, **overrides)
    params = jax.jit(lambda: model.init(jax.random.key(0), **model.dummy_inputs(1)))()
    return model, params


def _images(model, batch=3):
    shape = (batch, model.image_size, model.image_size, model.num_channels)
    return _random(np.random.default_rng(11), shape).astype(jnp.float32)


def _check_merge_state(model, state, batch):
    """The sown sizes and token map agree with the schedule and with each other."""
    sizes = state["intermediates"]["tome_token_sizes"][0]
    token_map = state["intermediates"]["tome_token_map"][0]
    n = model.sequence_length
    assert sizes.shape == (batch, n - sum(model.tome_schedule))
    np.testing.assert_array_equal(jnp.sum(sizes, axis=1), n)
    # Each final token holds `size` original tokens.
    counts = jax.vmap(lambda m: jnp.bincount(m, length=sizes.shape[1]))(token_map)
    np.testing.assert_array_equal(counts, sizes)
    if model.pooling == "class_token":  # protected: never merged
        np.testing.assert_array_equal(token_map[:, 0], 0)
        np.testing.assert_array_equal(sizes[:, 0], 1)


def test_cct_without_and_with_merging():
    # 16x16 -> 4x4 = 16 tokens, SeqPool (nothing protected).
    model, params = _model("cct_2_3x2", num_classes=10, image_size=16, num_channels=1, num_layers=2)
    images = _images(model)
    plain = jax.jit(model.apply)(params, images)
    for r in (0, (0, 0)):  # r = 0 is the same program as no merging: bit-identical
        off = model.clone(tome_r=r)
        assert off.tome_schedule == (0, 0)
        np.testing.assert_array_equal(jax.jit(off.apply)(params, images), plain)

    merged = model.clone(tome_r=9)  # clips to 8 (16 tokens), then 4 (8 tokens)
    assert merged.tome_schedule == (8, 4)
    logits, state = jax.jit(functools.partial(merged.apply, mutable=["intermediates"]))(
        params, images
    )
    assert logits.shape == (3, 10) and np.all(np.isfinite(logits))
    _check_merge_state(merged, state, 3)


def test_vit_with_merging_trains_one_step_and_evaluates():
    # 8x8 / patch 2 = 16 tokens + the class token; (4, 2) per block is taken exactly.
    model, variables = _model(
        "vit_digits",
        num_classes=10,
        image_size=8,
        num_channels=1,
        num_layers=2,
        tome_r=(4, 2),
        attention_dropout_rate=0.1,
        drop_path_rate=0.1,
    )
    assert model.tome_r == (4, 2) and model.tome_schedule == (4, 2)  # the list became a tuple
    params = variables["params"]
    images, labels = _images(model, batch=4), jnp.arange(4)
    optimizer = optax.sgd(0.1)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = model.apply(
                {"params": p}, images, train=True, rngs={"dropout": jax.random.key(1)}
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # Evaluate the updated model in the same program (one compilation).
        logits, state = model.apply({"params": params}, images, mutable=["intermediates"])
        return params, loss, grads, logits, state

    new_params, loss, grads, logits, state = step(params, optimizer.init(params))
    assert np.isfinite(loss)
    for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(grad)), jax.tree_util.keystr(path)
        assert np.any(grad != 0), jax.tree_util.keystr(path)
    assert logits.shape == (4, 10) and np.all(np.isfinite(logits))
    _check_merge_state(model, state, 4)


# ---------------------------------------------------------------- schedules and bad input


def test_merge_schedule_clips_an_int_and_checks_a_sequence():
    assert tome.merge_schedule(65, 3, 40, num_protected=1) == (32, 16, 8)
    assert tome.merge_schedule(16, 4, 4) == (4, 4, 4, 2)
    assert tome.merge_schedule(16, 2, [8, 4]) == (8, 4)
    with pytest.raises(ValueError, match=r"r\[1\]=5 is too large: block 1 sees 8 tokens"):
        tome.merge_schedule(16, 2, [8, 5])
    with pytest.raises(ValueError, match="one value per block"):
        tome.merge_schedule(16, 2, [1])
    with pytest.raises(ValueError, match="r must be an int >= 0, got -1"):
        tome.merge_schedule(16, 2, -1)


def test_bad_input_errors():
    metric = jnp.zeros((1, 9, 4))
    with pytest.raises(ValueError, match="r must be an int >= 0, got -1"):
        tome.bipartite_soft_matching(metric, -1)
    with pytest.raises(ValueError, match=r"r must be <= \(N - num_protected\) // 2 = 4 .* got r=5"):
        tome.bipartite_soft_matching(metric, 5, num_protected=1)
    with pytest.raises(ValueError, match=r"metric must be \[B, N, C\]"):
        tome.bipartite_soft_matching(metric[0], 1)
    with pytest.raises(ValueError, match=r"sizes must have shape \(1, 9\)"):
        tome.merge_tokens(metric, jnp.ones((1, 8)), jnp.zeros((1, 9), jnp.int32), 5)

    # Shapes only (jax.eval_shape): the errors come while tracing, nothing is compiled.
    x = jax.ShapeDtypeStruct((1, 6, 8), jnp.float32)
    sizes = jnp.ones((1, 6))
    block = _block("pre_norm")
    variables = jax.eval_shape(block.init, jax.random.key(0), x)

    def apply(module, **kwargs):
        return jax.eval_shape(functools.partial(module.apply, **kwargs), variables, x)

    for mask in (AttentionMask(causal=True), AttentionMask(soft_causal_ratio=0.5)):
        with pytest.raises(ValueError, match="token merging .* needs mask=None"):
            apply(block, mask=mask, token_sizes=sizes, merge_r=1)
    with pytest.raises(ValueError, match="merge_r=1 needs token_sizes"):
        apply(block, merge_r=1)
    with pytest.raises(ValueError, match=r"r must be <= \(N - num_protected\) // 2 = 3"):
        apply(block, token_sizes=sizes, merge_r=4)
    with pytest.raises(ValueError, match=r"token_sizes must have shape \(1, 6\)"):
        apply(block, token_sizes=jnp.ones((1, 5)), merge_r=1)
    mamba = ResidualBlock(mixer="mamba", mixer_kwargs=dict(d_model=8), ffn="gelu", ffn_hidden_dim=8)
    with pytest.raises(ValueError, match="needs a MultiHeadAttention mixer .* got MambaMixer"):
        jax.eval_shape(
            functools.partial(mamba.init, token_sizes=sizes, merge_r=1), jax.random.key(0), x
        )
    mixer = MultiHeadAttention(num_heads=2, position_encoding=RotaryPositionEncoding())
    with pytest.raises(ValueError, match="need position_encoding=None .* got Rotary"):
        jax.eval_shape(functools.partial(mixer.init, token_sizes=sizes), jax.random.key(0), x)

    model = models.create("vit_digits", tiny=True, num_classes=10, image_size=8, num_channels=1)
    images = _images(model, batch=1)
    for r, message in (
        (-2, "r must be an int >= 0"),
        ([1, 1], "one value per block"),
        ([9], "r\\[0\\]=9 is too large"),
    ):
        with pytest.raises(
            ValueError, match=f"VisionTransformer: tome_r=.* is invalid: .*{message}"
        ):
            model.clone(tome_r=r).init(jax.random.key(0), images)
