"""dot_product_attention: every fast path against the dense float64 reference.

Tolerances. float64 comparisons (fast path and reference both in float64) use
1e-10: the paths differ only in summation order, ~1e-15 per op. float32 fast
paths are compared with the float64 reference at 2e-5 (outputs) and 1e-4
(gradients): float32 has eps 1.2e-7, the outputs and gradients are O(1) sums of
at most a few dozen O(1) terms through exp/divide, so the rounding is a few
hundred eps at most; gradients add one more reduction over the batch/queries.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.ops import attention, attention_blockwise
from effformer.ops.attention import dot_product_attention
from effformer.ops.masks import AttentionMask

FAST = ("xla", "xla_blockwise")
# Block sizes that divide none of the lengths used below (13, 7).
BLOCKS = dict(block_q=4, block_k=5)

SEGMENTS = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0], [1] * 13], np.int32)
Q_SEGMENTS_SHORT = np.array([[2, 2, 2, 2, 2, 0, 0], [1] * 7], np.int32)


def _segments(q_len):
    q_seg = SEGMENTS if q_len == 13 else Q_SEGMENTS_SHORT
    return dict(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(SEGMENTS))


# name: (q_len, kv_len, mask builder, bias shape or None). Each feature appears
# alone and combined; the soft-causal cases also check the gradient w.r.t. the ratio.
CASES = {
    "none_bias": (13, 13, lambda lq: None, (2, 4, 13, 13)),
    "causal_short_q_bias_heads": (7, 13, lambda lq: AttentionMask(causal=True), (4, 1, 13)),
    "window_3_2": (13, 13, lambda lq: AttentionMask(window_left=3, window_right=2), None),
    "causal_window": (13, 13, lambda lq: AttentionMask(causal=True, window_left=4), None),
    "segments_short_q": (7, 13, lambda lq: AttentionMask(**_segments(lq)), None),
    "segments_causal_bias": (
        13,
        13,
        lambda lq: AttentionMask(causal=True, **_segments(lq)),
        (1, 4, 1, 13),
    ),
    "soft_0": (13, 13, lambda lq: AttentionMask(soft_causal_ratio=0.0), None),
    "soft_0.3_bias": (13, 13, lambda lq: AttentionMask(soft_causal_ratio=0.3), (1, 1, 13, 13)),
    "soft_1": (13, 13, lambda lq: AttentionMask(soft_causal_ratio=1.0), None),
    "soft_short_q": (7, 13, lambda lq: AttentionMask(soft_causal_ratio=0.3), None),
    "soft_segments_window_bias": (
        13,
        13,
        lambda lq: AttentionMask(
            soft_causal_ratio=0.3, window_left=4, window_right=3, **_segments(lq)
        ),
        (2, 1, 13, 13),
    ),
}


def _inputs(q_len, kv_len, bias_shape, dtype, heads=4, kv_heads=2, head_dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, q_len, heads, head_dim))
    k = rng.normal(size=(2, kv_len, kv_heads, head_dim))
    v = rng.normal(size=(2, kv_len, kv_heads, head_dim))
    bias = None if bias_shape is None else rng.normal(size=bias_shape)
    d_out = rng.normal(size=(2, q_len, heads, head_dim))
    as_array = lambda x: None if x is None else jnp.asarray(x, dtype)
    return tuple(as_array(x) for x in (q, k, v, bias, d_out))


def _attend(implementation, q, k, v, mask=None, bias=None, **static_kwargs):
    """Forward only, compiled once (much faster than dispatching each op eagerly)."""

    def attend(q, k, v, mask, bias):
        return dot_product_attention(
            q, k, v, mask=mask, bias=bias, implementation=implementation, **static_kwargs
        )

    return jax.jit(attend)(q, k, v, mask, bias)


def _value_and_grads(implementation, q, k, v, bias, d_out, mask, **kwargs):
    """Output and the gradients of <out, d_out> w.r.t. q, k, v (and bias, and the ratio)."""
    ratio = None if mask is None else mask.soft_causal_ratio
    if ratio is not None:
        ratio = jnp.asarray(ratio, q.dtype)

    def loss(q, k, v, bias, ratio):
        mask_ = mask if ratio is None else dataclasses.replace(mask, soft_causal_ratio=ratio)
        out = dot_product_attention(
            q, k, v, mask=mask_, bias=bias, implementation=implementation, **kwargs
        )
        return jnp.sum(out * d_out), out

    argnums = tuple(i for i, x in enumerate((q, k, v, bias, ratio)) if x is not None)
    grads, out = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(q, k, v, bias, ratio)
    return out, grads


def _assert_close(actual, expected, tol):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), atol=tol, rtol=tol
    )


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_float64(x64, case):
    q_len, kv_len, make_mask, bias_shape = CASES[case]
    q, k, v, bias, d_out = _inputs(q_len, kv_len, bias_shape, jnp.float64)
    mask = make_mask(q_len)
    ref_out, ref_grads = _value_and_grads("reference", q, k, v, bias, d_out, mask)
    for implementation in FAST:
        out, grads = _value_and_grads(implementation, q, k, v, bias, d_out, mask, **BLOCKS)
        assert out.dtype == jnp.float64
        _assert_close(out, ref_out, 1e-10)
        for grad, ref_grad in zip(grads, ref_grads, strict=True):
            _assert_close(grad, ref_grad, 1e-10)


@pytest.mark.parametrize("case", ["segments_causal_bias", "soft_segments_window_bias"])
def test_float32_matches_float64_reference(x64, case):
    q_len, kv_len, make_mask, bias_shape = CASES[case]
    inputs64 = _inputs(q_len, kv_len, bias_shape, jnp.float64)
    inputs32 = tuple(None if x is None else x.astype(jnp.float32) for x in inputs64)
    mask = make_mask(q_len)
    ref_out, ref_grads = _value_and_grads("reference", *inputs64, mask)
    for implementation in FAST:
        out, grads = _value_and_grads(implementation, *inputs32, mask, **BLOCKS)
        assert out.dtype == jnp.float32
        _assert_close(out, ref_out, 2e-5)
        for grad, ref_grad in zip(grads, ref_grads, strict=True):
            assert grad.dtype == jnp.float32
            _assert_close(grad, ref_grad, 1e-4)


def test_reference_follows_the_soft_causal_definition(x64):
    """Reference == softmax over all keys, then times r + (1 - r) * tril, unrenormalised."""
    q, k, v, _, _ = _inputs(5, 5, None, jnp.float64, heads=1, kv_heads=1)
    ratio = 0.3
    out = dot_product_attention(
        q, k, v, mask=AttentionMask(soft_causal_ratio=ratio), implementation="reference"
    )
    logits = np.einsum("qd,kd->qk", q[0, :, 0], k[0, :, 0]) / np.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    probs *= ratio + (1 - ratio) * np.tril(np.ones((5, 5)))
    _assert_close(out[0, :, 0], probs @ np.asarray(v[0, :, 0]), 1e-12)


@pytest.mark.parametrize("implementation", FAST)
def test_bfloat16_inputs_compute_in_float32(implementation):
    """bf16 in, bf16 out; the result is the float32 result rounded (bf16 has 8 mantissa bits)."""
    q, k, v, _, _ = _inputs(13, 13, None, jnp.float32)
    mask = AttentionMask(causal=True)
    single = _attend(implementation, q, k, v, mask=mask, **BLOCKS)
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = _attend(implementation, *half, mask=mask, **BLOCKS)
    assert out.dtype == jnp.bfloat16
    # Inputs rounded to bf16 (relative 2^-9) move O(1) outputs by a few 1e-3.
    _assert_close(out, single, 3e-2)


@pytest.mark.parametrize("implementation", ("reference", *FAST))
def test_fully_masked_rows_are_zero_with_finite_grads(implementation):
    q, k, v, bias, d_out = _inputs(13, 13, (1, 4, 13, 13), jnp.float32)
    # Row 0: padding throughout, so no query sees any key; row 1: queries 11, 12 padding.
    segments = jnp.asarray([[0] * 13, [1] * 11 + [0, 0]], jnp.int32)
    mask = AttentionMask(soft_causal_ratio=0.5, q_segment_ids=segments, kv_segment_ids=segments)
    out, grads = _value_and_grads(implementation, q, k, v, bias, d_out, mask, **BLOCKS)
    assert np.all(np.asarray(out[0]) == 0.0)
    assert np.all(np.asarray(out[1, 11:]) == 0.0)
    assert np.all(np.asarray(out[1, :11]) != 0.0)
    for grad in grads:
        assert np.all(np.isfinite(grad))
    # Nothing flows into or out of padding.
    assert np.all(np.asarray(grads[0][0]) == 0.0) and np.all(np.asarray(grads[1][0]) == 0.0)


@pytest.mark.parametrize("implementation", ("reference", *FAST))
def test_grouped_query_equals_repeated_kv_heads(implementation):
    q, k, v, _, _ = _inputs(13, 13, None, jnp.float32, heads=6, kv_heads=2)
    mask = AttentionMask(causal=True)
    grouped = _attend(implementation, q, k, v, mask=mask, **BLOCKS)
    repeated = _attend(
        implementation,
        q,
        jnp.repeat(k, 3, axis=2),
        jnp.repeat(v, 3, axis=2),
        mask=mask,
        **BLOCKS,
    )
    _assert_close(grouped, repeated, 1e-6)


@pytest.mark.parametrize("implementation", ("reference", *FAST))
def test_packed_row_equals_sequences_run_one_by_one(implementation):
    """Two sequences (lengths 5 and 6) packed in one row of 13 with trailing padding."""
    q, k, v, _, _ = _inputs(13, 13, None, jnp.float32, heads=2, kv_heads=2)
    q, k, v = q[:1], k[:1], v[:1]
    segments = jnp.asarray([[1] * 5 + [2] * 6 + [0, 0]], jnp.int32)
    positions = jnp.asarray([list(range(5)) + list(range(6)) + [0, 0]], jnp.int32)
    mask = AttentionMask(
        causal=True,
        q_segment_ids=segments,
        kv_segment_ids=segments,
        q_positions=positions,
        kv_positions=positions,
    )
    packed = _attend(implementation, q, k, v, mask=mask, **BLOCKS)
    for start, length in ((0, 5), (5, 6)):
        # Each sequence alone, right-padded to 13 (padding marked by segment 0).
        window = slice(start, start + length)
        widths = ((0, 0), (0, 13 - length), (0, 0), (0, 0))
        q_alone, k_alone, v_alone = (jnp.pad(x[:, window], widths) for x in (q, k, v))
        alone_segments = jnp.asarray([[1] * length + [0] * (13 - length)], jnp.int32)
        alone_mask = AttentionMask(
            causal=True, q_segment_ids=alone_segments, kv_segment_ids=alone_segments
        )
        alone = _attend(implementation, q_alone, k_alone, v_alone, mask=alone_mask, **BLOCKS)
        _assert_close(packed[:, window], alone[:, :length], 1e-6)
    assert np.all(np.asarray(packed[:, 11:]) == 0.0)


@pytest.mark.parametrize("implementation", ("reference", *FAST))
def test_decoding_one_query_against_partial_cache(implementation):
    """Lq=1 at position 9 against a 16-slot cache holding 10 keys == row 9 of full causal."""
    q, k, v, _, _ = _inputs(10, 16, None, jnp.float32)
    full = _attend("reference", q, k[:, :10], v[:, :10], mask=AttentionMask(causal=True))
    # Slots 10..15 hold junk; causality against explicit positions hides them.
    mask = AttentionMask(causal=True, q_positions=jnp.full((2, 1), 9, jnp.int32))
    step = _attend(implementation, q[:, 9:10], k, v, mask=mask, **BLOCKS)
    _assert_close(step, full[:, 9:10], 1e-6)


def test_default_positions_align_last_query_with_last_key():
    q, k, v, _, _ = _inputs(13, 13, None, jnp.float32)
    mask = AttentionMask(causal=True)
    full = _attend("reference", q, k, v, mask=mask)
    last = _attend("xla_blockwise", q[:, -1:], k, v, mask=mask)
    _assert_close(last, full[:, -1:], 1e-6)


@pytest.mark.parametrize("block_q, block_k", [(1, 1), (3, 13), (13, 2), (64, 64)])
def test_blockwise_any_block_size(block_q, block_k):
    q, k, v, bias, _ = _inputs(13, 13, (4, 13, 13), jnp.float32)
    mask = AttentionMask(window_left=4, window_right=1, **_segments(13))
    ref = _attend("reference", q, k, v, mask=mask, bias=bias)
    out = _attend("xla_blockwise", q, k, v, mask=mask, bias=bias, block_q=block_q, block_k=block_k)
    _assert_close(out, ref, 2e-6)


@pytest.mark.parametrize("implementation", ("reference", *FAST))
def test_jit(implementation):
    q, k, v, bias, _ = _inputs(13, 13, (1, 4, 13, 13), jnp.float32)

    @jax.jit
    def run(q, k, v, bias, ratio, segments):
        mask = AttentionMask(
            soft_causal_ratio=ratio, q_segment_ids=segments, kv_segment_ids=segments
        )
        return dot_product_attention(q, k, v, mask=mask, bias=bias, implementation=implementation)

    segments = jnp.asarray(SEGMENTS)
    mask = AttentionMask(soft_causal_ratio=0.3, q_segment_ids=segments, kv_segment_ids=segments)
    # The reference eagerly, with the ratio and segment ids concrete.
    expected = dot_product_attention(q, k, v, mask=mask, bias=bias, implementation="reference")
    _assert_close(run(q, k, v, bias, jnp.float32(0.3), segments), expected, 1e-6)


def _dense_blockwise_keep(rng, rate, batch, heads, q_len, kv_len, block_q, block_k):
    """The dropout mask the blockwise path draws, assembled tile by tile: [B, H, Lq, Lk]."""
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    rows = []
    for i in range(nq):
        tiles = [
            attention_blockwise.dropout_keep(
                rng, i * nk + j, rate, (batch, heads, block_q, block_k)
            )
            for j in range(nk)
        ]
        rows.append(jnp.concatenate(tiles, axis=-1))
    keep = jnp.concatenate(rows, axis=-2)[:, :, :q_len, :kv_len]
    return keep.astype(jnp.float64) / attention_blockwise.dropout_keep_probability(rate)


_dense_blockwise_keep = jax.jit(_dense_blockwise_keep, static_argnums=range(1, 8))


# The dropout tests use "rbg" keys: the op takes any key, and XLA:CPU takes several
# seconds to compile threefry, which would dominate this file's run time.


def test_dropout_reference_and_xla_share_one_mask(x64):
    q, k, v, _, _ = _inputs(13, 13, None, jnp.float64)
    kwargs = dict(
        mask=AttentionMask(causal=True), dropout_rate=0.3, dropout_rng=jax.random.key(1, impl="rbg")
    )
    ref = _attend("reference", q, k, v, **kwargs)
    # With one block covering everything, the blockwise path draws the same single tile.
    blockwise = _attend("xla_blockwise", q, k, v, **kwargs)
    no_dropout = _attend("reference", q, k, v, mask=kwargs["mask"])
    _assert_close(_attend("xla", q, k, v, **kwargs), ref, 1e-10)
    _assert_close(blockwise, ref, 1e-10)
    assert not np.allclose(ref, no_dropout)


@pytest.mark.parametrize("mask", [AttentionMask(causal=True), AttentionMask(soft_causal_ratio=0.3)])
def test_blockwise_dropout_is_reference_with_tiled_mask(x64, mask):
    """Forward and backward (including the regenerated mask) against the dense reference."""
    q, k, v, bias, d_out = _inputs(13, 13, (1, 4, 13, 13), jnp.float64)
    rng, rate = jax.random.key(3, impl="rbg"), 0.4
    keep = _dense_blockwise_keep(rng, rate, 2, 4, 13, 13, BLOCKS["block_q"], BLOCKS["block_k"])

    def reference(q, k, v, bias, ratio):
        mask_ = mask if ratio is None else dataclasses.replace(mask, soft_causal_ratio=ratio)
        return attention._reference(q, k, v, mask_, bias, q.shape[-1] ** -0.5, keep)

    ratio = None if mask.soft_causal_ratio is None else jnp.asarray(mask.soft_causal_ratio)
    argnums = (0, 1, 2, 3) if ratio is None else (0, 1, 2, 3, 4)
    reference_loss = lambda *args: jnp.sum(reference(*args) * d_out)
    ref_grads = jax.jit(jax.grad(reference_loss, argnums=argnums))(q, k, v, bias, ratio)
    out, grads = _value_and_grads(
        "xla_blockwise", q, k, v, bias, d_out, mask, dropout_rate=rate, dropout_rng=rng, **BLOCKS
    )
    _assert_close(out, jax.jit(reference)(q, k, v, bias, ratio), 1e-10)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        _assert_close(grad, ref_grad, 1e-10)


def test_xla_dropout_gradients_match_reference(x64):
    """The XLA path's hand-written backward with dropout and the soft mask (GQA, bias)."""
    q, k, v, bias, d_out = _inputs(13, 13, (1, 4, 13, 13), jnp.float64)
    mask = AttentionMask(soft_causal_ratio=0.3, causal=False)
    kwargs = dict(dropout_rate=0.4, dropout_rng=jax.random.key(3, impl="rbg"))
    ref_out, ref_grads = _value_and_grads("reference", q, k, v, bias, d_out, mask, **kwargs)
    out, grads = _value_and_grads("xla", q, k, v, bias, d_out, mask, **kwargs)
    _assert_close(out, ref_out, 1e-10)
    assert len(grads) == 5  # q, k, v, bias and the soft-causal ratio
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        _assert_close(grad, ref_grad, 1e-10)


