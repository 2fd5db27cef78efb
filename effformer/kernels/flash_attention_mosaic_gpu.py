"""Flash attention, forward and backward, as Mosaic GPU kernels (Hopper: TMA and WGMMA).

JAX 0.11 deprecates Pallas's Triton backend, which :mod:`effformer.kernels.flash_attention`
is written for, in favour of Mosaic GPU. These are that port's kernels for the same
attention (module docstring there, which also derives the gradients), for the masks
that need no position or segment rows: none, causal and iLLaMA's soft-causal weights,
with the default positions (query ``i`` at ``Lk - Lq + i``, key ``j`` at ``j``), GQA,
and lengths that are not multiples of the blocks. The forward returns the output and
the row log-sum-exp (base 2) in the Triton forward's layout and the backward reads
them, so either pass mixes with the other's Triton kernels. Windows, segment ids and
given positions stay on the Triton kernels.

Forward: one warpgroup (128 threads) per program, a grid over (query block, head,
batch). The program copies its query block to shared memory with the TMA unit, then
walks the key blocks it may see with two shared-memory slots for k and two for v:
block ``j + 2`` is copied into a slot as soon as the matmul reading block ``j`` from
it has finished, so copies overlap the softmax and the other matmul. Per key block:

* ``s = q k^T`` by WGMMA into a float32 accumulator (operands in shared memory);
* the online softmax of FlashAttention-2 in registers (base 2, as the Triton kernel),
  the normaliser over every visible key, then the soft-causal weight on ``e`` (keys
  after the query times ``r``), as in the Triton kernel;
* ``acc = alpha acc + e v`` by WGMMA with ``e`` (cast to the inputs' dtype) from
  registers and v from shared memory.

The key blocks are walked in up to four runs, each with its own body: blocks every
query of the block sees entirely at or before itself (weight 1, no mask), blocks
crossing the diagonal (element mask and weights), blocks entirely after (soft-causal:
weight r, no mask; causal: not visited), and the last block when its keys are padded
(element mask). The runs are computed from the program's block index and the static
lengths.

Backward: two kernels recompute the probabilities from the log-sum-exp. The dk / dv
kernel (grid over key block, query head, batch) keeps its k and v tiles in shared
memory and streams the query blocks (q, dO, lse, D) through two slots; it computes
transposed ``[bk, bq]`` tiles, so ``dv += (w p)^T dO`` and ``dk += ds^T q`` take their
left operand from registers, and writes one partial per query head (float32 under
GQA, summed afterwards). The dq kernel (grid over query block, head, batch) streams k
and v like the forward. Both walk their blocks in runs as the forward does.

Verified on CPU in Mosaic GPU's interpreter (``interpret=True`` here: it simulates
shared memory, the TMA copies and the barriers; the matmuls run as plain dots there,
since it has no WGMMA with a register operand nor transposed views) against float64
references, and lowered for CUDA from the CPU host (Mosaic GPU's lowering, layout and
shared-memory checks); not yet compiled or run on a GPU
(``tests/kernels/test_kernels_on_gpu.py`` checks the compiled kernels on one).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from effformer.kernels import mosaic_gpu_tiles as tiles

Array = jax.Array

_LOG2_E = math.log2(math.e)
_SLOTS = 2  # shared-memory buffers per key / value stream


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Static description of one forward call (hashable)."""

    causal: bool
    soft: bool
    scale: float
    q_len: int  # unpadded
    kv_len: int
    block_q: int
    block_k: int
    interpret: bool = False


def _floor_div(x: Array, d: int) -> Array:
    """floor(x / d) for int32 x that may be negative (lax.div truncates towards 0)."""
    return jnp.where(x >= 0, lax.div(x, d), -lax.div(d - 1 - x, d))


