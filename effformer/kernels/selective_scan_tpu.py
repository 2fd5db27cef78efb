"""Mosaic TPU Pallas kernel for the core recurrence of Mamba's selective scan.

The same computation and the same adjoint backward as the GPU kernel
(effformer/kernels/selective_scan.py, whose module docstring has the equations):

    x_t = exp(dt_t * A) * x_{t-1} + dt_t * u_t * B_t,   x_{-1} = 0
    y_t = sum_n C_t * x_t

on inputs the op has pre-processed (delta bias, softplus and the padding mask
folded into ``dt``). This module only differs in how the work is laid out for
Mosaic TPU, whose vector registers are [8 sublanes, 128 lanes] tiles and whose
blocks must be (8, 128)-tiled in their last two dimensions.

Layout.
  * The state of a channel block is ``[n, channel_block]``: n on sublanes,
    channels on lanes (n = 16 fills two sublane tiles; channels fill lanes).
  * u, dt and y are transposed in the wrapper to time-major ``[batch, L, d]``
    (as ``[batch, groups, L, d / groups]``, see below) and cut into
    ``[seq_block, channel_block]`` blocks, so step t of a block is a static
    sublane slice ``ref[t:t+1, :]`` of shape [1, channel_block] that broadcasts
    over the state's sublanes, and y_t (a sum over sublanes) is stored the same
    way. Keeping the op's ``[batch, d, L]`` would put time on lanes and need a
    lane-to-sublane transpose at every step. The Mamba mixer produces these
    arrays time-major and transposes them for the op, so under ``jit`` XLA can
    cancel the two transposes.
  * Time-varying B and C are needed as [n, 1] columns broadcast over the
    channel lanes. The wrapper lays them out as ``[batch, groups, L / seq_block,
    n, seq_block]``: one [n, seq_block] block per sequence block, whose last two
    dimensions are the array's (so any ``seq_block`` satisfies the tiling
    rule; in HBM each block's lanes are padded to 128, which costs little since
    B and C are d / n times smaller than u). Step t takes the static lane slice
    ``ref[:, t:t+1]``.
  * Time-invariant B and C, and A, are ``[n, d]`` (as ``[groups, n, d / groups]``).
  * Grouped B/C: a channel block must lie inside one group. The channels are
    viewed as ``[G, d / G]`` with G the lcm of B's and C's group counts (1 when
    neither is grouped) and a channel block is a 128-multiple slice of one
    group, or the whole group when d / G is not a multiple of 128 (a block may
    span the whole last dimension whatever its size).
  * n is padded to a multiple of 8 with zero A, B, C rows (the padded state
    stays exactly 0) and L to a multiple of ``seq_block`` with dt = 0 (the
    state passes through unchanged; the padded steps' outputs are dropped).

Forward grid (batch, channel blocks, sequence blocks), the sequence axis
"arbitrary" (sequential on one core), so the state persists in a VMEM scratch
buffer from one sequence block to the next; the steps inside a block are a
static Python loop (static slices only). It writes y, the last state and, for
the backward, the state entering each sequence block; the [batch, L, d, n]
states are never written to memory.

Backward grid: the same, the sequence blocks walked in reverse (index maps
with ``num_seq_blocks - 1 - k``). Each step reloads the state entering its
block, recomputes the block's states into a VMEM scratch buffer
``[seq_block + 1, n, channel_block]``, then steps the adjoint backwards (the
GPU docstring's equations), the adjoint carried across blocks in scratch.
dA and time-invariant dB/dC are accumulated in scratch over the sequence axis
and written per batch element (summed over batch in XLA); time-varying dB/dC
(sums over the channels sharing B_t/C_t) are written per channel block as
[n, seq_block] blocks, each column selected into place with a lane mask
(``where(lane == t, column, block)``) rather than a 1-lane store, and summed
over the channel blocks of a group in XLA.

Status: no TPU was available when this was written. It is checked in Pallas's
TPU interpret mode on CPU against the op's reference, and its forward and
backward lower to Mosaic MLIR from a CPU host (Pallas's lowering rules only:
Mosaic's layout passes and libtpu's compiler have not seen it, and it has never
run on a TPU). The default block sizes are untuned guesses.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array

# Untuned guesses (no TPU available): 32 unrolled steps per sequence block; 256
# channels = two lane tiles, so a [16, 256] float32 state is 4 vector registers.
DEFAULT_SEQ_BLOCK = 32
DEFAULT_CHANNEL_BLOCK = 256
_SUBLANES, _LANES = 8, 128


def supported_backend(backend: str | None = None) -> bool:
    """Whether this kernel compiles for ``backend`` (default: JAX's default backend)."""
    return (backend or jax.default_backend()) == "tpu"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# ----------------------------------------------------------------------------- kernels


def _forward_kernel(
    u_ref, dt_ref, A_ref, B_ref, C_ref, y_ref, last_ref, *rest,
    seq_block, B_varying, C_varying, save_starts,
):  # fmt: skip
    """One (batch, channel block, sequence block) step.

    Refs: u, dt, y [seq_block, cb]; A, last [n, cb]; B, C [n, seq_block] when
    time-varying, else [n, cb]; starts (optional) [n, cb], the state entering
    this block; scratch x [n, cb], the state carried across sequence blocks.
    """
    starts_ref, x_ref = rest if save_starts else (None, *rest)
    k, num_seq_blocks = pl.program_id(2), pl.num_programs(2)

    @pl.when(k == 0)
    def _init():
        x_ref[...] = jnp.zeros(x_ref.shape, x_ref.dtype)

    x = x_ref[...]
    if save_starts:
        starts_ref[...] = x
    A = A_ref[...]
    B_fixed = None if B_varying else B_ref[...]
    C_fixed = None if C_varying else C_ref[...]
    for t in range(seq_block):
        dt_t = dt_ref[t : t + 1, :]  # [1, cb]
        B_t = B_ref[:, t : t + 1] if B_varying else B_fixed  # [n, 1] or [n, cb]
        C_t = C_ref[:, t : t + 1] if C_varying else C_fixed
        x = jnp.exp(dt_t * A) * x + (dt_t * u_ref[t : t + 1, :]) * B_t
        y_ref[t : t + 1, :] = jnp.sum(x * C_t, axis=0, keepdims=True)
    x_ref[...] = x

    @pl.when(k == num_seq_blocks - 1)
    def _finish():
        last_ref[...] = x


def _backward_kernel(
    u_ref, dt_ref, A_ref, B_ref, C_ref, starts_ref, gy_ref, glast_ref,
    du_ref, ddt_ref, dA_ref, dB_ref, dC_ref,
    h_ref, states_ref, dA_acc_ref, *acc_refs,
    seq_block, B_varying, C_varying,
):  # fmt: skip
    """One step of the adjoint recurrence, sequence blocks visited in reverse.

    Refs: u, dt, gy, du, ddt [seq_block, cb] (this block); A, glast, dA [n, cb];
    B, C and dB, dC [n, seq_block] when time-varying (dB, dC: this channel
    block's partial sums), else [n, cb]; starts [n, cb], the state entering the
    block. Scratch: h [n, cb] the adjoint; states [seq_block + 1, n, cb];
    accumulators [n, cb] for dA and the time-invariant of dB, dC.
    """
    acc_refs = list(acc_refs)
    dB_acc_ref = None if B_varying else acc_refs.pop(0)
    dC_acc_ref = None if C_varying else acc_refs.pop(0)
    k, num_seq_blocks = pl.program_id(2), pl.num_programs(2)

    @pl.when(k == 0)  # the last sequence block
    def _init():
        h_ref[...] = glast_ref[...]
        for ref in (dA_acc_ref, dB_acc_ref, dC_acc_ref):
            if ref is not None:
                ref[...] = jnp.zeros(ref.shape, ref.dtype)

    A = A_ref[...]
    B_fixed = None if B_varying else B_ref[...]
    C_fixed = None if C_varying else C_ref[...]

    def coefficients(t):
        B_t = B_ref[:, t : t + 1] if B_varying else B_fixed
        C_t = C_ref[:, t : t + 1] if C_varying else C_fixed
        return B_t, C_t

    # Recompute the block's states: states[t] = x before step t, states[t + 1] after.
    x = starts_ref[...]
    states_ref[0] = x
    for t in range(seq_block):
        dt_t = dt_ref[t : t + 1, :]
        x = jnp.exp(dt_t * A) * x + (dt_t * u_ref[t : t + 1, :]) * coefficients(t)[0]
        states_ref[t + 1] = x

    # Step the adjoint backwards through the block.
    h = h_ref[...]
    dA_acc = jnp.zeros(A.shape, A.dtype)
    dB_fixed_acc = dC_fixed_acc = dA_acc
    # Time-varying dB/dC columns, placed by a lane mask into one [n, seq_block] block.
    lane = jax.lax.broadcasted_iota(jnp.int32, (A.shape[0], seq_block), 1)
    dB_block = dC_block = jnp.zeros((A.shape[0], seq_block), A.dtype)
    for t in reversed(range(seq_block)):
        dt_t, u_t, gy_t = dt_ref[t : t + 1, :], u_ref[t : t + 1, :], gy_ref[t : t + 1, :]
        B_t, C_t = coefficients(t)
        a_t = jnp.exp(dt_t * A)  # recomputed: keeping it would double the states' VMEM
        h = h + gy_t * C_t  # lambda_t
        da_a = h * states_ref[t] * a_t  # d loss / d(dt_t * A), elementwise
        hB = jnp.sum(h * B_t, axis=0, keepdims=True)  # [1, cb]
        ddt_ref[t : t + 1, :] = jnp.sum(da_a * A, axis=0, keepdims=True) + u_t * hB
        du_ref[t : t + 1, :] = dt_t * hB
        dA_acc = dA_acc + da_a * dt_t
        dB_t = h * (dt_t * u_t)  # [n, cb]
        dC_t = gy_t * states_ref[t + 1]
        if B_varying:
            dB_block = jnp.where(lane == t, jnp.sum(dB_t, axis=1, keepdims=True), dB_block)
        else:
            dB_fixed_acc = dB_fixed_acc + dB_t
        if C_varying:
            dC_block = jnp.where(lane == t, jnp.sum(dC_t, axis=1, keepdims=True), dC_block)
        else:
            dC_fixed_acc = dC_fixed_acc + dC_t
        h = a_t * h  # the part of lambda_{t-1} that flows through x_t
    h_ref[...] = h
    dA_acc_ref[...] += dA_acc
    if B_varying:
        dB_ref[...] = dB_block
    else:
        dB_acc_ref[...] += dB_fixed_acc
    if C_varying:
        dC_ref[...] = dC_block
    else:
        dC_acc_ref[...] += dC_fixed_acc

    @pl.when(k == num_seq_blocks - 1)  # the first sequence block: totals complete
    def _finish():
        dA_ref[...] = dA_acc_ref[...]
        if not B_varying:
            dB_ref[...] = dB_acc_ref[...]
        if not C_varying:
            dC_ref[...] = dC_acc_ref[...]


# ----------------------------------------------------------------------------- layout


class _Layout:
    """Static sizes of one call and the conversions between the op's layout and the kernel's.

    Channels are viewed as ``[G, group_size]`` (G: lcm of the B and C group
    counts); channel block j is lanes ``(j % blocks_per_group) * cb`` onwards of
    channel group ``j // blocks_per_group``.
    """

    def __init__(self, u_shape, n, B, C, seq_block, channel_block):
        self.batch, self.d, self.length = u_shape
        self.n = n
        self.n_pad = _round_up(n, _SUBLANES)
        # A short input gets one block of its (8-rounded) length, not padded steps.
        self.seq_block = min(seq_block, _round_up(self.length, _SUBLANES))
        self.num_seq_blocks = -(-self.length // self.seq_block)
        self.length_pad = self.num_seq_blocks * self.seq_block
        self.varying = {"B": B.ndim > 2, "C": C.ndim > 2}
        self.groups = {"B": B.shape[1] if B.ndim == 4 else 1, "C": C.shape[1] if C.ndim == 4 else 1}
        self.G = math.lcm(self.groups["B"], self.groups["C"])
        self.group_size = self.d // self.G
        if self.group_size % _LANES == 0:
            # The largest multiple of 128 that divides the group and is <= channel_block.
            group_tiles, max_tiles = self.group_size // _LANES, channel_block // _LANES
            tiles = max(t for t in range(1, max_tiles + 1) if group_tiles % t == 0)
            self.cb = tiles * _LANES
        else:
            self.cb = self.group_size  # a block may always span the whole last dimension
        self.blocks_per_group = self.group_size // self.cb
        self.num_channel_blocks = self.G * self.blocks_per_group
        self.grid = (self.batch, self.num_channel_blocks, self.num_seq_blocks)

    # Index maps over the grid (b, j, k); ``reverse`` walks the sequence blocks backwards.
    def _seq(self, k, reverse):
        return self.num_seq_blocks - 1 - k if reverse else k

    def _group_and_offset(self, j):
        """Channel block j -> (its channel group, its block index inside the group).

        lax.div/rem, not // and %: the indices are non-negative, and Python's
        floor semantics would add a sign correction that Mosaic cannot lower off-TPU.
        """
        blocks = jnp.int32(self.blocks_per_group)  # the grid index's dtype, also under x64
        return jax.lax.div(j, blocks), jax.lax.rem(j, blocks)

    def per_step(self, reverse=False):  # [batch, G, L_pad, group_size]
        def index(b, j, k):
            group, offset = self._group_and_offset(j)
            return b, group, self._seq(k, reverse), offset

        return pl.BlockSpec((None, None, self.seq_block, self.cb), index)

    def matrix(self):  # [G, n_pad, group_size]: A, time-invariant B, C
        def index(b, j, k):
            group, offset = self._group_and_offset(j)
            return group, 0, offset

        return pl.BlockSpec((None, self.n_pad, self.cb), index)

    def state(self):  # [batch, G, n_pad, group_size]: last state and per-batch gradients
        def index(b, j, k):
            group, offset = self._group_and_offset(j)
            return b, group, 0, offset

        return pl.BlockSpec((None, None, self.n_pad, self.cb), index)

    def starts(self, reverse=False):  # [batch, num_seq_blocks, G, n_pad, group_size]
        def index(b, j, k):
            group, offset = self._group_and_offset(j)
            return b, self._seq(k, reverse), group, 0, offset

        return pl.BlockSpec((None, None, None, self.n_pad, self.cb), index)

    def coefficient(self, name, reverse=False):
        """B or C: [batch, groups, num_seq_blocks, n_pad, seq_block] or the matrix."""
        if not self.varying[name]:
            return self.matrix()
        channel_groups_per_group = self.G // self.groups[name]

        def index(b, j, k):
            group = jax.lax.div(self._group_and_offset(j)[0], jnp.int32(channel_groups_per_group))
            return b, group, self._seq(k, reverse), 0, 0

        return pl.BlockSpec((None, None, None, self.n_pad, self.seq_block), index)

    def coefficient_grad(self, name):
        """dB or dC: per channel block [batch, blocks, num_seq_blocks, n_pad, seq_block]."""
        if not self.varying[name]:
            return self.state()
        return pl.BlockSpec(
            (None, None, None, self.n_pad, self.seq_block),
            lambda b, j, k: (b, j, self.num_seq_blocks - 1 - k, 0, 0),
        )

    # Conversions.
    def to_steps(self, a):  # [batch, d, L] -> [batch, G, L_pad, group_size]
        a = a.reshape(self.batch, self.G, self.group_size, self.length)
        a = jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, self.length_pad - self.length)))
        return jnp.swapaxes(a, 2, 3)

    def from_steps(self, a):  # [batch, G, L_pad, group_size] -> [batch, d, L]
        a = jnp.swapaxes(a, 2, 3).reshape(self.batch, self.d, self.length_pad)
        return a[..., : self.length]

    def to_matrix(self, a):  # [d, n] -> [G, n_pad, group_size]
        a = jnp.pad(a, ((0, 0), (0, self.n_pad - self.n)))
        return jnp.swapaxes(a.reshape(self.G, self.group_size, self.n_pad), 1, 2)

    def to_state(self, a):  # [batch, d, n] -> [batch, G, n_pad, group_size]
        a = jnp.pad(a, ((0, 0), (0, 0), (0, self.n_pad - self.n)))
        return jnp.swapaxes(a.reshape(self.batch, self.G, self.group_size, self.n_pad), 2, 3)

    def from_state(self, a):  # [..., G, n_pad, group_size] -> [..., d, n]
        a = jnp.swapaxes(a, -1, -2)
        return a.reshape(*a.shape[:-3], self.d, self.n_pad)[..., : self.n]

    def to_coefficient(self, BC):  # -> the matrix, or [batch, groups, blocks, n_pad, seq_block]
        if BC.ndim == 2:
            return self.to_matrix(BC)
        if BC.ndim == 3:
            BC = BC[:, None]
        pad = ((0, 0), (0, 0), (0, self.n_pad - self.n), (0, self.length_pad - self.length))
        BC = jnp.pad(BC, pad)
        BC = BC.reshape(*BC.shape[:3], self.num_seq_blocks, self.seq_block)
        return jnp.swapaxes(BC, 2, 3)

    def from_coefficient_grad(self, name, grad, like):
        """Sum the partials (over batch, or over a group's channel blocks) into ``like``'s layout."""
        if not self.varying[name]:  # [batch, G, n_pad, group_size]
            return self.from_state(jnp.sum(grad, axis=0))
        groups = self.groups[name]
        grad = grad.reshape(self.batch, groups, -1, *grad.shape[2:]).sum(axis=2)
        grad = jnp.swapaxes(grad, 2, 3)  # [batch, groups, n_pad, blocks, seq_block]
        grad = grad.reshape(self.batch, groups, self.n_pad, self.length_pad)
        return grad[:, :, : self.n, : self.length].reshape(like.shape)


