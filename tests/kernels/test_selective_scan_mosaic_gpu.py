"""The Mosaic GPU selective-scan kernels in Mosaic GPU's interpreter on CPU, and their lowering.

``selective_scan_pallas(mosaic_forward=..., mosaic_backward=...)``: the forward passes,
the backward's two kernels (adjoint carry, backward), or both on Mosaic GPU, the rest
on the Triton kernels (they share the block-entering states), against the float64
reference of the op, forward and gradients; and the forward's three outputs against
the Triton forward pass's (its contract). float32 kernel against float64: a step is a handful of float32
operations and the state decays, so errors stay near float32 rounding of the largest
values (~1e-6 relative at these sizes); 1e-5 of the largest value is the bound, and
one step of dt or B read at the wrong time moves outputs by more than 1e-2.
The interpreter is slow for an unrolled scan, so the shapes are small: 128 channels
(two programs of 64), n 16, L 24 in 16-step chunks (two chunks, the second padded).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.kernels import selective_scan as triton_scan
from effformer.kernels import selective_scan_mosaic_gpu as mosaic
from effformer.kernels.selective_scan import selective_scan_pallas
from effformer.ops.selective_scan import selective_scan

D, N, LENGTH, CHUNK, SEQ_BLOCK = 128, 16, 24, 16, 4
TOLERANCE = 1e-5


def _inputs(B_shape, C_shape, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(2, D, LENGTH))
    dt = rng.uniform(0.01, 0.3, size=(2, D, LENGTH))
    A = -rng.uniform(0.5, 2.0, size=(D, N))
    B, C = rng.normal(size=B_shape), rng.normal(size=C_shape)
    return [jnp.asarray(x, jnp.float32) for x in (u, dt, A, B, C)]


def _relative(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b)).max() / np.abs(b).max())


# Time-varying B, grouped C (two groups of 64 channels); time-invariant B and C.
LAYOUTS = {
    "varying_B_grouped_C": ((2, N, LENGTH), (2, 2, N, LENGTH)),
    "fixed_B_C": ((D, N), (D, N)),
}


@pytest.mark.parametrize(
    "name, mosaic_forward, mosaic_backward",
    [
        ("varying_B_grouped_C", True, False),
        ("varying_B_grouped_C", False, True),
        ("varying_B_grouped_C", True, True),
        ("fixed_B_C", True, True),
    ],
    ids=["varying-forward", "varying-backward", "varying-both", "fixed-both"],
)
def test_forward_and_gradients_match_float64_reference(name, mosaic_forward, mosaic_backward):
    u, dt, A, B, C = _inputs(*LAYOUTS[name])
    cotangents = [
        jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
        for shape in ((2, D, LENGTH), (2, D, N))
    ]

    def vjp(fn, args, cotangents):
        out, pullback = jax.vjp(fn, *args)
        return out, pullback(tuple(cotangents))

    def kernel(u, dt, A, B, C):
        return selective_scan_pallas(
            u, dt, A, B, C, seq_block=SEQ_BLOCK, chunk_size=CHUNK, interpret=True,
            mosaic_forward=mosaic_forward, mosaic_backward=mosaic_backward,
        )  # fmt: skip

    def reference(u, dt, A, B, C):
        return selective_scan(
            u, dt, A, B, C, return_last_state=True, delta_softplus=False,
            implementation="reference",
        )  # fmt: skip

    (y, last), grads = vjp(kernel, (u, dt, A, B, C), cotangents)
    with jax.enable_x64(True):
        as64 = [jnp.asarray(x, jnp.float64) for x in (u, dt, A, B, C, *cotangents)]
        (y_ref, last_ref), grads_ref = vjp(reference, as64[:5], as64[5:])
        y_ref, last_ref = np.asarray(y_ref), np.asarray(last_ref)
        grads_ref = [np.asarray(g) for g in grads_ref]
    assert _relative(y, y_ref) < TOLERANCE and _relative(last, last_ref) < TOLERANCE
    for arg, grad, grad_ref in zip(["u", "dt", "A", "B", "C"], grads, grads_ref, strict=True):
        assert _relative(grad, grad_ref) < 1e-4, arg  # float32 sums over time and channels
    # The gradients of dt shifted by one step are far outside the tolerance too.
    assert _relative(np.roll(np.asarray(grads[1]), 1, axis=2), grads_ref[1]) > 1e-2
    # dt shifted by one step (a tile read at the wrong time) is far outside the tolerance.
    shifted = selective_scan(
        u, jnp.roll(dt, 1, axis=2), A, B, C, return_last_state=True, delta_softplus=False,
        implementation="reference",
    )[0]  # fmt: skip
    assert _relative(y, np.asarray(shifted, np.float64)) > 1e-2


def test_outputs_equal_the_triton_forward_pass():
    # The contract the Triton wrapper's chunking and backward rely on: y, the state
    # leaving each chunk and the states entering each sequence block, from a given
    # chunk-entering state.
    u, dt, A, B, C = _inputs(*LAYOUTS["varying_B_grouped_C"], seed=2)
    layout = triton_scan._Layout(u.shape, N, B, C, SEQ_BLOCK, mosaic.CHANNELS, CHUNK)
    args = triton_scan._to_kernel_layout(u, dt, A, B, C, layout)
    rng = np.random.default_rng(3)
    init = jnp.asarray(rng.normal(size=(2, layout.num_chunks, D, layout.n_pad)), jnp.float32)
    expected = triton_scan._forward_pass(args, init, layout, 1, True, True, True)
    got = mosaic.forward_pass(args, init, layout, True, True, True)
    for name, a, b in zip(("y", "last", "starts"), got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5, err_msg=name)


def test_op_runs_the_mosaic_forward_and_falls_back_where_it_cannot(caplog):
    u, dt, A, B, C = _inputs((2, N, LENGTH), (2, N, LENGTH), seed=4)
    out = selective_scan(
        u[:, :, :8], dt[:, :, :8], A, B[..., :8], C[..., :8], delta_softplus=False,
        implementation="pallas_mosaic_gpu",
    )  # fmt: skip
    with jax.enable_x64(True):
        args64 = [jnp.asarray(x, jnp.float64) for x in (u, dt, A, B, C)]
        expected = selective_scan(
            args64[0][:, :, :8], args64[1][:, :, :8], args64[2], args64[3][..., :8],
            args64[4][..., :8], delta_softplus=False, implementation="reference",
        )  # fmt: skip
        assert _relative(out, np.asarray(expected)) < TOLERANCE
    assert "instead of 'pallas_mosaic_gpu'" not in caplog.text
    # 96 channels per group: not whole programs of 64; runs the Triton kernel, says why.
    selective_scan(
        u[:, :96, :8], dt[:, :96, :8], A[:96], B[..., :8], C[..., :8],
        implementation="pallas_mosaic_gpu",
    )  # fmt: skip
    assert "instead of 'pallas_mosaic_gpu'" in caplog.text and "got 96" in caplog.text


def test_bad_arguments_are_named():
    u, dt, A, B, C = _inputs((D, N), (D, N))
    with pytest.raises(ValueError, match=r"channels per B/C group must be a multiple of 64"):
        selective_scan_pallas(
            u[:, :96], dt[:, :96], A[:96], B[:96], C[:96], interpret=True, mosaic_forward=True
        )
    with pytest.raises(ValueError, match=r"A must be \[d, n\] with n >= 5"):
        selective_scan_pallas(
            u, dt, A[:, :4], B[:, :4], C[:, :4], interpret=True, mosaic_forward=True
        )


@pytest.mark.parametrize("mosaic_backward", [False, True])
def test_kernels_lower_for_cuda(mosaic_backward):
    # No GPU here: lowering for CUDA from the CPU host runs Mosaic GPU's lowering of the
    # two forward passes (chunk states, then y and the block starts) at the size,
    # and of the adjoint-carry and backward kernels, or their Triton lowering.
    u = jax.ShapeDtypeStruct((2, 1536, 4096), jnp.float32)
    A = jax.ShapeDtypeStruct((1536, 16), jnp.float32)
    BC = jax.ShapeDtypeStruct((2, 16, 4096), jnp.float32)

    def loss(u, dt, A, B, C):
        y, last = selective_scan_pallas(
            u, dt, A, B, C, interpret=False, mosaic_forward=True, mosaic_backward=mosaic_backward
        )
        return jnp.sum(y) + jnp.sum(last)

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(u, u, A, BC, BC)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu_v2") == (4 if mosaic_backward else 2)
    assert text.count("custom_call @__gpu$xla.gpu.triton") == (0 if mosaic_backward else 2)
