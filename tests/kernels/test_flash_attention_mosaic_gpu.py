"""The Mosaic GPU flash-attention kernels in Mosaic GPU's interpreter on CPU.

The interpreter simulates shared memory, the TMA copies and the barriers of the
kernel's two-slot pipeline; it has no rules for WGMMA with an operand in registers
or for transposed shared-memory views, so there the interpreted kernel multiplies
the tiles' values with plain dots (``_logits`` / ``_values``). The WGMMA forms are
checked by the lowering tests below and, compiled, by ``test_kernels_on_gpu.py``.

Inputs are float16 (WGMMA takes 16-bit operands); the reference is float64 numpy
on the same float16 values, so what is left is the kernel's own rounding: the
probabilities cast to float16 for the product with v and the float16 output, unit
roundoff 4.9e-4 each, hence 4e-3 of the largest output. A key wrongly visible or
hidden at these lengths moves an output by ~1e-2 of the largest (tested below).
The backward rounds more (p and ds cast to float16 for three products, the
gradients cast to float16): 3e-3 of the largest gradient, against 4e-4 to 8e-4
seen; the same one-key shift of the diagonal moves gradients by more than 1e-2.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.kernels import flash_attention_mosaic_gpu as mosaic
from effformer.kernels.flash_attention import BlockSizes, flash_attention
from effformer.ops.attention import dot_product_attention
from effformer.ops.masks import AttentionMask

TOLERANCE = 4e-3  # of the largest reference output (module docstring)
GRADIENT_TOLERANCE = 3e-3  # of the largest reference gradient (module docstring)


def _reference(q, k, v, causal=False, ratio=None, kv_diagonal_shift=0):
    """float64 attention and its base-2 row log-sum-exp, from the definition.

    Query i sits at position ``Lk - Lq + i``, key j at j. ``kv_diagonal_shift``
    moves the causal / soft-causal diagonal (a deliberately wrong reference).
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    q_len, heads = q.shape[1], q.shape[2]
    kv_len, kv_heads, head_dim = k.shape[1], k.shape[2], k.shape[3]
    k = np.repeat(k, heads // kv_heads, axis=2)
    v = np.repeat(v, heads // kv_heads, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    q_pos = (kv_len - q_len) + np.arange(q_len)[:, None]
    after = np.arange(kv_len)[None, :] + kv_diagonal_shift > q_pos
    if causal:
        s = np.where(after, -np.inf, s)
    row_max = s.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.exp(s - row_max)
    total = e.sum(axis=-1, keepdims=True)
    p = e / np.where(total > 0, total, 1.0)
    if ratio is not None:
        p = p * np.where(after, ratio, 1.0)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    total = total[..., 0]
    lse = np.where(total > 0, (row_max[..., 0] + np.log(np.where(total > 0, total, 1.0))), 0.0)
    lse = lse / np.log(2)
    return out, lse


def _inputs(q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.float16, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(2, q_len, heads, head_dim), (2, kv_len, kv_heads, head_dim)]
    q = jnp.asarray(rng.normal(size=shapes[0]), dtype)
    k, v = (jnp.asarray(rng.normal(size=shapes[1]), dtype) for _ in range(2))
    return q, k, v


def _pad(x, block):
    return jnp.pad(x, ((0, 0), (0, -x.shape[1] % block), (0, 0), (0, 0)))


def _config(q, k, causal, ratio, block_q, block_k):
    return mosaic.MosaicConfig(
        causal=causal,
        soft=ratio is not None,
        scale=q.shape[-1] ** -0.5,
        q_len=q.shape[1],
        kv_len=k.shape[1],
        block_q=block_q,
        block_k=block_k,
        interpret=True,
    )


def _kernel(q, k, v, causal=False, ratio=None, block_q=64, block_k=64):
    """The kernel on padded inputs, sliced back: (out, lse) as float64 numpy."""
    cfg = _config(q, k, causal, ratio, block_q, block_k)
    r = None if ratio is None else jnp.asarray([ratio], jnp.float32)
    out, lse = mosaic.forward(cfg, _pad(q, block_q), _pad(k, block_k), _pad(v, block_k), r)
    q_len = q.shape[1]
    return np.asarray(out[:, :q_len], np.float64), np.asarray(lse[:, :, :q_len], np.float64)


# name: (q_len, kv_len, heads, kv_heads, head_dim, causal, ratio, block_q, block_k)
CASES = {
    # GQA; 100 = one full block and one part-filled: padded keys masked, padded rows dropped.
    "unmasked_gqa_padded": (100, 100, 4, 2, 64, False, None, 64, 64),
    # Queries aligned with the last keys: each block's runs start mid-sequence.
    "causal_short_queries": (40, 150, 2, 1, 64, True, None, 64, 64),
    # More queries than keys: the first 30 see no key (output 0, lse 0).
    "causal_rows_without_keys": (100, 70, 2, 1, 64, True, None, 64, 64),
    "soft_causal_r0": (130, 130, 2, 2, 64, False, 0.0, 64, 64),
    "soft_causal_r03": (130, 130, 2, 2, 64, False, 0.3, 64, 64),
    "soft_causal_r1": (130, 130, 2, 2, 64, False, 1.0, 64, 64),
    # Head dim 128 with 128-key blocks; query blocks of 128 (two WGMMA row tiles).
    "soft_causal_head_dim_128": (200, 200, 2, 1, 128, False, 0.3, 128, 128),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_float64_reference(name):
    q_len, kv_len, heads, kv_heads, head_dim, causal, ratio, block_q, block_k = CASES[name]
    q, k, v = _inputs(q_len, kv_len, heads, kv_heads, head_dim)
    out, lse = _kernel(q, k, v, causal, ratio, block_q, block_k)
    expected, expected_lse = _reference(q, k, v, causal, ratio)
    bound = TOLERANCE * np.abs(expected).max()
    np.testing.assert_allclose(out, expected, atol=bound, rtol=0)
    np.testing.assert_allclose(lse, expected_lse, atol=1e-3, rtol=0)  # float32 log-sum-exp
    if causal or ratio not in (None, 1.0):
        # The diagonal one key off (the bug a wrong run boundary or mask makes) is
        # far outside the tolerance, so this comparison can fail.
        shifted, _ = _reference(q, k, v, causal, ratio, kv_diagonal_shift=1)
        assert np.abs(out - shifted).max() > 3 * bound
    if name == "causal_rows_without_keys":
        assert np.all(out[:, :30] == 0.0) and np.all(lse[:, :, :30] == 0.0)


def _reference_gradients(q, k, v, d_out, causal, ratio, shift=0):
    """float64 dq, dk, dv of :func:`_reference` (jax.vjp of the same definition in jnp)."""

    def attend(q, k, v):
        q_len, kv_len = q.shape[1], k.shape[1]
        groups = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        q_pos = (kv_len - q_len) + jnp.arange(q_len)[:, None]
        after = jnp.arange(kv_len)[None, :] + shift > q_pos
        if causal:
            s = jnp.where(after, -jnp.inf, s)
        row_max = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        e = jnp.exp(s - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
        total = e.sum(axis=-1, keepdims=True)
        p = e / jnp.where(total > 0, total, 1.0)
        if ratio is not None:
            p = p * jnp.where(after, ratio, 1.0)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    with jax.enable_x64(True):
        as64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, d_out)]
        _, pullback = jax.vjp(attend, *as64[:3])
        return [np.asarray(g) for g in pullback(as64[3])]


# name: (q_len, kv_len, heads, kv_heads, head_dim, causal, ratio, block_q, block_k)
BACKWARD_CASES = {
    "causal_gqa_padded": (150, 150, 4, 2, 64, True, None, 64, 64),
    # More queries than keys: the first 30 see no key (zero gradients), queries aligned
    # with the last keys (the forward's "causal_short_queries" case covers fewer).
    "causal_rows_without_keys": (100, 70, 2, 1, 64, True, None, 64, 64),
    "soft_causal_r03": (130, 130, 2, 2, 64, False, 0.3, 64, 64),
    # The tuned Triton backward tiles' shape: 128 queries x 64 keys, head dim 128.
    "soft_causal_head_dim_128": (200, 200, 2, 1, 128, False, 0.3, 128, 64),
    "unmasked_gqa_key_blocks_128": (100, 100, 4, 2, 64, False, None, 64, 128),
}


@pytest.mark.parametrize("name", list(BACKWARD_CASES))
def test_backward_matches_float64_reference(name):
    q_len, kv_len, heads, kv_heads, head_dim, causal, ratio, block_q, block_k = BACKWARD_CASES[name]
    q, k, v = _inputs(q_len, kv_len, heads, kv_heads, head_dim, seed=4)
    d_out = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float16)
    # The forward's residuals, padded to the backward's blocks (a multiple of both).
    multiple = max(64, block_q, block_k)
    padded = [_pad(x, multiple) for x in (q, k, v, d_out)]
    r = None if ratio is None else jnp.asarray([ratio], jnp.float32)
    out, lse = mosaic.forward(_config(q, k, causal, ratio, 64, 64), *padded[:3], r)
    grads = mosaic.backward(
        _config(q, k, causal, ratio, block_q, block_k), *padded[:3], r, out, lse, padded[3]
    )
    got = [
        np.asarray(g[:, :length], np.float64)
        for g, length in zip(grads, (q_len, kv_len, kv_len), strict=True)
    ]
    expected = _reference_gradients(q, k, v, d_out, causal, ratio)
    for name, a, b in zip(("dq", "dk", "dv"), got, expected, strict=True):
        bound = GRADIENT_TOLERANCE * np.abs(b).max()
        np.testing.assert_allclose(a, b, atol=bound, rtol=0, err_msg=name)
    if causal or ratio is not None:
        shifted = _reference_gradients(q, k, v, d_out, causal, ratio, shift=1)
        moved = [np.abs(a - b).max() / np.abs(b).max() for a, b in zip(got, shifted, strict=True)]
        assert max(moved) > 1e-2


def test_bfloat16_forward_matches_float64_reference():
    q, k, v = _inputs(100, 100, 2, 1, 64, dtype=jnp.bfloat16, seed=1)
    out, _ = _kernel(q, k, v, ratio=0.5)
    expected, _ = _reference(q, k, v, ratio=0.5)
    # bfloat16's unit roundoff is 8x float16's (3.9e-3).
    np.testing.assert_allclose(out, expected, atol=3e-2 * np.abs(expected).max(), rtol=0)


MOSAIC_BLOCKS = BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64)


