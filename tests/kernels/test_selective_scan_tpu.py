"""The Mosaic TPU selective-scan kernel: TPU interpret mode on CPU against the op's
reference (float64, forward and gradients), the op's dispatch to it, and its
lowering to Mosaic MLIR.

No TPU is available to these tests: the lowering test runs Pallas's Mosaic
lowering rules from the CPU host (block tiling, supported primitives), not
Mosaic's layout passes or libtpu's compiler, and nothing here runs on a TPU.
"""

import importlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from effformer.kernels import selective_scan_tpu as tpu_kernel
from effformer.kernels.selective_scan_tpu import selective_scan_tpu
from effformer.ops.selective_scan import selective_scan

# The module (effformer.ops re-exports the function under the same name).
ops_module = importlib.import_module("effformer.ops.selective_scan")

BATCH, N_STATE = 2, 3  # n = 3 is padded to 8 inside the kernel
INTERPRET = pltpu.InterpretParams()


def _coefficient(rng, layout, d, length):
    if layout == "shared":
        return rng.normal(size=(d, N_STATE))
    if layout == "per_batch":
        return rng.normal(size=(BATCH, N_STATE, length))
    groups = int(layout.removeprefix("grouped"))
    return rng.normal(size=(BATCH, groups, N_STATE, length))


def _core_inputs(seed, d, length, B_layout, C_layout):
    rng = np.random.default_rng(seed)
    return dict(
        u=rng.normal(size=(BATCH, d, length)),
        delta=np.abs(rng.normal(size=(BATCH, d, length))),
        A=-np.exp(rng.normal(size=(d, N_STATE))),
        B=_coefficient(rng, B_layout, d, length),
        C=_coefficient(rng, C_layout, d, length),
    )


@pytest.mark.parametrize(
    ("d", "length", "channel_block", "B_layout", "C_layout"),
    [
        # Two channel blocks of 128 lanes; time-varying B beside time-invariant C.
        (256, 20, 128, "per_batch", "shared"),
        # B and C grouped differently (channels viewed as 4 groups of 4): four
        # channel blocks, each a whole group narrower than 128 lanes.
        (16, 19, 128, "grouped2", "grouped4"),
        # Groups of 256 channels, two 128-lane blocks each: a block's group and
        # its offset inside the group both vary; time-invariant B.
        (512, 17, 128, "shared", "grouped2"),
    ],
)
def test_kernel_matches_reference(global_x64, d, length, channel_block, B_layout, C_layout):
    # seq_block 8: three sequence blocks, the last one partly padding (L is not a multiple).
    args = _core_inputs(0, d, length, B_layout, C_layout)
    rng = np.random.default_rng(1)
    cotangents = (rng.normal(size=(BATCH, d, length)), rng.normal(size=(BATCH, d, N_STATE)))

    def kernel(a):
        return selective_scan_tpu(
            a["u"], a["delta"], a["A"], a["B"], a["C"],
            seq_block=8, channel_block=channel_block, interpret=INTERPRET,
        )  # fmt: skip

    def reference(a):
        return selective_scan(**a, return_last_state=True, implementation="reference")

    @jax.jit
    def both(args):  # one compiled program: forward and VJP of kernel and reference
        results = []
        for fn in (kernel, reference):
            outs, vjp = jax.vjp(fn, args)
            results.append((outs, vjp(cotangents)[0]))
        return results

    (got_outs, got_grads), (want_outs, want_grads) = both(args)
    for got, want in zip(got_outs, want_outs, strict=True):
        assert got.dtype == want.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for name in args:
        assert np.any(want_grads[name] != 0), name  # the comparison can fail
        np.testing.assert_allclose(
            got_grads[name], want_grads[name], rtol=1e-11, atol=1e-12, err_msg=name
        )


@pytest.fixture
def fresh_op_cache():
    """The op is jitted: clear its trace cache so a patched dispatch is traced (and forgotten)."""
    ops_module._selective_scan.clear_cache()
    yield
    ops_module._selective_scan.clear_cache()