def _runs(cfg: MosaicConfig, q_block: Array) -> tuple[Array, Array, Array, Array]:
    """Ends of the runs of key blocks (one, masked, after, masked) for query block ``q_block``.

    Key blocks ``[0, a)`` are at or before every query of the block; ``[a, b)`` cross
    the diagonal (masked); ``[b, c)`` are after every query (weight r; empty when causal);
    ``[c, end)`` hold padded keys (masked). ``end`` is where the walk stops.
    """
    block_q, block_k = cfg.block_q, cfg.block_k
    num_blocks = -(-cfg.kv_len // block_k)
    padded = int(cfg.kv_len % block_k != 0)
    full = num_blocks - padded  # blocks without padded keys
    offset = cfg.kv_len - cfg.q_len  # position of query 0
    first_pos = offset + q_block * block_q
    last_pos = first_pos + block_q - 1
    if not (cfg.causal or cfg.soft):  # every key visible with weight 1
        a = b = c = jnp.int32(full)
        return a, b, c, jnp.int32(num_blocks)
    # Block j is entirely at or before the first query iff (j + 1) * block_k - 1 <= first_pos.
    a = jnp.clip(_floor_div(first_pos + 1, block_k), 0, full)
    # Blocks that may hold a key at or before the last query: j * block_k <= last_pos.
    b = jnp.clip(_floor_div(last_pos, block_k) + 1, a, num_blocks)
    if cfg.causal:
        return a, b, b, b
    c = jnp.maximum(b, full)
    return a, b, c, jnp.int32(num_blocks)


def _visible(cfg: MosaicConfig, q_pos: Array, kv_pos: Array) -> Array:
    """bool, like the position tiles: the key is not padding and, when causal, not after the query."""
    visible = kv_pos < cfg.kv_len
    return visible & (kv_pos <= q_pos) if cfg.causal else visible


def _query_positions(cfg: MosaicConfig, q_block: Array, shape: tuple[int, int], axis: int):
    """Positions of the query block's rows (query i sits at Lk - Lq + i) along ``axis``."""
    offset = (cfg.kv_len - cfg.q_len) + q_block * cfg.block_q
    return offset + tiles.iota(cfg.interpret, shape, axis)


def _forward_kernel(ratio_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scratch, *, cfg, groups):
    """One query block of one (batch, head); refs in GMEM: q [B, Lq, H, D], k, v [B, Lk, Hkv, D]."""
    q_smem, k_smem, v_smem, lse_smem, ratio_smem, q_barrier, k_barriers, v_barriers = scratch
    block_q, block_k = cfg.block_q, cfg.block_k
    q_block, head, batch = lax.axis_index("q"), lax.axis_index("head"), lax.axis_index("batch")
    kv_head = lax.div(head, groups)
    head_dim = q_smem.shape[-1]
    dtype = q_smem.dtype

    a, b, c, end = _runs(cfg, q_block)

    def copy_kv(j, slot):
        keys = (batch, pl.ds(j * block_k, block_k), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_barriers.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_barriers.at[slot])

    plgpu.copy_gmem_to_smem(
        q_ref.at[batch, pl.ds(q_block * block_q, block_q), head], q_smem, q_barrier.at[0]
    )
    plgpu.copy_gmem_to_smem(ratio_ref, ratio_smem, q_barrier.at[1])
    for slot in range(min(_SLOTS, k_ref.shape[1] // block_k)):
        pl.when(slot < end)(functools.partial(copy_kv, slot, slot))

    plgpu.barrier_wait(q_barrier.at[0])
    plgpu.barrier_wait(q_barrier.at[1])
    # [block_k], every entry r, laid out as a row of the logits.
    ratio = (
        tiles.vector(cfg.interpret, ratio_smem, plgpu.Layout.WGMMA.reduce(0)) if cfg.soft else None
    )

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    q_pos = _query_positions(cfg, q_block, (block_q, block_k), 0)

    def body_for(kind):
        def body(j, carry):
            acc, m, row_sum = carry
            slot = lax.rem(j, _SLOTS)
            plgpu.barrier_wait(k_barriers.at[slot])

            s = tiles.matmul_transposed(cfg.interpret, q_smem, k_smem.at[slot])
            s = s * (cfg.scale * _LOG2_E)
            kv_pos = j * block_k + tiles.iota(cfg.interpret, (block_q, block_k), 1)
            if kind == "masked":
                s = jnp.where(_visible(cfg, q_pos, kv_pos), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            # A row that has seen no visible key keeps m = -inf: shift by 0 so exp2 gives 0.
            m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            e = jnp.exp2(s - lax.broadcast_in_dim(m_shift, s.shape, [0]))
            alpha = jnp.exp2(m - m_shift)
            row_sum = row_sum * alpha + e.sum(axis=1)
            if ratio is not None and kind != "one":
                r = lax.broadcast_in_dim(ratio, s.shape, [1])
                e = e * r if kind == "after" else jnp.where(kv_pos > q_pos, e * r, e)

            @pl.when(j + _SLOTS < end)
            def _():  # the k slot is free again (s has been read)
                keys = (batch, pl.ds((j + _SLOTS) * block_k, block_k), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_barriers.at[slot])

            plgpu.barrier_wait(v_barriers.at[slot])

            pv = tiles.matmul_registers(cfg.interpret, e.astype(dtype), v_smem.at[slot])

            @pl.when(j + _SLOTS < end)
            def _():
                keys = (batch, pl.ds((j + _SLOTS) * block_k, block_k), kv_head)
                plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_barriers.at[slot])

            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
            return acc, m_new, row_sum

        return body

    carry = (
        tiles.with_layout(
            cfg.interpret, jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA
        ),
        tiles.with_layout(cfg.interpret, jnp.full((block_q,), -jnp.inf, jnp.float32), row_layout),
        tiles.with_layout(cfg.interpret, jnp.zeros((block_q,), jnp.float32), row_layout),
    )
    for kind, (lo, hi) in zip(
        ("one", "masked", "after", "masked"), ((0, a), (a, b), (b, c), (c, end)), strict=True
    ):
        carry = lax.fori_loop(lo, hi, body_for(kind), carry)
    acc, m, row_sum = carry

    empty = row_sum == 0.0  # no visible key: output exactly 0, lse 0 (as the Triton kernel)
    safe_sum = jnp.where(empty, 1.0, row_sum)
    out = acc / lax.broadcast_in_dim(safe_sum, acc.shape, [0])
    q_smem[...] = out.astype(dtype)  # the query tile is done with: it stages the output
    lse_smem[...] = jnp.where(empty, 0.0, m + jnp.log2(safe_sum))
    plgpu.commit_smem()
    rows = pl.ds(q_block * block_q, block_q)
    plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, rows, head])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, rows])
    plgpu.wait_smem_to_gmem(0)


