"""The Mosaic GPU flash-attention forward in Mosaic GPU's interpreter on CPU.

The interpreter simulates shared memory, the TMA copies and the barriers of the
kernel's two-slot pipeline; it has no rules for WGMMA with an operand in registers
or for transposed shared-memory views, so there the interpreted kernel multiplies
the tiles' values with plain dots (``_logits`` / ``_values``). The WGMMA forms are
checked by the lowering test below and, compiled, by ``test_kernels_on_gpu.py``.

Inputs are float16 (WGMMA takes 16-bit operands); the reference is float64 numpy
on the same float16 values, so what is left is the kernel's own rounding: the
probabilities cast to float16 for the product with v and the float16 output, unit
roundoff 4.9e-4 each, hence 4e-3 of the largest output. A key wrongly visible or
hidden at these lengths moves an output by ~1e-2 of the largest (tested below).
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


def _kernel(q, k, v, causal=False, ratio=None, block_q=64, block_k=64):
    """The kernel on padded inputs, sliced back: (out, lse) as float64 numpy."""
    cfg = mosaic.MosaicForwardConfig(
        causal=causal,
        soft=ratio is not None,
        scale=q.shape[-1] ** -0.5,
        q_len=q.shape[1],
        kv_len=k.shape[1],
        block_q=block_q,
        block_k=block_k,
        interpret=True,
    )
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


def test_bfloat16_forward_matches_float64_reference():
    q, k, v = _inputs(100, 100, 2, 1, 64, dtype=jnp.bfloat16, seed=1)
    out, _ = _kernel(q, k, v, ratio=0.5)
    expected, _ = _reference(q, k, v, ratio=0.5)
    # bfloat16's unit roundoff is 8x float16's (3.9e-3).
    np.testing.assert_allclose(out, expected, atol=3e-2 * np.abs(expected).max(), rtol=0)


MOSAIC_BLOCKS = BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64)


@pytest.mark.parametrize(
    "mask",
    [AttentionMask(causal=True), AttentionMask(soft_causal_ratio=0.3)],
    ids=["causal", "soft_causal_r03"],
)
def test_op_with_mosaic_forward_matches_reference_forward_and_gradients(mask):
    # Through the op: the Mosaic forward, then the Triton backward kernels from its
    # log-sum-exp (both interpreted). 90 keys: one full and one part-filled block.
    q, k, v = _inputs(90, 90, 4, 2, 64, seed=2)
    d_out = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float16)
    blocks = dataclasses.replace(MOSAIC_BLOCKS, mosaic_forward=True)

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
        (dict(dtype=jnp.float32), "takes float16 or bfloat16 inputs .* got float32"),
        (dict(window_left=8), "got window_left"),
        (
            dict(q_segment_ids=np.ones((2, 64), np.int32), kv_segment_ids=np.ones((2, 64))),
            "got q_segment_ids, kv_segment_ids",
        ),
        (dict(q_positions=np.tile(np.arange(64), (2, 1))), "got q_positions"),
    ],
)
def test_mosaic_forward_rejects_what_it_does_not_compute(kwargs, message):
    dtype = kwargs.pop("dtype", jnp.float16)
    q, k, v = _inputs(64, 64, 2, 2, 64, dtype=dtype)
    blocks = dataclasses.replace(MOSAIC_BLOCKS, mosaic_forward=True)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, block_sizes=blocks, interpret=True, **kwargs)


def test_mosaic_forward_needs_blocks_of_64():
    with pytest.raises(ValueError, match=r"block_q and block_k of at least 64 .* got 32 and 64"):
        BlockSizes(block_q=32, block_k=64, mosaic_forward=True)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_mosaic_forward_lowers_for_cuda_beside_the_triton_backward(head_dim):
    # No GPU here: lowering for CUDA from the CPU host runs Mosaic GPU's lowering of the
    # WGMMA / TMA forward, with its layout and tiling checks, and the Triton lowering of
    # the two backward kernels.
    q = jax.ShapeDtypeStruct((2, 1000, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1000, 2, head_dim), jnp.bfloat16)
    blocks = BlockSizes(block_q=64, block_k=128, mosaic_forward=True)

    def loss(q, k, v):
        out = flash_attention(q, k, v, soft_causal_ratio=0.5, block_sizes=blocks)
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv)
    text = text.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu_v2") == 1
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 2
