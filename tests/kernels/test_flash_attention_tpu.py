"""The Mosaic TPU flash-attention kernel: TPU interpret mode on CPU, Mosaic lowering, dispatch.

Interpret mode (``pltpu.InterpretParams``: Pallas's TPU interpreter, which
simulates VMEM/SMEM, scalar prefetch, the grid and its DMAs, and fills
scratch with NaN so a missing initialisation shows) runs in float64, which it
supports when float64 is switched on globally (``global_x64``); results are
compared with the op's float64 reference, forward and gradients. Shapes:
batch 2, 4 query heads on 2 kv heads (grouped-query attention; the
soft-causal test, three runs, uses batch 1 and 2 heads on 1), head dim 8,
blocks of 128 (the smallest the kernel takes) and lengths of 150 to 300,
which no block divides, so every kernel has at least two query and two key
blocks (accumulation across grid steps, block skipping by the causal
triangle, the window band and the segments).

Tolerance: kernel and reference compute the same sums in a different order
(online softmax over blocks), so they differ by rounding only: the measured
maximum over outputs and gradients is 3.3e-15 (float64, these sizes).
1e-12 leaves room for that and still catches any wrong mask entry, weight or
missing block, each of which changes results by ~1e-2 here.

The lowering test proves only that Pallas lowers the kernels to Mosaic TPU
MLIR (block-shape tiling rules, supported operations) from this CPU host; the
kernels have not been compiled by libtpu or run on a TPU.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from effformer.kernels import flash_attention as gpu_kernel
from effformer.kernels import flash_attention_tpu as tpu_kernel
from effformer.kernels.flash_attention_tpu import BlockSizes, flash_attention_tpu
from effformer.ops import attention, masks
from effformer.ops.attention import dot_product_attention
from effformer.ops.masks import AttentionMask

LENGTH = 200  # two blocks of 128, the second part padding
TOLERANCE = 1e-12
INTERPRET = pltpu.InterpretParams()

# Row 0 packs two sequences then 20 padding tokens (fully masked rows); row 1 is one sequence.
# The second sequence crosses the block boundary at 128.
SEGMENTS = np.array([[1] * 70 + [2] * 110 + [0] * 20, [3] * LENGTH], np.int32)
# Packed sequences restart their positions.
POSITIONS = np.array([list(range(70)) + list(range(110)) + [0] * 20, list(range(LENGTH))], np.int32)


def _inputs(q_len, kv_len, dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(2, q_len, 4, 8), (2, kv_len, 2, 8), (2, kv_len, 2, 8), (2, q_len, 4, 8)]
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)


@jax.jit
def _reference_vjp(q, k, v, d_out, visible):
    """The op's reference with the mask given as data (an additive -inf for hidden keys).

    One compilation per shape serves every mask; the reference turns an all -inf
    row into zeros exactly as it does for a masked row.
    """
    bias = jnp.where(visible, 0.0, -jnp.inf)
    attend = lambda q, k, v: dot_product_attention(  # noqa: E731
        q, k, v, bias=bias, implementation="reference"
    )
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(d_out)


@jax.jit
def _soft_reference_vjp(q, k, v, ratio, d_out):
    attend = lambda q, k, v, r: dot_product_attention(  # noqa: E731
        q, k, v, mask=AttentionMask(soft_causal_ratio=r), implementation="reference"
    )
    out, vjp = jax.vjp(attend, q, k, v, ratio)
    return out, vjp(d_out)


def _assert_close(actual, expected):
    out, grads = actual
    out_ref, grads_ref = expected
    np.testing.assert_allclose(out, out_ref, atol=TOLERANCE, rtol=0)
    for name, grad, grad_ref in zip(("dq", "dk", "dv"), grads, grads_ref, strict=False):
        np.testing.assert_allclose(grad, grad_ref, atol=TOLERANCE, rtol=0, err_msg=name)


# name: (q_len, kv_len, kernel keyword arguments, the same mask for the reference, the keys
# that no query sees, or None).
CASES = {
    "causal_packed_segments_padding": (
        LENGTH,
        LENGTH,
        dict(
            causal=True,
            q_segment_ids=SEGMENTS,
            kv_segment_ids=SEGMENTS,
            q_positions=POSITIONS,
            kv_positions=POSITIONS,
        ),
        AttentionMask(
            causal=True,
            q_segment_ids=jnp.asarray(SEGMENTS),
            kv_segment_ids=jnp.asarray(SEGMENTS),
            q_positions=jnp.asarray(POSITIONS),
            kv_positions=jnp.asarray(POSITIONS),
        ),
        None,
    ),
    # Queries at positions 150..299 (aligned to the end) see keys 130..299 at most: the band
    # skips key block 0 for every query block and key block 1 for query block 1.
    "window_short_queries": (
        150,
        300,
        dict(window_left=20, window_right=3),
        AttentionMask(window_left=20, window_right=3),
        slice(0, 128),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_reference(name, global_x64):
    q_len, kv_len, kwargs, mask, unseen = CASES[name]
    q, k, v, d_out = _inputs(q_len, kv_len)
    k_kernel, v_kernel = k, v
    if unseen is not None:
        # NaN keys and values where no query looks: any grid step that computed on their
        # block (instead of skipping it) would turn outputs or gradients into NaN.
        k_kernel, v_kernel = k.at[:, unseen].set(jnp.nan), v.at[:, unseen].set(jnp.nan)
        k, v = k.at[:, unseen].set(0.0), v.at[:, unseen].set(0.0)  # hidden anyway

    @jax.jit
    def kernel(q, k, v, d_out):
        attend = lambda q, k, v: flash_attention_tpu(  # noqa: E731
            q, k, v, interpret=INTERPRET, **kwargs
        )
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(d_out)

    out, grads = kernel(q, k_kernel, v_kernel, d_out)
    visible = masks.dense_mask(mask, 2, q_len, kv_len)
    if unseen is not None:
        assert not np.asarray(visible)[..., unseen].any()
    _assert_close((out, grads), _reference_vjp(q, k, v, d_out, visible))
    if "q_segment_ids" in kwargs:  # padding queries see nothing: exactly 0, zero gradient
        padding = SEGMENTS == 0
        assert np.all(np.asarray(out)[padding] == 0.0)
        assert np.all(np.asarray(grads[0])[padding] == 0.0)
        assert all(np.isfinite(g).all() for g in grads)


def test_soft_causal_traced_ratio_matches_reference_and_ratio_gets_no_gradient(global_x64):
    q, k, v, d_out = _inputs(LENGTH, LENGTH)
    # Three interpreted runs: batch 1, 2 query heads on 1 kv head keep them short.
    q, k, v, d_out = q[:1, :, :2], k[:1, :, :1], v[:1, :, :1], d_out[:1, :, :2]

    @jax.jit  # one compilation for every ratio: r is traced, as the trainer's schedule gives it
    def kernel(q, k, v, ratio, d_out):
        attend = lambda q, k, v, r: flash_attention_tpu(  # noqa: E731
            q, k, v, soft_causal_ratio=r, interpret=INTERPRET
        )
        out, vjp = jax.vjp(attend, q, k, v, ratio)
        return out, vjp(d_out)

    for ratio in (0.0, 0.3, 1.0):
        ratio = jnp.asarray(ratio)
        out, grads = kernel(q, k, v, ratio, d_out)
        expected = _soft_reference_vjp(q, k, v, ratio, d_out)
        _assert_close((out, grads[:3]), expected)
        assert grads[3] == 0.0 and expected[1][3] != 0.0  # the reference does depend on r
    # r = 1 is plain bidirectional attention: the full-row softmax is never renormalised.
    all_visible = jnp.ones((1, 1, LENGTH, LENGTH), bool)
    np.testing.assert_allclose(
        out, _reference_vjp(q, k, v, d_out, all_visible)[0], atol=TOLERANCE, rtol=0
    )


@pytest.mark.parametrize(
    "dtype, head_dim, length, kwargs",
    [
        (jnp.bfloat16, 64, 512, dict(causal=True, segments=True)),
        (jnp.float32, 128, 1000, dict(soft_causal_ratio=0.5, window_left=256, segments=True)),
    ],
    ids=["bf16_d64_causal_segments", "f32_d128_soft_window_padded_length"],
)
def test_forward_and_backward_lower_to_mosaic_tpu(dtype, head_dim, length, kwargs):
    """Lowering only: Pallas's Mosaic rules pass; libtpu never compiles it here."""
    kwargs = dict(kwargs)
    segments = kwargs.pop("segments")
    q = jax.ShapeDtypeStruct((2, length, 8, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((2, length, 2, head_dim), dtype)
    ids = jax.ShapeDtypeStruct((2, length), jnp.int32)

    def loss_and_grads(q, k, v, ids, ratio):
        def loss(q, k, v):
            if "soft_causal_ratio" in kwargs:
                kwargs["soft_causal_ratio"] = ratio  # traced, as in training
            out = flash_attention_tpu(
                q,
                k,
                v,
                q_segment_ids=ids if segments else None,
                kv_segment_ids=ids if segments else None,
                **kwargs,
            )
            return out.astype(jnp.float32).sum()

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    ratio = jax.ShapeDtypeStruct((), jnp.float32)
    lowered = (
        jax.jit(loss_and_grads).trace(q, kv, kv, ids, ratio).lower(lowering_platforms=("tpu",))
    )
    text = lowered.as_text()
    for name in (
        "flash_attention_tpu_forward",
        "flash_attention_tpu_dq",
        "flash_attention_tpu_dkdv",
    ):
        assert name in text
    assert text.count("tpu_custom_call") == 3


def _record_calls(monkeypatch, module, name):
    """Replace module.name by a fake that records its arguments and returns zeros like q."""
    calls = []

    def fake(q, k, v, **kwargs):
        calls.append(kwargs)
        return jnp.zeros_like(q)

    monkeypatch.setattr(module, name, fake)
    return calls


def test_op_dispatches_to_the_tpu_kernel_on_tpu(monkeypatch, caplog):
    q, k, v, _ = _inputs(24, 24, jnp.float32)
    tpu_calls = _record_calls(monkeypatch, tpu_kernel, "flash_attention_tpu")
    gpu_calls = _record_calls(monkeypatch, gpu_kernel, "flash_attention")
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "tpu")
    segments = jnp.ones((2, 24), jnp.int32)
    mask = AttentionMask(
        soft_causal_ratio=0.25, window_left=5, q_segment_ids=segments, kv_segment_ids=segments
    )
    blocks = BlockSizes(block_q=256)
    attention._logged_fallbacks.clear()
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        out = dot_product_attention(
            q, k, v, mask=mask, scale=0.5, implementation="pallas", pallas_block_sizes=blocks
        )
    assert not caplog.records  # the kernel runs: nothing to report
    assert out.shape == q.shape and not gpu_calls and len(tpu_calls) == 1
    call = dict(tpu_calls[0])
    assert call.pop("q_segment_ids") is segments and call.pop("kv_segment_ids") is segments
    assert call == dict(
        causal=False,
        window_left=5,
        window_right=None,
        q_positions=None,
        kv_positions=None,
        soft_causal_ratio=0.25,
        scale=0.5,
        block_sizes=blocks,
        interpret=False,
    )


def test_op_keeps_interpreting_the_gpu_kernel_on_cpu(monkeypatch):
    q, k, v, _ = _inputs(24, 24, jnp.float32)
    tpu_calls = _record_calls(monkeypatch, tpu_kernel, "flash_attention_tpu")
    gpu_calls = _record_calls(monkeypatch, gpu_kernel, "flash_attention")
    dot_product_attention(q, k, v, mask=AttentionMask(causal=True), implementation="pallas")
    assert not tpu_calls and len(gpu_calls) == 1
    assert gpu_calls[0]["interpret"] is True and gpu_calls[0]["causal"] is True


def test_op_falls_back_to_xla_on_a_backend_without_a_kernel(monkeypatch, caplog):
    q, k, v, _ = _inputs(24, 24, jnp.float32)

    def program(implementation):
        attend = functools.partial(
            dot_product_attention, mask=AttentionMask(causal=True), implementation=implementation
        )
        return str(jax.make_jaxpr(attend)(q, k, v))

    monkeypatch.setattr(attention.jax, "default_backend", lambda: "metal")
    attention._logged_fallbacks.clear()
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        fallback = program("pallas")
        program("pallas")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "no 'metal' lowering" in messages[0] and "'xla'" in messages[0]
    assert fallback == program("xla")  # exactly the XLA path's program


def _bad_call(**overrides):
    q, k, v, _ = _inputs(24, 24, jnp.float32)
    return lambda: flash_attention_tpu(q, k, v, **({"interpret": INTERPRET} | overrides))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: BlockSizes(block_q=64), r"BlockSizes.block_q must be a positive multiple of 128"),
        (lambda: BlockSizes(block_k_bwd=200), r"BlockSizes.block_k_bwd .* got 200"),
        (
            _bad_call(block_sizes=gpu_kernel.BlockSizes()),
            r"block_sizes must be a flash_attention_tpu.BlockSizes or None, got BlockSizes\(",
        ),
        (_bad_call(interpret="yes"), r"interpret must be a bool or a pltpu.InterpretParams"),
        # The shared validation names this entry.
        (_bad_call(window_left=-1), r"^flash_attention_tpu: window_left must be a non-negative"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_op_rejects_gpu_block_sizes_on_tpu(monkeypatch):
    q, k, v, _ = _inputs(24, 24, jnp.float32)
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match=r"flash_attention_tpu: block_sizes must be"):
        dot_product_attention(
            q, k, v, implementation="pallas", pallas_block_sizes=gpu_kernel.BlockSizes()
        )
