"""The Pallas flash-attention kernel (interpret mode) against the op's float64 reference.

Shapes are shared so that each mask compiles once: batch 2, 4 query heads on
2 kv heads (grouped-query attention), head dim 8 (padded to 16 inside), blocks
of 16 and lengths 40 and 24, which no block divides (padded to 48 and 32).

Tolerance: in float64 the kernel and the reference compute the same sums in a
different order (blockwise online softmax, exp2 of rescaled logits), so they
agree to ~1e-15 per operation on O(1) values; 1e-10 leaves room for the few
dozen accumulated terms and would still catch any wrong mask entry, weight or
missing term (each changes results by ~1e-2 at these sizes). The float32 op
test compares with the float64 reference at 2e-5, the op tests' bound.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effformer.kernels.flash_attention as fa
from effformer.kernels.flash_attention import BlockSizes, default_block_sizes, flash_attention
from effformer.ops import attention, masks
from effformer.ops.attention import dot_product_attention
from effformer.ops.masks import AttentionMask

BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
LENGTH, SHORT = 40, 24
TOLERANCE = 1e-10
# The interpreted kernels are XLA programs that take seconds to optimise and microseconds
# to run at these sizes: skipping LLVM's optimisations halves the tests' compile time.
_jit_unoptimised = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0}
)

# Row 0 packs two sequences then 5 padding tokens (fully masked rows); row 1 is one sequence.
SEGMENTS = np.array([[1] * 13 + [2] * 22 + [0] * 5, [3] * LENGTH], np.int32)
# Packed sequences restart their positions.
POSITIONS = np.array([list(range(13)) + list(range(22)) + [0] * 5, list(range(LENGTH))], np.int32)


def _inputs(q_len, kv_len, dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(2, q_len, 4, 8), (2, kv_len, 2, 8), (2, kv_len, 2, 8), (2, q_len, 4, 8)]
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)


@_jit_unoptimised
def _reference_vjp(q, k, v, d_out, visible):
    """The op's reference with the mask given as data (an additive -inf for hidden keys).

    One compilation per shape serves every mask; the op's reference turns an
    all -inf row into zeros exactly as it does for a masked row.
    """
    bias = jnp.where(visible, 0.0, -jnp.inf)
    attend = lambda q, k, v: dot_product_attention(  # noqa: E731
        q, k, v, bias=bias, implementation="reference"
    )
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(d_out)


@_jit_unoptimised
def _soft_reference_vjp(q, k, v, ratio, d_out):
    attend = lambda q, k, v, r: dot_product_attention(  # noqa: E731
        q, k, v, mask=AttentionMask(soft_causal_ratio=r), implementation="reference"
    )
    out, vjp = jax.vjp(attend, q, k, v, ratio)
    return out, vjp(d_out)


def _visible(mask: AttentionMask, q_len: int, kv_len: int):
    return masks.dense_mask(mask, 2, q_len, kv_len)


def _assert_close(actual, expected):
    out, grads = actual
    out_ref, grads_ref = expected
    np.testing.assert_allclose(out, out_ref, atol=TOLERANCE, rtol=0)
    for name, grad, grad_ref in zip(("dq", "dk", "dv"), grads, grads_ref, strict=False):
        np.testing.assert_allclose(grad, grad_ref, atol=TOLERANCE, rtol=0, err_msg=name)


# name: (q_len, kv_len, kernel keyword arguments, the same mask for the reference).
CASES = {
    # Backward blocks of 32: 40 is padded to 64, so the forward's last block of 16 is all padding.
    "no_mask_larger_backward_blocks": (
        LENGTH,
        LENGTH,
        dict(block_sizes=BlockSizes(block_q=16, block_k=16, block_q_bwd=32, block_k_bwd=32)),
        AttentionMask(),
    ),
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
    ),
    "window_short_queries": (
        SHORT,
        LENGTH,
        dict(window_left=5, window_right=3),
        AttentionMask(window_left=5, window_right=3),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_reference(name, x64):
    q_len, kv_len, kwargs, mask = CASES[name]
    q, k, v, d_out = _inputs(q_len, kv_len)

    @_jit_unoptimised
    def kernel(q, k, v, d_out):
        attend = lambda q, k, v: flash_attention(  # noqa: E731
            q, k, v, interpret=True, **({"block_sizes": BLOCKS} | kwargs)
        )
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(d_out)

    out, grads = kernel(q, k, v, d_out)
    _assert_close((out, grads), _reference_vjp(q, k, v, d_out, _visible(mask, q_len, kv_len)))
    if "q_segment_ids" in kwargs:  # padding queries see nothing: exactly 0, zero gradient
        padding = SEGMENTS == 0
        assert np.all(np.asarray(out)[padding] == 0.0)
        assert np.all(np.asarray(grads[0])[padding] == 0.0)
        assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", [*CASES, "soft_causal_r03"])
def test_fused_backward_matches_reference(name, x64):
    # dq added by the dk/dv kernel's programs with atomic adds (BlockSizes.fused_backward):
    # every key block of a query row must add its share once, for every mask.
    if name == "soft_causal_r03":
        q_len, kv_len = LENGTH, LENGTH
        kwargs, mask = dict(soft_causal_ratio=0.3), AttentionMask(soft_causal_ratio=0.3)
    else:
        q_len, kv_len, kwargs, mask = CASES[name]
    blocks = dataclasses.replace(kwargs.get("block_sizes", BLOCKS), fused_backward=True)
    kwargs = kwargs | {"block_sizes": blocks}
    q, k, v, d_out = _inputs(q_len, kv_len)

    @_jit_unoptimised
    def kernel(q, k, v, d_out):
        attend = lambda q, k, v: flash_attention(q, k, v, interpret=True, **kwargs)  # noqa: E731
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(d_out)

    jaxpr = str(kernel.trace(q, k, v, d_out).jaxpr)
    assert "flash_attention_dq" not in jaxpr and "atomic_rmw" in jaxpr
    if name == "soft_causal_r03":
        expected = _soft_reference_vjp(q, k, v, jnp.asarray(0.3), d_out)
        expected = (expected[0], expected[1][:3])
    else:
        expected = _reference_vjp(q, k, v, d_out, _visible(mask, q_len, kv_len))
    _assert_close(kernel(q, k, v, d_out), expected)


def test_soft_causal_traced_ratio_matches_reference_and_ratio_gets_no_gradient(x64):
    q, k, v, d_out = _inputs(LENGTH, LENGTH)

    @_jit_unoptimised  # one compilation for every ratio: r is traced, as the trainer's schedule gives it
    def kernel(q, k, v, ratio, d_out):
        attend = lambda q, k, v, r: flash_attention(  # noqa: E731
            q, k, v, soft_causal_ratio=r, block_sizes=BLOCKS, interpret=True
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
    unmasked = _reference_vjp(q, k, v, d_out, _visible(AttentionMask(), LENGTH, LENGTH))[0]
    np.testing.assert_allclose(out, unmasked, atol=TOLERANCE, rtol=0)


def test_op_dispatches_to_the_kernel_in_interpret_mode_on_cpu(caplog):
    q, k, v, d_out = _inputs(LENGTH, LENGTH, jnp.float32)
    attention._logged_fallbacks.clear()
    attend = _jit_unoptimised(
        lambda q, k, v: dot_product_attention(
            q,
            k,
            v,
            mask=AttentionMask(soft_causal_ratio=0.3),
            implementation="pallas",
            pallas_block_sizes=BLOCKS,
        )
    )
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        out = attend(q, k, v)
        attend(q * 2, k, v)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "interpret mode on CPU" in messages[0]
    assert out.dtype == jnp.float32
    with jax.enable_x64(True):
        as64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, jnp.asarray(0.3), d_out)]
        expected = _soft_reference_vjp(*as64)[0]
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=0)


def _bad_kernel_call(**overrides):
    q, k, v, _ = _inputs(SHORT, SHORT, jnp.float32)
    kwargs = dict(block_sizes=BLOCKS, interpret=True) | overrides
    q, k, v = kwargs.pop("q", q), kwargs.pop("k", k), kwargs.pop("v", v)
    return lambda: flash_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            _bad_kernel_call(q=jnp.zeros((2, SHORT, 8))),
            r"q must have rank 4 .* got shape \(2, 24, 8\)",
        ),
        (_bad_kernel_call(k=jnp.zeros((2, SHORT, 3, 8))), r"k and v must both have shape"),
        (
            _bad_kernel_call(k=jnp.zeros((2, SHORT, 3, 8)), v=jnp.zeros((2, SHORT, 3, 8))),
            r"q heads \(4\) must be a multiple of k/v heads, got 3",
        ),
        (
            _bad_kernel_call(causal=True, soft_causal_ratio=0.5),
            r"causal=True and soft_causal_ratio",
        ),
        (
            _bad_kernel_call(soft_causal_ratio=jnp.zeros(2)),
            r"soft_causal_ratio must be a scalar, got shape \(2,\)",
        ),
        (
            _bad_kernel_call(
                q_segment_ids=np.ones((2, 5), np.int32), kv_segment_ids=np.ones((2, 24))
            ),
            r"q_segment_ids must have shape \(2, 24\) \(or batch 1\), got \(2, 5\)",
        ),
        (_bad_kernel_call(kv_segment_ids=np.ones((2, 24))), r"give both q_segment_ids and"),
        (
            _bad_kernel_call(window_left=-1),
            r"window_left must be a non-negative int or None, got -1",
        ),
        (_bad_kernel_call(block_sizes=(16, 16)), r"block_sizes must be a BlockSizes or None"),
        (lambda: BlockSizes(block_q=24), r"BlockSizes.block_q must be a power of two >= 16.*24"),
        (lambda: BlockSizes(block_k_bwd=8), r"BlockSizes.block_k_bwd must be a power of two >= 16"),
        (
            lambda: jax.jit(lambda s: _bad_kernel_call(scale=s)())(1.0),
            r"scale must be a Python number",
        ),
    ],
)
def test_bad_kernel_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bias=jnp.zeros((1, 1, SHORT, SHORT))), r"'pallas' takes no bias, got bias of shape"),
        (
            dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)),
            r"'pallas' has no dropout, got dropout_rate=0.1",
        ),
    ],
)
def test_op_rejects_what_the_kernel_does_not_compute(kwargs, message):
    q, k, v, _ = _inputs(SHORT, SHORT, jnp.float32)
    with pytest.raises(ValueError, match=message):
        dot_product_attention(q, k, v, implementation="pallas", **kwargs)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "tuned"),
    [(jnp.bfloat16, 64, True), (jnp.float16, 128, True), (jnp.float32, 64, False),
     (jnp.bfloat16, 256, False)],
)  # fmt: skip
def test_default_block_sizes_keep_the_tuned_tiles_to_what_was_timed(dtype, head_dim, tuned):
    small = BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64)
    assert default_block_sizes(dtype, head_dim) == (BlockSizes() if tuned else small)
    assert BlockSizes() != small  # the two choices differ, so the assertion can fail


def test_kernels_lower_to_triton_with_the_launch_parameters():
    # No GPU here: lowering for CUDA from the CPU host runs Pallas's Triton lowering
    # of the forward, dk/dv and dq kernels (the pinned jax's, which the GPU run did not use).
    q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
    blocks = BlockSizes(num_warps=2, num_stages=3)

    def loss(q, k, v):
        out = flash_attention(q, k, v, soft_causal_ratio=0.5, block_sizes=blocks, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
    assert text.count("num_warps = 2 : i32") == 3 and text.count("num_stages = 3 : i32") == 3
    assert "atomic" not in text


def test_fused_backward_lowers_to_triton_with_atomic_adds_into_an_aliased_dq():
    q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
    blocks = BlockSizes(fused_backward=True)

    def loss(q, k, v):
        out = flash_attention(q, k, v, soft_causal_ratio=0.5, block_sizes=blocks, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    # The forward and the dk/dv kernel only; the latter's dq output aliases its zeros input.
    assert text.count("__gpu$xla.gpu.triton") == 2
    assert "atomic" in text and "output_operand_alias" in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(num_warps=3), "num_warps must be None or a power of two >= 1, got 3"),
        (dict(num_stages=0), "num_stages must be a positive int, got 0"),
        (dict(fused_backward=1), "fused_backward must be True or False, got 1"),
    ],
)
def test_block_sizes_reject_bad_launch_parameters(change, message):
    with pytest.raises(ValueError, match=message):
        BlockSizes(**change)


# ----------------------------------------------------------------------------- block schedules


# Blocks of 16 positions in the order 3, 0, 2, 1: the query block holding 32..47 sees key
# blocks 1 and 3 (positions 0..31) whole under a causal mask, and block 2 in between only
# in part, so its all-visible blocks are not one contiguous run.
BLOCKS_OUT_OF_ORDER = np.concatenate([np.arange(16 * b, 16 * b + 16) for b in (3, 0, 2, 1)]).astype(
    np.int32
)


def _schedules(q_len, kv_len, positions=None, segments=None, **mask):
    """block_schedules for blocks of 16 on batch-2 rows, with the kernel's own row padding."""
    cfg = fa._Config(
        causal=mask.get("causal", False), window_left=mask.get("window_left"),
        window_right=mask.get("window_right"), soft=mask.get("soft", False), scale=1.0,
        q_len=q_len, kv_len=kv_len, block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16,
        interpret=True,
    )  # fmt: skip
    q_padded, kv_padded = fa._padded_q_len(cfg), fa._padded_kv_len(cfg)
    rows = fa.padded_rows(
        2, q_len, kv_len, q_padded, kv_padded,
        with_positions=cfg.masks_by_position or cfg.soft,
        q_positions=positions, kv_positions=positions, q_segment_ids=segments,
        kv_segment_ids=segments,
    )  # fmt: skip
    by_query, by_key = fa.block_schedules(cfg, 2, *rows, 16, 16, q_padded, kv_padded)
    return cfg, rows, np.asarray(by_query), np.asarray(by_key)


