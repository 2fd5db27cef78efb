"""The three Pallas kernels compiled for a GPU (Triton) against the ops' float64 references.

Skipped unless JAX's default backend is a GPU; the suite's CPU run checks the same
kernels in interpret mode (the other files here). On a GPU machine:

    JAX_PLATFORMS=cuda python -m pytest tests/kernels/test_kernels_on_gpu.py -q

Inputs are float32 and the references run on float64 copies of them. Errors are
max |kernel - reference| / max |reference| per output and gradient.

Tolerances. The scan is elementwise float32 arithmetic (no matrix units): L steps
of a recurrence lose ~L float32 roundings, 300 * 6e-8 = 2e-5, so 2e-4. Attention's
blocks go through ``jnp.dot``, which Triton computes on the tensor cores in tf32
for float32 operands (10-bit mantissa, unit roundoff 4.9e-4) with float32
accumulation: errors of a few 1e-4 relative to the largest value, so 5e-3. A
wrong mask entry, weight or missing key changes results by more: one key of ~70
visible moves an output by ~1/70 of a value row, ~1e-2 of the largest output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from device_checks import relative_errors, scan_inputs, scan_outputs_and_gradients

from effformer.kernels.flash_attention import default_block_sizes
from effformer.kernels.selective_scan import selective_scan_pallas
from effformer.ops.attention import dot_product_attention
from effformer.ops.decode_attention import decode_attention
from effformer.ops.masks import AttentionMask
from effformer.ops.selective_scan import selective_scan

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU"
)

ATTENTION_TOLERANCE = 5e-3
SCAN_TOLERANCE = 2e-4


def _vjp(fn, primals, cotangent):
    out, pullback = jax.vjp(fn, *primals)
    return out, pullback(cotangent)


def _upcast(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def _attention_errors(mask, q, k, v, d_out, blocks=None) -> list[float]:
    """Relative errors of the compiled kernel's output and dq, dk, dv against float64.

    ``blocks``: the kernel's ``BlockSizes`` (default: the op's choice).
    """

    def attend(implementation, **options):
        return jax.jit(
            lambda q, k, v, d_out: _vjp(
                lambda q, k, v: dot_product_attention(
                    q, k, v, mask=mask, implementation=implementation, **options
                ),
                (q, k, v),
                d_out,
            )
        )

    got = attend("pallas", pallas_block_sizes=blocks)(q, k, v, d_out)
    with jax.enable_x64(True):
        expected = attend("reference")(*_upcast((q, k, v, d_out)))
        return relative_errors(got, expected)


LENGTH = 72  # no power-of-two block divides it
SEGMENTS = np.array([[1] * 25 + [2] * 40 + [0] * 7, [1] * LENGTH], np.int32)
ATTENTION_CASES = {
    "causal": (LENGTH, AttentionMask(causal=True)),
    "causal_short_queries": (27, AttentionMask(causal=True)),
    "window_16_left": (LENGTH, AttentionMask(window_left=16, window_right=0)),
    "causal_packed_segments_padding": (
        LENGTH,
        AttentionMask(
            causal=True, q_segment_ids=jnp.asarray(SEGMENTS), kv_segment_ids=jnp.asarray(SEGMENTS)
        ),
    ),
    "soft_causal_r0": (LENGTH, AttentionMask(soft_causal_ratio=0.0)),
    "soft_causal_r03": (LENGTH, AttentionMask(soft_causal_ratio=0.3)),
    "soft_causal_r1": (LENGTH, AttentionMask(soft_causal_ratio=1.0)),
}


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_attention_compiled_matches_reference(name, head_dim):
    q_len, mask = ATTENTION_CASES[name]
    rng = np.random.default_rng(0)
    # Batch 2, 4 query heads on 2 kv heads (grouped-query attention).
    shapes = [(2, q_len, 4, head_dim), (2, LENGTH, 2, head_dim), (2, LENGTH, 2, head_dim)]
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes)
    d_out = jnp.asarray(rng.normal(size=shapes[0]), jnp.float32)

    errors = _attention_errors(mask, q, k, v, d_out)
    assert max(errors) < ATTENTION_TOLERANCE, dict(
        zip(("out", "dq", "dk", "dv"), errors, strict=True)
    )


@pytest.mark.parametrize("name", ["causal", "causal_packed_segments_padding", "soft_causal_r03"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_attention_fused_backward_compiled_matches_reference(name, head_dim):
    # dq from the dk/dv kernel's atomic adds (BlockSizes.fused_backward): programs of
    # different key blocks add to the same dq rows concurrently on a GPU, which
    # interpret mode (programs one after another) cannot exercise.
    q_len, mask = ATTENTION_CASES[name]
    rng = np.random.default_rng(4)
    shapes = [(2, q_len, 4, head_dim), (2, LENGTH, 2, head_dim), (2, LENGTH, 2, head_dim)]
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes)
    d_out = jnp.asarray(rng.normal(size=shapes[0]), jnp.float32)
    blocks = dataclasses.replace(default_block_sizes(jnp.float32, head_dim), fused_backward=True)

    errors = _attention_errors(mask, q, k, v, d_out, blocks)
    assert max(errors) < ATTENTION_TOLERANCE, dict(
        zip(("out", "dq", "dk", "dv"), errors, strict=True)
    )


@pytest.mark.parametrize("mask", [AttentionMask(causal=True), AttentionMask(soft_causal_ratio=0.3)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_attention_bfloat16_tuned_tiles_match_reference(mask, head_dim):
    # bfloat16 runs the tuned 128 x 128 / 128 x 64 tiles; L 300 leaves a part-filled
    # last tile. The reference gets the same bfloat16 values in float64, so what is
    # left is the kernel's own rounding: probabilities cast to bfloat16 for the
    # matmul with v and the bfloat16 output (unit roundoff 3.9e-3 each), hence 2e-2.
    # A tile skipped or read at the wrong offset moves outputs by tens of percent.
    rng = np.random.default_rng(3)
    shapes = [(2, 300, 4, head_dim), (2, 300, 2, head_dim), (2, 300, 2, head_dim)]
    q, k, v, d_out = (
        jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for shape in [*shapes, shapes[0]]
    )

    errors = _attention_errors(mask, q, k, v, d_out)
    assert max(errors) < 2e-2, dict(zip(("out", "dq", "dk", "dv"), errors, strict=True))


MOSAIC_CASES = {
    "unmasked": (300, AttentionMask()),
    "causal": (300, AttentionMask(causal=True)),
    "causal_short_queries": (27, AttentionMask(causal=True)),
    "soft_causal_r03": (300, AttentionMask(soft_causal_ratio=0.3)),
}


# (forward blocks, Mosaic backward too): the backward at the default 128 x 64 tiles.
MOSAIC_VARIANTS = {
    "forward_64x64": ((64, 64), False),
    "forward_128x128": ((128, 128), False),
    "forward_64x128_and_backward": ((64, 128), True),
}


@pytest.mark.parametrize("name", list(MOSAIC_CASES))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("variant", list(MOSAIC_VARIANTS))
def test_flash_attention_mosaic_kernels_compiled_match_reference(name, head_dim, variant):
    # The Mosaic GPU kernels (TMA, WGMMA), the forward with the Triton backward or both
    # on Mosaic; on CPU only their interpreted form (plain dots instead of WGMMA) and
    # their lowering were checked. bfloat16 as the tuned-tiles test above, and for the
    # same reasons 2e-2.
    q_len, mask = MOSAIC_CASES[name]
    rng = np.random.default_rng(5)
    shapes = [(2, q_len, 4, head_dim), (2, 300, 2, head_dim), (2, 300, 2, head_dim)]
    q, k, v, d_out = (
        jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for shape in [*shapes, shapes[0]]
    )
    (block_q, block_k), mosaic_backward = MOSAIC_VARIANTS[variant]
    tiles = dataclasses.replace(
        default_block_sizes(jnp.bfloat16, head_dim),
        block_q=block_q,
        block_k=block_k,
        mosaic_forward=True,
        mosaic_backward=mosaic_backward,
    )

    errors = _attention_errors(mask, q, k, v, d_out, tiles)
    assert max(errors) < 2e-2, dict(zip(("out", "dq", "dk", "dv"), errors, strict=True))


SCAN_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.mark.parametrize(
    "B_shape, C_shape, with_mask",
    [
        ((2, 16, 300), (2, 16, 300), True),  # Mamba's layout, second row padded after 181 steps
        ((64, 16), (2, 2, 16, 300), False),  # time-invariant B, two groups of C
    ],
)
def test_selective_scan_compiled_matches_reference(B_shape, C_shape, with_mask):
    args = scan_inputs(64, 16, 300, B_shape, C_shape)
    mask = (jnp.arange(300)[None, :] < jnp.array([[300], [181]])) if with_mask else None

    got = jax.jit(scan_outputs_and_gradients("pallas", mask))(args)
    with jax.enable_x64(True):
        expected = jax.jit(scan_outputs_and_gradients("reference", mask))(_upcast(args))
        errors = relative_errors(got, expected)
    labels = ("out", "last_state", *(f"d{name}" for name in sorted(SCAN_NAMES)))
    assert max(errors) < SCAN_TOLERANCE, dict(zip(labels, errors, strict=True))


@pytest.mark.parametrize(
    "B_shape, C_shape, with_mask",
    [
        ((2, 16, 300), (2, 16, 300), True),
        ((128, 16), (2, 2, 16, 300), False),  # two groups of 64 channels: whole programs
    ],
)
def test_selective_scan_mosaic_compiled_matches_reference(B_shape, C_shape, with_mask, caplog):
    # Every scan kernel on Mosaic GPU (implementation="pallas_mosaic_gpu"); on CPU only
    # the interpreted kernels and their lowering were checked. 128 channels: two programs.
    args = scan_inputs(128, 16, 300, B_shape, C_shape)
    mask = (jnp.arange(300)[None, :] < jnp.array([[300], [181]])) if with_mask else None

    got = jax.jit(scan_outputs_and_gradients("pallas_mosaic_gpu", mask))(args)
    assert "instead of 'pallas_mosaic_gpu'" not in caplog.text
    with jax.enable_x64(True):
        expected = jax.jit(scan_outputs_and_gradients("reference", mask))(_upcast(args))
        errors = relative_errors(got, expected)
    labels = ("out", "last_state", *(f"d{name}" for name in sorted(SCAN_NAMES)))
    assert max(errors) < SCAN_TOLERANCE, dict(zip(labels, errors, strict=True))


@pytest.mark.parametrize("chunk_size", [64, 100])
def test_selective_scan_chunks_compiled_match_reference(chunk_size):
    # The kernel itself (dt already positive), its sequence cut into chunks of
    # 64 (5 chunks, the last one part padding) or 100 (rounded up to 112: 3 chunks).
    args = scan_inputs(64, 16, 300, (2, 16, 300), (2, 16, 300))
    core = dict(
        u=args["u"], delta=jax.nn.softplus(args["delta"]), A=args["A"], B=args["B"], C=args["C"]
    )

    def run(fn):
        def loss(core):
            out, state = fn(core)
            return jnp.sum(out * args["z"]) + jnp.sum(state * core["A"])

        return jax.jit(lambda core: (fn(core), jax.grad(loss)(core)))

    kernel = lambda c: selective_scan_pallas(  # noqa: E731
        c["u"], c["delta"], c["A"], c["B"], c["C"], chunk_size=chunk_size
    )
    reference = lambda c: selective_scan(  # noqa: E731
        **c, return_last_state=True, implementation="reference"
    )
    got = run(kernel)(core)
    with jax.enable_x64(True):
        expected = run(reference)(_upcast(core))
        errors = relative_errors(got, expected)
    assert max(errors) < SCAN_TOLERANCE, errors


@pytest.mark.parametrize(
    "heads, kv_heads, lengths",
    [(8, 2, (0, 1, 1000)), (4, 4, (777, 513, 64)), (8, 1, (1000, 999, 129))],
)
def test_decode_attention_compiled_matches_reference(heads, kv_heads, lengths):
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(3, 1, heads, 128)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(3, 1000, kv_heads, 128)), jnp.float32) for _ in "kv")
    lengths = jnp.asarray(lengths, jnp.int32)
    got = jax.jit(lambda *a: decode_attention(*a, implementation="pallas"))(q, k, v, lengths)
    with jax.enable_x64(True):
        expected = decode_attention(*_upcast((q, k, v)), lengths, implementation="reference")
        errors = relative_errors(got[lengths > 0], expected[lengths > 0])
    assert max(errors) < ATTENTION_TOLERANCE, errors
    # A sequence with no cached key attends to nothing: exactly zero, as the reference.
    assert not np.any(np.asarray(got)[np.asarray(lengths) == 0])


@pytest.mark.parametrize(
    "heads, kv_heads, lengths",
    [(8, 2, (0, 1, 1000)), (8, 1, (1000, 999, 129))],
)
def test_decode_attention_mosaic_gpu_compiled_matches_reference(heads, kv_heads, lengths):
    # The Mosaic GPU port (TMA, WGMMA; bfloat16, its operands); on CPU only its
    # interpreted form and its lowering were checked. bfloat16 probabilities and output:
    # 2e-2, as the flash bfloat16 tests.
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.normal(size=(3, 1, heads, 128)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(3, 1000, kv_heads, 128)), jnp.bfloat16) for _ in "kv")
    lengths = jnp.asarray(lengths, jnp.int32)
    got = jax.jit(lambda *a: decode_attention(*a, implementation="pallas_mosaic_gpu"))(
        q, k, v, lengths
    )
    with jax.enable_x64(True):
        expected = decode_attention(*_upcast((q, k, v)), lengths, implementation="reference")
        errors = relative_errors(got[lengths > 0], expected[lengths > 0])
    assert max(errors) < 2e-2, errors
    assert not np.any(np.asarray(got)[np.asarray(lengths) == 0])
