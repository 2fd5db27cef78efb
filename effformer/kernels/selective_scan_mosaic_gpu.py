"""The selective scan's kernels on Mosaic GPU (the Triton kernels' port, forward and backward).

The Mosaic GPU counterparts of the four launches of :mod:`effformer.kernels.selective_scan`
(Pallas's Triton backend is deprecated from jax 0.11), each with its Triton launch's
contract: the forward pass (:func:`forward_pass`: y, the state leaving each chunk, the
states entering each sequence block), the adjoint carry (:func:`adjoint_carry_pass`)
and the backward (:func:`backward_pass`: du, ddt, dA, dB, dC partials), in the Triton
kernels' layouts. The Triton wrapper's chunking (a pass from zero, the carry across
chunks in XLA, a pass from the true starts; the same for the adjoint) and its
``custom_vjp`` use them unchanged (``selective_scan_pallas(mosaic_forward=...,
mosaic_backward=...)``); each pass may run on either backend.

One warpgroup per (batch row, block of 64 channels, sequence chunk). The state, a
[64, n] float32 array, lives in registers in WGMMA's accumulator layout (64 rows over
the warpgroup's 128 threads), so a channel vector ([64], one per step: dt_t, u_t, gy_t
and the per-step du_t, ddt_t) is that layout reduced over the state axis and
broadcasts along it, and a state vector ([n]: B_t, C_t, and dB_t, dC_t summed over the
program's channels) is the layout reduced over the channels. A forward step is

    x = exp(dt_t A) * x + (dt_t u_t) B_t,     y_t = sum_n C_t x

with ``y_t`` stored as a row of a [seq_block, 64] shared-memory tile; the backward
recomputes a block's states from the saved block-entering state, then steps the
adjoint back through the block as the Triton kernel does (its module docstring gives
the equations). u, dt and gy are read time-major ([batch, L, d], transposed by the
wrapper) so that a step's 64 channels are one contiguous row; their tiles of
``seq_block`` steps, those of time-varying B and C and the block-entering states stream
through two shared-memory slots by TMA (block ``k + 2``, or ``k - 2`` walking
backwards, is copied into a slot when block ``k`` is done with it); the steps of a
block are unrolled. No matmul: the kernels are elementwise work, exps and reductions,
as the Triton ones.

Constraints: float32 (the Triton kernels also take float64, which Mosaic GPU does
not), channels per B/C group a multiple of 64, ``n`` padded to a multiple of 8 (zero A,
B, C columns keep the padded state at 0).

Verified on CPU in Mosaic GPU's interpreter (``interpret=True``) against the float64
reference, and lowered for CUDA from the host; not yet compiled or run on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from effformer.kernels import mosaic_gpu_tiles as tiles

Array = jax.Array

CHANNELS = tiles.TILE_ROWS  # channels per program: the rows of one WGMMA-layout array
_SLOTS = 2


def _load(interpret: bool, ref, index, layout) -> Array:
    """Row ``index`` of a [rows, width] shared-memory tile (or the whole tile, index None)."""
    if interpret:
        return ref[...] if index is None else ref[index]
    return plgpu.load(ref, () if index is None else (index,), layout=layout)


def _kernel(*refs, layout, has_init, write_y, save_starts, interpret):
    """One (batch row, channel block, chunk) program; see :func:`forward_pass`."""
    refs = list(refs)
    u_ref, dt_ref, A_ref, B_ref, C_ref = refs[:5]
    rest = refs[5:]
    init_ref = rest.pop(0) if has_init else None
    y_ref = rest.pop(0) if write_y else None
    last_ref = rest.pop(0)
    starts_ref = rest.pop(0) if save_starts else None
    (u_smem, dt_smem, B_smem, C_smem, y_smem, state_smem, barriers, *block_barriers) = rest[0]
    seq_block, blocks = layout.seq_block, layout.blocks_per_chunk
    varying = layout.varying
    b, j, c = lax.axis_index("b"), lax.axis_index("j"), lax.axis_index("c")
    channels = pl.ds(j * CHANNELS, CHANNELS)
    chunk_start = c * layout.chunk_len
    wgmma = plgpu.Layout.WGMMA
    channel_vector, state_vector = wgmma.reduce(1), wgmma.reduce(0)

    def group_of(name):
        return lax.div(j * CHANNELS, layout.d // layout.groups[name])

    def streams():
        """(source ref, its [.., L, width] view for a step range, tile, barriers) per stream."""
        yield u_ref, lambda steps: u_ref.at[b, steps, channels], u_smem, block_barriers[0]
        yield dt_ref, lambda steps: dt_ref.at[b, steps, channels], dt_smem, block_barriers[1]
        for index, (name, ref, smem) in enumerate((("B", B_ref, B_smem), ("C", C_ref, C_smem))):
            if varying[name]:
                view = functools.partial(lambda ref, name, steps: ref.at[b, group_of(name), steps],
                                         ref, name)  # fmt: skip
                yield ref, view, smem, block_barriers[2 + index]

    def copy_block(k, slot):
        steps = pl.ds(chunk_start + k * seq_block, seq_block)
        for _, view, smem, stream_barriers in streams():
            plgpu.copy_gmem_to_smem(view(steps), smem.at[slot], stream_barriers.at[slot])

    def wait_block(slot):
        for _, _, _, stream_barriers in streams():
            plgpu.barrier_wait(stream_barriers.at[slot])

    def read_matrix(ref_at, index):
        # A [64, n] tile of a [.., d, n] array into registers, through the state tile.
        plgpu.copy_gmem_to_smem(ref_at, state_smem, barriers.at[index])
        plgpu.barrier_wait(barriers.at[index])
        value = _load(interpret, state_smem, None, wgmma)
        return value

    for slot in range(min(_SLOTS, blocks)):
        copy_block(slot, slot)
    A = read_matrix(A_ref.at[channels], 0)
    fixed = {}
    for index, (name, ref) in enumerate((("B", B_ref), ("C", C_ref)), start=1):
        if not varying[name]:
            fixed[name] = read_matrix(ref.at[channels], index)
    if has_init:
        x = read_matrix(init_ref.at[b, c, channels], 3)
    else:
        x = tiles.with_layout(interpret, jnp.zeros(A.shape, jnp.float32), wgmma)

    def run_block(k, x):
        slot = lax.rem(k, _SLOTS)
        if starts_ref is not None:
            plgpu.wait_smem_to_gmem(0)  # the state tile's last copy out has been read
            state_smem[...] = x
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(state_smem, starts_ref.at[b, c * blocks + k, channels])
        wait_block(slot)
        if y_ref is not None:
            plgpu.wait_smem_to_gmem(0)  # y's staging tile has been copied out
        for i in range(seq_block):
            dt_t = _load(interpret, dt_smem.at[slot], i, channel_vector)
            u_t = _load(interpret, u_smem.at[slot], i, channel_vector)
            if varying["B"]:
                B_t = lax.broadcast_in_dim(
                    _load(interpret, B_smem.at[slot], i, state_vector), x.shape, [1]
                )
            else:
                B_t = fixed["B"]
            decay = jnp.exp(lax.broadcast_in_dim(dt_t, x.shape, [0]) * A)
            x = decay * x + lax.broadcast_in_dim(dt_t * u_t, x.shape, [0]) * B_t
            if y_ref is not None:
                if varying["C"]:
                    C_t = lax.broadcast_in_dim(
                        _load(interpret, C_smem.at[slot], i, state_vector), x.shape, [1]
                    )
                else:
                    C_t = fixed["C"]
                y_smem[i] = (x * C_t).sum(axis=1)
        if y_ref is not None:
            plgpu.commit_smem()
            steps = pl.ds(chunk_start + k * seq_block, seq_block)
            plgpu.copy_smem_to_gmem(y_smem, y_ref.at[b, steps, channels])
        # The slot's tiles have been read: fetch block k + 2 into it.
        pl.when(k + _SLOTS < blocks)(functools.partial(copy_block, k + _SLOTS, slot))
        return x

    x = lax.fori_loop(0, blocks, run_block, x)
    plgpu.wait_smem_to_gmem(0)
    state_smem[...] = x
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(state_smem, last_ref.at[b, c, channels])
    plgpu.wait_smem_to_gmem(0)


def supported_reason(layout) -> str | None:
    """Why this kernel cannot run a call of ``layout`` (a selective_scan._Layout), or None."""
    group_size = layout.d // max(layout.groups.values())
    if group_size % CHANNELS:
        return (
            f"the Mosaic GPU scan needs the channels of each B/C group ({group_size}) to be a "
            f"multiple of {CHANNELS}"
        )
    return None


def forward_pass(args, init, layout, interpret: bool, write_y: bool, save_starts: bool):
    """Mosaic GPU version of ``selective_scan._forward_pass`` (same arguments and results).

    ``args``: padded kernel-layout u, dt [batch, d, L_pad], A [d, n_pad], B, C
    ([d, n_pad] or [batch, groups, L_pad, n_pad]); ``init`` [batch, num_chunks, d, n_pad]
    or None. ``layout.n_pad`` must be a multiple of 8 and the channels of a B/C group a
    multiple of 64 (:func:`supported_reason`).
    Returns y [batch, d, L_pad] (or None), the state leaving each chunk and the states
    entering each sequence block (or None).
    """
    u, dt, A, B, C = args
    if u.dtype != jnp.float32:
        raise ValueError(f"selective scan (Mosaic GPU): float32 inputs only, got {u.dtype}.")
    reason = supported_reason(layout)
    if reason is not None or layout.n_pad % 8:
        raise ValueError(
            f"selective scan (Mosaic GPU): {reason or 'n_pad must be a multiple of 8'}."
        )
    batch, d, n_pad, seq_block = layout.batch, layout.d, layout.n_pad, layout.seq_block
    # Time-major, so that one step of 64 channels is a contiguous row of a tile.
    inputs = [jnp.swapaxes(u, 1, 2), jnp.swapaxes(dt, 1, 2), A, B, C]
    if init is not None:
        inputs.append(init)
    state_shape = (batch, layout.num_chunks, d, n_pad)
    out_type = []
    if write_y:
        out_type.append(jax.ShapeDtypeStruct((batch, layout.length_pad, d), jnp.float32))
    out_type.append(jax.ShapeDtypeStruct(state_shape, jnp.float32))
    if save_starts:
        out_type.append(jax.ShapeDtypeStruct((batch, layout.num_seq_blocks, d, n_pad), jnp.float32))

    def entry(*refs):
        scratch = (
            plgpu.SMEM((_SLOTS, seq_block, CHANNELS), jnp.float32),
            plgpu.SMEM((_SLOTS, seq_block, CHANNELS), jnp.float32),
            plgpu.SMEM((_SLOTS, seq_block, n_pad), jnp.float32),
            plgpu.SMEM((_SLOTS, seq_block, n_pad), jnp.float32),
            plgpu.SMEM((seq_block, CHANNELS), jnp.float32),
            plgpu.SMEM((CHANNELS, n_pad), jnp.float32),
            plgpu.Barrier(num_barriers=4),
            *(plgpu.Barrier(num_barriers=_SLOTS) for _ in range(4)),  # u, dt, B, C slots
        )
        kernel = functools.partial(
            _kernel,
            layout=layout,
            has_init=init is not None,
            write_y=write_y,
            save_starts=save_starts,
            interpret=interpret,
        )
        pl.run_scoped(lambda *scoped: kernel(*refs, scoped), *scratch)

    outs = list(
        plgpu.kernel(
            entry,
            out_type=tuple(out_type),
            grid=(batch, d // CHANNELS, layout.num_chunks),
            grid_names=("b", "j", "c"),
            compiler_params=plgpu.CompilerParams(),
            interpret=tiles.interpret_params(interpret),
        )(*inputs)
    )
    y = jnp.swapaxes(outs.pop(0), 1, 2) if write_y else None
    last = outs.pop(0)
    starts = outs.pop(0) if save_starts else None
    return y, last, starts


# ----------------------------------------------------------------------------- backward


def _stream_views(refs: dict, b, j, layout, varying_names):
    """(view of a step range, tile, barriers) per streamed input of the backward kernels."""
    channels = pl.ds(j * CHANNELS, CHANNELS)
    for name, (ref, smem, barriers) in refs.items():
        if name in ("B", "C"):
            if name not in varying_names:
                continue
            group = lax.div(j * CHANNELS, layout.d // layout.groups[name])
            yield (functools.partial(lambda ref, g, s: ref.at[b, g, s], ref, group), smem, barriers)
        else:
            yield (functools.partial(lambda ref, s: ref.at[b, s, channels], ref), smem, barriers)


def _adjoint_carry_kernel(dt_ref, A_ref, C_ref, gy_ref, carry_ref, scratch, *, layout, interpret):
    """The adjoint a chunk passes to its left from a zero right end (see selective_scan.py)."""
    dt_smem, gy_smem, C_smem, state_smem, barriers, *stream_barriers = scratch
    seq_block, blocks = layout.seq_block, layout.blocks_per_chunk
    b, j, c = lax.axis_index("b"), lax.axis_index("j"), lax.axis_index("c")
    channels = pl.ds(j * CHANNELS, CHANNELS)
    wgmma = plgpu.Layout.WGMMA
    channel_vector, state_vector = wgmma.reduce(1), wgmma.reduce(0)
    C_varying = layout.varying["C"]
    streams = {"dt": (dt_ref, dt_smem, stream_barriers[0]), "gy": (gy_ref, gy_smem, stream_barriers[1]),
               "C": (C_ref, C_smem, stream_barriers[2])}  # fmt: skip
    views = list(_stream_views(streams, b, j, layout, ("C",) if C_varying else ()))

    def copy_block(k, slot):  # block k of the chunk, walked from the last one
        steps = pl.ds(c * layout.chunk_len + k * seq_block, seq_block)
        for view, smem, barrier in views:
            plgpu.copy_gmem_to_smem(view(steps), smem.at[slot], barrier.at[slot])

    def read_matrix(ref_at, index):
        plgpu.copy_gmem_to_smem(ref_at, state_smem, barriers.at[index])
        plgpu.barrier_wait(barriers.at[index])
        return _load(interpret, state_smem, None, wgmma)

    for slot in range(min(_SLOTS, blocks)):
        copy_block(blocks - 1 - slot, slot)
    A = read_matrix(A_ref.at[channels], 0)
    C_fixed = None if C_varying else read_matrix(C_ref.at[channels], 1)

    def run_block(step, h):
        k, slot = blocks - 1 - step, lax.rem(step, _SLOTS)
        for _, _, barrier in views:
            plgpu.barrier_wait(barrier.at[slot])
        for i in reversed(range(seq_block)):
            gy_t = _load(interpret, gy_smem.at[slot], i, channel_vector)
            C_t = C_fixed if not C_varying else lax.broadcast_in_dim(
                _load(interpret, C_smem.at[slot], i, state_vector), h.shape, [1]
            )  # fmt: skip
            h = h + lax.broadcast_in_dim(gy_t, h.shape, [0]) * C_t
            dt_t = _load(interpret, dt_smem.at[slot], i, channel_vector)
            h = jnp.exp(lax.broadcast_in_dim(dt_t, h.shape, [0]) * A) * h
        pl.when(step + _SLOTS < blocks)(functools.partial(copy_block, k - _SLOTS, slot))
        return h

    h = tiles.with_layout(interpret, jnp.zeros(A.shape, jnp.float32), wgmma)
    h = lax.fori_loop(0, blocks, run_block, h)
    state_smem[...] = h
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(state_smem, carry_ref.at[b, c, channels])
    plgpu.wait_smem_to_gmem(0)


def _backward_kernel(u_ref, dt_ref, A_ref, B_ref, C_ref, starts_ref, gy_ref, carry_ref,
                     du_ref, ddt_ref, dA_ref, dB_ref, dC_ref, scratch, *, layout, interpret):  # fmt: skip
    """The adjoint recurrence over one chunk, blocks in reverse (see selective_scan.py).

    Same computation as the Triton ``_backward_kernel``: per block the states are
    recomputed from the saved block-entering state, then the adjoint ``h`` steps back
    through the block emitting du, ddt (rows of [seq_block, 64] tiles), dB, dC (summed
    over the program's channels: rows of [seq_block, n] tiles, or accumulated when
    time-invariant) and dA (accumulated).
    """
    (u_smem, dt_smem, gy_smem, B_smem, C_smem, state_smem, du_smem, ddt_smem, dB_smem,
     dC_smem, barriers, *stream_barriers) = scratch  # fmt: skip
    seq_block, blocks = layout.seq_block, layout.blocks_per_chunk
    b, j, c = lax.axis_index("b"), lax.axis_index("j"), lax.axis_index("c")
    channels = pl.ds(j * CHANNELS, CHANNELS)
    wgmma = plgpu.Layout.WGMMA
    channel_vector, state_vector = wgmma.reduce(1), wgmma.reduce(0)
    varying = layout.varying
    streams = {
        "u": (u_ref, u_smem, stream_barriers[0]),
        "dt": (dt_ref, dt_smem, stream_barriers[1]),
        "gy": (gy_ref, gy_smem, stream_barriers[2]),
        "B": (B_ref, B_smem, stream_barriers[3]),
        "C": (C_ref, C_smem, stream_barriers[4]),
    }
    varying_names = tuple(name for name in ("B", "C") if varying[name])
    views = list(_stream_views(streams, b, j, layout, varying_names))

    def copy_block(k, slot):
        steps = pl.ds(c * layout.chunk_len + k * seq_block, seq_block)
        for view, smem, barrier in views:
            plgpu.copy_gmem_to_smem(view(steps), smem.at[slot], barrier.at[slot])
        plgpu.copy_gmem_to_smem(  # the state entering block k
            starts_ref.at[b, c * blocks + k, channels], state_smem.at[slot],
            stream_barriers[5].at[slot],
        )  # fmt: skip

    def read_matrix(ref_at, index):
        plgpu.copy_gmem_to_smem(ref_at, state_smem.at[0], barriers.at[index])
        plgpu.barrier_wait(barriers.at[index])
        return _load(interpret, state_smem.at[0], None, wgmma)

    A = read_matrix(A_ref.at[channels], 0)
    fixed = {}
    for index, (name, ref) in enumerate((("B", B_ref), ("C", C_ref)), start=1):
        if not varying[name]:
            fixed[name] = read_matrix(ref.at[channels], index)
    h = read_matrix(carry_ref.at[b, c, channels], 3)
    for slot in range(min(_SLOTS, blocks)):
        copy_block(blocks - 1 - slot, slot)

    def coefficient(name, slot, i, shape):
        if not varying[name]:
            return fixed[name]
        smem = B_smem if name == "B" else C_smem
        return lax.broadcast_in_dim(_load(interpret, smem.at[slot], i, state_vector), shape, [1])

    def run_block(step, carry):
        h, dA_acc, dB_acc, dC_acc = carry
        k, slot = blocks - 1 - step, lax.rem(step, _SLOTS)
        for _, _, barrier in views:
            plgpu.barrier_wait(barrier.at[slot])
        plgpu.barrier_wait(stream_barriers[5].at[slot])
        plgpu.wait_smem_to_gmem(0)  # the previous block's gradient tiles have been copied out
        shape = h.shape
        broadcast = functools.partial(lax.broadcast_in_dim, shape=shape, broadcast_dimensions=[0])
        states = [_load(interpret, state_smem.at[slot], None, wgmma)]
        steps = []
        for i in range(seq_block):
            dt_t = _load(interpret, dt_smem.at[slot], i, channel_vector)
            u_t = _load(interpret, u_smem.at[slot], i, channel_vector)
            B_t = coefficient("B", slot, i, shape)
            a_t = jnp.exp(broadcast(dt_t) * A)
            states.append(a_t * states[-1] + broadcast(dt_t * u_t) * B_t)
            steps.append((dt_t, u_t, B_t, a_t))
        for i in reversed(range(seq_block)):
            dt_t, u_t, B_t, a_t = steps[i]
            gy_t = broadcast(_load(interpret, gy_smem.at[slot], i, channel_vector))
            h = h + gy_t * coefficient("C", slot, i, shape)  # lambda_t
            x_prev, x_t = states[i], states[i + 1]
            da_a = h * x_prev * a_t
            hB_sum = (h * B_t).sum(axis=1)
            ddt_smem[i] = (da_a * A).sum(axis=1) + u_t * hB_sum
            du_smem[i] = dt_t * hB_sum
            dA_acc = dA_acc + da_a * broadcast(dt_t)
            dB_t = h * broadcast(dt_t * u_t)
            dC_t = gy_t * x_t
            if varying["B"]:
                dB_smem[i] = dB_t.sum(axis=0)
            else:
                dB_acc = dB_acc + dB_t
            if varying["C"]:
                dC_smem[i] = dC_t.sum(axis=0)
            else:
                dC_acc = dC_acc + dC_t
            h = a_t * h
        plgpu.commit_smem()
        steps_out = pl.ds(c * layout.chunk_len + k * seq_block, seq_block)
        plgpu.copy_smem_to_gmem(du_smem, du_ref.at[b, steps_out, channels])
        plgpu.copy_smem_to_gmem(ddt_smem, ddt_ref.at[b, steps_out, channels])
        if varying["B"]:
            plgpu.copy_smem_to_gmem(dB_smem, dB_ref.at[b, j, steps_out])
        if varying["C"]:
            plgpu.copy_smem_to_gmem(dC_smem, dC_ref.at[b, j, steps_out])
        pl.when(step + _SLOTS < blocks)(functools.partial(copy_block, k - _SLOTS, slot))
        return h, dA_acc, dB_acc, dC_acc

    zeros = tiles.with_layout(interpret, jnp.zeros(A.shape, jnp.float32), wgmma)
    _, dA_acc, dB_acc, dC_acc = lax.fori_loop(0, blocks, run_block, (h, zeros, zeros, zeros))
    plgpu.wait_smem_to_gmem(0)
    outputs = [(dA_acc, dA_ref)]
    outputs += [(acc, ref) for name, acc, ref in (("B", dB_acc, dB_ref), ("C", dC_acc, dC_ref))
                if not varying[name]]  # fmt: skip
    for value, ref in outputs:
        state_smem.at[0][...] = value
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(state_smem.at[0], ref.at[b, c, channels])
        plgpu.wait_smem_to_gmem(0)


def adjoint_carry_pass(dt, A, C, gy, layout, interpret: bool) -> Array:
    """Mosaic GPU version of the Triton adjoint-carry launch: [batch, num_chunks, d, n_pad]."""
    batch, d, n_pad, seq_block = layout.batch, layout.d, layout.n_pad, layout.seq_block

    def entry(*refs):
        scratch = (
            plgpu.SMEM((_SLOTS, seq_block, CHANNELS), jnp.float32),
            plgpu.SMEM((_SLOTS, seq_block, CHANNELS), jnp.float32),
            plgpu.SMEM((_SLOTS, seq_block, n_pad), jnp.float32),
            plgpu.SMEM((CHANNELS, n_pad), jnp.float32),
            plgpu.Barrier(num_barriers=2),
            *(plgpu.Barrier(num_barriers=_SLOTS) for _ in range(3)),
        )
        kernel = functools.partial(_adjoint_carry_kernel, layout=layout, interpret=interpret)
        pl.run_scoped(lambda *scoped: kernel(*refs, scoped), *scratch)

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((batch, layout.num_chunks, d, n_pad), jnp.float32),
        grid=(batch, d // CHANNELS, layout.num_chunks),
        grid_names=("b", "j", "c"),
        compiler_params=plgpu.CompilerParams(),
        interpret=tiles.interpret_params(interpret),
    )(jnp.swapaxes(dt, 1, 2), A, C, jnp.swapaxes(gy, 1, 2))


def backward_pass(u, dt, A, B, C, starts, gy, carries, layout, interpret: bool):
    """Mosaic GPU version of the Triton backward launch: du, ddt, dA, dB, dC partials.

    Inputs and outputs in the Triton kernel's layouts (``layout.cb`` must be 64, so dB
    and dC partials come per 64-channel block).
    """
    batch, d, n_pad, seq_block = layout.batch, layout.d, layout.n_pad, layout.seq_block
    chunk_shape = (batch, layout.num_chunks, d, n_pad)
    time_major = (batch, layout.length_pad, d)

    def coefficient_grad_shape(name):
        if layout.varying[name]:
            return (batch, d // CHANNELS, layout.length_pad, n_pad)
        return chunk_shape

    def entry(*refs):
        scratch = (
            *(plgpu.SMEM((_SLOTS, seq_block, CHANNELS), jnp.float32) for _ in range(3)),
            *(plgpu.SMEM((_SLOTS, seq_block, n_pad), jnp.float32) for _ in range(2)),
            plgpu.SMEM((_SLOTS, CHANNELS, n_pad), jnp.float32),
            *(plgpu.SMEM((seq_block, CHANNELS), jnp.float32) for _ in range(2)),
            *(plgpu.SMEM((seq_block, n_pad), jnp.float32) for _ in range(2)),
            plgpu.Barrier(num_barriers=4),
            *(plgpu.Barrier(num_barriers=_SLOTS) for _ in range(6)),  # u dt gy B C starts
        )
        kernel = functools.partial(_backward_kernel, layout=layout, interpret=interpret)
        pl.run_scoped(lambda *scoped: kernel(*refs, scoped), *scratch)

    du, ddt, dA, dB, dC = plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct(time_major, jnp.float32),
            jax.ShapeDtypeStruct(time_major, jnp.float32),
            jax.ShapeDtypeStruct(chunk_shape, jnp.float32),
            jax.ShapeDtypeStruct(coefficient_grad_shape("B"), jnp.float32),
            jax.ShapeDtypeStruct(coefficient_grad_shape("C"), jnp.float32),
        ),
        grid=(batch, d // CHANNELS, layout.num_chunks),
        grid_names=("b", "j", "c"),
        compiler_params=plgpu.CompilerParams(),
        interpret=tiles.interpret_params(interpret),
    )(
        jnp.swapaxes(u, 1, 2), jnp.swapaxes(dt, 1, 2), A, B, C, starts,
        jnp.swapaxes(gy, 1, 2), carries,
    )  # fmt: skip
    return jnp.swapaxes(du, 1, 2), jnp.swapaxes(ddt, 1, 2), dA, dB, dC
