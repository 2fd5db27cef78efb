"""Split-K decode attention in Pallas: Flash-Decoding with Lean Attention's stream-K schedule.

One query token per sequence attends over a long KV cache. Reached only
through :func:`effformer.ops.decode_attention.decode_attention`
(``implementation="pallas"``), which validates the arguments; inference only
(the op routes gradients through its XLA path).

Work assignment (Lean Attention, Sanovar et al. 2024; Flash-Decoding, Dao et
al. 2023). A *tile* is ``block_k`` consecutive keys of one (sequence, kv head)
pair; only tiles holding at least one valid key exist, so the work is
``T = sum_b kv_heads * ceil(length_b / block_k)`` tiles, counted from the
lengths at run time. Laid end to end in (sequence, kv head, key block) order,
the tiles are cut into ``num_programs`` contiguous, equal ranges of
``W = ceil(T / num_programs)`` tiles, one per program. A range may start and
end inside a head and may cover several heads, so every program does the same
work whatever the number of heads, the batch size or the spread of lengths:
with few heads or a small batch a head's keys are spread over many programs,
and short sequences cost nothing beyond their valid tiles.

Each program walks its range head by head. For each head it touches it keeps
the flash-attention running state on chip (running max ``m``, normaliser
``l``, unnormalised output ``o``, for the ``G`` query heads that share the kv
head: GQA reads each K/V tile once for all of them) and writes one partial
``(o, m, l)`` at the end of the head's part of its range. The partial for
(program ``p``, head ``bh``) goes to slot ``p + bh``: along the tile line
either the program or the head (or both) advances at every new partial, so
the slots are distinct, and ``num_programs + batch * kv_heads`` slots suffice.
A second XLA pass combines the partials of each head by their log-sum-exp
(:func:`combine_partials`). Slots no program writes are never read (a mask
computed from the schedule selects the written ones).

Backends: GPU through Pallas' Triton lowering (selected by
``pltriton.CompilerParams``; all block shapes are powers of two, query heads
are padded to at least 16 rows for ``tl.dot``); CPU with ``interpret=True``.
The Mosaic TPU version is :mod:`effformer.kernels.decode_attention_tpu`: the
same schedule and combination, the cache in ``pl.ANY`` memory and each tile
(all kv heads of ``block_k`` keys) copied by a double-buffered DMA.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

Array = jax.Array

# Triton's tl.dot needs at least 16 rows and columns.
MIN_BLOCK = 16
DEFAULT_BLOCK_K = 128


def next_power_of_2(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def padded_group(group_size: int) -> int:
    """Rows of the query tile: the G query heads of a kv head, padded to a power of 2 >= 16."""
    return max(MIN_BLOCK, next_power_of_2(group_size))


class Schedule(NamedTuple):
    """The stream-K assignment of tiles to programs, computed from the lengths at run time.

    tile_start: [B * Hkv + 1] int32, index of each head's first tile on the tile line
      (the last entry is the total T).
    programs: [P, 4] int32, per program (first tile, end tile, first head, last head);
      a program with no work has first tile == end tile and last head < first head.
    slot_head: [P + B * Hkv] int32, the head whose partial each slot holds, or
      ``B * Hkv`` for a slot no program writes.
    """

    tile_start: Array
    programs: Array
    slot_head: Array


def _search_right(sorted_values: Array, queries: Array) -> Array:
    """``jnp.searchsorted(sorted_values, queries, side="right")`` as one int32 comparison pass."""
    return jnp.searchsorted(sorted_values, queries, side="right", method="compare_all").astype(
        jnp.int32
    )


def make_schedule(cache_lengths: Array, kv_heads: int, block_k: int, num_programs: int) -> Schedule:
    """Cuts the valid tiles into ``num_programs`` equal ranges (see the module docstring).

    cache_lengths: [B] int, already clipped to [0, max_len].
    """
    num_heads_total = cache_lengths.shape[0] * kv_heads
    tiles_per_head = jnp.repeat((cache_lengths + block_k - 1) // block_k, kv_heads)
    tile_start = jnp.concatenate(
        [jnp.zeros((1,), jnp.int32), jnp.cumsum(tiles_per_head, dtype=jnp.int32)]
    )
    total = tile_start[-1]
    per_program = jnp.maximum(1, (total + num_programs - 1) // num_programs)
    first_tile = jnp.minimum(jnp.arange(num_programs, dtype=jnp.int32) * per_program, total)
    end_tile = jnp.minimum(first_tile + per_program, total)
    has_work = first_tile < end_tile

    # The head holding tile t is the last head starting at or before t (empty heads share
    # their start with the next head, and side="right" steps over them). Both searches
    # compare every query with every entry ([P, B * Hkv] booleans) in one pass, instead of
    # jnp.searchsorted's default bisection, a loop of ~log2(n) dependent steps.
    def head_of(tile):
        head = _search_right(tile_start, tile) - 1
        return jnp.clip(head, 0, num_heads_total - 1)

    first_head = head_of(first_tile)
    last_head = jnp.where(has_work, head_of(end_tile - 1), first_head - 1)
    programs = jnp.stack([first_tile, end_tile, first_head, last_head], axis=1)

    # Slot p + bh holds (program p, head bh). Programs with work come first on the tile
    # line and their first slots increase strictly, so each slot's owner is found by search.
    num_slots = num_programs + num_heads_total
    program_ids = jnp.arange(num_programs, dtype=jnp.int32)
    first_slot = jnp.where(has_work, program_ids + first_head, num_slots)
    slots = jnp.arange(num_slots, dtype=jnp.int32)
    owner = _search_right(first_slot, slots) - 1
    owner_index = jnp.clip(owner, 0, num_programs - 1)
    head = slots - owner_index
    written = (owner >= 0) & has_work[owner_index] & (head <= last_head[owner_index])
    slot_head = jnp.where(written, head, num_heads_total)
    return Schedule(tile_start, programs, slot_head)


def _kernel(
    lengths_ref,
    tile_start_ref,
    programs_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    m_ref,
    norm_ref,
    *,
    scale: float,
    block_k: int,
    kv_heads: int,
):
    """One program: its range of tiles, one partial (o, m, l) per head it touches.

    lengths_ref [B]; tile_start_ref [B*Hkv + 1]; programs_ref [P, 4];
    q_ref [B*Hkv, Gp, Dh]; k_ref, v_ref [B, max_len, Hkv, Dh] (max_len >= block_k);
    o_ref [S, Gp, Dh], m_ref, norm_ref [S, Gp] float32 (the partial (o, m, l)).
    """
    program = pl.program_id(0)
    first_tile = programs_ref[program, 0]
    end_tile = programs_ref[program, 1]
    first_head = programs_ref[program, 2]
    last_head = programs_ref[program, 3]
    rows, head_dim = q_ref.shape[1], q_ref.shape[2]
    max_len = k_ref.shape[1]
    key_offsets = jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)

    def one_head(head, carry):
        head_first_tile = tile_start_ref[head]
        lo = jnp.maximum(first_tile, head_first_tile)
        hi = jnp.minimum(end_tile, tile_start_ref[head + 1])
        batch_index = head // kv_heads
        kv_head = head % kv_heads
        length = lengths_ref[batch_index]
        q = q_ref[head]  # [Gp, Dh]

        def one_tile(tile, state):
            o, m, norm = state
            key_start = (tile - head_first_tile) * block_k
            # The last tile of a cache whose length is not a multiple of block_k is read as
            # the window ending at max_len (never out of bounds); keys before key_start were
            # counted by the previous tile and are masked out here.
            window = jnp.minimum(key_start, max_len - block_k)
            keys = k_ref[batch_index, pl.ds(window, block_k), kv_head, :]  # [block_k, Dh]
            s = jax.lax.dot_general(
                q, keys, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
            s = s * scale  # [Gp, block_k]
            index = window + key_offsets
            visible = (index >= key_start) & (index < length)
            s = jnp.where(visible, s, -jnp.inf)
            # Every tile holds key_start < length, so m_new is finite.
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            correction = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[:, None])
            values = v_ref[batch_index, pl.ds(window, block_k), kv_head, :]
            pv = jax.lax.dot_general(
                p.astype(values.dtype),
                values,
                (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
            )
            return o * correction[:, None] + pv, m_new, norm * correction + jnp.sum(p, axis=1)

        initial = (
            jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
        )
        o, m, norm = jax.lax.fori_loop(lo, hi, one_tile, initial)
        slot = program + head
        o_ref[slot] = o
        m_ref[slot] = m
        norm_ref[slot] = norm
        return carry

    jax.lax.fori_loop(first_head, last_head + 1, one_head, 0)


def combine_partials(o: Array, m: Array, norm: Array, slot_head: Array, num_heads_total: int):
    """Per-head log-sum-exp combination of the slots' partials.

    o: [S, Gp, Dh], m, norm: [S, Gp] float32 (the partials' o, m, l) (unwritten slots may hold anything);
    slot_head: [S] (``num_heads_total`` marks an unwritten slot).
    Returns [num_heads_total, Gp, Dh] float32; a head with no valid key gives 0.
    """
    written = (slot_head < num_heads_total)[:, None]
    m = jnp.where(written, m, -jnp.inf)
    head_max = jax.ops.segment_max(m, slot_head, num_segments=num_heads_total + 1)
    has_keys = jnp.isfinite(m)
    weight = jnp.where(has_keys, jnp.exp(m - jnp.where(has_keys, head_max[slot_head], 0.0)), 0.0)
    norm = jnp.where(written, norm, 0.0) * weight
    o = jnp.where(written[..., None], o, 0.0) * weight[..., None]
    total = jax.ops.segment_sum(norm, slot_head, num_segments=num_heads_total + 1)[:-1]
    out = jax.ops.segment_sum(o, slot_head, num_segments=num_heads_total + 1)[:-1]
    return out / jnp.where(total > 0.0, total, 1.0)[..., None]


@functools.partial(
    jax.jit,
    static_argnames=("scale", "num_programs", "block_k", "interpret", "num_warps", "num_stages"),
)
def split_k_decode_attention(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    cache_lengths: Array,
    *,
    scale: float,
    num_programs: int,
    block_k: int = DEFAULT_BLOCK_K,
    interpret: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
) -> Array:
    """Decode attention with the stream-K split-K kernel.

    Args:
      q: [B, H, Dh] one query per sequence.
      k_cache, v_cache: [B, max_len, Hkv, Dh], ``H % Hkv == 0``.
      cache_lengths: [B] int, valid keys per sequence (clipped to [0, max_len]).
      scale: logit scale.
      num_programs: programs the tiles are spread over (the kernel's grid).
      block_k: keys per tile, a power of two >= 16.
      interpret: run with Pallas' interpreter (CPU).
      num_warps, num_stages: Triton launch parameters.
    Returns:
      [B, H, Dh] in q's dtype; a sequence of length 0 gives zeros.
    """
    batch, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    rows = padded_group(group)
    max_len = k_cache.shape[1]
    if max_len < block_k:
        # Only caches shorter than one tile are copied, so every tile read stays in bounds.
        padding = ((0, 0), (0, block_k - max_len), (0, 0), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, padding), jnp.pad(v_cache, padding)
    lengths = jnp.clip(cache_lengths.astype(jnp.int32), 0, max_len)
    schedule = make_schedule(lengths, kv_heads, block_k, num_programs)
    num_heads_total = batch * kv_heads
    num_slots = num_programs + num_heads_total
    q_tiles = q.reshape(num_heads_total, group, head_dim)
    q_tiles = jnp.pad(q_tiles, ((0, 0), (0, rows - group), (0, 0)))

    kernel = functools.partial(_kernel, scale=scale, block_k=block_k, kv_heads=kv_heads)
    o, m, norm = pl.pallas_call(
        kernel,
        grid=(num_programs,),
        out_shape=[
            jax.ShapeDtypeStruct((num_slots, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_slots, rows), jnp.float32),
            jax.ShapeDtypeStruct((num_slots, rows), jnp.float32),
        ],
        # Triton is chosen explicitly: jax 0.10's default GPU lowering is Mosaic GPU.
        compiler_params=None
        if interpret
        else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="split_k_decode_attention",
    )(lengths, schedule.tile_start, schedule.programs, q_tiles, k_cache, v_cache)
    out = combine_partials(o, m, norm, schedule.slot_head, num_heads_total)
    return out[:, :group].reshape(batch, num_heads, head_dim).astype(q.dtype)


def default_num_programs(batch: int, kv_heads: int, max_len: int, block_k: int) -> int:
    """Enough programs to give every GPU core two, and no more than there are tiles."""
    cores = getattr(jax.devices()[0], "core_count", None) or 1
    tiles = batch * kv_heads * math.ceil(max_len / block_k)
    return max(1, min(tiles, max(2 * cores, batch * kv_heads)))
