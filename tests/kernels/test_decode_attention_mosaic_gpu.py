"""The Mosaic GPU split-K decode kernel in Mosaic GPU's interpreter on CPU, and its lowering.

The interpreter simulates shared memory, the TMA copies (the schedule rows, the query
tile, the two key and two value slots) and the barriers; the two products run as plain
dots there (``effformer.kernels.mosaic_gpu_tiles``), their WGMMA forms are checked by
the lowering test. Inputs are float16 (WGMMA operands) and the reference is float64
numpy on the same values, so what is left is the kernel's rounding: the probabilities
cast to float16 for the product with v and the float16 output (unit roundoff 4.9e-4
each), hence 3e-3 of the largest output. A cache length read one key off moves the
outputs of these short caches by more (the mutation check below asserts it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.kernels import decode_attention_mosaic_gpu as mosaic

TOLERANCE = 3e-3


def _reference(q, k, v, lengths):
    """float64 softmax attention of each query over its sequence's first lengths[b] keys."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, heads, head_dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        n = lengths[b]
        for h in range(heads):
            if n == 0:
                continue
            s = k[b, :n, h // group] @ q[b, h] / np.sqrt(head_dim)
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ v[b, :n, h // group]
    return out


def _inputs(batch, heads, kv_heads, head_dim, max_len, dtype=jnp.float16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, heads, head_dim)), dtype)
    k, v = (
        jnp.asarray(rng.normal(size=(batch, max_len, kv_heads, head_dim)), dtype) for _ in range(2)
    )
    return q, k, v


# name: (batch, heads, kv_heads, head_dim, max_len, lengths, num_programs, block_k)
CASES = {
    # Empty, one-key and full caches; 500 keys end in a part-filled window of 128.
    "lengths_0_1_full": (3, 8, 2, 64, 500, (0, 1, 500), 5, 128),
    # One sequence's tiles spread over many programs; ranges crossing heads.
    "ranges_cross_heads": (2, 4, 1, 64, 700, (333, 64), 7, 64),
    # Few programs: 11 tiles each, so the two slots are refilled many times (the
    # prefetch of tile t + 2), across a head boundary.
    "long_ranges_refill_the_slots": (1, 4, 2, 64, 700, (700,), 2, 64),
    # A cache shorter than a tile (lengthened inside) and head dim 128.
    "cache_shorter_than_a_tile": (1, 2, 2, 128, 40, (40,), 2, 64),
    # Three query heads per kv head (padded to 64 rows); head dim 48 padded to 64;
    # max_len 100 rounded up to 104 for the copies' tiling.
    "gqa_3_head_dim_48_odd_length": (2, 6, 2, 48, 100, (100, 37), 4, 64),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_float64_reference(name):
    batch, heads, kv_heads, head_dim, max_len, lengths, programs, block_k = CASES[name]
    q, k, v = _inputs(batch, heads, kv_heads, head_dim, max_len)
    out = mosaic.split_k_decode_attention(
        q, k, v, jnp.asarray(lengths), scale=head_dim**-0.5, num_programs=programs,
        block_k=block_k, interpret=True,
    )  # fmt: skip
    out = np.asarray(out, np.float64)
    expected = _reference(q, k, v, lengths)
    bound = TOLERANCE * np.abs(expected).max()
    np.testing.assert_allclose(out, expected, atol=bound, rtol=0)
    for b, length in enumerate(lengths):
        if length == 0:
            assert np.all(out[b] == 0.0)
    # A mask bound one key off (one key fewer, or one more for a single-key cache) is far
    # outside the tolerance.
    off_by_one = [length - 1 if length > 1 else length + 1 for length in lengths]
    assert np.abs(out - _reference(q, k, v, off_by_one)).max() > 3 * bound


def test_bad_inputs_are_named():
    q, k, v = _inputs(1, 2, 1, 64, 128, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"caches must be float16 or bfloat16.*got float32"):
        mosaic.split_k_decode_attention(q, k, v, jnp.array([5]), scale=0.1, num_programs=2)
    q, k, v = _inputs(1, 2, 1, 64, 128)
    with pytest.raises(ValueError, match=r"block_k must be a multiple of 64.*block_k=32"):
        mosaic.split_k_decode_attention(
            q, k, v, jnp.array([5]), scale=0.1, num_programs=2, block_k=32
        )


@pytest.mark.parametrize("head_dim, max_len", [(128, 8192), (64, 100)])
def test_kernel_lowers_for_cuda(head_dim, max_len):
    # No GPU here: lowering for CUDA from the CPU host runs Mosaic GPU's lowering of the
    # TMA copies, scalar schedule reads and WGMMA products, with its layout, tiling and
    # shared-memory checks (a max_len of 100 needs the rounding up to 104).
    q = jax.ShapeDtypeStruct((4, 32, head_dim), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((4, max_len, 8, head_dim), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((4,), jnp.int32)

    def decode(q, k, v, lengths):
        return mosaic.split_k_decode_attention(
            q, k, v, lengths, scale=0.1, num_programs=264, block_k=128 if max_len > 128 else 64
        )

    text = jax.jit(decode).trace(q, cache, cache, lengths).lower(lowering_platforms=("cuda",))
    assert text.as_text().count("custom_call @mosaic_gpu_v2") == 1
