"""Pallas kernel for the core recurrence of Mamba's selective scan, forward and backward.

The kernel evaluates (Gu & Dao 2023, Algorithm 2; effformer.ops.selective_scan)

    a_t = exp(dt_t * A)             [d, n]
    x_t = a_t * x_{t-1} + dt_t * u_t * B_t,   x_{-1} = 0
    y_t = sum_n C_t * x_t           [d]

for inputs that the op has already pre-processed (delta bias, softplus and the
padding mask folded into ``dt``); D, the z gate and the output mask stay in
XLA around it, where they fuse into one elementwise pass.

Work split. The grid is (batch, channel blocks of ``channel_block`` channels,
sequence chunks of ``chunk_size`` steps). One program keeps the state of its
channels, ``[channel_block, n]``, on chip and walks its chunk in blocks of
``seq_block`` steps (a ``fori_loop`` over blocks, the steps of a block unrolled
so the compiler can issue the loads and exps of later steps ahead of the one
dependent FMA per step). The ``[batch, L, d, n]`` tensor of states is never
written to memory: the forward pass writes y, the last state and, when a
gradient is needed, the state entering each sequence block
(``[batch, L / seq_block, d, n]``).

Sequence chunks. Every step depends on the one before, so a program's time is
its number of steps times the latency of one step; one program per channel
block over all L steps leaves most of a GPU idle (batch 2 x 1536 channels is
a few hundred programs). The recurrence is linear in the state, so the state
leaving chunk c is ``decay_c * x_in_c + local_c``, with ``decay_c = prod_t a_t =
exp(A sum_t dt_t)`` over the chunk and ``local_c`` the state the chunk produces
from a zero start. The forward pass therefore runs three steps: every chunk
scanned from zero in parallel (``local``); the entering states carried across
the chunks in XLA (``x_in_{c+1} = decay_c x_in_c + local_c``, a scan over
L / chunk_size steps of [batch, d, n] arrays); every chunk scanned again from
its true entering state, writing y. The adjoint recurrence below is linear too,
with the same decays, and is split the same way: a light kernel finds the
adjoint each chunk passes to its left from a zero right end, XLA carries the
true ones right to left, then the backward kernel runs every chunk in
parallel. One chunk (``chunk_size >= L``) is the plain one-pass scan.

Backward (the adjoint recurrence). With a_t and b_t = dt_t u_t B_t as above and
cotangents gy_t (of y_t) and g_last (of x_{L-1}), the total derivative of the
loss with respect to the state x_t is

    lambda_{L-1} = g_last + gy_{L-1} C_{L-1}
    lambda_t     = a_{t+1} * lambda_{t+1} + gy_t C_t            (t < L-1)

(elementwise over [d, n]; gy_t broadcasts over n). Since x_t depends on a_t,
b_t and C_t only through the two equations above:

    dC_t   = gy_t x_t                    (summed over the channels sharing C_t)
    db_t   = lambda_t,   da_t = lambda_t * x_{t-1}
    ddt_t  = sum_n (da_t * a_t * A) + u_t sum_n (lambda_t B_t)
    du_t   = dt_t sum_n (lambda_t B_t)
    dA    += da_t * a_t * dt_t           (summed over t and batch)
    dB_t   = lambda_t dt_t u_t           (summed over the channels sharing B_t)

The backward kernel walks the sequence blocks in reverse. For each block it
reloads the saved state entering the block, recomputes the block's states
x_{t0-1} .. x_{t0+T-1} forwards (kept in registers: ``seq_block + 1`` arrays of
``[channel_block, n]``), then steps the adjoint ``h`` backwards through the
block: ``h += gy_t C_t`` (now lambda_t), emit the gradients above, ``h = a_t h``.
Gradients summed over channels that belong to another program (time-varying
dB, dC) are written per channel block and summed in XLA; those summed over
time (dA, time-invariant dB, dC) are accumulated in the program and summed
over batch in XLA.

Backends. Written for Pallas's Triton lowering on NVIDIA GPUs: power-of-two
register arrays ([channel_block, n_pad], [channel_block, 1], [1, n_pad]),
per-step loads through ``pl.ds`` with a static size, no scratch buffers. The
wrapper pads n to a power of two (zero A, B, C columns: the padded state stays
exactly 0) and L to a multiple of ``seq_block`` (zero dt: the state passes
through unchanged). On CPU it runs with ``interpret=True``. Mosaic TPU rejects
this kernel (its per-step loads slice the lane, last, dimension dynamically);
effformer/kernels/selective_scan_tpu.py is the TPU version, and the op picks it there.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from effformer.kernels import selective_scan_mosaic_gpu

Array = jax.Array

# Block sizes for a GPU, from experiments/benchmarks/kernels_selective_scan.py --sweep
# on an H200 (results in experiments/benchmarks/README.md).
DEFAULT_SEQ_BLOCK = 16
# Interpret mode unrolls the same steps into an XLA program whose compile time
# grows with them (measured on the shared 2-core CPU: about 0.85 s per unrolled step for
# forward + backward), while its speed does not matter; so a shorter block there.
INTERPRET_SEQ_BLOCK = 4
DEFAULT_CHANNEL_BLOCK = 8
# Sequence chunks and warps from the scan_sweep stage of kernels_gpu_session.sh on an
# H200 (experiments/benchmarks/README.md, "Pallas kernels on an NVIDIA H200: second
# session"; batch 2, d 1536, n 16, L 4096, channel block 8): 256-step
# chunks with one warp ran the kernel in 0.66 ms forward and 2.13 ms forward + backward,
# against 1.77 and 3.96 ms for the one-pass scan (2 warps, its best in the first session).
# With two warps the chunked scan was ~2x slower forward (1.35 ms): more warps per
# program only add idle lanes to a [8, 16] state, and fewer resident programs.
DEFAULT_CHUNK_SIZE = 256
DEFAULT_NUM_WARPS_CHUNKED = 1
# One chunk (sequences of at most DEFAULT_CHUNK_SIZE steps, or chunk_size=None).
DEFAULT_NUM_WARPS = 2

_log = logging.getLogger(__name__)


@functools.cache
def _log_interpret_once() -> None:
    _log.info(
        "selective_scan: no GPU backend; running the Pallas kernel with interpret=True "
        "(correct but slow: use implementation='chunked' for speed on CPU)."
    )


def supported_backend(backend: str | None = None) -> bool:
    """Whether the kernel runs on ``backend`` (default: JAX's default backend).

    GPU (Triton lowering) compiles it; CPU runs it in interpret mode; TPU has
    its own kernel (effformer/kernels/selective_scan_tpu.py).
    """
    return (backend or jax.default_backend()) in ("gpu", "cuda", "rocm", "cpu")


def _next_power_of_2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def _largest_power_of_2_dividing(value: int) -> int:
    return value & -value


# ----------------------------------------------------------------------------- kernels


def _load_column(ref, t):
    """Column t of a [rows, L] ref as [rows, 1]."""
    return ref[:, pl.ds(t, 1)]


def _coefficient(ref, t, time_varying: bool, fixed):
    """B_t or C_t: [1, n] from a [L, n] ref, or the time-invariant [channel_block, n]."""
    return ref[pl.ds(t, 1), :] if time_varying else fixed


def _forward_kernel(
    *refs, seq_block, num_seq_blocks, B_varying, C_varying, has_init, write_y, save_starts
):
    """One (batch, channel block, chunk) program, walking its chunk's ``num_seq_blocks`` blocks.

    Refs in order: inputs u, dt [cb, T] (T the chunk's steps), A [cb, n], B, C
    ([T, n] or [cb, n]), the state entering the chunk [cb, n] if ``has_init``
    (else 0); outputs y [cb, T] if ``write_y``, the state after the chunk
    [cb, n], and the states entering each block [num_seq_blocks, cb, n] if
    ``save_starts``.
    """
    u_ref, dt_ref, A_ref, B_ref, C_ref, *rest = refs
    init_ref = rest.pop(0) if has_init else None
    y_ref = rest.pop(0) if write_y else None
    last_ref = rest.pop(0)
    starts_ref = rest.pop(0) if save_starts else None
    A = A_ref[...]
    B_fixed = None if B_varying else B_ref[...]
    C_fixed = None if C_varying else C_ref[...]

    def run_block(k, x):
        if starts_ref is not None:
            starts_ref[k] = x
        t0 = pl.multiple_of(k * seq_block, seq_block)
        for i in range(seq_block):
            t = t0 + i
            dt_t = _load_column(dt_ref, t)
            x = jnp.exp(dt_t * A) * x + (dt_t * _load_column(u_ref, t)) * _coefficient(
                B_ref, t, B_varying, B_fixed
            )
            if y_ref is not None:
                C_t = _coefficient(C_ref, t, C_varying, C_fixed)
                y_ref[:, pl.ds(t, 1)] = jnp.sum(x * C_t, axis=1, keepdims=True)
        return x

    x0 = init_ref[...] if init_ref is not None else jnp.zeros(A.shape, A.dtype)
    last_ref[...] = jax.lax.fori_loop(0, num_seq_blocks, run_block, x0)


def _adjoint_carry_kernel(
    dt_ref, A_ref, C_ref, gy_ref, carry_ref, *, seq_block, num_seq_blocks, C_varying
):
    """The adjoint leaving a chunk backwards when none enters it: ``a_{t0} lambda_{t0}``.

    Refs: dt, gy [cb, T]; A [cb, n]; C [T, n] or [cb, n]; output carry [cb, n].
    The first pass of the chunked backward (module docstring, "Sequence chunks").
    """
    A = A_ref[...]
    C_fixed = None if C_varying else C_ref[...]

    def run_block(j, h):
        t0 = pl.multiple_of((num_seq_blocks - 1 - j) * seq_block, seq_block)
        for i in reversed(range(seq_block)):
            t = t0 + i
            h = h + _load_column(gy_ref, t) * _coefficient(C_ref, t, C_varying, C_fixed)
            h = jnp.exp(_load_column(dt_ref, t) * A) * h
        return h

    zeros = jnp.zeros(A.shape, A.dtype)
    carry_ref[...] = jax.lax.fori_loop(0, num_seq_blocks, run_block, zeros)


def _backward_kernel(
    u_ref, dt_ref, A_ref, B_ref, C_ref, starts_ref, gy_ref, carry_ref,
    du_ref, ddt_ref, dA_ref, dB_ref, dC_ref,
    *, seq_block, num_seq_blocks, B_varying, C_varying,
):  # fmt: skip
    """The adjoint recurrence of the module docstring over one chunk, blocks in reverse.

    Refs: u, dt, gy, du, ddt [cb, T]; A, dA [cb, n]; carry [cb, n] (the adjoint
    entering the chunk from its right: the last state's cotangent for the last
    chunk); B, C [T, n] or [cb, n]; starts [num_seq_blocks, cb, n]; dB, dC
    [T, n] (per-channel-block partial sums) when time-varying, else [cb, n]
    (per-chunk partial sums, like dA).
    """
    A = A_ref[...]
    B_fixed = None if B_varying else B_ref[...]
    C_fixed = None if C_varying else C_ref[...]
    zeros = jnp.zeros(A.shape, A.dtype)

    def run_block(j, carry):
        h, dA_acc, dB_acc, dC_acc = carry
        k = num_seq_blocks - 1 - j
        t0 = pl.multiple_of(k * seq_block, seq_block)
        # Recompute the block's states from the saved one; states[i] = x_{t0+i-1}.
        states = [starts_ref[k]]
        steps = []
        for i in range(seq_block):
            t = t0 + i
            dt_t, u_t = _load_column(dt_ref, t), _load_column(u_ref, t)
            B_t = _coefficient(B_ref, t, B_varying, B_fixed)
            C_t = _coefficient(C_ref, t, C_varying, C_fixed)
            a_t = jnp.exp(dt_t * A)
            states.append(a_t * states[-1] + (dt_t * u_t) * B_t)
            steps.append((t, dt_t, u_t, B_t, C_t, a_t))
        for i in reversed(range(seq_block)):
            t, dt_t, u_t, B_t, C_t, a_t = steps[i]
            gy_t = _load_column(gy_ref, t)
            h = h + gy_t * C_t  # lambda_t
            x_prev, x_t = states[i], states[i + 1]
            dC_t = gy_t * x_t
            da_a = h * x_prev * a_t  # d loss / d(dt_t * A), elementwise
            hB_sum = jnp.sum(h * B_t, axis=1, keepdims=True)
            ddt_ref[:, pl.ds(t, 1)] = jnp.sum(da_a * A, axis=1, keepdims=True) + u_t * hB_sum
            du_ref[:, pl.ds(t, 1)] = dt_t * hB_sum
            dA_acc = dA_acc + da_a * dt_t
            dB_t = h * (dt_t * u_t)
            if B_varying:
                dB_ref[pl.ds(t, 1), :] = jnp.sum(dB_t, axis=0, keepdims=True)
            else:
                dB_acc = dB_acc + dB_t
            if C_varying:
                dC_ref[pl.ds(t, 1), :] = jnp.sum(dC_t, axis=0, keepdims=True)
            else:
                dC_acc = dC_acc + dC_t
            h = a_t * h  # a_t lambda_t: the part of lambda_{t-1} that flows through x_t
        return h, dA_acc, dB_acc, dC_acc

    init = (carry_ref[...], zeros, zeros, zeros)
    _, dA_acc, dB_acc, dC_acc = jax.lax.fori_loop(0, num_seq_blocks, run_block, init)
    dA_ref[...] = dA_acc
    if not B_varying:
        dB_ref[...] = dB_acc
    if not C_varying:
        dC_ref[...] = dC_acc


# ----------------------------------------------------------------------------- layout


class _Layout:
    """Static sizes of one call: the padded lengths, the blocks, the chunks, the B/C groups."""

    def __init__(self, u_shape, n, B, C, seq_block, channel_block, chunk_size):
        self.batch, self.d, self.length = u_shape
        chunk_size = self.length if chunk_size is None else chunk_size
        self.n = n
        self.n_pad = _next_power_of_2(self.n)
        self.seq_block = min(seq_block, self.length)  # no padded steps for short inputs
        blocks = -(-self.length // self.seq_block)
        # A chunk is a whole number of sequence blocks, at least chunk_size steps.
        self.blocks_per_chunk = min(blocks, -(-chunk_size // self.seq_block))
        self.num_chunks = -(-blocks // self.blocks_per_chunk)
        self.chunk_len = self.blocks_per_chunk * self.seq_block
        self.num_seq_blocks = self.num_chunks * self.blocks_per_chunk
        self.length_pad = self.num_chunks * self.chunk_len
        self.groups = {
            name: (BC.shape[1] if BC.ndim == 4 else 1) for name, BC in (("B", B), ("C", C))
        }
        self.varying = {"B": B.ndim > 2, "C": C.ndim > 2}
        # A channel block must lie inside one group of B and of C, and be a power of two.
        common_group_size = self.d // math.lcm(*self.groups.values())
        self.cb = min(channel_block, _largest_power_of_2_dividing(common_group_size))
        self.num_channel_blocks = self.d // self.cb
        self.grid = (self.batch, self.num_channel_blocks, self.num_chunks)

    # BlockSpecs over the grid (b, j, c): batch row, channel block, chunk.
    def per_channel(self):  # [batch, d, L_pad]
        return pl.BlockSpec((None, self.cb, self.chunk_len), lambda b, j, c: (b, j, c))

    def chunk_state(self):  # [batch, num_chunks, d, n_pad]
        return pl.BlockSpec((None, None, self.cb, self.n_pad), lambda b, j, c: (b, c, j, 0))

    def channel_matrix(self):  # [d, n_pad]
        return pl.BlockSpec((self.cb, self.n_pad), lambda b, j, c: (j, 0))

    def starts(self):  # [batch, num_seq_blocks, d, n_pad]
        return pl.BlockSpec(
            (None, self.blocks_per_chunk, self.cb, self.n_pad), lambda b, j, c: (b, c, j, 0)
        )

    def coefficient(self, name):  # B or C: [batch, groups, L_pad, n_pad] or [d, n_pad]
        if not self.varying[name]:
            return self.channel_matrix()
        group_size = self.d // self.groups[name]
        return pl.BlockSpec(
            (None, None, self.chunk_len, self.n_pad),
            lambda b, j, c: (b, (j * self.cb) // group_size, c, 0),
        )

    def coefficient_grad(self, name):  # per channel block [batch, blocks, L_pad, n_pad]
        if not self.varying[name]:
            return self.chunk_state()
        return pl.BlockSpec((None, None, self.chunk_len, self.n_pad), lambda b, j, c: (b, j, c, 0))

    def chunk_state_shape(self, dtype):
        return jax.ShapeDtypeStruct((self.batch, self.num_chunks, self.d, self.n_pad), dtype)

    # Array conversions between the op's layout and the kernel's.
    def pad_time(self, a):  # [batch, d, L] -> [batch, d, L_pad], zeros appended
        return jnp.pad(a, ((0, 0), (0, 0), (0, self.length_pad - self.length)))

    def pad_state(self, a):  # [..., n] -> [..., n_pad], zeros appended
        return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, self.n_pad - self.n)])

    def to_kernel_coefficient(self, BC):  # -> [d, n_pad] or [batch, groups, L_pad, n_pad]
        if BC.ndim == 2:
            return self.pad_state(BC)
        if BC.ndim == 3:
            BC = BC[:, None]
        BC = jnp.swapaxes(BC, 2, 3)  # time-major rows, so a step loads one contiguous [1, n]
        pad = ((0, 0), (0, 0), (0, self.length_pad - self.length), (0, self.n_pad - self.n))
        return jnp.pad(BC, pad)

    def from_kernel_coefficient_grad(self, name, grad, like):
        """Sum the per-block partials and return the gradient in ``like``'s layout."""
        if not self.varying[name]:  # [batch, num_chunks, d, n_pad]
            return jnp.sum(grad, axis=(0, 1))[:, : self.n]
        groups = self.groups[name]
        grad = grad.reshape(self.batch, groups, -1, self.length_pad, self.n_pad).sum(axis=2)
        grad = jnp.swapaxes(grad[:, :, : self.length, : self.n], 2, 3)
        return grad.reshape(like.shape)

    def chunk_decay(self, dt, A):
        """prod_{t in chunk c} a_t = exp(A sum_t dt_t): [batch, num_chunks, d, n_pad]."""
        dt_sums = dt.reshape(self.batch, self.d, self.num_chunks, self.chunk_len).sum(axis=-1)
        return jnp.exp(jnp.swapaxes(dt_sums, 1, 2)[..., None] * A)


# ----------------------------------------------------------------------------- calls


def _compiler_params(num_warps: int, interpret: bool):
    # Triton compiler parameters select Pallas's Triton lowering on GPU (the
    # default GPU lowering of jax 0.10 is Mosaic GPU); interpret mode ignores them.
    return None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


def _forward_pass(args, init, layout: _Layout, num_warps, interpret, write_y, save_starts):
    """One launch of the forward kernel over every (batch row, channel block, chunk).

    ``args``: padded kernel-layout u, dt, A, B, C; ``init``: the state entering
    each chunk [batch, num_chunks, d, n_pad], or None (zero). Returns y (or None),
    the state leaving each chunk [batch, num_chunks, d, n_pad] and the states
    entering each sequence block [batch, num_seq_blocks, d, n_pad] (or None).
    """
    u = args[0]
    dtype = u.dtype
    in_specs = [
        layout.per_channel(),
        layout.per_channel(),
        layout.channel_matrix(),
        layout.coefficient("B"),
        layout.coefficient("C"),
    ]
    if init is not None:
        args = (*args, init)
        in_specs.append(layout.chunk_state())
    out_shape, out_specs = [], []
    if write_y:
        out_shape.append(jax.ShapeDtypeStruct(u.shape, dtype))
        out_specs.append(layout.per_channel())
    out_shape.append(layout.chunk_state_shape(dtype))
    out_specs.append(layout.chunk_state())
    if save_starts:
        out_shape.append(
            jax.ShapeDtypeStruct(
                (layout.batch, layout.num_seq_blocks, layout.d, layout.n_pad), dtype
            )
        )
        out_specs.append(layout.starts())
    kernel = functools.partial(
        _forward_kernel,
        seq_block=layout.seq_block,
        num_seq_blocks=layout.blocks_per_chunk,
        B_varying=layout.varying["B"],
        C_varying=layout.varying["C"],
        has_init=init is not None,
        write_y=write_y,
        save_starts=save_starts,
    )
    outs = list(
        pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=layout.grid,
            in_specs=in_specs,
            out_specs=out_specs,
            interpret=interpret,
            compiler_params=_compiler_params(num_warps, interpret),
            name="selective_scan_forward" if write_y else "selective_scan_chunk_states",
        )(*args)
    )
    y = outs.pop(0) if write_y else None
    last = outs.pop(0)
    starts = outs.pop(0) if save_starts else None
    return y, last, starts


def _forward(args, layout: _Layout, num_warps, interpret, save_starts, mosaic=False):
    """Padded kernel-layout inputs -> y [batch, d, L_pad], last [batch, d, n_pad], starts.

    With several chunks: a first pass finds the state each chunk produces from
    a zero start, XLA carries the true chunk-entering states across chunks
    (``x_in[c + 1] = decay[c] * x_in[c] + local[c]``), and a second pass reruns
    every chunk from its true start, writing y. ``mosaic``: both passes on the Mosaic
    GPU kernel (:mod:`effformer.kernels.selective_scan_mosaic_gpu`, same contract).
    """
    if mosaic:
        forward_pass = functools.partial(_mosaic_forward_pass, interpret=interpret)
    else:
        forward_pass = functools.partial(_forward_pass, num_warps=num_warps, interpret=interpret)
    init = None
    if layout.num_chunks > 1:
        _, local, _ = forward_pass(args, None, layout, write_y=False, save_starts=False)
        decay = layout.chunk_decay(args[1], args[2])

        def step(x, decay_and_local):
            chunk_decay, chunk_local = decay_and_local
            return chunk_decay * x + chunk_local, x

        to_chunk_major = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731
        _, init = jax.lax.scan(
            step, jnp.zeros_like(local[:, 0]), (to_chunk_major(decay), to_chunk_major(local))
        )
        init = jnp.moveaxis(init, 0, 1)
    y, last, starts = forward_pass(args, init, layout, write_y=True, save_starts=save_starts)
    return y, last[:, -1], starts


def _mosaic_forward_pass(args, init, layout, *, interpret, write_y, save_starts):
    return selective_scan_mosaic_gpu.forward_pass(
        args, init, layout, interpret, write_y, save_starts
    )


def _adjoint_carries(dt, A, C, gy, glast, layout: _Layout, num_warps, interpret, mosaic=False):
    """The adjoint entering each chunk from its right, [batch, num_chunks, d, n_pad].

    The last chunk gets the last state's cotangent. Each other chunk c gets
    ``decay[c + 1] * carry[c + 1] + local[c + 1]``, where ``local`` is the adjoint
    a chunk passes on when none enters it (one launch of the carry kernel).
    """
    if layout.num_chunks == 1:
        return glast[:, None]
    if mosaic:
        local = selective_scan_mosaic_gpu.adjoint_carry_pass(dt, A, C, gy, layout, interpret)
    else:
        local = _adjoint_carry_locals(dt, A, C, gy, layout, num_warps, interpret)
    decay = layout.chunk_decay(dt, A)

    def step(h, decay_and_local):  # h enters chunk c + 1; returns what enters chunk c
        chunk_decay, chunk_local = decay_and_local
        passed_on = chunk_decay * h + chunk_local
        return passed_on, passed_on

    # Chunks right to left over c + 1 = C - 1 .. 1; output c is what enters chunk c.
    to_chunk_major = lambda a: jnp.moveaxis(a, 1, 0)[1:]  # noqa: E731
    _, carries = jax.lax.scan(
        step, glast, (to_chunk_major(decay), to_chunk_major(local)), reverse=True
    )
    return jnp.concatenate([jnp.moveaxis(carries, 0, 1), glast[:, None]], axis=1)


def _adjoint_carry_locals(dt, A, C, gy, layout: _Layout, num_warps, interpret):
    """One launch of the carry kernel: the adjoint each chunk passes on when none enters it."""
    kernel = functools.partial(
        _adjoint_carry_kernel,
        seq_block=layout.seq_block,
        num_seq_blocks=layout.blocks_per_chunk,
        C_varying=layout.varying["C"],
    )
    return pl.pallas_call(
        kernel,
        out_shape=layout.chunk_state_shape(dt.dtype),
        grid=layout.grid,
        in_specs=[
            layout.per_channel(),
            layout.channel_matrix(),
            layout.coefficient("C"),
            layout.per_channel(),
        ],
        out_specs=layout.chunk_state(),
        interpret=interpret,
        compiler_params=_compiler_params(num_warps, interpret),
        name="selective_scan_adjoint_carries",
    )(dt, A, C, gy)


def _backward(
    u, dt, A, B, C, starts, gy, glast, layout: _Layout, num_warps, interpret, mosaic=False
):
    """Padded kernel-layout inputs and cotangents -> du, ddt, dA, dB, dC partials.

    ``mosaic``: both kernels on Mosaic GPU (``layout.cb`` 64; same contract).
    """
    dtype = u.dtype
    carries = _adjoint_carries(dt, A, C, gy, glast, layout, num_warps, interpret, mosaic)
    if mosaic:
        return selective_scan_mosaic_gpu.backward_pass(
            u, dt, A, B, C, starts, gy, carries, layout, interpret
        )

    def coefficient_grad_shape(name):
        if layout.varying[name]:
            shape = (layout.batch, layout.num_channel_blocks, layout.length_pad, layout.n_pad)
            return jax.ShapeDtypeStruct(shape, dtype)
        return layout.chunk_state_shape(dtype)

    kernel = functools.partial(
        _backward_kernel,
        seq_block=layout.seq_block,
        num_seq_blocks=layout.blocks_per_chunk,
        B_varying=layout.varying["B"],
        C_varying=layout.varying["C"],
    )
    return pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(u.shape, dtype),
            jax.ShapeDtypeStruct(u.shape, dtype),
            layout.chunk_state_shape(dtype),
            coefficient_grad_shape("B"),
            coefficient_grad_shape("C"),
        ],
        grid=layout.grid,
        in_specs=[
            layout.per_channel(),
            layout.per_channel(),
            layout.channel_matrix(),
            layout.coefficient("B"),
            layout.coefficient("C"),
            layout.starts(),
            layout.per_channel(),
            layout.chunk_state(),
        ],
        out_specs=[
            layout.per_channel(),
            layout.per_channel(),
            layout.chunk_state(),
            layout.coefficient_grad("B"),
            layout.coefficient_grad("C"),
        ],
        interpret=interpret,
        compiler_params=_compiler_params(num_warps, interpret),
        name="selective_scan_backward",
    )(u, dt, A, B, C, starts, gy, carries)


