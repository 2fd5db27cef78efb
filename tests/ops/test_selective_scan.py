"""Tests of effformer.ops.selective_scan against a NumPy transliteration of selective_scan_ref."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.ops.selective_scan import IMPLEMENTATIONS, selective_scan

# The module, not the function that effformer.ops exports under the same name.
ops_module = importlib.import_module("effformer.ops.selective_scan")

BATCH, D_INNER, N_STATE, LENGTH = 2, 6, 3, 11
FAST = [impl for impl in IMPLEMENTATIONS if impl != "reference"]
# B/C layouts: time-invariant [d, n]; [batch, n, L]; grouped [batch, groups, n, L].
LAYOUTS = {
    "shared": lambda rng: rng.normal(size=(D_INNER, N_STATE)),
    "per_batch": lambda rng: rng.normal(size=(BATCH, N_STATE, LENGTH)),
    "grouped2": lambda rng: rng.normal(size=(BATCH, 2, N_STATE, LENGTH)),
    "grouped3": lambda rng: rng.normal(size=(BATCH, 3, N_STATE, LENGTH)),
}


def numpy_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, mask=None):  # fmt: skip
    """The original selective_scan_ref as plain float64 loops, plus the padding mask."""
    u, delta, A, B, C = (np.asarray(a, np.float64) for a in (u, delta, A, B, C))
    batch, d, length = u.shape
    n = A.shape[1]
    if delta_bias is not None:
        delta = delta + np.asarray(delta_bias)[:, None]
    if delta_softplus:
        delta = np.log1p(np.exp(delta))
    if mask is not None:
        delta = np.where(np.asarray(mask)[:, None, :], delta, 0.0)

    def coefficient(BC, b, c, t):  # the [n] vector that channel c uses at time t
        if BC.ndim == 2:
            return BC[c]
        if BC.ndim == 3:
            return BC[b, :, t]
        return BC[b, c // (d // BC.shape[1]), :, t]

    out = np.zeros((batch, d, length))
    state = np.zeros((batch, d, n))
    for b in range(batch):
        for c in range(d):
            x = np.zeros(n)
            for t in range(length):
                x = (
                    np.exp(delta[b, c, t] * A[c]) * x
                    + delta[b, c, t] * coefficient(B, b, c, t) * u[b, c, t]
                )
                out[b, c, t] = x @ coefficient(C, b, c, t)
            state[b, c] = x
    if D is not None:
        out = out + np.asarray(D)[:, None] * u
    if z is not None:
        z = np.asarray(z)
        out = out * z / (1 + np.exp(-z))
    if mask is not None:
        out = np.where(np.asarray(mask)[:, None, :], out, 0.0)
    return out, state


def random_inputs(seed, B_layout="per_batch", C_layout="per_batch", with_options=True):
    rng = np.random.default_rng(seed)
    args = dict(
        u=rng.normal(size=(BATCH, D_INNER, LENGTH)),
        delta=rng.normal(size=(BATCH, D_INNER, LENGTH)) * 0.5,
        A=-np.exp(rng.normal(size=(D_INNER, N_STATE))),
        B=LAYOUTS[B_layout](rng),
        C=LAYOUTS[C_layout](rng),
    )
    if with_options:
        args.update(
            D=rng.normal(size=(D_INNER,)),
            z=rng.normal(size=(BATCH, D_INNER, LENGTH)),
            delta_bias=rng.normal(size=(D_INNER,)) * 0.5,
        )
    return args


LAYOUT_PAIRS = [("shared", "per_batch"), ("per_batch", "grouped3"), ("grouped2", "shared"),
                ("grouped3", "grouped2")]  # fmt: skip


@pytest.mark.parametrize(("B_layout", "C_layout"), LAYOUT_PAIRS)
def test_reference_matches_numpy_loops(x64, B_layout, C_layout):
    args = random_inputs(0, B_layout, C_layout)
    out, state = selective_scan(**args, delta_softplus=True, return_last_state=True,
                                implementation="reference")  # fmt: skip
    want_out, want_state = numpy_selective_scan(**args, delta_softplus=True)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state, want_state, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("softplus", "with_options"), [(False, False), (True, True)])
@pytest.mark.parametrize(("B_layout", "C_layout"), LAYOUT_PAIRS)
@pytest.mark.parametrize("implementation", FAST)
def test_fast_paths_match_reference(
    x64, implementation, B_layout, C_layout, softplus, with_options
):
    args = random_inputs(1, B_layout, C_layout, with_options)
    # chunk 4 does not divide L = 11: the last chunk is padded.
    got = selective_scan(**args, delta_softplus=softplus, return_last_state=True,
                         implementation=implementation, chunk_size=4)  # fmt: skip
    want = selective_scan(**args, delta_softplus=softplus, return_last_state=True,
                          implementation="reference")  # fmt: skip
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.float64
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12)
    without_state = selective_scan(**args, delta_softplus=softplus, implementation=implementation)
    np.testing.assert_allclose(without_state, want[0], rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 64])
def test_chunked_any_chunk_size(x64, chunk_size):
    args = random_inputs(2)
    got = selective_scan(
        **args, return_last_state=True, implementation="chunked", chunk_size=chunk_size
    )
    want = numpy_selective_scan(**args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
    ("B_layout", "C_layout"),
    # Every way the chunked path's hand-written backward sums a coefficient's gradient:
    # over time and batch (shared), over channels (per batch), over each group's channels.
    [("grouped2", "per_batch"), ("shared", "shared"), ("per_batch", "grouped3"),
     ("shared", "grouped2")],
)  # fmt: skip
@pytest.mark.parametrize("implementation", FAST)
def test_gradients_match_reference(x64, implementation, B_layout, C_layout):
    args = random_inputs(3, B_layout, C_layout)
    names = list(args)
    rng = np.random.default_rng(4)
    out_cotangent = rng.normal(size=(BATCH, D_INNER, LENGTH))
    state_cotangent = rng.normal(size=(BATCH, D_INNER, N_STATE))

    def loss(implementation, *values):
        out, state = selective_scan(**dict(zip(names, values, strict=True)), delta_softplus=True,
                                    return_last_state=True, implementation=implementation,
                                    chunk_size=4)  # fmt: skip
        return jnp.sum(out * out_cotangent) + jnp.sum(state * state_cotangent)

    argnums = tuple(range(1, len(names) + 1))
    got = jax.grad(loss, argnums)(implementation, *args.values())
    want = jax.grad(loss, argnums)("reference", *args.values())
    for name, g, w in zip(names, got, want, strict=True):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-11, err_msg=name)


def test_reference_gradient_matches_finite_differences(x64):
    args = random_inputs(5, "grouped2", "per_batch")
    names = list(args)

    def loss(*values):
        out = selective_scan(**dict(zip(names, values, strict=True)), delta_softplus=True,
                             implementation="reference")  # fmt: skip
        return jnp.sum(jnp.sin(out))

    grads = jax.grad(loss, tuple(range(len(names))))(*args.values())
    rng = np.random.default_rng(6)
    for i, name in enumerate(names):
        direction = rng.normal(size=np.shape(args[name]))
        eps = 1e-6
        plus = list(args.values())
        minus = list(args.values())
        plus[i] = plus[i] + eps * direction
        minus[i] = minus[i] - eps * direction
        numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(np.sum(grads[i] * direction), numeric, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_hand_computed_tiny_case(x64, implementation):
    # d = 1, n = 1, L = 3, A = -ln 2 so that exp(delta * A) = 1/2 at delta = 1.
    u = jnp.array([[[1.0, 2.0, 3.0]]])
    delta = jnp.ones((1, 1, 3))
    A = jnp.array([[-np.log(2.0)]])
    B = jnp.array([[[1.0, 1.0, 2.0]]])  # [batch, n, L]
    C = jnp.array([[[1.0, 3.0, 1.0]]])
    D = jnp.array([10.0])
    # x0 = 1*1*1 = 1; x1 = 1/2 * 1 + 1*1*2 = 2.5; x2 = 1/2 * 2.5 + 1*2*3 = 7.25.
    # y = [1*1, 2.5*3, 7.25*1] + 10 * u = [11, 27.5, 37.25].
    out, state = selective_scan(u, delta, A, B, C, D, return_last_state=True,
                                implementation=implementation, chunk_size=2)  # fmt: skip
    np.testing.assert_allclose(out, [[[11.0, 27.5, 37.25]]], rtol=1e-14)
    np.testing.assert_allclose(state, [[[7.25]]], rtol=1e-14)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_padding_mask_matches_unpadded_sequences(x64, implementation):
    args = random_inputs(7, "grouped2", "per_batch")
    lengths = [7, 11]
    mask = np.arange(LENGTH)[None, :] < np.array(lengths)[:, None]
    # Padded positions hold garbage: a large delta with a large bias would leak if
    # bias and softplus were applied after masking.
    args["delta"] = np.where(mask[:, None, :], args["delta"], 50.0)
    args["u"] = np.where(mask[:, None, :], args["u"], 1e3)
    out, state = selective_scan(**args, delta_softplus=True, return_last_state=True, mask=mask,
                                implementation=implementation, chunk_size=4)  # fmt: skip
    for b, length in enumerate(lengths):
        single = {
            k: (v[b : b + 1, ..., :length] if np.ndim(v) >= 3 else v) for k, v in args.items()
        }
        want_out, want_state = selective_scan(**single, delta_softplus=True, return_last_state=True,
                                              implementation="reference")  # fmt: skip
        np.testing.assert_allclose(out[b, :, :length], want_out[0], rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(state[b], want_state[0], rtol=1e-11, atol=1e-12)
        np.testing.assert_array_equal(out[b, :, length:], 0.0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mask_in_the_middle_leaves_state_unchanged(x64, implementation):
    args = random_inputs(8, "per_batch", "shared")
    masked = [3, 4, 5]
    mask = np.ones((BATCH, LENGTH), bool)
    mask[:, masked] = False
    got = selective_scan(**args, delta_softplus=True, mask=mask, implementation=implementation,
                         chunk_size=4)  # fmt: skip
    keep = [t for t in range(LENGTH) if t not in masked]
    dropped = {k: (v[..., keep] if np.ndim(v) >= 3 else v) for k, v in args.items()}
    want = numpy_selective_scan(**dropped, delta_softplus=True)[0]
    np.testing.assert_allclose(got[..., keep], want, rtol=1e-11, atol=1e-12)
    np.testing.assert_array_equal(got[..., masked], 0.0)
    np.testing.assert_allclose(got, numpy_selective_scan(**args, delta_softplus=True, mask=mask)[0],
                               rtol=1e-11, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_gradient_reaches_masked_inputs(x64, implementation):
    args = random_inputs(9)
    mask = np.ones((BATCH, LENGTH), bool)
    mask[0, 2] = mask[1, -3:] = False

    def loss(u, delta):
        return jnp.sum(selective_scan(u, delta, args["A"], args["B"], args["C"], args["D"], args["z"],
                                      args["delta_bias"], True, mask=mask,
                                      implementation=implementation))  # fmt: skip

    grad_u, grad_delta = jax.grad(loss, (0, 1))(args["u"], args["delta"])
    for grad in (grad_u, grad_delta):
        np.testing.assert_array_equal(np.where(mask[:, None, :], 0.0, grad), 0.0)
        assert np.any(grad != 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_low_precision_inputs_compute_in_float32(implementation):
    args = {k: jnp.asarray(v, jnp.bfloat16) for k, v in random_inputs(10).items()}
    out, state = selective_scan(**args, delta_softplus=True, return_last_state=True,
                                implementation=implementation)  # fmt: skip
    assert out.dtype == jnp.bfloat16
    assert state.dtype == jnp.float32
    want_out, want_state = numpy_selective_scan(
        **{k: np.asarray(v, np.float32) for k, v in args.items()}, delta_softplus=True
    )
    np.testing.assert_allclose(state, want_state, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out, np.float32), want_out, rtol=1e-2, atol=1e-2)


def test_default_implementation_runs_under_jit():
    args = {k: jnp.asarray(v, jnp.float32) for k, v in random_inputs(11).items()}
    got = jax.jit(lambda a: selective_scan(**a, delta_softplus=True))(args)
    want = numpy_selective_scan(**args, delta_softplus=True)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _bad(name, value):
    args = {k: jnp.asarray(v, jnp.float32) for k, v in random_inputs(12).items()}
    args[name] = jnp.zeros(value) if isinstance(value, tuple) else value
    return args


@pytest.mark.parametrize(
    ("name", "shape"),
    [("u", (BATCH, D_INNER)), ("delta", (BATCH, D_INNER, LENGTH + 1)), ("z", (BATCH, 1, LENGTH)),
     ("A", (D_INNER + 1, N_STATE)), ("B", (BATCH, N_STATE + 1, LENGTH)), ("C", (D_INNER, 2)),
     ("B", (BATCH, 4, N_STATE, LENGTH)), ("C", (BATCH, N_STATE, LENGTH - 1)), ("D", (D_INNER, 1)),
     ("delta_bias", (D_INNER + 2,))],
)  # fmt: skip
def test_shape_errors_name_the_argument_and_both_shapes(name, shape):
    args = _bad(name, shape)
    if name == "A":
        args[name] = -jnp.ones(shape)
    with pytest.raises(ValueError, match=rf"{name} must have shape .*got \({shape[0]},"):
        selective_scan(**args)


def test_mask_shape_error():
    args = _bad("u", random_inputs(0)["u"])
    with pytest.raises(ValueError, match=r"mask must have shape \[batch=2, L=11\], got \(2, 10\)"):
        selective_scan(**args, mask=jnp.ones((BATCH, LENGTH - 1), bool))


def test_unknown_implementation_and_bad_chunk_size():
    args = _bad("u", random_inputs(0)["u"])
    with pytest.raises(ValueError, match="implementation must be one of .*got 'triton'"):
        selective_scan(**args, implementation="triton")
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        selective_scan(**args, chunk_size=0)


def test_positive_A_is_rejected_when_concrete():
    args = _bad("A", jnp.ones((D_INNER, N_STATE)))
    with pytest.raises(ValueError, match=r"A must be <= 0 .*max\(A\) = 1.0"):
        selective_scan(**args)


def test_concrete_A_captured_by_jit_is_checked_not_traced():
    # Under jit, jnp ops on a captured concrete A are staged out: the sign check must
    # read A in NumPy, not raise a TracerBoolConversionError.
    args = {k: jnp.asarray(v, jnp.float32) for k, v in random_inputs(13).items()}
    A = args.pop("A")
    got = jax.jit(lambda a: selective_scan(**a, A=A, delta_softplus=True))(args)
    want = numpy_selective_scan(**args, A=A, delta_softplus=True)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    positive_A = -A  # concrete, captured as A is
    with pytest.raises(ValueError, match=r"A must be <= 0"):
        jax.jit(lambda a: selective_scan(**a, A=positive_A))(args)


@pytest.mark.parametrize(
    ("backend", "expected"), [("gpu", "pallas"), ("cpu", "chunked"), ("tpu", "chunked")]
)
def test_default_implementation_is_the_fastest_measured_per_backend(monkeypatch, backend, expected):
    monkeypatch.setattr(ops_module, "_backend", lambda: backend)
    monkeypatch.setattr(ops_module.jax, "device_count", lambda: 8)  # jit would not split it
    assert ops_module.default_implementation(2) == "chunked"
    monkeypatch.setattr(ops_module.jax, "device_count", lambda: 1)
    assert ops_module.default_implementation(2) == expected
    # And implementation=None runs it: the kernel is a pallas_call in the program.
    rng = np.random.default_rng(0)
    shapes = dict(u=(1, 4, 6), delta=(1, 4, 6), A=(4, 2), B=(1, 2, 6), C=(1, 2, 6))
    args = {
        name: jnp.asarray(rng.normal(size=shape), jnp.float32) for name, shape in shapes.items()
    }
    args["A"] = -jnp.abs(args["A"])
    jaxpr = str(jax.make_jaxpr(lambda a: selective_scan(**a))(args))
    assert ("pallas_call" in jaxpr) == (expected == "pallas")