@pytest.mark.parametrize(
    "mask, mosaic_flags",
    [
        (AttentionMask(causal=True), ("mosaic_forward",)),
        (AttentionMask(soft_causal_ratio=0.3), ("mosaic_backward",)),
        (AttentionMask(soft_causal_ratio=0.3), ("mosaic_forward", "mosaic_backward")),
    ],
    ids=["causal-mosaic_forward", "soft_causal_r03-mosaic_backward", "soft_causal_r03-both"],
)
def test_op_with_mosaic_kernels_matches_reference_forward_and_gradients(mask, mosaic_flags):
    # Through the op: either pass on Mosaic GPU, the other on Triton (they share the
    # output and log-sum-exp), or both; all interpreted. 90 keys: one full block and
    # one part-filled.
    q, k, v = _inputs(90, 90, 4, 2, 64, seed=2)
    d_out = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float16)
    blocks = dataclasses.replace(MOSAIC_BLOCKS, **{flags: True for flags in mosaic_flags})

    def vjp(implementation, q, k, v, d_out, **options):
        out, pullback = jax.vjp(
            lambda q, k, v: dot_product_attention(
                q, k, v, mask=mask, implementation=implementation, **options
            ),
            q,
            k,
            v,
        )
        return [np.asarray(x, np.float64) for x in (out, *pullback(d_out))]

    got = vjp("pallas", q, k, v, d_out, pallas_block_sizes=blocks)
    with jax.enable_x64(True):
        as64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, d_out)]
        expected = vjp("reference", *as64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-2 * np.abs(b).max(), rtol=0, err_msg=name)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype=jnp.float32), "take float16 or bfloat16 inputs .* got float32"),
        (dict(window_left=8), "got window_left"),
        (
            dict(q_segment_ids=np.ones((2, 64), np.int32), kv_segment_ids=np.ones((2, 64))),
            "got q_segment_ids, kv_segment_ids",
        ),
        (dict(q_positions=np.tile(np.arange(64), (2, 1))), "got q_positions"),
    ],
)
def test_mosaic_kernels_reject_what_they_do_not_compute(kwargs, message):
    dtype = kwargs.pop("dtype", jnp.float16)
    q, k, v = _inputs(64, 64, 2, 2, 64, dtype=dtype)
    blocks = dataclasses.replace(MOSAIC_BLOCKS, mosaic_forward=True)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, block_sizes=blocks, interpret=True, **kwargs)