# ----------------------------------------------------------------------------- calls


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _forward(u, dt, A, B, C, layout: _Layout, interpret, save_starts):
    """Kernel-layout inputs -> y [batch, G, L_pad, gs], last [batch, G, n_pad, gs], starts."""
    dtype = u.dtype
    state_shape = (layout.batch, layout.G, layout.n_pad, layout.group_size)
    out_shape = [jax.ShapeDtypeStruct(u.shape, dtype), jax.ShapeDtypeStruct(state_shape, dtype)]
    out_specs = [layout.per_step(), layout.state()]
    if save_starts:
        starts_shape = (layout.batch, layout.num_seq_blocks, *state_shape[1:])
        out_shape.append(jax.ShapeDtypeStruct(starts_shape, dtype))
        out_specs.append(layout.starts())
    kernel = functools.partial(
        _forward_kernel,
        seq_block=layout.seq_block,
        B_varying=layout.varying["B"],
        C_varying=layout.varying["C"],
        save_starts=save_starts,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=layout.grid,
        in_specs=[
            layout.per_step(),
            layout.per_step(),
            layout.matrix(),
            layout.coefficient("B"),
            layout.coefficient("C"),
        ],
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((layout.n_pad, layout.cb), dtype)],
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="selective_scan_tpu_forward",
    )(u, dt, A, B, C)
    return outs if save_starts else (*outs, None)


