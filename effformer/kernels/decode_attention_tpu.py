"""Split-K decode attention for Mosaic TPU: the stream-K schedule with manual, double-buffered DMA.

The contract of the GPU kernel (:mod:`effformer.kernels.decode_attention`):
one query per sequence, ``q [B, H, Dh]``, against caches ``[B, max_len, Hkv,
Dh]`` holding ``cache_lengths[b]`` valid keys, grouped-query attention, a
sequence of length 0 giving zeros; the op (:mod:`effformer.ops.decode_attention`)
validates the arguments and differentiates through its XLA path.

Why the caches stay in HBM (``pl.ANY``) and are copied by hand. The cache is
``[B, max_len, Hkv, Dh]``: the key rows of one (sequence, kv head) pair are a
strided slice, one row out of every ``Hkv``, which no BlockSpec can express
under Mosaic's (8, 128) tiling of the last two dimensions. Each program
therefore copies its tiles itself with ``pltpu.make_async_copy``, double
buffered: while tile ``t`` is computed, tile ``t + 1`` (of the same sequence
or the next) is on its way.

Why a tile holds every kv head of a block of keys (not one kv head). On TPU
the last two dimensions of an array, here ``(Hkv, Dh)``, are laid out in
(sublane, lane) tiles of 8 or 16 rows (bf16 packs two rows per sublane).
Mosaic's verifier (``MemRefSliceOp`` and ``MemRefSqueezeOp`` in
jaxlib/mosaic/dialect/tpu/tpu_ops.cc) requires a slice's offset along a tiled
dimension to be a multiple of the tile and only squeezes tiled dimensions
whose tile is 1 row, so the per-head copy ``k_hbm.at[b, pl.ds(start,
block_k), h]`` is rejected for bf16 (rows interleaved in pairs) and for any
kv-head count that Mosaic tiles by more than one row; as far as its source
tells, only float32 with ``Dh <= 128`` would pass. Copying
``k_hbm.at[b, pl.ds(start, block_k)]``, all kv heads of ``block_k``
consecutive keys, slices only untiled dimensions (sequence and key), so it is
a plain contiguous copy for every dtype. The loaded slab ``[block_k, Hkv,
Dh]`` is reshaped to ``[block_k * Hkv, Dh]`` (the key dimension merged into
the sublane dimension: a relabelling of vector registers when ``Hkv`` fills
whole sublane tiles; a ref reshape would be the same, but Pallas's TPU
interpreter does not support one) and one matmul scores all ``H`` query heads
(padded to a multiple of 8 rows, 16 for 16-bit dtypes) against all
``block_k * Hkv`` key rows; a constant additive mask (0 where a row's kv head
``h // G`` is the column's, ``-inf`` elsewhere) keeps each query head to its
own kv head, and the same masked probabilities multiply the ``[block_k * Hkv,
Dh]`` values. Each K/V element is read from HBM exactly once, for all the
query heads that use it. The price is ``Hkv`` times the matmul and exp work
of a per-head kernel: ``2 H`` flops per cached element (32 query heads in
bf16: 32 flops per HBM byte), well below the ratio of peak bf16 flops to HBM
bandwidth of TPUs (from about 160 flops per byte for v5p to 560 for v6e, by
their published peaks), so decoding should stay memory-bound (not measured).
The default ``block_k`` makes the tile ``1024`` key rows whatever ``Hkv`` is.

Schedule: the stream-K assignment of the GPU kernel (``make_schedule``,
scalar-prefetched into SMEM), with each sequence as one "head" (``kv_heads=1``,
since a tile covers all kv heads): the valid tiles ``sum_b ceil(length_b /
block_k)``, laid end to end in sequence order, are cut into ``num_programs``
equal contiguous ranges; no tile beyond a sequence's length is copied. Each
program walks its range in one loop; when its range leaves a sequence (or
ends) it writes that sequence's partial ``(o, m, l)`` to slot ``program + b``
by DMA, and an XLA pass combines the partials by their log-sum-exp
(``combine_partials``). Online softmax in float32; the last tile of a
sequence whose length is not a multiple of ``block_k`` is read as the window
ending at ``max_len`` and the keys outside ``[key_start, length)`` are masked.

Balancing on a TPU differs from a GPU's. A GPU runs many programs at once on
its ~100 SMs, so stream-K's equal ranges keep all of them busy whatever the
lengths. A TPU chip has one TensorCore (v5e, v6e) or two (v4, v5p megacore);
a grid is a sequential loop on each core, and with ``"parallel"`` semantics
Mosaic splits the grid between the two cores. What matters there is that (1)
the two cores get equal work, which the equal ranges give, (2) the DMA engine
never idles, which the single loop per program gives (the prefetch crosses
sequence boundaries, so a sequence change costs no pipeline bubble), and (3)
no tile past a length is copied. Hence the default is one program per
TensorCore (``default_num_programs``); more programs only add partials and one
exposed (non-overlapped) copy each. Programs share nothing (each starts its
own first copy), so ``"parallel"`` is safe.

Memory: VMEM holds all queries ``[B, Hp, Dh]`` (copied in once), two K and two
V slabs (``4 * block_k * Hkv * Dh`` elements: 1 MiB at the default tile in
bf16 with ``Dh = 128``), the ``[Hp, block_k * Hkv]`` score tile and the mask.

Status: no TPU was available when this was written. The kernel is checked in
Pallas's TPU interpret mode on CPU (which simulates the DMAs and semaphores)
against the op's reference, and it lowers to Mosaic MLIR from a CPU host
(Pallas's lowering rules only: Mosaic's layout passes and libtpu's compiler
have not seen it, and it has never run on a TPU, so the layout argument above
rests on reading Mosaic's source). The op dispatches to it only for
``Dh`` a multiple of 128 (lane-aligned tiles), in bfloat16 or float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effformer.kernels.decode_attention import combine_partials, make_schedule, next_power_of_2

Array = jax.Array

# Key rows (block_k * Hkv) per tile at the default block_k: 256 KiB per K or V slab in
# bf16 at head_dim 128, large enough for efficient DMAs. Untuned (no TPU was available).
DEFAULT_TILE_ROWS = 1024
MIN_BLOCK_K = 16  # the op's lower bound on block_k (also a multiple of every sublane tiling)
LANES = 128


def default_block_k(kv_heads: int, max_len: int) -> int:
    """Keys per tile: ``DEFAULT_TILE_ROWS`` key rows over all kv heads, a power of two >= 16,
    and no longer than the cache rounded up to a power of two."""
    block_k = max(MIN_BLOCK_K, DEFAULT_TILE_ROWS // next_power_of_2(kv_heads))
    return min(block_k, max(MIN_BLOCK_K, next_power_of_2(max_len)))


def default_num_programs() -> int:
    """One program per TensorCore of the chip (1 or 2; see the module docstring)."""
    try:
        return max(1, int(pltpu.get_tpu_info().num_cores))
    except Exception:  # not on a TPU (interpret mode, lowering from a CPU host)
        return 1


def padded_rows(num_heads: int, dtype) -> int:
    """Rows of the query tile: all H query heads, padded to a whole sublane tile."""
    tile = 8 * max(1, 4 // jnp.dtype(dtype).itemsize)
    return -(-num_heads // tile) * tile


def _kernel(
    lengths_ref,
    tile_start_ref,
    programs_ref,
    next_sequence_ref,
    q_ref,
    head_mask_ref,
    column_key_ref,
    k_hbm,
    v_hbm,
    o_hbm,
    m_hbm,
    norm_hbm,
    k_buffer,
    v_buffer,
    o_stage,
    m_stage,
    norm_stage,
    copy_sems,
    out_sems,
    *,
    scale: float,
    block_k: int,
):
    """One program: its range of tiles, double-buffered, one partial (o, m, l) per sequence.

    SMEM: lengths_ref [B]; tile_start_ref [B + 1]; programs_ref [P * 4] (per program: first
    tile, end tile, first sequence, last sequence); next_sequence_ref [B + 1] (the first
    sequence at or after b with a valid key, B if none).
    VMEM: q_ref [B, Hp, Dh]; head_mask_ref [Hp, R] float32 (0 or -inf, R = block_k * Hkv);
    column_key_ref [1, R] int32 (the key offset of each key row in its tile).
    HBM: k_hbm, v_hbm [B, max_len, Hkv, Dh] (max_len >= block_k); o_hbm [S, Hp, Dh],
    m_hbm, norm_hbm [S, Hp, 128] float32 (the partials; m and l replicated over lanes).
    Scratch: k_buffer, v_buffer [2, block_k, Hkv, Dh]; o_stage [Hp, Dh], m_stage,
    norm_stage [Hp, 128] float32; copy_sems [2, 2] (K/V x buffer); out_sems [3].
    """
    program = pl.program_id(0)
    first_tile = programs_ref[4 * program]
    end_tile = programs_ref[4 * program + 1]
    first_sequence = programs_ref[4 * program + 2]
    max_len = k_hbm.shape[1]
    key_rows = k_buffer.shape[1] * k_buffer.shape[2]
    head_dim = k_buffer.shape[3]
    rows = q_ref.shape[1]

    def tile_copies(sequence, tile, buffer):
        """The K and V copies of `tile` (a tile of `sequence`) into `buffer`, and the
        tile's first key and copied window."""
        key_start = (tile - tile_start_ref[sequence]) * block_k
        # A last tile that would run past the cache is read as the window ending at
        # max_len (never out of bounds); the keys before key_start are masked out.
        window = jnp.minimum(key_start, max_len - block_k)
        copies = [
            pltpu.make_async_copy(
                cache.at[sequence, pl.ds(window, block_k)],
                target.at[buffer],
                copy_sems.at[index, buffer],
            )
            for index, (cache, target) in enumerate(((k_hbm, k_buffer), (v_hbm, v_buffer)))
        ]
        return copies, key_start, window

    def next_sequence(tile, sequence):
        """The sequence of tile + 1, given that `tile` belongs to `sequence`."""
        return jnp.where(
            tile + 1 < tile_start_ref[sequence + 1],
            sequence,
            next_sequence_ref[sequence + 1],
        )

    def write_partial(slot, o, m, norm):
        o_stage[...] = o
        m_stage[...] = jnp.broadcast_to(m, m_stage.shape)
        norm_stage[...] = jnp.broadcast_to(norm, norm_stage.shape)
        copies = [
            pltpu.make_async_copy(stage, target.at[slot], out_sems.at[index])
            for index, (stage, target) in enumerate(
                ((o_stage, o_hbm), (m_stage, m_hbm), (norm_stage, norm_hbm))
            )
        ]
        for copy in copies:
            copy.start()
        for copy in copies:
            copy.wait()  # the stage buffers are reused by the next partial

    def one_tile(tile, state):
        sequence, o, m, norm = state
        buffer = (tile - first_tile) % 2

        @pl.when(tile + 1 < end_tile)
        def _prefetch():
            copies, _, _ = tile_copies(next_sequence(tile, sequence), tile + 1, 1 - buffer)
            for copy in copies:
                copy.start()

        copies, key_start, window = tile_copies(sequence, tile, buffer)
        for copy in copies:
            copy.wait()
        keys = k_buffer[buffer].reshape(key_rows, head_dim)
        s = jax.lax.dot_general(
            q_ref[sequence], keys, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        s = s * scale + head_mask_ref[...]  # [Hp, R]: each query head sees its kv head only
        key_index = window + column_key_ref[...]
        in_range = (key_index >= key_start) & (key_index < lengths_ref[sequence])
        s = jnp.where(in_range, s, -jnp.inf)
        # Every tile holds key_start < length for every kv head, so each row's maximum is finite.
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        values = v_buffer[buffer].reshape(key_rows, head_dim)
        pv = jax.lax.dot_general(
            p.astype(values.dtype),
            values,
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        o = o * correction + pv
        norm = norm * correction + jnp.sum(p, axis=1, keepdims=True)
        m = m_new

        # The range leaves this sequence (or ends) after this tile: write its partial and
        # start the next sequence's state afresh.
        leaves = (tile + 1 == end_tile) | (tile + 1 == tile_start_ref[sequence + 1])

        @pl.when(leaves)
        def _write():
            write_partial(program + sequence, o, m, norm)

        o = jnp.where(leaves, 0.0, o)
        m = jnp.where(leaves, -jnp.inf, m)
        norm = jnp.where(leaves, 0.0, norm)
        return next_sequence(tile, sequence), o, m, norm

    @pl.when(first_tile < end_tile)
    def _run():
        copies, _, _ = tile_copies(first_sequence, first_tile, 0)
        for copy in copies:
            copy.start()
        initial = (
            first_sequence,
            jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows, 1), -jnp.inf, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32),
        )
        jax.lax.fori_loop(first_tile, end_tile, one_tile, initial)