def _to_kernel_layout(u, dt, A, B, C, layout: _Layout):
    return (
        layout.pad_time(u),
        layout.pad_time(dt),
        layout.pad_state(A),
        layout.to_kernel_coefficient(B),
        layout.to_kernel_coefficient(C),
    )


def _mosaic_layout(u, A, B, C, seq_block, channel_block, chunk_size, mosaic: bool):
    # The Mosaic GPU kernels run 64 channels per program. The forward's residuals (the
    # block-entering states) do not depend on the channel block, so the forward and the
    # backward may each use their own.
    channels = selective_scan_mosaic_gpu.CHANNELS if mosaic else channel_block
    return _Layout(u.shape, A.shape[1], B, C, seq_block, channels, chunk_size)


# ``mosaic``: (forward, backward) on the Mosaic GPU kernels (selective_scan_mosaic_gpu.py).
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _scan(u, dt, A, B, C, seq_block, channel_block, chunk_size, num_warps, interpret, mosaic):
    layout = _mosaic_layout(u, A, B, C, seq_block, channel_block, chunk_size, mosaic[0])
    args = _to_kernel_layout(u, dt, A, B, C, layout)
    y, last, _ = _forward(args, layout, num_warps, interpret, False, mosaic[0])
    return y[..., : layout.length], last[..., : layout.n]