def test_dropout_keeps_about_one_minus_rate(x64):
    keep = _dense_blockwise_keep(jax.random.key(0, impl="rbg"), 0.25, 4, 4, 64, 64, 16, 16)
    assert abs(float(jnp.mean(keep > 0)) - 0.75) < 0.02


@pytest.mark.parametrize("rate", [0.1, 0.25, 1e-6, 0.9999999])
def test_dropout_keep_probability_is_one_minus_rate_to_16_bits(rate):
    p_keep = attention_blockwise.dropout_keep_probability(rate)
    assert abs(p_keep - (1 - rate)) <= 2.0**-17 or p_keep == 2.0**-16  # never 0
    assert (p_keep * 2**16) == int(p_keep * 2**16)


def test_dropout_keep_entries_are_independent():
    """Two entries share each 32-bit word: pairs must be kept independently (p^2 both)."""
    rate, shape = 0.5, (64, 64, 64)
    keep = attention_blockwise.dropout_keep(jax.random.key(1, impl="rbg"), 0, rate, shape)
    p_keep = attention_blockwise.dropout_keep_probability(rate)
    pairs = keep.reshape(64, 64, 32, 2)  # the two halves of one word
    n = pairs.shape[0] * pairs.shape[1] * pairs.shape[2]
    both = float(jnp.mean(pairs[..., 0] & pairs[..., 1]))
    # 5 standard deviations of the mean of n Bernoulli(p^2) draws.
    assert abs(both - p_keep**2) < 5 * (p_keep**2 * (1 - p_keep**2) / n) ** 0.5
    assert abs(float(jnp.mean(keep)) - p_keep) < 5 * (p_keep * (1 - p_keep) / keep.size) ** 0.5
    # An odd last axis keeps the first half of the last word.
    odd = attention_blockwise.dropout_keep(jax.random.key(1, impl="rbg"), 0, rate, (64, 64, 63))
    assert bool(jnp.all(odd == keep[..., :63]))