@functools.partial(jax.jit, static_argnames=("scale", "num_programs", "block_k", "interpret"))
def split_k_decode_attention_tpu(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    cache_lengths: Array,
    *,
    scale: float,
    num_programs: int,
    block_k: int,
    interpret: bool | pltpu.InterpretParams = False,
) -> Array:
    """Decode attention with the stream-K split-K kernel, Mosaic TPU version.

    Args:
      q: [B, H, Dh] one query per sequence.
      k_cache, v_cache: [B, max_len, Hkv, Dh], ``H % Hkv == 0``, q's dtype.
      cache_lengths: [B] int, valid keys per sequence (clipped to [0, max_len]).
      scale: logit scale.
      num_programs: programs the tiles are spread over (the kernel's grid).
      block_k: keys per tile (each tile holds all Hkv kv heads), a power of two >= 16.
      interpret: run in Pallas's TPU interpreter (True or a ``pltpu.InterpretParams``).
    Returns:
      [B, H, Dh] in q's dtype; a sequence of length 0 gives zeros.
    """
    batch, num_heads, head_dim = q.shape
    if k_cache.ndim != 4 or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache must be [batch={batch}, max_len, kv_heads, head_dim={head_dim}], "
            f"got {k_cache.shape}."
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {k_cache.shape}, got {v_cache.shape}.")
    kv_heads = k_cache.shape[2]
    if num_heads % kv_heads:
        raise ValueError(f"q's heads ({num_heads}) must be a multiple of kv_heads ({kv_heads}).")
    if cache_lengths.shape != (batch,):
        raise ValueError(f"cache_lengths must have shape ({batch},), got {cache_lengths.shape}.")
    if block_k < MIN_BLOCK_K or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= {MIN_BLOCK_K}, got {block_k}.")
    if num_programs < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}.")
    if interpret is True:
        interpret = pltpu.InterpretParams()

    group = num_heads // kv_heads
    rows = padded_rows(num_heads, q.dtype)
    key_rows = block_k * kv_heads
    max_len = k_cache.shape[1]
    if max_len < block_k:
        # Only caches shorter than one tile are copied, so every tile's window is in bounds.
        padding = ((0, 0), (0, block_k - max_len), (0, 0), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, padding), jnp.pad(v_cache, padding)
    lengths = jnp.clip(cache_lengths.astype(jnp.int32), 0, max_len)
    # Each sequence is one "head" of the schedule: a tile covers all of its kv heads.
    schedule = make_schedule(lengths, 1, block_k, num_programs)
    num_slots = num_programs + batch
    has_keys = lengths > 0
    candidates = jnp.where(has_keys, jnp.arange(batch, dtype=jnp.int32), batch)
    next_sequence = jnp.concatenate(
        [jax.lax.cummin(candidates, reverse=True), jnp.full((1,), batch, jnp.int32)]
    )
    q_tiles = jnp.pad(q, ((0, 0), (0, rows - num_heads), (0, 0)))

    # Key row c of a tile is key c // Hkv of kv head c % Hkv. Query row r (a padding row
    # past H included) reads kv head min(r // G, Hkv - 1), so every row sees some key.
    column = np.arange(key_rows)
    row_head = np.minimum(np.arange(rows) // group, kv_heads - 1)
    head_mask = np.where(row_head[:, None] == column[None, :] % kv_heads, 0.0, -np.inf)
    head_mask = jnp.asarray(head_mask, jnp.float32)
    column_key = jnp.asarray(column[None, :] // kv_heads, jnp.int32)

    kernel = functools.partial(_kernel, scale=scale, block_k=block_k)
    vmem = pl.BlockSpec(memory_space=pltpu.VMEM)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    o, m, norm = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(num_programs,),
            in_specs=[vmem, vmem, vmem, hbm, hbm],
            out_specs=[hbm, hbm, hbm],
            scratch_shapes=[
                pltpu.VMEM((2, block_k, kv_heads, head_dim), k_cache.dtype),
                pltpu.VMEM((2, block_k, kv_heads, head_dim), v_cache.dtype),
                pltpu.VMEM((rows, head_dim), jnp.float32),
                pltpu.VMEM((rows, LANES), jnp.float32),
                pltpu.VMEM((rows, LANES), jnp.float32),
                pltpu.SemaphoreType.DMA((2, 2)),
                pltpu.SemaphoreType.DMA((3,)),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((num_slots, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_slots, rows, LANES), jnp.float32),
            jax.ShapeDtypeStruct((num_slots, rows, LANES), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="split_k_decode_attention_tpu",
    )(
        lengths,
        schedule.tile_start,
        schedule.programs.reshape(-1),
        next_sequence,
        q_tiles,
        head_mask,
        column_key,
        k_cache,
        v_cache,
    )
    # The schedule counts a slot for every sequence inside a program's range, empty ones
    # included (the GPU kernel writes their empty partials); this kernel skips sequences
    # without keys, so their slots are unwritten.
    slot_has_keys = jnp.concatenate([has_keys, jnp.zeros((1,), bool)])[schedule.slot_head]
    slot_sequence = jnp.where(slot_has_keys, schedule.slot_head, batch)
    out = combine_partials(o, m[..., 0], norm[..., 0], slot_sequence, batch)
    return out[:, :num_heads].astype(q.dtype)