def _scan_fwd(u, dt, A, B, C, seq_block, channel_block, chunk_size, num_warps, interpret, mosaic):
    layout = _mosaic_layout(u, A, B, C, seq_block, channel_block, chunk_size, mosaic[0])
    args = _to_kernel_layout(u, dt, A, B, C, layout)
    y, last, starts = _forward(args, layout, num_warps, interpret, True, mosaic[0])
    # Residuals: the (padded) inputs, the original B and C (for their layout),
    # and the states entering each sequence block; nothing of size L * n per channel.
    return (y[..., : layout.length], last[..., : layout.n]), (args, starts, B, C)


def _scan_bwd(
    seq_block, channel_block, chunk_size, num_warps, interpret, mosaic, residuals, cotangents
):
    args, starts, B, C = residuals
    gy, glast = cotangents
    # The cotangents have the unpadded shapes of y [batch, d, L] and the state [batch, d, n].
    n = glast.shape[-1]
    A_like = jax.ShapeDtypeStruct((gy.shape[1], n), gy.dtype)
    layout = _mosaic_layout(gy, A_like, B, C, seq_block, channel_block, chunk_size, mosaic[1])
    du, ddt, dA, dB, dC = _backward(
        *args, starts, layout.pad_time(gy), layout.pad_state(glast), layout, num_warps,
        interpret, mosaic[1],
    )  # fmt: skip
    length = layout.length
    return (
        du[..., :length],
        ddt[..., :length],
        jnp.sum(dA, axis=(0, 1))[:, :n],
        layout.from_kernel_coefficient_grad("B", dB, B),
        layout.from_kernel_coefficient_grad("C", dC, C),
    )


