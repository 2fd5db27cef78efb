"""Combiner: the mixer against its dense implied attention, and the paper's properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.mixers import CombinerAttention, make_mixer
from effformer.mixers.combiner import combiner_attention, resolve_segment_length
from effformer.models import registry
from effformer.ops.combiner_reference import combiner_reference, implied_attention
from effformer.ops.masks import AttentionMask

CASES = [
    ("fixed", True),
    ("fixed", False),
    ("logsparse", True),
    ("axial", True),
    ("axial", False),
    ("mixture", True),
    ("mixture", False),
]
IDS = [f"{variant}-{'causal' if causal else 'bidir'}" for variant, causal in CASES]
DIM, HEADS = 8, 2


def _segment(variant):
    return None if variant == "logsparse" else 4


def _layer_norm(x, scale, bias, epsilon):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(variance + epsilon) * scale + bias


def _reference_mixer(params, x, variant, causal, segment_length, epsilon=1e-6):
    """The whole mixer through the dense implied attention, from its parameters."""
    head_dim = DIM // HEADS
    q, k, v = (
        jnp.einsum("bld,dhk->blhk", x, params[name]["kernel"]) for name in ("query", "key", "value")
    )
    q = q / np.sqrt(head_dim)
    length = x.shape[1]
    width = resolve_segment_length(variant, causal, segment_length, length)
    row_key_fn = None
    if variant == "axial":
        slots = -(-length // width) * width
        x_slots = jnp.pad(x, [(0, 0), (0, slots - length), (0, 0)])

        def row_key_fn(row_out):
            projected = jnp.einsum("bshk,hkd->bsd", row_out, params["row_out"]["kernel"])
            normed = _layer_norm(
                x_slots + projected,
                params["row_norm"]["scale"],
                params["row_norm"]["bias"],
                epsilon,
            )
            return jnp.einsum("bsd,dhk->bshk", normed, params["row_key"]["kernel"])

    out = combiner_reference(
        q, k, v, variant=variant, causal=causal, segment_length=width, row_key_fn=row_key_fn
    )
    return jnp.einsum("blhk,hkd->bld", out, params["out"]["kernel"])


def _inputs(length, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), (2, length, DIM), dtype)


# One length per case to keep compile time down; every segmented variant is checked at
# a multiple of the segment length 4 (12) and at a length that is not (13).
REFERENCE_LENGTHS = {
    ("fixed", True): 12,
    ("fixed", False): 13,
    ("logsparse", True): 13,
    ("axial", True): 13,
    ("axial", False): 12,
    ("mixture", True): 12,
    ("mixture", False): 13,
}


@pytest.mark.parametrize(("variant", "causal"), CASES, ids=IDS)
def test_mixer_equals_dense_reference_forward_and_gradients(x64, variant, causal):
    mixer = CombinerAttention(
        num_heads=HEADS, variant=variant, causal=causal, segment_length=_segment(variant)
    )

    def fast_and_slow(length):
        x = _inputs(length)
        params = mixer.init(jax.random.key(1), x)["params"]
        # Non-trivial norm parameters, so the axial key path is exercised in full.
        params = jax.tree.map(
            lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params
        )
        cotangent = jax.random.normal(jax.random.key(3), x.shape)

        def fast(params, x):
            return jnp.sum(mixer.apply({"params": params}, x) * cotangent)

        def slow(params, x):
            out = _reference_mixer(params, x, variant, causal, mixer.segment_length)
            return jnp.sum(out * cotangent)

        return [jax.value_and_grad(f, argnums=(0, 1))(params, x) for f in (fast, slow)]

    results = jax.jit(lambda: fast_and_slow(REFERENCE_LENGTHS[variant, causal]))()
    (fast_value, fast_grads), (slow_value, slow_grads) = results
    np.testing.assert_allclose(fast_value, slow_value, rtol=1e-10)
    for fast_leaf, slow_leaf in zip(
        jax.tree.leaves(fast_grads), jax.tree.leaves(slow_grads), strict=True
    ):
        np.testing.assert_allclose(fast_leaf, slow_leaf, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("variant", "causal"), CASES, ids=IDS)
def test_implied_attention_is_a_distribution_with_full_support(x64, variant, causal):
    length = 13
    qkv = jax.random.normal(jax.random.key(4), (3, 1, length, 1, 3))
    width = resolve_segment_length(variant, causal, _segment(variant), length)
    weights = jax.jit(
        lambda qkv: implied_attention(
            *qkv,
            variant=variant,
            causal=causal,
            segment_length=width,
            row_key_fn=jnp.tanh,  # any key map will do here
        )
    )(qkv)[0, 0]
    assert bool(jnp.all(weights >= 0))
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-12)
    visible = np.tril(np.ones((length, length), bool)) if causal else np.ones((length,) * 2, bool)
    # Causal: nothing after the query; full support: every visible token gets weight.
    np.testing.assert_array_equal(weights > 0, visible)


@pytest.mark.parametrize(("variant", "causal"), CASES, ids=IDS)
def test_causality_and_full_support_by_gradient(variant, causal):
    """Causal: out_i has zero gradient from q, k and v at every j > i. Full support:
    out_i has a non-zero gradient from the value at every visible j (every j <= i
    causal, every j bidirectional), so the last output reaches every earlier value."""
    length = 11
    qkv = jax.random.normal(jax.random.key(5), (3, 1, length, 2, 3))

    def out(qkv):
        return combiner_attention(
            *qkv,
            variant=variant,
            causal=causal,
            segment_length=_segment(variant),
            row_key_fn=jnp.tanh,
        )

    jacobian = np.abs(np.asarray(jax.jit(jax.jacrev(out))(qkv)))  # [1, i, h, d, 3, 1, j, h, d]
    reaches = jacobian.sum(axis=(0, 2, 3, 5, 7, 8))  # [i, 3, j]
    visible = np.tril(np.ones((length, length), bool)) if causal else np.ones((length,) * 2, bool)
    for part in range(3):
        assert not np.any(reaches[:, part][~visible]), "gradient from an invisible position"
    np.testing.assert_array_equal(reaches[:, 2] > 0, visible)


PADDING_CASES = [("fixed", False), ("logsparse", True), ("axial", False), ("mixture", False)]


@pytest.mark.parametrize(("variant", "causal"), PADDING_CASES)
def test_padding_by_segment_ids_is_invisible(variant, causal):
    """A row padded with segment id 0 computes, on its real tokens, what the unpadded
    sequence computes (bidirectional variants included), and zero on the padding."""
    real, padded = 10, 13
    mixer = CombinerAttention(
        num_heads=HEADS, variant=variant, causal=causal, segment_length=_segment(variant)
    )
    x = _inputs(padded, seed=6, dtype=jnp.float32)
    segment_ids = jnp.broadcast_to((jnp.arange(padded) < real).astype(jnp.int32), (2, padded))
    mask = AttentionMask(causal=causal, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)

    def both():
        variables = mixer.init(jax.random.key(1), x)
        return mixer.apply(variables, x, mask=mask), mixer.apply(variables, x[:, :real])

    with_padding, alone = jax.jit(both)()
    np.testing.assert_allclose(with_padding[:, :real], alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(with_padding[:, real:], 0.0)


def test_default_segment_length_is_ceil_sqrt():
    assert resolve_segment_length("fixed", True, None, 16) == 4
    assert resolve_segment_length("fixed", True, None, 17) == 5
    assert resolve_segment_length("axial", True, None, 4) == 2
    assert resolve_segment_length("logsparse", True, None, 17) == 0


@pytest.mark.parametrize(
    ("kwargs", "length", "message"),
    [
        (dict(variant="bogus"), 8, "variant must be one of"),
        (dict(variant="fixed", segment_length=0), 8, "segment_length must be a positive int"),
        (dict(variant="fixed", segment_length=9), 8, "segment_length must be <= the sequence"),
        (dict(variant="axial", segment_length=8), 8, "needs at least two rows"),
        (dict(variant="mixture", segment_length=8), 8, "needs at least two rows"),
        (dict(variant="logsparse", causal=False), 8, "causal attention only"),
        (dict(variant="logsparse", segment_length=2), 8, "takes no segment_length"),
        (dict(num_heads=3), 8, "num_heads must divide the model width"),
        # Regression: head_dim=0 silently meant D // num_heads.
        (dict(head_dim=0), 8, r"head_dim must be a positive int or None .*got 0"),
    ],
)
def test_bad_configuration_fails_clearly(kwargs, length, message):
    mixer = CombinerAttention(**{"num_heads": HEADS, **kwargs})
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(mixer.init, jax.random.key(0), jnp.zeros((1, length, DIM)))


@pytest.mark.parametrize(
    ("call_kwargs", "message"),
    [
        (dict(decode=True), "decode=True"),
        (dict(mask=AttentionMask(window_left=2)), "windows, soft-causal"),
        # Regression: key positions alone were silently ignored (query positions raised).
        (dict(mask=AttentionMask(kv_positions=jnp.zeros((1, 8), jnp.int32))), "explicit positions"),
        (dict(mask=AttentionMask(causal=True)), "bidirectional mixer"),
        (
            dict(
                mask=AttentionMask(q_segment_ids=jnp.ones((1, 5)), kv_segment_ids=jnp.ones((1, 5)))
            ),
            "q_segment_ids must have shape",
        ),
    ],
)
def test_bad_call_fails_clearly(call_kwargs, message):
    mixer = CombinerAttention(num_heads=HEADS, variant="fixed", causal=False)
    x = jnp.zeros((1, 8, DIM))
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: mixer.init(jax.random.key(0), x, **call_kwargs))


def test_bad_inputs_to_the_function_fail_clearly():
    q = jnp.zeros((1, 8, 2, 3))
    with pytest.raises(ValueError, match="q, k, v must all be"):
        combiner_attention(q, q[:, :4], q, variant="fixed", causal=True)
    with pytest.raises(ValueError, match="needs row_key_fn"):
        combiner_attention(q, q, q, variant="axial", causal=True)
    with pytest.raises(ValueError, match="valid must have shape"):
        combiner_attention(q, q, q, variant="fixed", causal=True, valid=jnp.ones((1, 7), bool))


def test_make_mixer_builds_the_combiner_and_keeps_bf16():
    mixer = make_mixer("combiner", num_heads=HEADS, variant="mixture", dtype=jnp.bfloat16)
    assert isinstance(mixer, CombinerAttention)
    x = jnp.zeros((2, 9, DIM), jnp.bfloat16)
    variables = jax.eval_shape(mixer.init, jax.random.key(0), x)
    assert jax.eval_shape(mixer.apply, variables, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("variant", ["fixed", "logsparse", "axial", "mixture"])
def test_registered_models(variant):
    lm = registry.create("combiner_lm", tiny=True, combiner_variant=variant)
    inputs = lm.dummy_inputs(2)
    variables = jax.eval_shape(lm.init, jax.random.key(0), **inputs)
    assert jax.eval_shape(lambda v: lm.apply(v, **inputs), variables).shape == (2, 8, 64)
    if variant != "logsparse":
        encoder = registry.create("combiner_encoder", tiny=True, combiner_variant=variant)
        variables = jax.eval_shape(encoder.init, jax.random.key(0), **inputs)
        assert jax.eval_shape(lambda v: encoder.apply(v, **inputs), variables).shape == (2, 3)


def test_registered_models_refuse_relative_encodings_and_unknown_variants():
    with pytest.raises(ValueError, match="position_encoding must be one of"):
        registry.create("combiner_lm", tiny=True, position_encoding="rope")
    with pytest.raises(ValueError, match="combiner_variant must be one of"):
        registry.create("combiner_encoder", tiny=True, combiner_variant="axial2")


@pytest.mark.parametrize(
    "variant, segment_length, max_length",
    [("fixed", 8, 64), ("axial", 8, 64), ("mixture", 8, 64), ("mixture", 128, 2048)],
)
def test_dummy_inputs_fit_the_segment_length(variant, segment_length, max_length):
    # The trainer initialises from dummy_inputs: 8 tokens were too few for segment
    # length 8 (axial/mixture need two rows) or 128 (the paper's LM).
    lm = registry.create(
        "combiner_lm",
        tiny=True,
        combiner_variant=variant,
        combiner_segment_length=segment_length,
        max_length=max_length,
    )
    inputs = lm.dummy_inputs(1)
    assert inputs["inputs"].shape == (1, 2 * segment_length)
    variables = jax.eval_shape(lm.init, jax.random.key(0), **inputs)
    logits = jax.eval_shape(lambda v: lm.apply(v, **inputs), variables)
    assert logits.shape == (1, 2 * segment_length, 64)