def forward(cfg: MosaicConfig, q: Array, k: Array, v: Array, ratio: Array | None):
    """Padded q [B, Lq', H, D], k, v [B, Lk', Hkv, D] -> (out like q, lse [B, H, Lq'] base 2).

    ``Lq'`` and ``Lk'`` are multiples of the blocks (the caller pads; keys at or past
    ``cfg.kv_len`` are masked here, query rows past ``cfg.q_len`` are computed and
    dropped by the caller). ``ratio`` is the soft-causal r as a [1] float32 array or None.
    """
    batch, q_padded, num_heads, head_dim = q.shape
    kv_padded, num_kv_heads = k.shape[1], k.shape[2]
    block_q, block_k = cfg.block_q, cfg.block_k
    if q_padded % block_q or kv_padded % block_k:
        raise ValueError(
            f"flash attention (Mosaic GPU): padded lengths must be multiples of the blocks "
            f"({block_q}, {block_k}), got q {q_padded} and kv {kv_padded}."
        )
    transforms = tiles.tile_transforms(q.dtype)
    # r reaches the kernel as a row of the key block's width (a vector load, then a
    # broadcast over the rows); 1 without soft-causal weights, where it is not read.
    r = jnp.ones((), jnp.float32) if ratio is None else ratio.astype(jnp.float32).reshape(())
    ratio_row = jnp.broadcast_to(r, (block_k,))

    def entry(ratio_ref, q_ref, k_ref, v_ref, out_ref, lse_ref):
        scratch = (
            plgpu.SMEM((block_q, head_dim), q.dtype, transforms=transforms),
            plgpu.SMEM((_SLOTS, block_k, head_dim), k.dtype, transforms=transforms),
            plgpu.SMEM((_SLOTS, block_k, head_dim), v.dtype, transforms=transforms),
            plgpu.SMEM((block_q,), jnp.float32),
            plgpu.SMEM((block_k,), jnp.float32),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=_SLOTS),
            plgpu.Barrier(num_barriers=_SLOTS),
        )
        kernel = functools.partial(_forward_kernel, cfg=cfg, groups=num_heads // num_kv_heads)
        pl.run_scoped(
            lambda *refs: kernel(ratio_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, refs),
            *scratch,
        )

    call = plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, q_padded), jnp.float32),
        ),
        grid=(q_padded // block_q, num_heads, batch),
        grid_names=("q", "head", "batch"),
        compiler_params=plgpu.CompilerParams(),
        interpret=tiles.interpret_params(cfg.interpret),
    )
    return call(ratio_row, q, k, v)