_scan.defvjp(_scan_fwd, _scan_bwd)


def _check(name: str, condition: bool, expected: str, got) -> None:
    if not condition:
        raise ValueError(f"selective_scan_pallas: {name} must be {expected}, got {got}.")


def selective_scan_pallas(
    u: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    seq_block: int | None = None,
    channel_block: int = DEFAULT_CHANNEL_BLOCK,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    num_warps: int | None = None,
    interpret: bool | None = None,
    mosaic_forward: bool = False,
    mosaic_backward: bool = False,
) -> tuple[Array, Array]:
    """The core recurrence of the selective scan as a Pallas kernel, differentiable.

    Args:
      u, dt: [batch, d, L]; ``dt`` already has delta bias, softplus and the
        padding mask applied (effformer.ops.selective_scan does this).
      A: [d, n].
      B, C: [d, n], [batch, n, L] or [batch, groups, n, L] (channel c uses group
        c // (d // groups)).
      seq_block: time steps per sequence block (unrolled in the kernel; the
        backward saves one state per block); None: ``DEFAULT_SEQ_BLOCK``, or
        ``INTERPRET_SEQ_BLOCK`` in interpret mode.
      channel_block: channels per program, a power of two; reduced to the largest
        power of two dividing the channels of one B/C group when smaller.
      chunk_size: time steps per program (rounded up to whole sequence blocks):
        the sequence is cut into chunks scanned in parallel, then joined (module
        docstring, "Sequence chunks"). None or a chunk_size >= L scans the whole
        sequence in one program per channel block, one pass.
      num_warps: Triton warps per program (GPU only); None: ``DEFAULT_NUM_WARPS_CHUNKED``
        when the sequence is cut into chunks, else ``DEFAULT_NUM_WARPS``.
      interpret: run in Pallas interpret mode; None: on CPU only (logged once).
      mosaic_forward, mosaic_backward: run the forward passes, the backward's two
        kernels, or both on Mosaic GPU (:mod:`effformer.kernels.selective_scan_mosaic_gpu`,
        64 channels per program; Mosaic GPU's interpreter on CPU) instead of Triton;
        they mix (same residuals). float32, ``n`` of at least 5 (padded to a power
        of two >= 8), the channels of each B/C group a multiple of 64.
    Returns:
      y [batch, d, L] (= sum_n C_t x_t, before D and z) and the last state
      [batch, d, n], both in the inputs' dtype (float32 or float64).
    """
    _check("u", getattr(u, "ndim", None) == 3, "[batch, d, L]", getattr(u, "shape", u))
    batch, d, length = u.shape
    _check("u", length >= 1, "[batch, d, L] with L >= 1", tuple(u.shape))
    dtype = u.dtype
    _check("u.dtype", dtype in (jnp.float32, jnp.float64), "float32 or float64", dtype)
    _check("dt", dt.shape == u.shape, f"shaped {tuple(u.shape)} like u", tuple(dt.shape))
    _check("A", A.ndim == 2 and A.shape[0] == d, f"[d={d}, n]", tuple(A.shape))
    n = A.shape[1]
    for name, BC in (("B", B), ("C", C)):
        groups = BC.shape[1] if BC.ndim == 4 else 1
        ok = (
            (BC.ndim == 2 and BC.shape == (d, n))
            or (BC.ndim == 3 and BC.shape == (batch, n, length))
            or (BC.ndim == 4 and BC.shape == (batch, groups, n, length) and d % groups == 0)
        )
        _check(name, ok, f"[{d}, {n}], [{batch}, {n}, {length}] or [{batch}, groups, {n}, {length}]",
               tuple(BC.shape))  # fmt: skip
    for name, value in (("dt", dt), ("A", A), ("B", B), ("C", C)):
        _check(f"{name}.dtype", value.dtype == dtype, f"{dtype} (that of u)", value.dtype)
    positive = lambda value: isinstance(value, int) and value >= 1
    _check(
        "seq_block", seq_block is None or positive(seq_block), "None or a positive int", seq_block
    )
    _check("num_warps", num_warps is None or positive(num_warps), "None or a positive int",
           num_warps)  # fmt: skip
    _check(
        "chunk_size",
        chunk_size is None or positive(chunk_size),
        "None or a positive int",
        chunk_size,
    )
    _check(
        "channel_block",
        isinstance(channel_block, int)
        and channel_block >= 1
        and channel_block & (channel_block - 1) == 0,
        "a power of two",
        channel_block,
    )
    if mosaic_forward or mosaic_backward:
        flags = "mosaic_forward / mosaic_backward"
        _check("u.dtype", dtype == jnp.float32, f"float32 with {flags}", dtype)
        _check("A", _next_power_of_2(n) % 8 == 0, f"[d, n] with n >= 5 with {flags}",
               tuple(A.shape))  # fmt: skip
        groups = max(BC.shape[1] if BC.ndim == 4 else 1 for BC in (B, C))
        _check(
            "the channels per B/C group",
            (d // groups) % selective_scan_mosaic_gpu.CHANNELS == 0,
            f"a multiple of {selective_scan_mosaic_gpu.CHANNELS} with {flags}",
            d // groups,
        )
    if interpret is None:
        # interpret=False stays allowed on CPU: lowering for a GPU from a CPU host
        # (``.lower(lowering_platforms=("cuda",))``) checks the Triton lowering.
        interpret = jax.default_backend() == "cpu"
        if interpret:
            _log_interpret_once()
    if seq_block is None:
        seq_block = INTERPRET_SEQ_BLOCK if interpret else DEFAULT_SEQ_BLOCK
    if num_warps is None:
        chunked = chunk_size is not None and chunk_size < length
        num_warps = DEFAULT_NUM_WARPS_CHUNKED if chunked else DEFAULT_NUM_WARPS
    return _scan(
        u, dt, A, B, C, seq_block, channel_block, chunk_size, num_warps, bool(interpret),
        (bool(mosaic_forward), bool(mosaic_backward)),
    )  # fmt: skip