def _backward(u, dt, A, B, C, starts, gy, glast, layout: _Layout, interpret):
    """Kernel-layout inputs and cotangents -> du, ddt, dA, dB, dC partials."""
    dtype = u.dtype
    state_shape = (layout.batch, layout.G, layout.n_pad, layout.group_size)
    block_state = (layout.n_pad, layout.cb)

    def coefficient_grad_shape(name):
        if not layout.varying[name]:
            return jax.ShapeDtypeStruct(state_shape, dtype)
        shape = (layout.batch, layout.num_channel_blocks, layout.num_seq_blocks,
                 layout.n_pad, layout.seq_block)  # fmt: skip
        return jax.ShapeDtypeStruct(shape, dtype)

    scratch = [
        pltpu.VMEM(block_state, dtype),  # the adjoint h
        pltpu.VMEM((layout.seq_block + 1, *block_state), dtype),  # the block's states
        pltpu.VMEM(block_state, dtype),  # dA
    ]
    scratch += [pltpu.VMEM(block_state, dtype) for name in "BC" if not layout.varying[name]]
    kernel = functools.partial(
        _backward_kernel,
        seq_block=layout.seq_block,
        B_varying=layout.varying["B"],
        C_varying=layout.varying["C"],
    )
    return pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(u.shape, dtype),
            jax.ShapeDtypeStruct(u.shape, dtype),
            jax.ShapeDtypeStruct(state_shape, dtype),
            coefficient_grad_shape("B"),
            coefficient_grad_shape("C"),
        ],
        grid=layout.grid,
        in_specs=[
            layout.per_step(reverse=True),
            layout.per_step(reverse=True),
            layout.matrix(),
            layout.coefficient("B", reverse=True),
            layout.coefficient("C", reverse=True),
            layout.starts(reverse=True),
            layout.per_step(reverse=True),
            layout.state(),
        ],
        out_specs=[
            layout.per_step(reverse=True),
            layout.per_step(reverse=True),
            layout.state(),
            layout.coefficient_grad("B"),
            layout.coefficient_grad("C"),
        ],
        scratch_shapes=scratch,
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="selective_scan_tpu_backward",
    )(u, dt, A, B, C, starts, gy, glast)