# ----------------------------------------------------------------------------- backward


def _ceil_div(x: Array, d: int) -> Array:
    return -_floor_div(-x, d)


def _query_runs(cfg: MosaicConfig, kv_block: Array, num_q_blocks: int):
    """Runs of query blocks (before, masked, one) for key block ``kv_block`` in the dk/dv kernel.

    Returns ``(start, e0, e1, end)``: query blocks ``[start, e0)`` lie entirely before
    every key of the block (soft-causal weight r), ``[e0, e1)`` cross the diagonal or
    meet padded keys (masked), ``[e1, end)`` see every key with weight 1.
    """
    block_q, block_k = cfg.block_q, cfg.block_k
    offset = cfg.kv_len - cfg.q_len
    end = jnp.int32(num_q_blocks)
    zero = jnp.int32(0)
    padded_block = (cfg.kv_len % block_k != 0) & (kv_block == -(-cfg.kv_len // block_k) - 1)
    if not (cfg.causal or cfg.soft):
        return zero, zero, jnp.where(padded_block, end, zero), end
    first_key, last_key = kv_block * block_k, kv_block * block_k + block_k - 1
    # Block i lies before the keys iff its last query, offset + (i + 1) bq - 1, < first_key.
    before = jnp.clip(_floor_div(first_key - offset, block_q), 0, end)
    # Block i sees every key iff its first query, offset + i bq, >= last_key.
    after = jnp.clip(_ceil_div(last_key - offset, block_q), before, end)
    e1 = jnp.where(padded_block, end, after)
    if cfg.causal:
        return before, before, e1, end
    return zero, jnp.where(padded_block, zero, before), e1, end


def _dkdv_kernel(ratio_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                 scratch, *, cfg, groups, num_q_blocks):  # fmt: skip
    """One key block of one (batch, query head): dk, dv partials [bk, D] over its query blocks."""
    (k_smem, v_smem, q_smem, d_out_smem, lse_smem, delta_smem, ratio_smem, out_smem,
     kv_barrier, q_barriers, d_out_barriers, lse_barriers, delta_barriers) = scratch  # fmt: skip
    block_q, block_k = cfg.block_q, cfg.block_k
    kv_block, head, batch = lax.axis_index("kv"), lax.axis_index("head"), lax.axis_index("batch")
    kv_head = lax.div(head, groups)
    head_dim = k_smem.shape[-1]
    dtype = k_smem.dtype
    start, e0, e1, end = _query_runs(cfg, kv_block, num_q_blocks)

    keys = (batch, pl.ds(kv_block * block_k, block_k), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, kv_barrier.at[0])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, kv_barrier.at[1])
    plgpu.copy_gmem_to_smem(ratio_ref, ratio_smem, kv_barrier.at[2])

    def copy_queries(i, slot):
        rows = pl.ds(i * block_q, block_q)
        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[slot], q_barriers.at[slot])
        plgpu.copy_gmem_to_smem(
            d_out_ref.at[batch, rows, head], d_out_smem.at[slot], d_out_barriers.at[slot]
        )
        plgpu.copy_gmem_to_smem(
            lse_ref.at[batch, head, rows], lse_smem.at[slot], lse_barriers.at[slot]
        )
        plgpu.copy_gmem_to_smem(
            delta_ref.at[batch, head, rows], delta_smem.at[slot], delta_barriers.at[slot]
        )

    for slot in range(min(_SLOTS, num_q_blocks)):
        pl.when(start + slot < end)(functools.partial(copy_queries, start + slot, slot))
    for index in range(3):
        plgpu.barrier_wait(kv_barrier.at[index])
    column = plgpu.Layout.WGMMA.reduce(0)  # a vector over the query axis of [bk, bq] tiles
    ratio = tiles.vector(cfg.interpret, ratio_smem, column) if cfg.soft else None
    kv_pos = kv_block * block_k + tiles.iota(cfg.interpret, (block_k, block_q), 0)

    def body_for(kind):
        def body(i, carry):
            dk, dv = carry
            slot = lax.rem(i - start, _SLOTS)
            for barriers in (q_barriers, d_out_barriers, lse_barriers, delta_barriers):
                plgpu.barrier_wait(barriers.at[slot])
            lse = lax.broadcast_in_dim(
                tiles.vector(cfg.interpret, lse_smem.at[slot], column), (block_k, block_q), [1]
            )
            delta = lax.broadcast_in_dim(
                tiles.vector(cfg.interpret, delta_smem.at[slot], column), (block_k, block_q), [1]
            )
            # Transposed blocks, keys along the rows: p^T and dp^T are [bk, bq].
            p = jnp.exp2(
                tiles.matmul_transposed(cfg.interpret, k_smem, q_smem.at[slot])
                * (cfg.scale * _LOG2_E)
                - lse
            )
            q_pos = _query_positions(cfg, i, (block_k, block_q), 1)
            if kind == "masked":
                p = jnp.where(_visible(cfg, q_pos, kv_pos), p, 0.0)
            weight = None
            if ratio is not None and kind != "one":
                r = lax.broadcast_in_dim(ratio, (block_k, block_q), [1])
                weight = r if kind == "before" else jnp.where(kv_pos > q_pos, r, 1.0)
            weighted_p = p if weight is None else p * weight
            dv = dv + tiles.matmul_registers(
                cfg.interpret, weighted_p.astype(dtype), d_out_smem.at[slot]
            )
            dp = tiles.matmul_transposed(cfg.interpret, v_smem, d_out_smem.at[slot])
            ds = p * ((dp if weight is None else dp * weight) - delta)
            dk = dk + tiles.matmul_registers(cfg.interpret, ds.astype(dtype), q_smem.at[slot])
            # The slot's tiles have been read by every matmul: fetch block i + 2 into it.
            pl.when(i + _SLOTS < end)(functools.partial(copy_queries, i + _SLOTS, slot))
            return dk, dv

        return body

    zeros = tiles.with_layout(
        cfg.interpret, jnp.zeros((block_k, head_dim), jnp.float32), plgpu.Layout.WGMMA
    )
    carry = (zeros, zeros)
    for kind, (lo, hi) in zip(
        ("before", "masked", "one"), ((start, e0), (e0, e1), (e1, end)), strict=True
    ):
        carry = lax.fori_loop(lo, hi, body_for(kind), carry)
    dk, dv = carry
    rows = pl.ds(kv_block * block_k, block_k)
    # One staging tile for both (float32 partials at head dim 128 would not fit twice).
    for result, result_ref in ((dk * cfg.scale, dk_ref), (dv, dv_ref)):
        out_smem[...] = result.astype(out_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, result_ref.at[batch, rows, head])
        plgpu.wait_smem_to_gmem(0)  # the tile is read before it is overwritten


