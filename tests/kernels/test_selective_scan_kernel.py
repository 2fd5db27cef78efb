"""The Pallas selective-scan kernel (interpret mode on CPU) against the op's reference.

Each comparison compiles one program holding the forward and the VJP of both
the kernel and the reference (interpret-mode programs compile slowly), in
float64 so that the tolerances are those of reordered float64 sums.
"""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.kernels import selective_scan as kernel_module
from effformer.kernels.selective_scan import selective_scan_pallas
from effformer.ops.selective_scan import selective_scan

BATCH, D_INNER, N_STATE = 2, 8, 3  # n = 3 is padded to 4 inside the kernel


def _coefficient(rng, layout, length):
    if layout == "shared":
        return rng.normal(size=(D_INNER, N_STATE))
    if layout == "per_batch":
        return rng.normal(size=(BATCH, N_STATE, length))
    groups = int(layout.removeprefix("grouped"))
    return rng.normal(size=(BATCH, groups, N_STATE, length))


def _core_inputs(seed, length, B_layout, C_layout):
    rng = np.random.default_rng(seed)
    return dict(
        u=rng.normal(size=(BATCH, D_INNER, length)),
        delta=np.abs(rng.normal(size=(BATCH, D_INNER, length))),
        A=-np.exp(rng.normal(size=(D_INNER, N_STATE))),
        B=_coefficient(rng, B_layout, length),
        C=_coefficient(rng, C_layout, length),
    )


def _assert_vjps_match(got_fn, want_fn, args, seed):
    """Forward outputs and the VJP (random cotangents) of all args, one compiled program."""
    rng = np.random.default_rng(seed)

    out_shapes = jax.eval_shape(want_fn, args)
    cotangents = jax.tree.map(lambda o: rng.normal(size=o.shape).astype(o.dtype), out_shapes)

    @jax.jit
    def both(args, cotangents):
        results = []
        for fn in (got_fn, want_fn):
            outs, vjp = jax.vjp(fn, args)
            results.append((outs, vjp(cotangents)[0]))
        return results

    (got_outs, got_grads), (want_outs, want_grads) = both(args, cotangents)
    for got, want in zip(got_outs, want_outs, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for name in args:
        assert np.any(want_grads[name] != 0), name  # the comparison can fail
        np.testing.assert_allclose(
            got_grads[name], want_grads[name], rtol=1e-11, atol=1e-12, err_msg=name
        )


@pytest.mark.parametrize(
    ("length", "seq_block", "channel_block", "chunk_size", "B_layout", "C_layout"),
    [
        # L a multiple of the sequence block; B and C grouped differently, so a
        # channel block (2 channels) is a fraction of a B group (4) and of a C group (2).
        # One chunk: the whole sequence in one program per channel block.
        (16, 4, 8, None, "grouped2", "grouped4"),
        # The same cut into 4 chunks of one block, scanned in parallel then joined.
        (16, 4, 8, 4, "grouped2", "grouped4"),
        # L not a multiple of the block (5 blocks, the last one 2/4 padding);
        # time-invariant B beside time-varying C.
        (18, 4, 4, 256, "shared", "per_batch"),
        # 3 chunks of 2 blocks (chunk_size 7 rounds up to 8 steps): the last chunk
        # holds the last real block and a block of padding.
        (18, 4, 4, 7, "shared", "per_batch"),
    ],
)
def test_kernel_matches_reference(
    x64, length, seq_block, channel_block, chunk_size, B_layout, C_layout
):
    args = _core_inputs(0, length, B_layout, C_layout)

    def kernel(a):
        return selective_scan_pallas(
            a["u"], a["delta"], a["A"], a["B"], a["C"],
            seq_block=seq_block, channel_block=channel_block, chunk_size=chunk_size,
        )  # fmt: skip

    def reference(a):
        return selective_scan(**a, return_last_state=True, implementation="reference")

    _assert_vjps_match(kernel, reference, args, seed=1)


def test_op_with_every_option_matches_reference(x64):
    # D, z, delta_bias, softplus and a padding mask (one sequence padded at the
    # end, a hole in the other) stay in XLA around the kernel; grouped B, shared C.
    length = 11
    args = _core_inputs(2, length, "grouped2", "shared")
    rng = np.random.default_rng(3)
    args.update(
        D=rng.normal(size=(D_INNER,)),
        z=rng.normal(size=(BATCH, D_INNER, length)),
        delta_bias=rng.normal(size=(D_INNER,)) * 0.5,
    )
    mask = np.ones((BATCH, length), bool)
    mask[0, 7:] = False
    mask[1, 3:5] = False

    def run(implementation):
        def fn(a):
            return selective_scan(**a, delta_softplus=True, return_last_state=True, mask=mask,
                                  implementation=implementation)  # fmt: skip

        return fn

    jaxpr = str(jax.make_jaxpr(run("pallas"))(args))
    assert "pallas_call" in jaxpr  # the kernel runs, not a fallback
    _assert_vjps_match(run("pallas"), run("reference"), args, seed=4)


@pytest.mark.parametrize(
    ("chunk_size", "kernels"),
    [
        (None, 2),  # one chunk: the forward and the backward kernel
        (16, 4),  # 4 chunks: + the chunk-state pass and the adjoint-carry pass
    ],
)
def test_kernel_lowers_to_triton(chunk_size, kernels):
    # No GPU here: lowering for CUDA from the CPU host runs Pallas's Triton
    # lowering (power-of-two arrays, supported primitives) of every kernel
    # at the Mamba benchmark's channel and state sizes.
    length = 64
    shapes = dict(
        u=(BATCH, 1536, length), delta=(BATCH, 1536, length), A=(1536, 16),
        B=(1536, 16), C=(BATCH, 2, 16, length),
    )  # fmt: skip
    args = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}

    def loss(a):
        y, last = selective_scan_pallas(
            a["u"], a["delta"], a["A"], a["B"], a["C"], chunk_size=chunk_size, interpret=False
        )
        return jnp.sum(y) + jnp.sum(last)

    lowered = jax.jit(jax.grad(loss)).trace(args).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == kernels


