"""Mamba's selective scan: the op, its argument checks and its implementations.

Semantics are those of the original ``selective_scan_ref`` (state-spaces/mamba,
``mamba_ssm/ops/selective_scan_interface.py``); see Gu & Dao (2023), Algorithm 2:

    delta <- softplus(delta + delta_bias)          (each optional)
    dA_t  = exp(delta_t * A)                       [batch, d, n]
    dBu_t = delta_t * B_t * u_t                    [batch, d, n]
    x_t   = dA_t * x_{t-1} + dBu_t,   x_{-1} = 0
    y_t   = <x_t, C_t>  (sum over n) + D * u_t
    out   = y * silu(z)

Shapes: u, delta, z ``[batch, d, L]``; A ``[d, n]``; B and C each ``[d, n]``
(time-invariant), ``[batch, n, L]`` (shared by all channels) or
``[batch, groups, n, L]`` (channel ``c`` uses group ``c // (d // groups)``);
D and delta_bias ``[d]``; mask ``[batch, L]`` bool, True for a real token.
At a masked position the state passes through unchanged (dA = 1, dBu = 0: the
processed delta is set to 0 *after* bias and softplus, so neither leaks into
padding) and the output is zero.

Computation is in float32 (float64 when the inputs are float64, for the
float64 references in tests); the output has u's dtype; the last state is
``[batch, d, n]`` in the compute dtype.

Implementations (all share the pre- and post-processing above and differ only
in how the recurrence over time is evaluated):

  * ``"reference"``: ``lax.scan`` over time, one step per position, state in
    the original ``[batch, d, n]`` layout. Slow and obviously correct.
  * ``"associative"``: ``lax.associative_scan`` over all L positions with the
    combine ``((a1, b1), (a2, b2)) -> (a2 * a1, a2 * b1 + b2)``. Materialises
    ``[L, batch, d, n]`` arrays (memory grows with L).
  * ``"chunked"``: the sequence is cut into chunks of ``chunk_size`` steps; an
    outer ``lax.scan`` carries the state from chunk to chunk, and the backward
    (written by hand, ``custom_vjp``) keeps only the chunk-boundary states and
    recomputes one chunk at a time before running the adjoint recurrence over it
    (memory proportional to the chunk length, not L). Inside a chunk the steps
    run sequentially with the state laid out ``[batch, n, d]`` (channels
    contiguous, so every step is a wide vectorised, multi-threaded elementwise
    update and the sum over n is a vertical add), never materialising the
    ``[batch, d, n, L]`` tensor. This is the fastest on CPU (measured:
    experiments/benchmarks/README.md, section "Selective scan") and the default
    except on GPU.
  * ``"pallas"``: a Pallas kernel (state kept on chip, backward recomputing
    from block-boundary states). On TPU, the Mosaic TPU kernel of
    effformer/kernels/selective_scan_tpu.py; on GPU, the Triton kernel of
    effformer/kernels/selective_scan.py; on CPU, that GPU kernel in interpret
    mode (slow; logged once); on other backends the op falls back to
    ``"chunked"`` (logged once). The default on GPU: on an H200 at batch 2,
    d 1536, n 16, L 4096 its forward + backward took 2.26 ms against 12.08 for
    ``"associative"`` and 109 for ``"chunked"`` (with its earlier autodiff
    backward; its forward alone 0.73 ms against 1.87 and 31.0;
    experiments/benchmarks/README.md, "Pallas kernels on an NVIDIA H200:
    second session").
  * ``"pallas_mosaic_gpu"``: the same schedule with every kernel, forward and
    backward, on Mosaic GPU (effformer/kernels/selective_scan_mosaic_gpu.py, the
    port away from Pallas's Triton backend, deprecated from jax 0.11); Mosaic GPU's
    interpreter on CPU. For float32 with n >= 5 and channels per B/C
    group a multiple of 64; otherwise, and off GPU / CPU, it runs ``"pallas"``
    (logged once). Interpreted and lowered on CPU, not yet run on a GPU; never
    chosen by ``implementation=None``.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from effformer.kernels import selective_scan as pallas_kernel
from effformer.kernels import selective_scan_tpu as tpu_kernel
from effformer.ops import kernel_sharding

Array = jax.Array

# The XLA implementations, which run on every backend.
IMPLEMENTATIONS = ("reference", "associative", "chunked")
KERNEL_IMPLEMENTATIONS = ("pallas", "pallas_mosaic_gpu")
# Chosen by measurement on a 2-core CPU (experiments/benchmarks/selective_scan.py);
# on GPU the kernel is (default_implementation).
DEFAULT_IMPLEMENTATION = "chunked"
DEFAULT_CHUNK_SIZE = 64
# Time steps unrolled per iteration of the sequential loops of the chunked path:
# halves the loop overhead without bloating the program (measured; 4 was no faster).
_UNROLL = 2
# The same for the loop of the hand-written backward of the chunked path: 4 steps ran
# it 1.0-1.1x faster than 2 and than 8 (measured; the differences are near the noise).
_ADJOINT_UNROLL = 4


def _shape_error(name: str, expected: str, got) -> ValueError:
    return ValueError(f"selective_scan: {name} must have shape {expected}, got {tuple(got)}.")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, mask) -> None:
    if u.ndim != 3:
        raise _shape_error("u", "[batch, d, L]", u.shape)
    batch, d, length = u.shape
    if delta.shape != u.shape:
        raise _shape_error("delta", f"{tuple(u.shape)} (that of u)", delta.shape)
    if z is not None and z.shape != u.shape:
        raise _shape_error("z", f"{tuple(u.shape)} (that of u)", z.shape)
    if A.ndim != 2 or A.shape[0] != d:
        raise _shape_error("A", f"[d={d}, n]", A.shape)
    n = A.shape[1]
    for name, value in (("B", B), ("C", C)):
        if value.ndim == 2:
            ok = value.shape == (d, n)
        elif value.ndim == 3:
            ok = value.shape == (batch, n, length)
        elif value.ndim == 4:
            groups = value.shape[1]
            ok = value.shape == (batch, groups, n, length) and groups > 0 and d % groups == 0
        else:
            ok = False
        if not ok:
            raise _shape_error(
                name,
                f"[d={d}, n={n}], [batch={batch}, n={n}, L={length}] or "
                f"[batch={batch}, groups dividing d={d}, n={n}, L={length}]",
                value.shape,
            )
    for name, value in (("D", D), ("delta_bias", delta_bias)):
        if value is not None and value.shape != (d,):
            raise _shape_error(name, f"[d={d}]", value.shape)
    if mask is not None and mask.shape != (batch, length):
        raise _shape_error("mask", f"[batch={batch}, L={length}]", mask.shape)
    # Under jit a traced A is abstract and this cannot be checked; the Mamba block builds
    # A = -exp(A_log), which is negative by construction. A concrete A is read in NumPy:
    # jnp ops on a concrete array captured by a jitted function are staged out as
    # tracers, and bool() of them would raise instead of checking.
    if not isinstance(A, jax.core.Tracer) and bool(np.any(np.asarray(A) > 0)):
        raise ValueError(
            "selective_scan: A must be <= 0 everywhere (a decaying state, |exp(delta * A)| <= 1); "
            f"got max(A) = {float(np.max(np.asarray(A)))}."
        )


def selective_scan(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    z: Array | None = None,
    delta_bias: Array | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    mask: Array | None = None,
    implementation: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Array | tuple[Array, Array]:
    """Mamba's selective scan (see the module docstring for the equations).

    Args:
      u, delta: [batch, d, L].
      A: [d, n], entries <= 0 (checked when A is concrete).
      B, C: [d, n], [batch, n, L] or [batch, groups, n, L].
      D, delta_bias: [d] or None.
      z: [batch, d, L] or None; the output is multiplied by silu(z).
      delta_softplus: apply softplus to delta + delta_bias.
      return_last_state: also return the state after the last step.
      mask: [batch, L] bool (True = real token) or None. Masked positions leave
        the state unchanged and output zero.
      implementation: "reference", "associative", "chunked", "pallas" or None (the fastest
        measured on this backend: :func:`default_implementation`).
      chunk_size: steps per chunk of the "chunked" implementation.
    Returns:
      out [batch, d, L] in u's dtype, and with ``return_last_state`` the last
      state [batch, d, n] in the compute dtype (float32, or float64 for float64
      inputs).
    """
    if implementation is None:
        implementation = default_implementation(u.shape[0])
    if implementation not in IMPLEMENTATIONS + KERNEL_IMPLEMENTATIONS:
        raise ValueError(
            "selective_scan: implementation must be one of "
            f"{IMPLEMENTATIONS + KERNEL_IMPLEMENTATIONS} or None, "
            f"got {implementation!r}."
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}.")
    u, delta, A, B, C = (jnp.asarray(a) for a in (u, delta, A, B, C))
    D, z, delta_bias, mask = (
        None if a is None else jnp.asarray(a) for a in (D, z, delta_bias, mask)
    )
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, mask)
    return _selective_scan(
        u, delta, A, B, C, D, z, delta_bias, mask, delta_softplus, return_last_state,
        implementation, chunk_size,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnums=(9, 10, 11, 12))
def _selective_scan(
    u, delta, A, B, C, D, z, delta_bias, mask, delta_softplus, return_last_state,
    implementation, chunk_size,
):  # fmt: skip
    dtype = jnp.promote_types(u.dtype, jnp.float32)
    u_c = u.astype(dtype)
    dt = delta.astype(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(dtype)[:, None]
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    if mask is not None:
        # After bias and softplus: dt = 0 gives dA = exp(0) = 1 and dBu = 0 exactly.
        dt = jnp.where(mask[:, None, :], dt, 0)
    A, B, C = A.astype(dtype), B.astype(dtype), C.astype(dtype)

    if implementation == "pallas_mosaic_gpu":
        reason = _mosaic_gpu_unsupported_reason(dt, A, B, C, _backend())
        if reason is not None:
            logging.getLogger(__name__).warning(
                "selective_scan: using implementation='pallas' instead of 'pallas_mosaic_gpu': %s.",
                reason,
            )
            implementation = "pallas"
    if implementation == "pallas":
        backend = _backend()
        if tpu_kernel.supported_backend(backend):
            implementation = "pallas_tpu"
        elif not pallas_kernel.supported_backend(backend):
            _log_pallas_fallback_once(backend)
            implementation = "chunked"
    if implementation == "reference":
        y, last_state = _scan_reference(u_c, dt, A, B, C)
    elif implementation == "associative":
        y, last_state = _scan_associative(u_c, dt, A, B, C)
    elif implementation == "pallas_tpu":
        y, last_state = _kernel_over_batch(tpu_kernel.selective_scan_tpu, u_c, dt, A, B, C)
    elif implementation == "pallas":  # GPU (Triton), or CPU in interpret mode
        y, last_state = _kernel_over_batch(pallas_kernel.selective_scan_pallas, u_c, dt, A, B, C)
    elif implementation == "pallas_mosaic_gpu":  # on Mosaic GPU (or interpreted)
        mosaic = functools.partial(
            pallas_kernel.selective_scan_pallas, mosaic_forward=True, mosaic_backward=True
        )
        y, last_state = _kernel_over_batch(mosaic, u_c, dt, A, B, C)
    else:
        y, last_state = _scan_chunked(u_c, dt, A, B, C, chunk_size)

    if D is not None:
        y = y + D.astype(dtype)[:, None] * u_c
    if z is not None:
        y = y * jax.nn.silu(z.astype(dtype))
    if mask is not None:
        y = jnp.where(mask[:, None, :], y, 0)
    out = y.astype(u.dtype)
    return (out, last_state) if return_last_state else out


def default_implementation(batch: int) -> str:
    """What ``implementation=None`` runs for ``batch`` sequences: the Triton kernel on GPU,
    else ``"chunked"``.

    Both measured fastest for training there (module docstring). The TPU kernel is
    not chosen: it has not run on a TPU. On several GPUs the kernel is chosen only
    where each device can run it on its own sequences (under a mesh the batch splits
    over; :func:`effformer.ops.kernel_sharding.kernel_placement`): jit's sharding
    cannot split a kernel's custom call, and would scan the whole batch on every device.
    """
    if _backend() == "gpu" and kernel_sharding.kernel_placement(batch).reason is None:
        return "pallas"
    return DEFAULT_IMPLEMENTATION


def _kernel_over_batch(kernel, u, dt, A, B, C):
    """``kernel(u, dt, A, B, C)``, each device scanning its own sequences under a mesh.

    B and C are split with the batch when they vary in time ([batch, ...]); A and
    time-invariant B, C ([d, n]) go to every device whole.
    """
    varying_B, varying_C = B.ndim > 2, C.ndim > 2
    batched = (u, dt, B if varying_B else None, C if varying_C else None)
    shared = (A, None if varying_B else B, None if varying_C else C)

    def run(u, dt, B_batched, C_batched, A, B_shared, C_shared):
        B = B_shared if B_batched is None else B_batched
        C = C_shared if C_batched is None else C_batched
        return kernel(u, dt, A, B, C)

    placement = kernel_sharding.kernel_placement(u.shape[0])
    return kernel_sharding.call_over_batch(run, batched, shared, placement.batch_axes)


def _backend() -> str:
    """The backend the op dispatches ``implementation="pallas"`` for (patched in tests)."""
    return jax.default_backend()


def _mosaic_gpu_unsupported_reason(dt, A, B, C, backend: str) -> str | None:
    if backend not in ("gpu", "cpu"):
        return f"the Mosaic GPU kernel runs on a GPU (or interpreted on CPU), not {backend!r}"
    if dt.dtype != jnp.float32:
        return f"the Mosaic GPU kernel takes float32, got {dt.dtype}"
    if A.shape[1] < 5:
        return f"the Mosaic GPU kernel needs n >= 5 (padded to a multiple of 8), got {A.shape[1]}"
    groups = max(BC.shape[1] if BC.ndim == 4 else 1 for BC in (B, C))
    if (A.shape[0] // groups) % 64:
        return (
            "the Mosaic GPU kernel needs the channels of each B/C group to be a multiple of 64, "
            f"got {A.shape[0] // groups}"
        )
    return None


@functools.cache
def _log_pallas_fallback_once(backend: str) -> None:
    logging.getLogger(__name__).warning(
        "selective_scan: no Pallas kernel for backend %r; using implementation='chunked'.", backend
    )


def _expand_groups(BC: Array, d: int) -> Array:
    """[batch, groups, n, L] -> [batch, d, n, L], channel c using group c // (d // groups)."""
    return jnp.repeat(BC, d // BC.shape[1], axis=1)


def _scan_reference(u, dt, A, B, C):
    """One lax.scan step per position, in the original [batch, d, n] layout.

    u, dt: [batch, d, L]; returns y [batch, d, L] (before D and z), x_last [batch, d, n].
    """
    batch, d, _ = u.shape
    n = A.shape[1]

    def per_step(BC):  # -> time-major [L, batch, d, n] view, or None if time-invariant
        if BC.ndim == 2:
            return None
        if BC.ndim == 3:
            return jnp.moveaxis(BC, -1, 0)[:, :, None, :]
        return jnp.moveaxis(_expand_groups(BC, d), -1, 0)

    B_t, C_t = per_step(B), per_step(C)

    def step(x, inputs):
        u_i, dt_i, B_i, C_i = inputs
        B_i = B if B_i is None else B_i
        C_i = C if C_i is None else C_i
        x = jnp.exp(dt_i[..., None] * A) * x + (dt_i * u_i)[..., None] * B_i
        return x, jnp.sum(x * C_i, axis=-1)

    x0 = jnp.zeros((batch, d, n), u.dtype)
    xs = (jnp.moveaxis(u, -1, 0), jnp.moveaxis(dt, -1, 0), B_t, C_t)
    x_last, y = jax.lax.scan(step, x0, xs)
    return jnp.moveaxis(y, 0, -1), x_last


def _time_major_nd(u, dt, A, B, C):
    """Inputs in the layout of the fast paths: time first, state [batch, n, *channels].

    ``channels`` is ``(d,)``, or ``(groups, d // groups)`` when B or C is grouped
    (channels split as the original's ``repeat`` orders them). The ungrouped
    layout is kept 3-D because XLA's CPU loops over a 4-D state with a unit
    axis ran about 2x slower (measured). Every per-step array broadcasts
    against the state:
      dt, u: [L, batch, 1, *channels]; A: [n, *channels];
      B, C: [n, *channels] when time-invariant (returned with a ``None`` per-step
            array), else per step [L, batch, n, 1 or groups, (1)].
    """
    batch, d, length = u.shape
    n = A.shape[1]
    # B and C may be grouped differently; the lcm of two divisors of d divides d.
    groups = math.lcm(*(a.shape[1] for a in (B, C) if a.ndim == 4), 1)
    channels = (d,) if groups == 1 else (groups, d // groups)

    def per_channel(a):  # [batch, d, L] -> [L, batch, 1, *channels]
        return jnp.moveaxis(a, -1, 0).reshape(length, batch, 1, *channels)

    def per_step(BC):
        if BC.ndim == 2:
            return BC.T.reshape(n, *channels), None
        if BC.ndim == 3:
            return None, jnp.moveaxis(BC, -1, 0).reshape(length, batch, n, *(1,) * len(channels))
        BC = jnp.repeat(BC, groups // BC.shape[1], axis=1)
        return None, jnp.transpose(BC, (3, 0, 2, 1))[..., None]

    return per_channel(dt), per_channel(u), A.T.reshape(n, *channels), per_step(B), per_step(C)


def _from_time_major(y, x_last, batch, d):
    """y [L, batch, *channels] -> [batch, d, L]; x [batch, n, *channels] -> [batch, d, n]."""
    length = y.shape[0]
    y = jnp.moveaxis(y.reshape(length, batch, d), 0, -1)
    x_last = jnp.swapaxes(x_last.reshape(batch, -1, d), 1, 2)
    return y, x_last


def _scan_associative(u, dt, A, B, C):
    """lax.associative_scan over all L positions (materialises [L, batch, n, d])."""
    batch, d, _ = u.shape
    dt_t, u_t, A_t, (B_fixed, B_t), (C_fixed, C_t) = _time_major_nd(u, dt, A, B, C)
    dA = jnp.exp(dt_t * A_t)
    dBu = (dt_t * u_t) * (B_fixed if B_t is None else B_t)

    def combine(earlier, later):
        a1, b1 = earlier
        a2, b2 = later
        return a2 * a1, a2 * b1 + b2

    _, x = jax.lax.associative_scan(combine, (dA, dBu), axis=0)
    y = jnp.sum(x * (C_fixed if C_t is None else C_t), axis=2)
    return _from_time_major(y, x[-1], batch, d)


def _scan_chunked(u, dt, A, B, C, chunk_size):
    """Chunks of ``chunk_size`` steps, state carried between them (see :func:`_chunked_recurrence`)."""
    batch, d, length = u.shape
    dt_t, u_t, A_t, (B_fixed, B_t), (C_fixed, C_t) = _time_major_nd(u, dt, A, B, C)
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length

    def to_chunks(a):
        if a is None:
            return None
        # Padded steps have dt = 0: the state passes through them unchanged.
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(num_chunks, chunk, *a.shape[1:])

    dt_c, u_c, B_c, C_c = (to_chunks(a) for a in (dt_t, u_t, B_t, C_t))
    y, x_last = _chunked_recurrence(A_t, B_fixed, C_fixed, dt_c, u_c, B_c, C_c)
    y = y.reshape(num_chunks * chunk, *y.shape[2:])[:length]
    return _from_time_major(y, x_last, batch, d)


def _chunk_states(x, A, B_fixed, C_fixed, chunk_inputs, entering_states: bool):
    """One chunk's steps from state ``x`` (time-major, the layout of :func:`_time_major_nd`).

    Returns the last state and per step y_t, or with ``entering_states`` the
    state each step starts from, x_{t-1} (for the backward).
    """

    def step(x, inputs):
        dt_i, u_i, B_i, C_i = inputs
        B_i = B_fixed if B_i is None else B_i
        C_i = C_fixed if C_i is None else C_i
        x_next = jnp.exp(dt_i * A) * x + (dt_i * u_i) * B_i
        return x_next, (x if entering_states else jnp.sum(x_next * C_i, axis=1))

    # Stacking the states ran faster without unrolling on XLA's CPU (measured: 119 against
    # 187 ms for the 1024 steps of batch 2, d 1536, n 16).
    unroll = 1 if entering_states else min(_UNROLL, chunk_inputs[0].shape[0])
    return jax.lax.scan(step, x, chunk_inputs, unroll=unroll)


@jax.custom_vjp
def _chunked_recurrence(A, B_fixed, C_fixed, dt, u, B_steps, C_steps):
    """The recurrence over chunks: y [K, T, batch, *channels] and the last state.

    ``dt, u``: [K, T, batch, 1, *channels] (K chunks of T steps); ``B_steps,
    C_steps``: per-step coefficients [K, T, batch, n, ...] or None, with
    ``B_fixed, C_fixed`` [n, *channels] in their place (None otherwise).

    The backward is written by hand (:func:`_chunked_recurrence_bwd`) rather
    than differentiated through the loops: it keeps only the state entering
    each chunk and, per chunk, runs one pass forward storing the states and one
    backward over the adjoint whose per-step outputs are small (gradients of
    dt, u and of B, C summed over channels). Autodiff of the same loops with
    ``jax.checkpoint`` per chunk stacked several [batch, n, d] residuals per
    step, which XLA's CPU loops write slowly: 7x the forward's time on CPU
    (experiments/benchmarks/README.md, "Selective scan"). Forward-mode
    differentiation (``jax.jvp``) is not defined for this path (custom_vjp).
    """
    return _chunked_recurrence_fwd(A, B_fixed, C_fixed, dt, u, B_steps, C_steps)[0]


def _chunked_recurrence_fwd(A, B_fixed, C_fixed, dt, u, B_steps, C_steps):
    def run_chunk(x, chunk_inputs):
        x_next, y = _chunk_states(x, A, B_fixed, C_fixed, chunk_inputs, entering_states=False)
        return x_next, (y, x)

    batch, channels = dt.shape[2], dt.shape[4:]
    x0 = jnp.zeros((batch, A.shape[0], *channels), dt.dtype)
    x_last, (y, starts) = jax.lax.scan(run_chunk, x0, (dt, u, B_steps, C_steps))
    residuals = (A, B_fixed, C_fixed, dt, u, B_steps, C_steps, starts)
    return (y, x_last), residuals


def _sum_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Sums ``x`` (one step) over the axes where ``shape`` has 1: a broadcast's VJP."""
    axes = tuple(i for i, size in enumerate(shape) if size == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True)


def _chunked_recurrence_bwd(residuals, cotangents):
    """The adjoint recurrence (effformer/kernels/selective_scan.py's docstring), chunk by chunk.

    With lambda_t = dL/dx_t: lambda_t = a_{t+1} lambda_{t+1} + gy_t C_t, then
    dC_t = gy_t x_t, d(dt u B)_t = lambda_t, da_t = lambda_t x_{t-1}, and through
    a_t = exp(dt_t A), w_t = dt_t u_t: ddt_t = sum_n (da_t a_t A) + u_t sum_n
    (lambda_t B_t), du_t = dt_t sum_n (lambda_t B_t), dA = sum (da_t a_t dt_t).
    """
    A, B_fixed, C_fixed, dt, u, B_steps, C_steps, starts = residuals
    gy, g_last = cotangents
    zero = lambda a: None if a is None else jnp.zeros_like(a)  # noqa: E731

    n, channels = starts.shape[2], starts.shape[3:]
    groups, per_group = (1, channels[0]) if len(channels) == 1 else channels

    def grouped(a):  # a step's [batch, 1 or n, *channels] -> [batch, 1 or n, groups, per_group]
        return a.reshape(a.shape[0], a.shape[1], groups, per_group)

    def channel_sums(state, per_channel):
        """sum over channels of state * per_channel, per batch row, n and group: [b, n, g, 1].

        A contraction (XLA's dot) rather than a multiply and a sum: with the sums
        written that way the whole loop took 345 ms against 180 at batch 2, d 1536,
        n 16, L 1024 (measured on the 2-core CPU).
        """
        return jnp.einsum("bngj,bgj->bng", grouped(state), grouped(per_channel)[:, 0])[..., None]

    def batch_sums(state, per_channel):
        """sum over batch rows of state * per_channel: [n, *channels], as a contraction."""
        summed = jnp.einsum("bngj,bgj->ngj", grouped(state), grouped(per_channel)[:, 0])
        return summed.reshape(n, *channels)

    def to_shape(sums, shape):  # channel_sums' [b, n, g, 1] to a per-step B or C's shape
        sums = sums if len(channels) == 2 else sums[:, :, 0]
        return _sum_to(sums, shape)

    def adjoint_step(carry, inputs):
        h, dA, dB_fixed, dC_fixed = carry  # h: the adjoint arriving from step t + 1
        x_prev, dt_i, u_i, B_i, C_i, gy_i = inputs
        B_all = B_fixed if B_i is None else B_i
        a = jnp.exp(dt_i * A)
        w = dt_i * u_i
        x = a * x_prev + w * B_all
        lam = h + gy_i * (C_fixed if C_i is None else C_i)
        dw = jnp.sum(lam * B_all, axis=1, keepdims=True)
        da_a = lam * x_prev * a
        ddt = dw * u_i + jnp.sum(da_a * A, axis=1, keepdims=True)
        dA = dA + batch_sums(da_a, dt_i)
        if B_i is None:
            dB_fixed, dB_i = dB_fixed + batch_sums(lam, w), None
        else:
            dB_i = to_shape(channel_sums(lam, w), B_i.shape)
        if C_i is None:
            dC_fixed, dC_i = dC_fixed + batch_sums(x, gy_i), None
        else:
            dC_i = to_shape(channel_sums(x, gy_i), C_i.shape)
        return (a * lam, dA, dB_fixed, dC_fixed), (ddt, dw * dt_i, dB_i, dC_i)

    def chunk_backward(carry, chunk):
        start, dt_c, u_c, B_c, C_c, gy_c = chunk
        _, x_prev = _chunk_states(start, A, B_fixed, C_fixed, (dt_c, u_c, B_c, C_c), True)
        # y_t sums over n (axis 1 of a step): its cotangent broadcasts back over n.
        steps = (x_prev, dt_c, u_c, B_c, C_c, gy_c[:, :, None])
        unroll = min(_ADJOINT_UNROLL, dt_c.shape[0])
        return jax.lax.scan(adjoint_step, carry, steps, reverse=True, unroll=unroll)

    init = (g_last, jnp.zeros_like(A), zero(B_fixed), zero(C_fixed))
    chunks = (starts, dt, u, B_steps, C_steps, gy)
    (_, dA, dB_fixed, dC_fixed), (ddt, du, dB_steps, dC_steps) = jax.lax.scan(
        chunk_backward, init, chunks, reverse=True
    )
    return dA, dB_fixed, dC_fixed, ddt, du, dB_steps, dC_steps


_chunked_recurrence.defvjp(_chunked_recurrence_fwd, _chunked_recurrence_bwd)