def test_mosaic_kernels_need_blocks_of_64_and_no_fused_backward():
    with pytest.raises(ValueError, match=r"block_q and block_k of at least 64 .* got 32 and 64"):
        BlockSizes(block_q=32, block_k=64, mosaic_forward=True)
    with pytest.raises(ValueError, match=r"block_q_bwd and block_k_bwd .* got 128 and 32"):
        BlockSizes(block_k_bwd=32, mosaic_backward=True)
    with pytest.raises(ValueError, match=r"cannot be combined with mosaic_backward"):
        BlockSizes(block_k_bwd=64, fused_backward=True, mosaic_backward=True)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mosaic_backward", [False, True])
def test_mosaic_kernels_lower_for_cuda(head_dim, mosaic_backward):
    # No GPU here: lowering for CUDA from the CPU host runs Mosaic GPU's lowering of the
    # WGMMA / TMA kernels, with its layout, tiling and shared-memory checks, and the
    # Triton lowering of the backward kernels where they are used. Default backward
    # tiles (128 x 64); grouped heads, so the dk / dv partials are float32.
    q = jax.ShapeDtypeStruct((2, 1000, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1000, 2, head_dim), jnp.bfloat16)
    blocks = BlockSizes(
        block_q=64, block_k=128, mosaic_forward=True, mosaic_backward=mosaic_backward
    )

    def loss(q, k, v):
        out = flash_attention(q, k, v, soft_causal_ratio=0.5, block_sizes=blocks)
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv)
    text = text.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu_v2") == (3 if mosaic_backward else 1)
    assert text.count("custom_call @__gpu$xla.gpu.triton") == (0 if mosaic_backward else 2)