def test_blockwise_backward_memory_is_linear():
    """Compiled temp memory of value-and-grad at L and 2L: linear (~2x), not quadratic (~4x)."""

    def temp_bytes(length):
        x = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)

        def loss(q, k, v):
            out = dot_product_attention(
                q,
                k,
                v,
                mask=AttentionMask(causal=True),
                implementation="xla_blockwise",
                block_q=128,
                block_k=128,
            )
            return jnp.sum(out**2)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(2048), temp_bytes(4096)
    assert large < 2.5 * small, (small, large)
    # And far below one materialised score matrix (4096^2 float32 = 64 MiB).
    assert large < 4096 * 4096 * 4 / 8


def test_choice_on_cpu():
    small = jax.ShapeDtypeStruct((1, 512, 1, 64), jnp.float32)
    large = jax.ShapeDtypeStruct((1, 1024, 1, 64), jnp.float32)
    assert attention._choose_implementation(small, small, None, None, 0.0) == "xla"
    assert attention._choose_implementation(large, large, None, None, 0.0) == "xla_blockwise"


def test_choice_on_gpu_falls_back_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention.jax, "device_count", lambda: 1)
    attention._logged_fallbacks.clear()
    length = attention.PALLAS_MIN_AUTO_QUERIES
    half = jax.ShapeDtypeStruct((1, length, 2, 64), jnp.bfloat16)
    single = jax.ShapeDtypeStruct((1, length, 2, 64), jnp.float32)
    wide = jax.ShapeDtypeStruct((1, length, 2, 256), jnp.bfloat16)
    step = jax.ShapeDtypeStruct((1, 1, 2, 64), jnp.bfloat16)  # one decode query
    causal = AttentionMask(causal=True)
    soft = AttentionMask(soft_causal_ratio=0.5)
    bias = jax.ShapeDtypeStruct((1, 2, length, length), jnp.float32)
    choose = attention._choose_implementation
    blockwise = "xla_blockwise"  # Lq * Lk > XLA_MAX_SCORES
    assert choose(half, half, causal, None, 0.0) == "cudnn"
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        for _ in range(3):  # cuDNN cannot, the Triton kernel can (logged once)
            assert choose(half, half, soft, None, 0.0) == "pallas"
        # Neither: cuDNN and the kernel's measured range are both 16-bit, head dim <= 128.
        assert choose(single, single, causal, None, 0.0) == blockwise
        assert choose(wide, wide, soft, None, 0.0) == blockwise
        # The kernel takes no dropout or bias and compiles the scale in.
        assert choose(half, half, causal, None, 0.1) == blockwise
        assert choose(half, half, causal, bias, 0.0) == blockwise
        assert choose(half, half, soft, None, 0.0, jnp.float32(0.1)) == blockwise
        # Nor was it timed on short query blocks.
        assert choose(step, half, causal, None, 0.0) == "xla"
        # jit's sharding would not split it across several devices.
        monkeypatch.setattr(attention.jax, "device_count", lambda: 2)
        assert choose(half, half, soft, None, 0.0) == blockwise
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 8, messages
    expected = [
        ("'pallas'", "soft-causal"),
        (blockwise, "16-bit inputs only, got float32"),
        (blockwise, "head dim 128, got 256"),
        (blockwise, "no dropout"),
        (blockwise, "no bias"),
        (blockwise, "scale is traced"),
        ("'xla'", f">= {length} queries, got 1"),
        (blockwise, "2 devices"),
    ]
    for message, (choice, why) in zip(messages, expected, strict=True):
        assert choice in message and why in message, message