@pytest.mark.parametrize(
    ("chunk_size", "warps"),
    [(None, kernel_module.DEFAULT_NUM_WARPS), (16, kernel_module.DEFAULT_NUM_WARPS_CHUNKED)],
)
def test_default_warps_follow_the_chunking(chunk_size, warps):
    # num_warps=None takes the warps timed for the mode the call runs in: one warp for
    # chunked programs, two for the one-pass scan (module constants; the H200 sweep).
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in
            [(1, 16, 64), (1, 16, 64), (16, 16), (16, 16), (1, 16, 64)]]  # fmt: skip

    def forward(*a):
        return selective_scan_pallas(*a, chunk_size=chunk_size, interpret=False)

    text = jax.jit(forward).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    launches = re.findall(r"num_warps = (\d+)", text)
    assert launches and set(launches) == {str(warps)}


def test_backends_and_interpret_log(caplog):
    assert kernel_module.supported_backend("gpu")
    assert kernel_module.supported_backend("cpu")  # interpret mode
    assert not kernel_module.supported_backend("tpu")  # the op falls back to XLA
    kernel_module._log_interpret_once.cache_clear()
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in
            [(1, 2, 5), (1, 2, 5), (2, 4), (1, 4, 5), (1, 4, 5)]]  # fmt: skip
    with caplog.at_level(logging.INFO, logger=kernel_module.__name__):
        for _ in range(2):
            jax.eval_shape(selective_scan_pallas, *args)
    assert sum("interpret=True" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(u=np.zeros((2, 8))), r"u must be \[batch, d, L\], got \(2, 8\)"),
        (dict(u=np.zeros((2, 8, 0))), r"u must be \[batch, d, L\] with L >= 1, got \(2, 8, 0\)"),
        (dict(delta=np.zeros((2, 8, 5))), r"dt must be shaped \(2, 8, 4\) like u, got \(2, 8, 5\)"),
        (dict(B=np.zeros((2, 3, 3, 4))), r"B must be .*groups.*got \(2, 3, 3, 4\)"),
        (dict(C=np.zeros((8, 4))), r"C must be \[8, 3\].*got \(8, 4\)"),
        (dict(u=np.zeros((2, 8, 4), np.float16)), "u.dtype must be float32 or float64, got float16"),
        (dict(A=-np.ones((8, 3), jnp.bfloat16)), r"A.dtype must be float32 \(that of u\), got bfloat16"),
        (dict(channel_block=6), "channel_block must be a power of two, got 6"),
        (dict(seq_block=0), "seq_block must be None or a positive int, got 0"),
        (dict(num_warps=0), "num_warps must be None or a positive int, got 0"),
        (dict(chunk_size=0), "chunk_size must be None or a positive int, got 0"),
    ],
)  # fmt: skip
def test_bad_input_names_the_argument(change, message):
    args = dict(
        u=np.zeros((2, 8, 4), np.float32), delta=np.zeros((2, 8, 4), np.float32),
        A=-np.ones((8, 3), np.float32), B=np.zeros((2, 3, 4), np.float32),
        C=np.zeros((2, 2, 3, 4), np.float32),
    )  # fmt: skip
    options = {
        k: change.pop(k)
        for k in list(change)
        if k in ("channel_block", "seq_block", "num_warps", "chunk_size")
    }
    args.update(change)
    arrays = [jnp.asarray(args[k]) for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(ValueError, match=message):
        selective_scan_pallas(*arrays, **options)
