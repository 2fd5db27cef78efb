"""The three Pallas kernels compiled for a TPU (Mosaic) against float64 references on the host.

Skipped unless JAX's default backend is a TPU; the suite's CPU run checks the same
kernels in Pallas's TPU interpret mode (test_*_tpu.py). Never run yet: no TPU has been
available to this project. On a TPU VM or a Colab TPU runtime:

    JAX_PLATFORMS=tpu,cpu python -m pytest tests/kernels/test_kernels_on_tpu.py -q

The ops pick the Mosaic kernels on a TPU with ``implementation="pallas"``. A TPU has no
float64, so the references run on the host CPU (hence ``cpu`` in ``JAX_PLATFORMS``).
Errors are max |kernel - reference| / max |reference| per output and gradient.

Tolerances, as for the GPU (test_kernels_on_gpu.py), with one unknown: whether Mosaic
runs a float32 block matmul in float32 or, like XLA's default on a TPU, in one bfloat16
pass (unit roundoff 3.9e-3). 5e-3 holds for float32 or three-pass matmuls; a failure at
a few 1e-3 on every case, masks alike, means one pass, and the kernels' float32 dots
would need ``precision=HIGHEST``. A wrong mask entry or weight moves results by ~1e-2
(one key of ~70 visible). The scan is elementwise float32 (no matrix unit): 2e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from device_checks import relative_errors, scan_inputs, scan_outputs_and_gradients

from effformer.ops.attention import dot_product_attention
from effformer.ops.decode_attention import decode_attention
from effformer.ops.masks import AttentionMask

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "tpu", reason="compiled Mosaic kernels need a TPU"
)

MATMUL_TOLERANCE = 5e-3
SCAN_TOLERANCE = 2e-4


def _on_host_float64(fn, *arrays):
    """``fn`` on float64 copies of ``arrays`` (numpy, pytrees) on the host CPU, as numpy."""
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        upcast = jax.tree.map(lambda x: np.asarray(x, np.float64), arrays)
        return jax.tree.map(np.asarray, fn(*upcast))


def _attention_vjp(mask, implementation):
    def run(q, k, v, d_out):
        attend = lambda q, k, v: dot_product_attention(  # noqa: E731
            q, k, v, mask=mask, implementation=implementation
        )
        out, pullback = jax.vjp(attend, q, k, v)
        return out, pullback(d_out)

    return run


LENGTH = 200  # not a multiple of the 128-row blocks
# NumPy, not device arrays: the masks serve the TPU kernel and the host reference alike.
SEGMENTS = np.array([[1] * 70 + [2] * 120 + [0] * 10, [1] * LENGTH], np.int32)
ATTENTION_CASES = {
    "causal": (LENGTH, AttentionMask(causal=True)),
    "causal_short_queries": (77, AttentionMask(causal=True)),
    "window_40_left": (LENGTH, AttentionMask(window_left=40, window_right=0)),
    "causal_packed_segments_padding": (
        LENGTH,
        AttentionMask(causal=True, q_segment_ids=SEGMENTS, kv_segment_ids=SEGMENTS),
    ),
    "soft_causal_r0": (LENGTH, AttentionMask(soft_causal_ratio=0.0)),
    "soft_causal_r03": (LENGTH, AttentionMask(soft_causal_ratio=0.3)),
    "soft_causal_r1": (LENGTH, AttentionMask(soft_causal_ratio=1.0)),
}


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flash_attention_compiled_matches_reference(name, head_dim, dtype):
    q_len, mask = ATTENTION_CASES[name]
    rng = np.random.default_rng(0)
    # Batch 2, 4 query heads on 2 kv heads (grouped-query attention).
    shapes = [(2, q_len, 4, head_dim), (2, LENGTH, 2, head_dim), (2, LENGTH, 2, head_dim)]
    q, k, v, d_out = (jnp.asarray(rng.normal(size=shape), dtype) for shape in [*shapes, shapes[0]])
    got = jax.jit(_attention_vjp(mask, "pallas"))(q, k, v, d_out)
    expected = _on_host_float64(_attention_vjp(mask, "reference"), q, k, v, d_out)
    errors = relative_errors(got, expected)
    # bfloat16: the reference gets the same bfloat16 values, so what is left is the
    # kernel's rounding of probabilities and outputs to bfloat16 (3.9e-3 each): 2e-2.
    tolerance = MATMUL_TOLERANCE if dtype == "float32" else 2e-2
    assert max(errors) < tolerance, dict(zip(("out", "dq", "dk", "dv"), errors, strict=True))


@pytest.mark.parametrize(
    "B_shape, C_shape, with_mask",
    [
        ((2, 16, 300), (2, 16, 300), True),  # Mamba's layout, second row padded after 181 steps
        ((256, 16), (2, 2, 16, 300), False),  # time-invariant B, two groups of C
    ],
)
def test_selective_scan_compiled_matches_reference(B_shape, C_shape, with_mask):
    # 256 channels: two of the kernel's 128-lane channel blocks; 300 steps, not a
    # multiple of its sequence block.
    args = scan_inputs(256, 16, 300, B_shape, C_shape)
    mask = np.arange(300)[None, :] < np.array([[300], [181]]) if with_mask else None
    got = jax.jit(
        scan_outputs_and_gradients("pallas", None if mask is None else jnp.asarray(mask))
    )(args)
    expected = _on_host_float64(scan_outputs_and_gradients("reference", mask), args)
    errors = relative_errors(got, expected)
    assert max(errors) < SCAN_TOLERANCE, errors


@pytest.mark.parametrize(
    "heads, kv_heads, lengths",
    [(8, 2, (0, 1, 1000)), (4, 4, (777, 513, 64)), (8, 1, (1000, 999, 129))],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_attention_compiled_matches_reference(heads, kv_heads, lengths, dtype):
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(3, 1, heads, 128)), dtype)  # head dim 128: the lane width
    k, v = (jnp.asarray(rng.normal(size=(3, 1000, kv_heads, 128)), dtype) for _ in "kv")
    lengths = np.asarray(lengths, np.int32)
    got = jax.jit(lambda *a: decode_attention(*a, implementation="pallas"))(
        q, k, v, jnp.asarray(lengths)
    )
    expected = _on_host_float64(
        lambda q, k, v: decode_attention(q, k, v, lengths, implementation="reference"), q, k, v
    )
    valid = lengths > 0
    errors = relative_errors(np.asarray(got)[valid], expected[valid])
    assert max(errors) < (MATMUL_TOLERANCE if dtype == "float32" else 2e-2), errors
    # A sequence with no cached key attends to nothing: exactly zero, as the reference.
    assert not np.any(np.asarray(got)[~valid])