def _dense_pairs(cfg, rows):
    """Per batch row: visible [Lq_pad, Lk_pad] (real queries only) and keys-after-query."""
    q_pos, kv_pos, q_seg, kv_seg = (None if x is None else np.asarray(x) for x in rows)
    q_padded, kv_padded = fa._padded_q_len(cfg), fa._padded_kv_len(cfg)
    visible = np.ones((2, q_padded, kv_padded), bool)
    visible[:, cfg.q_len :, :] = False  # padded queries: their results are dropped
    visible[:, :, cfg.kv_len :] = False
    after = np.zeros_like(visible)
    if q_pos is not None:
        q_col, kv_row = q_pos[:, :, None], kv_pos[:, None, :]
        after = kv_row > q_col
        if cfg.causal:
            visible &= ~after
        if cfg.window_left is not None:
            visible &= q_col - kv_row <= cfg.window_left
        if cfg.window_right is not None:
            visible &= kv_row - q_col <= cfg.window_right
    if q_seg is not None:
        visible &= (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    return visible, after


def _check_schedules(cfg, rows, by_query, by_key):
    """Every visible pair is walked; the unmasked runs hold only visible, same-weight pairs.

    Over key blocks (forward, dq) the first run must be keys at or before every
    query (weight 1) and the second keys after every query (weight r); over
    query blocks (dk, dv) the reverse. Only real queries count: padded ones are
    dropped from the output and get a zero cotangent.
    """
    visible, after = _dense_pairs(cfg, rows)
    real = np.arange(visible.shape[1]) < cfg.q_len
    blocks = lambda index: slice(16 * index, 16 * index + 16)  # noqa: E731
    for schedules, by_key_rows in ((by_query, False), (by_key, True)):
        run_after = (True, False) if by_key_rows else (False, True)
        num_other = (visible.shape[1] if by_key_rows else visible.shape[2]) // 16
        for b in range(2):
            for row, (start, a, b_end, c, d, end) in enumerate(schedules[b]):
                assert start <= a <= b_end <= c <= d <= end
                for other in range(num_other):
                    q_block, k_block = (other, row) if by_key_rows else (row, other)
                    qs, ks = blocks(q_block), blocks(k_block)
                    seen = visible[b, qs, ks][real[qs]]
                    if not start <= other < end:
                        assert not seen.any(), (b, row, other)
                    for (low, high), keys_after in zip(
                        ((a, b_end), (c, d)), run_after, strict=True
                    ):
                        if low <= other < high:
                            assert seen.all(), (b, row, other)
                            if cfg.soft:
                                is_after = after[b, qs, ks][real[qs]]
                                assert (is_after == keys_after).all(), (b, row, other)


def test_block_schedules_leave_the_element_mask_to_the_diagonal_blocks():
    # Positions in order, 4 blocks of 16: a causal query block i walks key blocks
    # [0, i) unmasked and only the diagonal masked; soft-causal adds the keys after
    # it as a weight-r run. Key block j (dk, dv) walks queries the other way round.
    cfg, rows, by_query, by_key = _schedules(64, 64, causal=True)
    _check_schedules(cfg, rows, by_query, by_key)
    for i in range(4):
        assert tuple(by_query[0, i]) == (0, 0, i, i + 1, i + 1, i + 1)
        assert tuple(by_key[1, i]) == (i, i, i, i + 1, 4, 4)
    cfg, rows, by_query, by_key = _schedules(64, 64, soft=True)
    _check_schedules(cfg, rows, by_query, by_key)
    for i in range(4):
        assert tuple(by_query[1, i]) == (0, 0, i, i + 1, 4, 4)
        assert tuple(by_key[0, i]) == (0, 0, i, i + 1, 4, 4)


@pytest.mark.parametrize(
    "mask",
    [
        dict(causal=True),
        dict(soft=True),
        dict(window_left=40, window_right=20),
        dict(causal=True, segments=SEGMENTS, positions=POSITIONS),
        dict(soft=True, segments=SEGMENTS, positions=POSITIONS),
        dict(causal=True, shuffled=True),
        dict(soft=True, shuffled=True),
        dict(causal=True, positions=np.stack([BLOCKS_OUT_OF_ORDER[:LENGTH]] * 2)),
    ],
    ids=["causal", "soft", "window", "packed", "soft_packed", "shuffled", "soft_shuffled",
         "blocks_out_of_order"],
)  # fmt: skip
def test_block_schedules_never_skip_a_visible_pair_nor_leave_one_unmasked(mask):
    mask = dict(mask)
    q_len = LENGTH
    shuffled = mask.pop("shuffled", False)
    if shuffled:  # positions out of order: runs are not contiguous
        rng = np.random.default_rng(0)
        mask["positions"] = np.stack([rng.permutation(LENGTH) for _ in range(2)]).astype(np.int32)
    cfg, rows, by_query, by_key = _schedules(q_len, LENGTH, **mask)
    _check_schedules(cfg, rows, by_query, by_key)
    # Something is walked unmasked, except where positions are shuffled.
    runs = lambda s: (s[..., 2] - s[..., 1] + s[..., 4] - s[..., 3]).sum()  # noqa: E731
    if "positions" not in mask or mask["positions"] is not POSITIONS and not shuffled:
        assert runs(by_query) + runs(by_key) > 0


@pytest.mark.parametrize(
    "mask_kwargs",
    [dict(causal=True), dict(soft_causal_ratio=0.3), dict(window_left=40, window_right=20)],
    ids=["causal", "soft", "window"],
)
@pytest.mark.parametrize("order", ["ordered", "shuffled", "blocks_out_of_order"])
def test_kernel_matches_reference_with_ordered_and_shuffled_positions(x64, mask_kwargs, order):
    # 64 = 4 whole blocks: with ordered positions every loop kind of _walk_schedule runs
    # (the schedule test above); shuffled positions break the runs, so their blocks go to
    # the masked loops; blocks out of order make all-visible blocks that are not contiguous.
    length = 64
    positions = np.arange(length, dtype=np.int32)[None].repeat(2, 0)
    if order == "shuffled":
        rng = np.random.default_rng(1)
        positions = np.stack([rng.permutation(length) for _ in range(2)]).astype(np.int32)
    elif order == "blocks_out_of_order":
        positions = np.stack([BLOCKS_OUT_OF_ORDER] * 2)
    q, k, v, d_out = _inputs(length, length, seed=2)
    mask = AttentionMask(q_positions=positions, kv_positions=positions, **mask_kwargs)

    def run(implementation, **kwargs):
        attend = lambda q, k, v: dot_product_attention(  # noqa: E731
            q, k, v, mask=mask, implementation=implementation, **kwargs
        )
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(d_out)

    actual = _jit_unoptimised(lambda: run("pallas", pallas_block_sizes=BLOCKS))()
    _assert_close(actual, _jit_unoptimised(lambda: run("reference"))())