def _to_kernel_layout(u, dt, A, B, C, layout: _Layout):
    return (
        layout.to_steps(u),
        layout.to_steps(dt),
        layout.to_matrix(A),
        layout.to_coefficient(B),
        layout.to_coefficient(C),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _scan(u, dt, A, B, C, seq_block, channel_block, interpret):
    layout = _Layout(u.shape, A.shape[1], B, C, seq_block, channel_block)
    args = _to_kernel_layout(u, dt, A, B, C, layout)
    y, last, _ = _forward(*args, layout, interpret, save_starts=False)
    return layout.from_steps(y), layout.from_state(last)


def _scan_fwd(u, dt, A, B, C, seq_block, channel_block, interpret):
    layout = _Layout(u.shape, A.shape[1], B, C, seq_block, channel_block)
    args = _to_kernel_layout(u, dt, A, B, C, layout)
    y, last, starts = _forward(*args, layout, interpret, save_starts=True)
    # Residuals: the kernel-layout inputs, the original B and C (for their
    # layout) and the states entering each sequence block.
    return (layout.from_steps(y), layout.from_state(last)), (args, starts, B, C)


def _scan_bwd(seq_block, channel_block, interpret, residuals, cotangents):
    args, starts, B, C = residuals
    gy, glast = cotangents
    layout = _Layout(gy.shape, glast.shape[-1], B, C, seq_block, channel_block)
    du, ddt, dA, dB, dC = _backward(
        *args, starts, layout.to_steps(gy), layout.to_state(glast), layout, interpret
    )
    return (
        layout.from_steps(du),
        layout.from_steps(ddt),
        layout.from_state(jnp.sum(dA, axis=0)),
        layout.from_coefficient_grad("B", dB, B),
        layout.from_coefficient_grad("C", dC, C),
    )


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------- entry


def _check(name: str, condition: bool, expected: str, got) -> None:
    if not condition:
        raise ValueError(f"selective_scan_tpu: {name} must be {expected}, got {got}.")


def selective_scan_tpu(
    u: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    seq_block: int = DEFAULT_SEQ_BLOCK,
    channel_block: int = DEFAULT_CHANNEL_BLOCK,
    interpret: bool | pltpu.InterpretParams = False,
) -> tuple[Array, Array]:
    """The core recurrence of the selective scan as a Mosaic TPU kernel, differentiable.

    Args:
      u, dt: [batch, d, L]; ``dt`` already has delta bias, softplus and the
        padding mask applied (effformer.ops.selective_scan does this).
      A: [d, n].
      B, C: [d, n], [batch, n, L] or [batch, groups, n, L] (channel c uses group
        c // (d // groups)).
      seq_block: time steps per sequence block, a multiple of 8 (unrolled in
        the kernel; the backward saves one state per block and recomputes a
        block's states in VMEM). Shorter inputs use one block.
      channel_block: channels per program, a multiple of 128: the largest
        multiple of 128 at most this that divides the channels of one B/C
        group; when the group size is not a multiple of 128, the whole group.
      interpret: False to compile for TPU; True or a ``pltpu.InterpretParams``
        to run in Pallas's TPU interpret mode (on CPU, for tests).
    Returns:
      y [batch, d, L] (= sum_n C_t x_t, before D and z) and the last state
      [batch, d, n], both in the inputs' dtype (float32; float64 in interpret mode).
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
            or (BC.ndim == 4 and BC.shape == (batch, groups, n, length) and groups > 0
                and d % groups == 0)
        )  # fmt: skip
        _check(name, ok, f"[{d}, {n}], [{batch}, {n}, {length}] or [{batch}, groups, {n}, {length}]",
               tuple(BC.shape))  # fmt: skip
    for name, value in (("dt", dt), ("A", A), ("B", B), ("C", C)):
        _check(f"{name}.dtype", value.dtype == dtype, f"{dtype} (that of u)", value.dtype)
    _check(
        "seq_block",
        isinstance(seq_block, int) and seq_block >= 1 and seq_block % _SUBLANES == 0,
        "a positive multiple of 8",
        seq_block,
    )
    _check(
        "channel_block",
        isinstance(channel_block, int) and channel_block >= 1 and channel_block % _LANES == 0,
        "a positive multiple of 128",
        channel_block,
    )
    if interpret is True:
        interpret = pltpu.InterpretParams()
    return _scan(u, dt, A, B, C, seq_block, channel_block, interpret or False)