@pytest.mark.parametrize(
    "mask",
    [
        None,
        AttentionMask(causal=True),
        AttentionMask(causal=True, window_left=3),
        AttentionMask(window_left=3, window_right=0),
        AttentionMask(window_right=0),
    ],
)
def test_cudnn_arguments_express_the_mask(mask):
    """The kwargs handed to cuDNN, run through jax's XLA path, equal our reference."""
    q, k, v, _, _ = _inputs(13, 13, None, jnp.float32)
    assert attention._cudnn_unsupported_reason(q.astype(jnp.bfloat16), k, mask, 0.0) is None
    ours = dot_product_attention(q, k, v, mask=mask, implementation="reference")
    theirs = jax.nn.dot_product_attention(
        q, k, v, implementation="xla", **attention.cudnn_arguments(mask)
    )
    _assert_close(theirs, ours, 1e-6)


@pytest.mark.parametrize(
    "mask, q_len",
    [
        (AttentionMask(soft_causal_ratio=0.5), 13),
        (AttentionMask(causal=True), 7),
        (AttentionMask(window_left=3, window_right=2), 13),
        (AttentionMask(causal=True, q_positions=jnp.zeros((1, 13), jnp.int32)), 13),
        (AttentionMask(**_segments(13)), 13),
    ],
)
def test_cudnn_rejects_what_it_cannot_compute(mask, q_len):
    q = jax.ShapeDtypeStruct((2, q_len, 4, 8), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 13, 2, 8), jnp.bfloat16)
    assert attention._cudnn_unsupported_reason(q, k, mask, 0.0) is not None


