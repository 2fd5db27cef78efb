"""Split-K decode attention as a Mosaic GPU kernel (Hopper: TMA and WGMMA).

The Mosaic GPU port of :mod:`effformer.kernels.decode_attention` (Pallas's Triton
backend is deprecated from jax 0.11): the same stream-K schedule (``make_schedule``:
the valid tiles of ``block_k`` keys of every (sequence, kv head), laid end to end and
cut into equal ranges, one per program), the same partials ``(o, m, l)`` per (program,
head) slot and the same log-sum-exp combination (``combine_partials``); see that
module's docstring.

What changes is how a program runs. WGMMA multiplies 64-row tiles, so the ``G`` query
heads that share a kv head are padded to 64 rows (zeros: their outputs are dropped);
decoding reads each key and value once and is bound by memory, so the unused rows cost
tensor-core time that is not the bottleneck. Per head of its range the program copies
the head's row of the schedule (its tiles, cache length, sequence and kv head) and its
query tile to shared memory by TMA, then walks its tiles with two shared-memory slots
for keys and two for values (tile ``t + 2`` is copied into a slot once the matmul
reading tile ``t`` has finished):

* ``s = q k^T`` by WGMMA ([64, block_k], float32), keys before the tile's start (the
  last tile of a cache is read as the window ending at ``max_len``) or past the
  sequence's length masked;
* the online softmax (natural base, as the Triton kernel and ``combine_partials``);
* ``o = alpha o + p v`` by WGMMA, ``p`` from registers.

The schedule's rows are padded to 32 int32 (128 bytes), because Mosaic GPU's copies
move multiples of the warpgroup's 128 threads' bytes. Inputs are 16-bit (WGMMA
operands; the queries are cast to the cache's dtype) with head dim a multiple of 64
(padded with zeros otherwise), tiles of a multiple of 64 keys; two slots of 256-key
tiles at head dim 128 exceed shared memory (the default is 128 keys).

Verified on CPU in Mosaic GPU's interpreter (``interpret=True``; the products run as
plain dots there, :mod:`effformer.kernels.mosaic_gpu_tiles`) against the float64
reference, and lowered for CUDA from the CPU host; not yet compiled or run on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from effformer.kernels import mosaic_gpu_tiles as tiles
from effformer.kernels.decode_attention import combine_partials, make_schedule

Array = jax.Array

ROWS = tiles.TILE_ROWS  # query rows per tile: a kv head's query heads, zero-padded
_SLOTS = 2
_ROW_INTS = 32  # a schedule row padded to 128 bytes


def _kernel(programs_ref, heads_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, scratch, *,
            scale: float, block_k: int, interpret: bool):  # fmt: skip
    """One program: its range of tiles, one partial (o, m, l) per head it touches.

    programs_ref [P, 32] (first tile, end tile, first head, last head, ...);
    heads_ref [B * Hkv, 32] (first tile, end tile, cache length, sequence, kv head, ...);
    q_ref [B * Hkv, 64, D]; k_ref, v_ref [B, max_len, Hkv, D];
    o_ref [S, 64, D], m_ref, l_ref [S, 64] float32.
    """
    (program_smem, head_smem, q_smem, k_smem, v_smem, o_smem, m_smem, l_smem,
     barriers, k_barriers, v_barriers) = scratch  # fmt: skip
    program = lax.axis_index("program")
    max_len, head_dim = k_ref.shape[1], k_ref.shape[3]
    plgpu.copy_gmem_to_smem(programs_ref.at[program], program_smem, barriers.at[0])
    plgpu.barrier_wait(barriers.at[0])
    first_tile, end_tile = program_smem[0], program_smem[1]
    first_head, last_head = program_smem[2], program_smem[3]
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def one_head(head, carry):
        plgpu.copy_gmem_to_smem(heads_ref.at[head], head_smem, barriers.at[1])
        plgpu.copy_gmem_to_smem(q_ref.at[head], q_smem, barriers.at[2])
        plgpu.barrier_wait(barriers.at[1])
        head_first_tile, head_end_tile = head_smem[0], head_smem[1]
        length, sequence, kv_head = head_smem[2], head_smem[3], head_smem[4]
        lo = jnp.maximum(first_tile, head_first_tile)
        hi = jnp.minimum(end_tile, head_end_tile)

        def window(tile):
            # The last tile of a cache whose length is not a multiple of block_k is read as
            # the window ending at max_len (never out of bounds); keys before key_start were
            # counted by the previous tile and are masked out.
            key_start = (tile - head_first_tile) * block_k
            return key_start, jnp.minimum(key_start, max_len - block_k)

        def copy_keys(tile, slot):
            keys = (sequence, pl.ds(window(tile)[1], block_k), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_barriers.at[slot])

        def copy_values(tile, slot):
            keys = (sequence, pl.ds(window(tile)[1], block_k), kv_head)
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_barriers.at[slot])

        for slot in range(_SLOTS):

            @pl.when(lo + slot < hi)
            def _(slot=slot):
                copy_keys(lo + slot, slot)
                copy_values(lo + slot, slot)

        plgpu.barrier_wait(barriers.at[2])

        def one_tile(tile, state):
            o, m, norm = state
            slot = lax.rem(tile - lo, _SLOTS)
            plgpu.barrier_wait(k_barriers.at[slot])
            s = tiles.matmul_transposed(interpret, q_smem, k_smem.at[slot]) * scale
            key_start, start = window(tile)
            index = start + tiles.iota(interpret, (ROWS, block_k), 1)
            s = jnp.where((index >= key_start) & (index < length), s, -jnp.inf)
            # Every tile holds a key before the cache's length, so m_new is finite.
            m_new = jnp.maximum(m, s.max(axis=1))
            correction = jnp.exp(m - m_new)
            p = jnp.exp(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            norm = norm * correction + p.sum(axis=1)
            pl.when(tile + _SLOTS < hi)(functools.partial(copy_keys, tile + _SLOTS, slot))
            plgpu.barrier_wait(v_barriers.at[slot])
            pv = tiles.matmul_registers(interpret, p.astype(v_smem.dtype), v_smem.at[slot])
            pl.when(tile + _SLOTS < hi)(functools.partial(copy_values, tile + _SLOTS, slot))
            o = o * lax.broadcast_in_dim(correction, o.shape, [0]) + pv
            return o, m_new, norm

        initial = (
            tiles.with_layout(interpret, jnp.zeros((ROWS, head_dim), jnp.float32),
                              plgpu.Layout.WGMMA),
            tiles.with_layout(interpret, jnp.full((ROWS,), -jnp.inf, jnp.float32), row_layout),
            tiles.with_layout(interpret, jnp.zeros((ROWS,), jnp.float32), row_layout),
        )  # fmt: skip
        o, m, norm = lax.fori_loop(lo, hi, one_tile, initial)
        slot = program + head
        o_smem[...] = o
        m_smem[...] = m
        l_smem[...] = norm
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[slot])
        plgpu.copy_smem_to_gmem(m_smem, m_ref.at[slot])
        plgpu.copy_smem_to_gmem(l_smem, l_ref.at[slot])
        plgpu.wait_smem_to_gmem(0)  # the staging tiles are read before the next head's
        return carry

    lax.fori_loop(first_head, last_head + 1, one_head, 0)


def _rows(table: Array) -> Array:
    """int32 [n, k] -> [n, 32]: each row padded to 128 bytes for its copy."""
    return jnp.pad(table.astype(jnp.int32), ((0, 0), (0, _ROW_INTS - table.shape[1])))


@functools.partial(jax.jit, static_argnames=("scale", "num_programs", "block_k", "interpret"))
def split_k_decode_attention(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    cache_lengths: Array,
    *,
    scale: float,
    num_programs: int,
    block_k: int = 128,
    interpret: bool = False,
) -> Array:
    """Decode attention with the stream-K split-K schedule, on Mosaic GPU.

    Args:
      q: [B, H, Dh] one query per sequence.
      k_cache, v_cache: [B, max_len, Hkv, Dh] float16 or bfloat16, ``H % Hkv == 0``,
        ``H / Hkv <= 64``.
      cache_lengths: [B] int, valid keys per sequence (clipped to [0, max_len]).
      scale: logit scale.
      num_programs: programs the tiles are spread over (the kernel's grid).
      block_k: keys per tile, a multiple of 64.
      interpret: run in Mosaic GPU's interpreter (CPU).
    Returns:
      [B, H, Dh] in q's dtype; a sequence of length 0 gives zeros.
    """
    batch, num_heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    dtype = k_cache.dtype
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        raise ValueError(
            f"split_k_decode_attention (Mosaic GPU): the caches must be float16 or bfloat16 "
            f"(WGMMA operands), got {jnp.dtype(dtype).name}."
        )
    if block_k % ROWS or group > ROWS:
        raise ValueError(
            f"split_k_decode_attention (Mosaic GPU): block_k must be a multiple of {ROWS} and "
            f"the query heads per kv head at most {ROWS}, got block_k={block_k} and "
            f"{group} heads per kv head."
        )
    padded_dim = -(-head_dim // ROWS) * ROWS  # zero columns change no dot product
    # Caches shorter than one tile are lengthened, so every tile read stays in bounds, and
    # lengths that are not multiples of 8 rounded up (the copies' tiling needs it; this
    # copies the cache, which lengths like 4096 never do).
    padded_len = max(block_k, -(-max_len // 8) * 8)
    if padded_len != max_len or padded_dim != head_dim:
        padding = ((0, 0), (0, padded_len - max_len), (0, 0), (0, padded_dim - head_dim))
        k_cache, v_cache = jnp.pad(k_cache, padding), jnp.pad(v_cache, padding)
    lengths = jnp.clip(cache_lengths.astype(jnp.int32), 0, max_len)
    schedule = make_schedule(lengths, kv_heads, block_k, num_programs)
    num_heads_total = batch * kv_heads
    num_slots = num_programs + num_heads_total
    heads = jnp.arange(num_heads_total, dtype=jnp.int32)
    head_rows = jnp.stack(
        [
            schedule.tile_start[:-1],
            schedule.tile_start[1:],
            lengths[heads // kv_heads],
            heads // kv_heads,
            heads % kv_heads,
        ],
        axis=1,
    )
    q_tiles = q.astype(dtype).reshape(num_heads_total, group, head_dim)
    q_tiles = jnp.pad(q_tiles, ((0, 0), (0, ROWS - group), (0, padded_dim - head_dim)))
    transforms = tiles.tile_transforms(dtype)

    def entry(*refs):
        scratch = (
            plgpu.SMEM((_ROW_INTS,), jnp.int32),
            plgpu.SMEM((_ROW_INTS,), jnp.int32),
            plgpu.SMEM((ROWS, padded_dim), dtype, transforms=transforms),
            plgpu.SMEM((_SLOTS, block_k, padded_dim), dtype, transforms=transforms),
            plgpu.SMEM((_SLOTS, block_k, padded_dim), dtype, transforms=transforms),
            plgpu.SMEM((ROWS, padded_dim), jnp.float32,
                       transforms=tiles.tile_transforms(jnp.float32)),
            plgpu.SMEM((ROWS,), jnp.float32),
            plgpu.SMEM((ROWS,), jnp.float32),
            plgpu.Barrier(num_barriers=3),
            plgpu.Barrier(num_barriers=_SLOTS),
            plgpu.Barrier(num_barriers=_SLOTS),
        )  # fmt: skip
        kernel = functools.partial(_kernel, scale=scale, block_k=block_k, interpret=interpret)
        pl.run_scoped(lambda *scoped: kernel(*refs, scoped), *scratch)

    o, m, norm = plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct((num_slots, ROWS, padded_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_slots, ROWS), jnp.float32),
            jax.ShapeDtypeStruct((num_slots, ROWS), jnp.float32),
        ),
        grid=(num_programs,),
        grid_names=("program",),
        compiler_params=plgpu.CompilerParams(),
        interpret=tiles.interpret_params(interpret),
    )(_rows(schedule.programs), _rows(head_rows), q_tiles, k_cache, v_cache)
    out = combine_partials(o, m, norm, schedule.slot_head, num_heads_total)
    out = out[:, :group, :head_dim].reshape(batch, num_heads, head_dim)
    return out.astype(q.dtype)