def _dq_kernel(ratio_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dq_ref, scratch, *,
               cfg, groups):  # fmt: skip
    """One query block of one (batch, head): dq [bq, D] over the key blocks it may see."""
    (q_smem, d_out_smem, lse_smem, delta_smem, ratio_smem, dq_smem, k_smem, v_smem,
     q_barrier, k_barriers, v_barriers) = scratch  # fmt: skip
    block_q, block_k = cfg.block_q, cfg.block_k
    q_block, head, batch = lax.axis_index("q"), lax.axis_index("head"), lax.axis_index("batch")
    kv_head = lax.div(head, groups)
    head_dim = q_smem.shape[-1]
    dtype = q_smem.dtype
    a, b, c, end = _runs(cfg, q_block)

    rows = pl.ds(q_block * block_q, block_q)
    plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem, q_barrier.at[0])
    plgpu.copy_gmem_to_smem(d_out_ref.at[batch, rows, head], d_out_smem, q_barrier.at[1])
    plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem, q_barrier.at[2])
    plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem, q_barrier.at[3])
    plgpu.copy_gmem_to_smem(ratio_ref, ratio_smem, q_barrier.at[4])

    def copy_kv(j, slot):
        keys = (batch, pl.ds(j * block_k, block_k), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_barriers.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_barriers.at[slot])

    for slot in range(min(_SLOTS, k_ref.shape[1] // block_k)):
        pl.when(slot < end)(functools.partial(copy_kv, slot, slot))
    for index in range(5):
        plgpu.barrier_wait(q_barrier.at[index])
    row = plgpu.Layout.WGMMA.reduce(1)  # a vector over the query axis of [bq, bk] tiles
    lse = lax.broadcast_in_dim(tiles.vector(cfg.interpret, lse_smem, row), (block_q, block_k), [0])
    delta = lax.broadcast_in_dim(
        tiles.vector(cfg.interpret, delta_smem, row), (block_q, block_k), [0]
    )
    ratio = (
        tiles.vector(cfg.interpret, ratio_smem, plgpu.Layout.WGMMA.reduce(0)) if cfg.soft else None
    )
    q_pos = _query_positions(cfg, q_block, (block_q, block_k), 0)

    def body_for(kind):
        def body(j, dq):
            slot = lax.rem(j, _SLOTS)
            plgpu.barrier_wait(k_barriers.at[slot])
            p = jnp.exp2(
                tiles.matmul_transposed(cfg.interpret, q_smem, k_smem.at[slot])
                * (cfg.scale * _LOG2_E)
                - lse
            )
            kv_pos = j * block_k + tiles.iota(cfg.interpret, (block_q, block_k), 1)
            if kind == "masked":
                p = jnp.where(_visible(cfg, q_pos, kv_pos), p, 0.0)
            plgpu.barrier_wait(v_barriers.at[slot])
            dp = tiles.matmul_transposed(cfg.interpret, d_out_smem, v_smem.at[slot])
            pl.when(j + _SLOTS < end)(  # v's slot is free: fetch block j + 2's values
                lambda: plgpu.copy_gmem_to_smem(
                    v_ref.at[batch, pl.ds((j + _SLOTS) * block_k, block_k), kv_head],
                    v_smem.at[slot],
                    v_barriers.at[slot],
                )
            )
            if ratio is not None and kind != "one":
                r = lax.broadcast_in_dim(ratio, (block_q, block_k), [1])
                dp = dp * r if kind == "after" else jnp.where(kv_pos > q_pos, dp * r, dp)
            ds = p * (dp - delta)
            dq = dq + tiles.matmul_registers(cfg.interpret, ds.astype(dtype), k_smem.at[slot])
            pl.when(j + _SLOTS < end)(
                lambda: plgpu.copy_gmem_to_smem(
                    k_ref.at[batch, pl.ds((j + _SLOTS) * block_k, block_k), kv_head],
                    k_smem.at[slot],
                    k_barriers.at[slot],
                )
            )
            return dq

        return body

    dq = tiles.with_layout(
        cfg.interpret, jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA
    )
    for kind, (lo, hi) in zip(
        ("one", "masked", "after", "masked"), ((0, a), (a, b), (b, c), (c, end)), strict=True
    ):
        dq = lax.fori_loop(lo, hi, body_for(kind), dq)
    dq_smem[...] = (dq * cfg.scale).astype(dq_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[batch, rows, head])
    plgpu.wait_smem_to_gmem(0)


def backward(
    cfg: MosaicConfig,
    q: Array,
    k: Array,
    v: Array,
    ratio: Array | None,
    out: Array,
    lse: Array,
    d_out: Array,
) -> tuple[Array, Array, Array]:
    """dq, dk, dv of the padded inputs (shapes as :func:`forward`'s), from its (out, lse).

    Two kernels recompute the probabilities from the base-2 log-sum-exp, as the Triton
    backward (:mod:`effformer.kernels.flash_attention`, which derives the gradients): a
    grid over (key block, query head, batch) for dk, dv, one partial per query head
    summed over each kv head's group afterwards, and a grid over (query block, head,
    batch) for dq. ``cfg``'s blocks are the backward's.
    """
    batch, q_padded, num_heads, head_dim = q.shape
    kv_padded, num_kv_heads = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    block_q, block_k = cfg.block_q, cfg.block_k
    if q_padded % block_q or kv_padded % block_k:
        raise ValueError(
            f"flash attention backward (Mosaic GPU): padded lengths must be multiples of the "
            f"blocks ({block_q}, {block_k}), got q {q_padded} and kv {kv_padded}."
        )
    # FlashAttention-2's row term D_i = dO_i . o_i, [B, H, Lq], as the Triton backward.
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    lse = lse.astype(jnp.float32)
    r = jnp.ones((), jnp.float32) if ratio is None else ratio.astype(jnp.float32).reshape(())
    transforms = tiles.tile_transforms(q.dtype)
    interpret = tiles.interpret_params(cfg.interpret)
    inputs = (q, k, v, d_out, lse, delta)
    # Only the query blocks that hold a real query contribute (the rest have dO = 0).
    num_q_blocks = -(-cfg.q_len // block_q)

    # One partial per query head when grouped (summed below), so no two programs share a tile.
    partial_dtype = k.dtype if groups == 1 else jnp.float32

    def dkdv_entry(ratio_ref, *refs):
        scratch = (
            plgpu.SMEM((block_k, head_dim), k.dtype, transforms=transforms),
            plgpu.SMEM((block_k, head_dim), v.dtype, transforms=transforms),
            plgpu.SMEM((_SLOTS, block_q, head_dim), q.dtype, transforms=transforms),
            plgpu.SMEM((_SLOTS, block_q, head_dim), d_out.dtype, transforms=transforms),
            plgpu.SMEM((_SLOTS, block_q), jnp.float32),
            plgpu.SMEM((_SLOTS, block_q), jnp.float32),
            plgpu.SMEM((block_q,), jnp.float32),
            plgpu.SMEM((block_k, head_dim), partial_dtype, transforms=tiles.tile_transforms(partial_dtype)),
            plgpu.Barrier(num_barriers=3),
            *(plgpu.Barrier(num_barriers=_SLOTS) for _ in range(4)),
        )  # fmt: skip
        kernel = functools.partial(_dkdv_kernel, cfg=cfg, groups=groups, num_q_blocks=num_q_blocks)
        pl.run_scoped(lambda *scoped: kernel(ratio_ref, *refs, scoped), *scratch)

    partial_shape = jax.ShapeDtypeStruct((batch, kv_padded, num_heads, head_dim), partial_dtype)
    dk, dv = plgpu.kernel(
        dkdv_entry,
        out_type=(partial_shape, partial_shape),
        grid=(kv_padded // block_k, num_heads, batch),
        grid_names=("kv", "head", "batch"),
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
    )(jnp.broadcast_to(r, (block_q,)), *inputs)
    if groups > 1:
        grouped = (batch, kv_padded, num_kv_heads, groups, head_dim)
        dk = dk.reshape(grouped).sum(axis=3).astype(k.dtype)
        dv = dv.reshape(grouped).sum(axis=3).astype(v.dtype)

    def dq_entry(ratio_ref, *refs):
        scratch = (
            plgpu.SMEM((block_q, head_dim), q.dtype, transforms=transforms),
            plgpu.SMEM((block_q, head_dim), d_out.dtype, transforms=transforms),
            plgpu.SMEM((block_q,), jnp.float32),
            plgpu.SMEM((block_q,), jnp.float32),
            plgpu.SMEM((block_k,), jnp.float32),
            plgpu.SMEM((block_q, head_dim), q.dtype, transforms=transforms),
            plgpu.SMEM((_SLOTS, block_k, head_dim), k.dtype, transforms=transforms),
            plgpu.SMEM((_SLOTS, block_k, head_dim), v.dtype, transforms=transforms),
            plgpu.Barrier(num_barriers=5),
            plgpu.Barrier(num_barriers=_SLOTS),
            plgpu.Barrier(num_barriers=_SLOTS),
        )
        kernel = functools.partial(_dq_kernel, cfg=cfg, groups=groups)
        pl.run_scoped(lambda *scoped: kernel(ratio_ref, *refs, scoped), *scratch)

    dq = plgpu.kernel(
        dq_entry,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(q_padded // block_q, num_heads, batch),
        grid_names=("q", "head", "batch"),
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
    )(jnp.broadcast_to(r, (block_k,)), *inputs)
    return dq, dk, dv