def test_choice_on_gpu_skips_cudnn_for_head_dims_it_refuses(monkeypatch):
    """jax's cuDNN call raises NotImplementedError for a head dim that is not a multiple
    of 8 or above 128 (256 from Hopper): implementation=None must pick another path."""
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention.jax, "device_count", lambda: 1)
    causal = AttentionMask(causal=True)
    for head_dim, expected in ((64, "cudnn"), (12, "xla"), (264, "xla")):
        q = jax.ShapeDtypeStruct((1, 16, 2, head_dim), jnp.bfloat16)
        assert attention._choose_implementation(q, q, causal, None, 0.0) == expected, head_dim
    q = jax.ShapeDtypeStruct((1, 16, 2, 12), jnp.bfloat16)
    reason = attention._cudnn_unsupported_reason(q, q, causal, 0.0)
    assert reason is not None and "multiple of 8, got 12" in reason


def test_cudnn_on_cpu_raises():
    q, k, v, _, _ = _inputs(13, 13, None, jnp.float32)
    with pytest.raises(ValueError, match="implementation='cudnn' needs a GPU backend, got 'cpu'"):
        dot_product_attention(q, k, v, implementation="cudnn")


def _bad(**changes):
    q, k, v, _, _ = _inputs(13, 13, None, jnp.float32)
    args = dict(q=q, k=k, v=v)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args, match",
    [
        (_bad(q=jnp.zeros((2, 13, 32))), r"q must have rank 4 .* got shape \(2, 13, 32\)"),
        (
            _bad(k=jnp.zeros((3, 13, 2, 8))),
            r"k batch must equal q's batch 2, got k.shape=\(3, 13, 2, 8\)",
        ),
        (_bad(v=jnp.zeros((2, 13, 2, 4))), r"v head_dim must equal q's head_dim 8, got v.shape"),
        (
            _bad(k=jnp.zeros((2, 13, 3, 8)), v=jnp.zeros((2, 13, 3, 8))),
            r"multiple of k/v heads, got 3",
        ),
        (_bad(v=jnp.zeros((2, 12, 2, 8))), r"v must have k's length and heads \(13, 2\), got"),
        (_bad(v=jnp.zeros((2, 13, 2, 8), jnp.float16)), r"share one floating dtype"),
        (
            _bad(bias=jnp.zeros((4, 13, 12))),
            r"bias must be broadcastable to \(2, 4, 13, 13\).*\(4, 13, 12\)",
        ),
        (
            _bad(
                mask=AttentionMask(
                    q_segment_ids=jnp.ones((2, 12)), kv_segment_ids=jnp.ones((2, 13))
                )
            ),
            r"q_segment_ids must have shape \(2, 13\)",
        ),
        (
            _bad(mask=AttentionMask(kv_positions=jnp.ones((2, 14)))),
            r"kv_positions must have shape \(2, 13\)",
        ),
        (_bad(implementation="flash"), r"implementation must be one of .* got 'flash'"),
        (_bad(dropout_rate=1.0), r"dropout_rate must be in \[0, 1\), got 1.0"),
        (_bad(dropout_rate=0.1), r"dropout_rate=0.1 needs a dropout_rng, got None"),
        (_bad(block_q=0), r"block_q must be a positive int, got 0"),
        (_bad(mask=jnp.ones((13, 13), bool)), r"mask must be an AttentionMask or None"),
    ],
)
def test_bad_input_raises(args, match):
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        dot_product_attention(q, k, v, **args)