def test_op_dispatches_to_tpu_kernel_on_tpu(global_x64, monkeypatch, fresh_op_cache):
    # Pretend the backend is a TPU; the TPU entry runs in interpret mode, so the
    # op's pre- and post-processing (D, z, delta bias, softplus, mask) around it
    # is checked too. Forward only: the gradients are the test above.
    calls = []
    real_entry = tpu_kernel.selective_scan_tpu

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_entry(*args, seq_block=8, channel_block=128, interpret=INTERPRET)

    monkeypatch.setattr(ops_module, "_backend", lambda: "tpu")
    monkeypatch.setattr(tpu_kernel, "selective_scan_tpu", spy)
    d, length = 8, 13
    args = _core_inputs(2, d, length, "grouped2", "shared")
    rng = np.random.default_rng(3)
    args.update(
        D=rng.normal(size=(d,)),
        z=rng.normal(size=(BATCH, d, length)),
        delta_bias=rng.normal(size=(d,)) * 0.5,
    )
    mask = np.ones((BATCH, length), bool)
    mask[0, 9:] = False
    options = dict(delta_softplus=True, return_last_state=True, mask=mask)

    got = selective_scan(**args, **options, implementation="pallas")
    assert len(calls) == 1
    want = selective_scan(**args, **options, implementation="reference")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_op_falls_back_on_other_backends(monkeypatch, fresh_op_cache, caplog):
    monkeypatch.setattr(ops_module, "_backend", lambda: "neuron")
    monkeypatch.setattr(tpu_kernel, "selective_scan_tpu", None)  # must not be called
    ops_module._log_pallas_fallback_once.cache_clear()
    args = _core_inputs(4, 4, 6, "per_batch", "per_batch")
    args = {k: jnp.asarray(v, jnp.float32) for k, v in args.items()}
    with caplog.at_level(logging.WARNING, logger=ops_module.__name__):
        for _ in range(2):
            jaxpr = str(
                jax.make_jaxpr(lambda a: selective_scan(**a, implementation="pallas"))(args)
            )
            assert "pallas_call" not in jaxpr
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no Pallas kernel for backend 'neuron'" in m for m in messages) == 1
    assert tpu_kernel.supported_backend("tpu")
    assert not tpu_kernel.supported_backend("cpu")


@pytest.mark.parametrize(
    ("B_shape", "C_shape"),
    [
        # Mamba's layout (B, C per batch and step) at the benchmark size.
        ((2, 16, 4096), (2, 16, 4096)),
        # Time-invariant B; C in 4 groups of 384 channels (three 128-lane blocks each).
        ((1536, 16), (2, 4, 16, 4096)),
        # 8 groups of 192 channels: not a multiple of 128, so one block per group.
        ((2, 8, 16, 4096), (1536, 16)),
    ],
)
def test_kernel_lowers_to_mosaic(B_shape, C_shape):
    # Pallas's Mosaic lowering only (block tiling, primitives); not compiled by
    # libtpu, not run on a TPU. Default block sizes, float32.
    shapes = dict(u=(2, 1536, 4096), delta=(2, 1536, 4096), A=(1536, 16), B=B_shape, C=C_shape)
    args = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}

    def loss(a):
        y, last = selective_scan_tpu(a["u"], a["delta"], a["A"], a["B"], a["C"])
        return jnp.sum(y) + jnp.sum(last)

    lowered = jax.jit(jax.grad(loss)).trace(args).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("stablehlo.custom_call @tpu_custom_call") == 2  # fwd, bwd


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(u=np.zeros((2, 8))), r"u must be \[batch, d, L\], got \(2, 8\)"),
        (dict(delta=np.zeros((2, 8, 5))), r"dt must be shaped \(2, 8, 4\) like u, got \(2, 8, 5\)"),
        (dict(B=np.zeros((2, 3, 3, 4))), r"B must be .*groups.*got \(2, 3, 3, 4\)"),
        (dict(C=np.zeros((8, 4))), r"C must be \[8, 3\].*got \(8, 4\)"),
        (dict(u=np.zeros((2, 8, 4), np.float16)), "u.dtype must be float32 or float64, got float16"),
        (dict(A=-np.ones((8, 3), jnp.bfloat16)), r"A.dtype must be float32 \(that of u\), got bfloat16"),
        (dict(seq_block=12), "seq_block must be a positive multiple of 8, got 12"),
        (dict(channel_block=64), "channel_block must be a positive multiple of 128, got 64"),
    ],
)  # fmt: skip
def test_bad_input_names_the_argument(change, message):
    args = dict(
        u=np.zeros((2, 8, 4), np.float32), delta=np.zeros((2, 8, 4), np.float32),
        A=-np.ones((8, 3), np.float32), B=np.zeros((2, 3, 4), np.float32),
        C=np.zeros((2, 2, 3, 4), np.float32),
    )  # fmt: skip
    options = {k: change.pop(k) for k in list(change) if k in ("channel_block", "seq_block")}
    args.update(change)
    arrays = [jnp.asarray(args[k]) for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(ValueError, match=message):
        selective_scan_tpu(*arrays, **options)
