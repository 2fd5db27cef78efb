"""Flash attention with structured masks and iLLaMA's soft-causal mask, in Pallas.

Computes, per batch row and query head, ``out_i = sum_j p_ij w_ij v_j`` with
``p_i = softmax_j(scale * q_i . k_j)`` over the keys visible to query ``i``
(causal, sliding window, segment ids with 0 = padding) and the post-softmax
weight ``w_ij = r + (1 - r) [pos_j <= pos_i]`` of iLLaMA's soft-causal mask
(``w = 1`` without it). This is :func:`effformer.ops.attention.dot_product_attention`'s
reference, reached from there with ``implementation="pallas"``.

Forward (FlashAttention-2, Dao 2023, Algorithm 1): a grid over (query block,
batch, head); each program walks the key blocks that its block may see with
the running row max ``m``, the normaliser ``l`` over ALL visible keys and one
accumulator ``acc = sum_j e_ij w_ij v_j`` (``e_ij = exp(s_ij - m_i)``). The
issue's two accumulators, ``acc_all = sum_j e_ij v_j`` and ``acc_causal =
sum_{pos_j <= pos_i} e_ij v_j``, combine as ``r acc_all + (1 - r) acc_causal``,
which is exactly this one weighted sum: the weight is applied to the block of
``e`` before its matmul with ``v``, so one [block_q, head_dim] accumulator
is kept instead of two (half the registers on a GPU) and the normaliser is
still the full row's, so nothing is renormalised. The row log-sum-exp is saved.

Backward (FlashAttention-2, Algorithm 2), derived for the weights. With
``s_ij = scale q_i . k_j``, ``p_ij = exp(s_ij - lse_i)`` and ``o_i = sum_j p_ij w_ij v_j``:

* ``dv_j = sum_i p_ij w_ij dO_i``;
* ``dL/dp_ij = w_ij (dO_i . v_j)``; through the softmax Jacobian
  ``ds_ij = p_ij (dL/dp_ij - sum_k p_ik dL/dp_ik) = p_ij (w_ij dO_i . v_j - D_i)``, where
  ``D_i = sum_k p_ik w_ik (dO_i . v_k) = dO_i . (sum_k p_ik w_ik v_k) = dO_i . o_i``:
  the weights leave FlashAttention's row term ``D_i = dO_i . o_i`` unchanged;
* ``dq_i = scale sum_j ds_ij k_j`` and ``dk_j = scale sum_i ds_ij q_i``.

Two kernels recompute ``p`` blockwise from the saved log-sum-exp: one over
(key block, batch, head) accumulating ``dk, dv`` over the query blocks that
may see the key block, one over (query block, batch, head) accumulating
``dq``. With grouped-query attention the ``dk, dv`` kernel writes one partial
per query head, summed over each kv head's group afterwards (as FlashAttention-2
does for MQA/GQA), so no two programs write the same block. Per block pair the
two kernels run seven block matmuls (``s`` and ``dO v^T`` in both). With
``BlockSizes(fused_backward=True)`` the ``dk, dv`` kernel also adds each pair's
``ds k`` to a float32 ``dq`` with atomic adds and the ``dq`` kernel is not run:
five matmuls per pair, as FlashAttention-2's own backward, at the price of
``L / block_k_bwd`` atomic adds per ``dq`` element (and a summation order that
varies from run to run). Off by default: not yet timed on a GPU.

The soft-causal ratio ``r`` is a schedule value (it may be traced): it gets a
zero cotangent, i.e. it is treated as non-differentiable.

Lengths that are not multiples of the blocks are padded here: padded keys are
hidden by their index (static), padded queries are sliced away (their zero
cotangent makes them contribute nothing to ``dk, dv``). A query that sees no key
outputs exactly 0 with zero gradients, as the reference does. Which key blocks a
query block may see (and the reverse) is bounded outside the kernel from the
per-block extremes of positions and segment ids, so causal attention visits
only the lower triangle and a sliding window only its band. The same extremes
find the block pairs that are visible throughout with one soft-causal weight
(:func:`block_schedules`); the kernels walk those with a body that computes no
per-element mask or weight (a scalar r at most), so with positions in order
only the diagonal blocks of a causal or soft-causal row, and a window's edges,
pay for the element mask, as in FlashAttention-2's and Triton's causal kernels.

Backends: written for Pallas's GPU Triton lowering (2-D ``jnp.dot`` on blocks,
``lax.fori_loop`` with bounds read from an input, power-of-two block shapes,
``exp2``) and run anywhere with ``interpret=True`` (what the op does on CPU).
It is not written for Mosaic TPU (blocks squeeze the head axis, which Mosaic's
(8, 128) tiling rejects): :mod:`effformer.kernels.flash_attention_tpu` is the
TPU version, with the same contract, sharing :func:`validate_arguments`,
:func:`padded_rows` and :func:`block_ranges` from here. With
``BlockSizes(mosaic_forward=True)`` / ``mosaic_backward=True`` the forward / the
backward run on Mosaic GPU instead (:mod:`effformer.kernels.flash_attention_mosaic_gpu`,
the port away from the deprecated Triton backend).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effformer.kernels import flash_attention_mosaic_gpu

Array = jax.Array

_LOG2_E = math.log2(math.e)
# Triton's tl.dot needs every matmul dimension to be at least 16.
_MIN_BLOCK = 16
# The Mosaic GPU forward's blocks and head dim: WGMMA's 64-row tiles, 64-element swizzled rows.
_MOSAIC_MIN_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes (powers of two, at least 16) of the three kernels.

    ``block_q, block_k``: forward query / key blocks; ``block_q_bwd,
    block_k_bwd``: the query / key blocks of both backward kernels. Each is
    clipped to the (power-of-two rounded) length, so short sequences use one
    block. The defaults are the fastest of the 16 combinations timed on an
    NVIDIA H200 (bfloat16, batch 2, 16 heads, L 4096, soft-causal, head dims 64
    and 128; experiments/benchmarks/kernels_flash_attention.py --sweep, results
    in experiments/benchmarks/README.md): 128 x 128 forward tiles, and 128
    queries x 64 keys in the backward kernels, which ran 1.1x (head dim 64) to
    1.6x (head dim 128) faster than 64 x 64 there.

    ``fused_backward``: compute dq inside the dk/dv kernel with atomic adds
    instead of in a kernel of its own (module docstring); off until timed.

    ``mosaic_forward``, ``mosaic_backward``: run the forward pass, the backward
    pass, or both as the Mosaic GPU kernels of
    :mod:`effformer.kernels.flash_attention_mosaic_gpu` (TMA copies and WGMMA on
    Hopper) instead of the Triton ones; either mixes with the other's Triton
    kernels (they share the residuals: the output and the base-2 log-sum-exp). They
    serve 16-bit inputs without windows, segment ids or given positions, with
    blocks of at least 64 (``block_q, block_k`` for the forward, ``block_q_bwd,
    block_k_bwd`` for the backward); other calls raise. Off until timed on a GPU.

    ``num_warps, num_stages``: Triton launch parameters of all three kernels
    (ignored in interpret mode). The defaults, 4 warps for head dims up to 64,
    else 8 (``num_warps=None``), and 2 pipeline stages, were the fastest forward +
    backward of 4 / 8 warps x 1 / 2 / 3 stages around the default blocks on the
    H200 (``--sweep-launch``); 3 stages at head dim 128 ran out of shared memory.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 128
    block_k_bwd: int = 64
    num_warps: int | None = None
    num_stages: int = 2
    fused_backward: bool = False
    mosaic_forward: bool = False
    mosaic_backward: bool = False

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            size = getattr(self, name)
            if not isinstance(size, int) or size < _MIN_BLOCK or size & (size - 1):
                raise ValueError(
                    f"BlockSizes.{name} must be a power of two >= {_MIN_BLOCK} "
                    f"(Triton block shapes), got {size!r}."
                )
        warps = self.num_warps
        if warps is not None and (not isinstance(warps, int) or warps < 1 or warps & (warps - 1)):
            raise ValueError(
                f"BlockSizes.num_warps must be None or a power of two >= 1, got {warps!r}."
            )
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(
                f"BlockSizes.num_stages must be a positive int, got {self.num_stages!r}."
            )
        for name in ("fused_backward", "mosaic_forward", "mosaic_backward"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"BlockSizes.{name} must be True or False, got {getattr(self, name)!r}."
                )
        for flag, names in (
            ("mosaic_forward", ("block_q", "block_k")),
            ("mosaic_backward", ("block_q_bwd", "block_k_bwd")),
        ):
            sizes = [getattr(self, name) for name in names]
            if getattr(self, flag) and min(sizes) < _MOSAIC_MIN_BLOCK:
                raise ValueError(
                    f"BlockSizes({flag}=True) needs {names[0]} and {names[1]} of at least "
                    f"{_MOSAIC_MIN_BLOCK} (WGMMA's 64-row tiles), got {sizes[0]} and {sizes[1]}."
                )
        if self.fused_backward and self.mosaic_backward:
            raise ValueError(
                "BlockSizes: fused_backward is a Triton backward; it cannot be combined with "
                "mosaic_backward=True."
            )


def default_block_sizes(dtype, head_dim: int) -> BlockSizes:
    """The tuned :class:`BlockSizes` for 16-bit inputs with head dim <= 128, else 64 x 64.

    The tuned tiles were timed for bfloat16 at head dims 64 and 128 only. Wider
    elements (float32) or heads double a tile's bytes, and Triton refuses a kernel
    whose pipelined tiles do not fit a multiprocessor's shared memory (228 KiB on
    Hopper): a 128 x 128 float32 key tile at head dim 128 is 64 KiB, two of them
    (keys and values) double-buffered 256 KiB. Those inputs get 64 x 64 tiles,
    a quarter of the bytes; untimed.
    """
    if jnp.dtype(dtype).itemsize <= 2 and head_dim <= 128:
        return BlockSizes()
    return BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Hashable, trace-time description of one call (a custom_vjp nondiff argument)."""

    causal: bool
    window_left: int | None
    window_right: int | None
    soft: bool
    scale: float
    q_len: int  # unpadded lengths
    kv_len: int
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    interpret: bool
    num_warps: int | None = None
    num_stages: int = 2
    fused_backward: bool = False
    mosaic_forward: bool = False
    mosaic_backward: bool = False

    @property
    def masks_by_position(self) -> bool:
        """Whether positions hide keys (the soft-causal weight also reads positions)."""
        return self.causal or self.window_left is not None or self.window_right is not None


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _clip_block(size: int, length: int, smallest: int = _MIN_BLOCK) -> int:
    return max(smallest, min(size, _next_power_of_2(length)))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded_q_len(cfg: _Config) -> int:
    # A multiple of the forward and the backward blocks (powers of two: of the larger).
    return _round_up(cfg.q_len, max(cfg.block_q, cfg.block_q_bwd))


def _padded_kv_len(cfg: _Config) -> int:
    return _round_up(cfg.kv_len, max(cfg.block_k, cfg.block_k_bwd))


def _accumulator_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------- in-kernel pieces


def _visible(cfg: _Config, q_pos, kv_pos, q_seg, kv_seg, kv_start, block_k) -> Array | None:
    """bool [bq, bk]: which (query, key) pairs take part in the softmax; None for all."""
    visible = None

    def both(a, b):
        return b if a is None else a & b

    if cfg.masks_by_position:
        q_col, kv_row = q_pos[:, None], kv_pos[None, :]
        if cfg.causal:
            visible = both(visible, kv_row <= q_col)
        if cfg.window_left is not None:
            visible = both(visible, q_col - kv_row <= cfg.window_left)
        if cfg.window_right is not None:
            visible = both(visible, kv_row - q_col <= cfg.window_right)
    if q_seg is not None:
        q_col = q_seg[:, None]
        visible = both(visible, (q_col == kv_seg[None, :]) & (q_col != 0))
    if _padded_kv_len(cfg) != cfg.kv_len:  # padded keys (in the last block or two)
        kv_index = kv_start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        visible = both(visible, kv_index < cfg.kv_len)
    return visible


def _soft_weight(ratio, q_pos, kv_pos, x):
    """x * w with w = r + (1 - r)[pos_k <= pos_q]: keys after the query are scaled by r."""
    return jnp.where(kv_pos[None, :] > q_pos[:, None], x * ratio, x)


# How a loop of a kernel treats its block pairs (see _walk_schedule and block_schedules).
_MASKED = "masked"  # per-element visibility and soft-causal weights, from positions
_WEIGHT_ONE = "weight_one"  # every pair visible, keys at or before the queries: weight 1
_WEIGHT_RATIO = "weight_ratio"  # every pair visible, keys after the queries: weight r


def _apply_weight(kind, ratio, q_pos, kv_pos, x):
    """x * w for a block of the given kind (x unchanged without a soft-causal ratio)."""
    if ratio is None or kind == _WEIGHT_ONE:
        return x
    if kind == _WEIGHT_RATIO:
        return x * ratio
    return _soft_weight(ratio, q_pos, kv_pos, x)


def _walk_schedule(schedule_ref, body_for, run_kinds, carry):
    """Runs ``body_for(kind)`` over a row's schedule: five loops, three masked.

    ``schedule_ref`` holds ``(start, first_start, first_end, second_start,
    second_end, end)`` (block_schedules): the blocks of [start, end) are walked
    in order, those of the two runs with the cheaper bodies of ``run_kinds``,
    the rest with the masked body. Each loop is a plain ``fori_loop``, so Triton
    pipelines its loads; empty loops cost nothing.
    """
    bounds = [schedule_ref[index] for index in range(6)]
    kinds = (_MASKED, run_kinds[0], _MASKED, run_kinds[1], _MASKED)
    for index, kind in enumerate(kinds):
        carry = lax.fori_loop(bounds[index], bounds[index + 1], body_for(kind), carry)
    return carry


def _logits_log2(cfg: _Config, q, k, dtype):
    """scale * q k^T in base 2 ([bq, bk]); the matmul runs in the inputs' dtype."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=dtype)
    return s * (cfg.scale * _LOG2_E)


def _load_optional(ref, index):
    return None if ref is None else ref[index]


def _forward_kernel(
    schedule_ref,
    ratio_ref,
    q_ref,
    k_ref,
    v_ref,
    q_pos_ref,
    kv_pos_ref,
    q_seg_ref,
    kv_seg_ref,
    out_ref,
    lse_ref,
    *,
    cfg: _Config,
):
    """One query block of one (batch, head). Blocks: q [bq, D]; k, v [Lk, D] (all keys)."""
    block_q, block_k = cfg.block_q, cfg.block_k
    dtype = lse_ref.dtype
    q = q_ref[...]
    q_pos = _load_optional(q_pos_ref, slice(None))
    q_seg = _load_optional(q_seg_ref, slice(None))
    ratio = None if ratio_ref is None else ratio_ref[0]

    def body_for(kind):
        def body(j, carry):
            m, row_sum, acc = carry
            keys = pl.ds(j * block_k, block_k)
            s = _logits_log2(cfg, q, k_ref[keys, :], dtype)
            kv_pos = _load_optional(kv_pos_ref, keys) if kind == _MASKED else None
            if kind == _MASKED:
                visible = _visible(
                    cfg, q_pos, kv_pos, q_seg, _load_optional(kv_seg_ref, keys), j * block_k,
                    block_k,
                )  # fmt: skip
                if visible is not None:
                    s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            # A row that has seen no visible key keeps m = -inf: shift by 0 so exp2 gives 0.
            m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            e = jnp.exp2(s - m_shift[:, None])
            correction = jnp.exp2(m - m_shift)
            row_sum = row_sum * correction + e.sum(axis=1)
            e = _apply_weight(kind, ratio, q_pos, kv_pos, e)
            v = v_ref[keys, :]
            acc = acc * correction[:, None] + jnp.dot(
                e.astype(v.dtype), v, preferred_element_type=dtype
            )
            return m_new, row_sum, acc

        return body

    init = (
        jnp.full((block_q,), -jnp.inf, dtype),
        jnp.zeros((block_q,), dtype),
        jnp.zeros((block_q, q.shape[1]), dtype),
    )
    m, row_sum, acc = _walk_schedule(schedule_ref, body_for, (_WEIGHT_ONE, _WEIGHT_RATIO), init)
    empty = row_sum == 0.0  # no visible key: output exactly 0
    safe_sum = jnp.where(empty, 1.0, row_sum)
    out_ref[...] = (acc / safe_sum[:, None]).astype(out_ref.dtype)
    # Base 2, as the logits; 0 for empty rows (every p is masked to 0 there anyway).
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log2(safe_sum))


def _probabilities(cfg, q, k, lse, q_pos, kv_pos, q_seg, kv_seg, kv_start, dtype, masked):
    """Recomputed p [bq, bk] from the saved log-sum-exp, 0 where hidden (if ``masked``)."""
    p = jnp.exp2(_logits_log2(cfg, q, k, dtype) - lse[:, None])
    if not masked:  # a block pair the schedule found all visible
        return p
    visible = _visible(cfg, q_pos, kv_pos, q_seg, kv_seg, kv_start, cfg.block_k_bwd)
    return p if visible is None else jnp.where(visible, p, 0.0)


def _score_gradient(p, d_out, v, delta, weight, dtype):
    """ds_ij = p_ij (w_ij dO_i . v_j - D_i) (module docstring), without the scale."""
    dp = lax.dot_general(d_out, v, (((1,), (1,)), ((), ())), preferred_element_type=dtype)
    return p * (weight(dp) - delta[:, None])


def _dkdv_kernel(
    schedule_ref,
    ratio_ref,
    q_ref,
    k_ref,
    v_ref,
    q_pos_ref,
    kv_pos_ref,
    q_seg_ref,
    kv_seg_ref,
    d_out_ref,
    lse_ref,
    delta_ref,
    dq_zeros_ref,
    dk_ref,
    dv_ref,
    *dq_out,
    cfg: _Config,
):
    """One key block of one (batch, query head). Blocks: k, v [bk, D]; q, dO [Lq, D].

    With ``cfg.fused_backward``, ``dq_out`` holds one ref: the [Lq, D] float32 dq of
    the (batch, query head), aliased to ``dq_zeros_ref`` (zeros), that every key block's
    program adds its ``ds k`` to atomically (unscaled); else it is empty and
    ``dq_zeros_ref`` None.
    """
    block_q, block_k = cfg.block_q_bwd, cfg.block_k_bwd
    dtype = lse_ref.dtype
    k, v = k_ref[...], v_ref[...]
    kv_pos = _load_optional(kv_pos_ref, slice(None))
    kv_seg = _load_optional(kv_seg_ref, slice(None))
    kv_start = pl.program_id(0) * block_k
    ratio = None if ratio_ref is None else ratio_ref[0]

    def body_for(kind):
        def body(i, carry):
            dk, dv = carry
            queries = pl.ds(i * block_q, block_q)
            q, d_out = q_ref[queries, :], d_out_ref[queries, :]
            masked = kind == _MASKED
            # Positions and segment ids are read only where the block needs the mask.
            q_pos = _load_optional(q_pos_ref, queries) if masked else None
            q_seg = _load_optional(q_seg_ref, queries) if masked else None
            p = _probabilities(
                cfg, q, k, lse_ref[queries], q_pos, kv_pos, q_seg, kv_seg, kv_start, dtype,
                masked,
            )  # fmt: skip
            weight = functools.partial(_apply_weight, kind, ratio, q_pos, kv_pos)
            # dv_j = sum_i p_ij w_ij dO_i: contract the query axis of both blocks.
            dv = dv + lax.dot_general(
                weight(p).astype(d_out.dtype),
                d_out,
                (((0,), (0,)), ((), ())),
                preferred_element_type=dtype,
            )
            ds = _score_gradient(p, d_out, v, delta_ref[queries], weight, dtype)
            dk = dk + lax.dot_general(
                ds.astype(q.dtype), q, (((0,), (0,)), ((), ())), preferred_element_type=dtype
            )
            if cfg.fused_backward:
                dq_part = jnp.dot(ds.astype(k.dtype), k, preferred_element_type=dtype)
                # Both starts int32 (the loop index's type): interpret mode's rule slices
                # with them together, and a Python 0 would be int64 under x64.
                columns = pl.ds(jnp.int32(0), dq_part.shape[1])
                plgpu.atomic_add(dq_out[0], (queries, columns), dq_part)
            return dk, dv

        return body

    zeros = jnp.zeros((block_k, k.shape[1]), dtype)
    # Along the queries of a key block, those before the keys (weight r) come first.
    dk, dv = _walk_schedule(schedule_ref, body_for, (_WEIGHT_RATIO, _WEIGHT_ONE), (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    schedule_ref,
    ratio_ref,
    q_ref,
    k_ref,
    v_ref,
    q_pos_ref,
    kv_pos_ref,
    q_seg_ref,
    kv_seg_ref,
    d_out_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    cfg: _Config,
):
    """One query block of one (batch, head). Blocks: q, dO [bq, D]; k, v [Lk, D]."""
    block_k = cfg.block_k_bwd
    dtype = lse_ref.dtype
    q, d_out = q_ref[...], d_out_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = _load_optional(q_pos_ref, slice(None))
    q_seg = _load_optional(q_seg_ref, slice(None))
    ratio = None if ratio_ref is None else ratio_ref[0]

    def body_for(kind):
        def body(j, dq):
            keys = pl.ds(j * block_k, block_k)
            k, v = k_ref[keys, :], v_ref[keys, :]
            masked = kind == _MASKED
            # Positions and segment ids are read only where the block needs the mask.
            kv_pos = _load_optional(kv_pos_ref, keys) if masked else None
            kv_seg = _load_optional(kv_seg_ref, keys) if masked else None
            p = _probabilities(
                cfg, q, k, lse, q_pos, kv_pos, q_seg, kv_seg, j * block_k, dtype, masked
            )
            weight = functools.partial(_apply_weight, kind, ratio, q_pos, kv_pos)
            ds = _score_gradient(p, d_out, v, delta, weight, dtype)
            return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=dtype)

        return body

    zeros = jnp.zeros((q.shape[0], q.shape[1]), dtype)
    dq = _walk_schedule(schedule_ref, body_for, (_WEIGHT_ONE, _WEIGHT_RATIO), zeros)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- block ranges


def _block_extremes(values: Array, block: int, ignore_zero: bool = False):
    """Per-block (min, max) of [B, L] values as [B, L / block] each; zeros ignored if asked."""
    blocks = values.reshape(values.shape[0], -1, block)
    low = blocks
    if ignore_zero:  # padding segment id: an all-padding block gets min = int max (overlaps none)
        low = jnp.where(blocks == 0, jnp.iinfo(jnp.int32).max, blocks)
    return low.min(axis=2), blocks.max(axis=2)


def _span(may_see: Array) -> Array:
    """[B, n, m] bool -> [B, n, 2] int32: first and one past the last True along m (0, 0 if none)."""
    count = may_see.shape[2]
    any_visible = may_see.any(axis=2)
    first = jnp.argmax(may_see, axis=2)
    end = count - jnp.argmax(may_see[:, :, ::-1], axis=2)
    span = jnp.stack([jnp.where(any_visible, first, 0), jnp.where(any_visible, end, 0)], axis=2)
    return span.astype(jnp.int32)


def _block_pairs(cfg, batch, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, q_padded, kv_padded):
    """[B, nq, nk] bools: which (query block, key block) pairs may see each other."""
    num_q, num_k = q_padded // block_q, kv_padded // block_k
    # Blocks of padding only (when the other pass's blocks are larger) are never visited.
    q_real = jnp.arange(num_q) * block_q < cfg.q_len
    kv_real = jnp.arange(num_k) * block_k < cfg.kv_len
    may_see = jnp.broadcast_to(q_real[:, None] & kv_real[None, :], (batch, num_q, num_k))
    if cfg.masks_by_position:
        q_min, q_max = _block_extremes(q_pos, block_q)
        k_min, k_max = _block_extremes(kv_pos, block_k)
        q_min, q_max = q_min[:, :, None], q_max[:, :, None]
        k_min, k_max = k_min[:, None, :], k_max[:, None, :]
        if cfg.causal:
            may_see &= k_min <= q_max
        if cfg.window_left is not None:
            may_see &= q_min - k_max <= cfg.window_left
        if cfg.window_right is not None:
            may_see &= k_min - q_max <= cfg.window_right
    if q_seg is not None:
        q_low, q_high = _block_extremes(q_seg, block_q, ignore_zero=True)
        k_low, k_high = _block_extremes(kv_seg, block_k, ignore_zero=True)
        may_see &= (q_low[:, :, None] <= k_high[:, None, :]) & (
            k_low[:, None, :] <= q_high[:, :, None]
        )
    return may_see


def block_ranges(cfg, batch, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, q_padded, kv_padded):
    """Key blocks each query block may see, and the reverse: ([B, nq, 2], [B, nk, 2]).

    Shared with :mod:`effformer.kernels.flash_attention_tpu`. ``cfg`` is either
    kernel's config: it reads ``causal``, ``window_left``, ``window_right``,
    ``masks_by_position`` and the unpadded ``q_len``, ``kv_len``. ``q_pos``, ``kv_pos``,
    ``q_seg``, ``kv_seg`` are the [B, padded length] int32 rows of :func:`padded_rows`
    (or None); ``q_padded``, ``kv_padded`` are those lengths, multiples of the blocks.

    Conservative: a block pair is kept whenever some query of the one might see
    some key of the other. Padded entries repeat the last position and have
    segment id 0, so they do not widen the ranges.
    """
    may_see = _block_pairs(
        cfg, batch, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, q_padded, kv_padded
    )
    return _span(may_see), _span(may_see.transpose(0, 2, 1))


def _uniform_pairs(cfg, batch, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, q_padded, kv_padded):
    """[B, nq, nk] bools, (weight one, weight r): block pairs with every pair visible.

    Exact, never optimistic: a pair of blocks counts only if every query of the
    one sees every key of the other (no padded key, one shared non-padding
    segment, every position inside the causal / window bounds) and, with the
    soft-causal ratio, every key lies at or before every query (weight 1: the
    first array) or after every query (weight r: the second). Without the
    ratio every all-visible pair has weight 1.
    """
    num_q, num_k = q_padded // block_q, kv_padded // block_k
    kv_complete = (jnp.arange(num_k) + 1) * block_k <= cfg.kv_len  # no padded key in the block
    q_real = jnp.arange(num_q) * block_q < cfg.q_len
    full = jnp.broadcast_to(q_real[:, None] & kv_complete[None, :], (batch, num_q, num_k))
    lower = upper = None
    if cfg.masks_by_position or cfg.soft:
        q_min, q_max = _block_extremes(q_pos, block_q)
        k_min, k_max = _block_extremes(kv_pos, block_k)
        q_min, q_max = q_min[:, :, None], q_max[:, :, None]
        k_min, k_max = k_min[:, None, :], k_max[:, None, :]
        lower, upper = k_max <= q_min, k_min > q_max
        if cfg.causal:
            full &= lower
        if cfg.window_left is not None:
            full &= q_max - k_min <= cfg.window_left
        if cfg.window_right is not None:
            full &= k_max - q_min <= cfg.window_right
    if q_seg is not None:
        q_low, q_high = _block_extremes(q_seg, block_q)
        k_low, k_high = _block_extremes(kv_seg, block_k)
        one_q, one_k = (q_low == q_high) & (q_low != 0), k_low == k_high
        full &= one_q[:, :, None] & one_k[:, None, :] & (q_low[:, :, None] == k_low[:, None, :])
    if not cfg.soft:
        return full, jnp.zeros_like(full)
    return full & lower, full & upper


def _runs(may_see: Array, first: Array, second: Array) -> Array:
    """[B, n, m] bools -> [B, n, 6] int32 schedules (see :func:`block_schedules`).

    A run is kept only if its blocks are contiguous and the first ends before
    the second starts; a run that is not (positions out of order) is emptied,
    and its blocks go to the masked loops, which compute them exactly anyway.
    """
    span = _span(may_see)
    start, end = span[..., 0], span[..., 1]

    def run(uniform):
        run_span = _span(uniform)
        low, high = run_span[..., 0], run_span[..., 1]
        contiguous = uniform.sum(axis=2) == high - low
        return contiguous & (high > low), low, high

    first_ok, first_low, first_high = run(first)
    first_low = jnp.where(first_ok, first_low, start)
    first_high = jnp.where(first_ok, first_high, start)
    second_ok, second_low, second_high = run(second)
    second_ok &= second_low >= first_high
    second_low = jnp.where(second_ok, second_low, end)
    second_high = jnp.where(second_ok, second_high, end)
    schedule = (start, first_low, first_high, second_low, second_high, end)
    return jnp.stack(schedule, axis=2).astype(jnp.int32)


def block_schedules(
    cfg, batch, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, q_padded, kv_padded
):
    """Which blocks each row of blocks visits, and how: ([B, nq, 6], [B, nk, 6]) int32.

    The first array is per query block over the key blocks (forward, dq), the
    second per key block over the query blocks (dk, dv). Each row is
    ``(start, a, b, c, d, end)`` with ``start <= a <= b <= c <= d <= end``: the
    kernel visits ``[start, end)`` (the span of :func:`block_ranges`); the runs
    ``[a, b)`` and ``[c, d)`` are block pairs that are visible throughout with a
    uniform soft-causal weight (:func:`_uniform_pairs`), walked without the
    per-element mask; the rest is walked with it. Over key blocks the first run
    has weight 1 and the second weight r (keys before, then after the queries);
    over query blocks the reverse. With positions in order this leaves the
    element mask to the diagonal blocks (causal, soft-causal) and a window's
    two edges: the FlashAttention-2 and Triton-tutorial split of a causal row.
    """
    args = (cfg, batch, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, q_padded, kv_padded)
    may_see = _block_pairs(*args)
    weight_one, weight_ratio = _uniform_pairs(*args)
    weight_one &= may_see
    weight_ratio &= may_see
    by_query = _runs(may_see, weight_one, weight_ratio)
    transpose = lambda x: x.transpose(0, 2, 1)  # noqa: E731
    by_key = _runs(transpose(may_see), transpose(weight_ratio), transpose(weight_one))
    return by_query, by_key


# ----------------------------------------------------------------------------- pallas calls


def _compiler_params(cfg: _Config, head_dim: int) -> plgpu.CompilerParams:
    # Unless set (BlockSizes.num_warps): more warps for the larger [block, head_dim] tiles.
    warps = cfg.num_warps or (4 if head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=warps, num_stages=cfg.num_stages)


def _ratio_spec(ratio):
    return None if ratio is None else pl.BlockSpec((1,), lambda *_: (0,))


def _forward_call(cfg: _Config, q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg):
    """Padded [B, Lq, H, D] q and [B, Lk, Hkv, D] k, v -> out like q, lse [B, H, Lq] (base 2)."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, groups = k.shape[1], num_heads // k.shape[2]
    block_q = cfg.block_q
    schedules, _ = block_schedules(
        cfg, batch, q_pos, kv_pos, q_seg, kv_seg, block_q, cfg.block_k, q_len, kv_len
    )
    q_block = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_all = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0))
    q_row = pl.BlockSpec((None, block_q), lambda i, b, h: (b, i))
    kv_row = pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0))
    optional = lambda x, spec: None if x is None else spec  # noqa: E731
    dtype = _accumulator_dtype(q.dtype)
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=(q_len // block_q, batch, num_heads),
        in_specs=[
            pl.BlockSpec((None, None, 6), lambda i, b, h: (b, i, 0)),
            _ratio_spec(ratio),
            q_block,
            kv_all,
            kv_all,
            optional(q_pos, q_row),
            optional(kv_pos, kv_row),
            optional(q_seg, q_row),
            optional(kv_seg, kv_row),
        ],
        out_specs=[q_block, pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, q_len), dtype),
        ],
        compiler_params=_compiler_params(cfg, head_dim),
        interpret=cfg.interpret,
        name="flash_attention_forward",
    )(schedules, ratio, q, k, v, q_pos, kv_pos, q_seg, kv_seg)


def _backward_calls(cfg: _Config, residuals, d_out):
    """The dq and dk/dv kernels; returns dq like q and dk, dv like k, v."""
    q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg, out, lse = residuals
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    block_q, block_k = cfg.block_q_bwd, cfg.block_k_bwd
    dtype = _accumulator_dtype(q.dtype)
    # FlashAttention-2's row term D_i = dO_i . o_i (right with the soft weights too), [B, H, Lq].
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(dtype), out.astype(dtype))
    q_schedules, kv_schedules = block_schedules(
        cfg, batch, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, q_len, kv_len
    )
    optional = lambda x, spec: None if x is None else spec  # noqa: E731
    inputs = (ratio, q, k, v, q_pos, kv_pos, q_seg, kv_seg, d_out, lse, delta)
    params = _compiler_params(cfg, head_dim)

    # dk, dv: grid over key blocks; every query of the (batch, head) is in reach.
    q_all = pl.BlockSpec((None, q_len, None, head_dim), lambda j, b, h: (b, 0, h, 0))
    kv_block = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, h: (b, j, h // groups, 0))
    q_rows = pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0))
    kv_rows = pl.BlockSpec((None, block_k), lambda j, b, h: (b, j))
    per_row = pl.BlockSpec((None, None, q_len), lambda j, b, h: (b, h, 0))
    # One partial per query head when grouped (summed below), so no two programs share a block.
    partial_dtype = k.dtype if groups == 1 else dtype
    dkdv_block = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, h: (b, j, h, 0))
    out_specs = [dkdv_block, dkdv_block]
    out_shape = [jax.ShapeDtypeStruct((batch, kv_len, num_heads, head_dim), partial_dtype)] * 2
    dq_zeros, aliases = None, {}
    if cfg.fused_backward:
        # Every key block's program adds to its (batch, head)'s whole dq: a zeros input
        # aliased to the output, so the adds start from 0 (a fresh output is uninitialised).
        dq_zeros = jnp.zeros(q.shape, dtype)
        out_specs.append(q_all)
        out_shape.append(jax.ShapeDtypeStruct(q.shape, dtype))
        # Alias indices count the flattened inputs, which skip the absent (None) ones.
        aliases = {len(jax.tree.leaves((kv_schedules, inputs))): 2}
    outputs = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid=(kv_len // block_k, batch, num_heads),
        in_specs=[
            pl.BlockSpec((None, None, 6), lambda j, b, h: (b, j, 0)),
            _ratio_spec(ratio),
            q_all,
            kv_block,
            kv_block,
            optional(q_pos, q_rows),
            optional(kv_pos, kv_rows),
            optional(q_seg, q_rows),
            optional(kv_seg, kv_rows),
            q_all,
            per_row,
            per_row,
            None if dq_zeros is None else q_all,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_attention_dkdv",
    )(kv_schedules, *inputs, dq_zeros)
    dk, dv = outputs[:2]
    if groups > 1:
        grouped = (batch, kv_len, num_kv_heads, groups, head_dim)
        dk = dk.reshape(grouped).sum(axis=3).astype(k.dtype)
        dv = dv.reshape(grouped).sum(axis=3).astype(v.dtype)
    if cfg.fused_backward:
        return (outputs[2] * cfg.scale).astype(q.dtype), dk, dv

    # dq: grid over query blocks, like the forward.
    q_block = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_all = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0))
    q_row = pl.BlockSpec((None, block_q), lambda i, b, h: (b, i))
    kv_row = pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0))
    row_block = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(q_len // block_q, batch, num_heads),
        in_specs=[
            pl.BlockSpec((None, None, 6), lambda i, b, h: (b, i, 0)),
            _ratio_spec(ratio),
            q_block,
            kv_all,
            kv_all,
            optional(q_pos, q_row),
            optional(kv_pos, kv_row),
            optional(q_seg, q_row),
            optional(kv_seg, kv_row),
            q_block,
            row_block,
            row_block,
        ],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(q_schedules, *inputs)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg):
    return _any_forward_call(cfg, q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg)[0]


def _mosaic_config(cfg: _Config, block_q: int, block_k: int):
    return flash_attention_mosaic_gpu.MosaicConfig(
        causal=cfg.causal,
        soft=cfg.soft,
        scale=cfg.scale,
        q_len=cfg.q_len,
        kv_len=cfg.kv_len,
        block_q=block_q,
        block_k=block_k,
        interpret=cfg.interpret,
    )


def _mosaic_forward_call(cfg: _Config, q, k, v, ratio):
    """The forward on Mosaic GPU: the same (out, lse) as :func:`_forward_call`."""
    mosaic_cfg = _mosaic_config(cfg, cfg.block_q, cfg.block_k)
    return flash_attention_mosaic_gpu.forward(mosaic_cfg, q, k, v, ratio)


def _any_forward_call(cfg: _Config, q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg):
    if cfg.mosaic_forward:  # positions are the defaults and there are no segments here
        return _mosaic_forward_call(cfg, q, k, v, ratio)
    return _forward_call(cfg, q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg)


def _flash_forward(cfg, q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = _any_forward_call(cfg, q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg)
    return out, (q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _flash_backward(cfg, residuals, d_out):
    if cfg.mosaic_backward:  # positions are the defaults and there are no segments here
        q, k, v, ratio, _, _, _, _, out, lse = residuals
        mosaic_cfg = _mosaic_config(cfg, cfg.block_q_bwd, cfg.block_k_bwd)
        dq, dk, dv = flash_attention_mosaic_gpu.backward(
            mosaic_cfg, q, k, v, ratio, out, lse, d_out
        )
    else:
        dq, dk, dv = _backward_calls(cfg, residuals, d_out)
    # The ratio is a schedule value: zero cotangent; positions and segment ids are integers.
    return dq, dk, dv, None, None, None, None, None


_flash.defvjp(_flash_forward, _flash_backward)


# ----------------------------------------------------------------------------- public entry


def _pad_axis(x: Array | None, axis: int, length: int, mode: str = "constant") -> Array | None:
    if x is None or x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def _check_rows(caller: str, name: str, x, batch: int, length: int) -> None:
    if x is not None and (
        jnp.ndim(x) != 2 or jnp.shape(x)[0] not in (1, batch) or jnp.shape(x)[1] != length
    ):
        raise ValueError(
            f"{caller}: {name} must have shape ({batch}, {length}) (or batch 1), "
            f"got {jnp.shape(x)}."
        )


def validate_arguments(
    caller: str,
    q,
    k,
    v,
    *,
    causal,
    window_left,
    window_right,
    q_segment_ids,
    kv_segment_ids,
    q_positions,
    kv_positions,
    soft_causal_ratio,
    scale,
) -> float:
    """Checks :func:`flash_attention`'s arguments (all but the block sizes); returns the scale.

    Shared with :mod:`effformer.kernels.flash_attention_tpu`, whose entry has the
    same contract; ``caller`` names the entry in the error messages.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{caller}: {name} must have rank 4 [batch, length, heads, head_dim], "
                f"got shape {jnp.shape(x)}."
            )
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"{caller}: k and v must both have shape ({batch}, Lk, Hkv, {head_dim}), "
            f"got k {k.shape} and v {v.shape}."
        )
    if num_heads % num_kv_heads:
        raise ValueError(
            f"{caller}: q heads ({num_heads}) must be a multiple of k/v heads, got {num_kv_heads}."
        )
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(
            f"{caller}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}."
        )
    if causal and soft_causal_ratio is not None:
        raise ValueError(
            f"{caller}: causal=True and soft_causal_ratio are exclusive (the soft-causal "
            "mask already carries the causal structure)."
        )
    for name, window in (("window_left", window_left), ("window_right", window_right)):
        if window is not None and (not isinstance(window, int) or window < 0):
            raise ValueError(
                f"{caller}: {name} must be a non-negative int or None, got {window!r}."
            )
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(
            f"{caller}: give both q_segment_ids and kv_segment_ids, or neither, got "
            f"q_segment_ids={'None' if q_segment_ids is None else 'an array'} and "
            f"kv_segment_ids={'None' if kv_segment_ids is None else 'an array'}."
        )
    _check_rows(caller, "q_segment_ids", q_segment_ids, batch, q_len)
    _check_rows(caller, "kv_segment_ids", kv_segment_ids, batch, kv_len)
    _check_rows(caller, "q_positions", q_positions, batch, q_len)
    _check_rows(caller, "kv_positions", kv_positions, batch, kv_len)
    if soft_causal_ratio is not None and jnp.ndim(soft_causal_ratio) != 0:
        raise ValueError(
            f"{caller}: soft_causal_ratio must be a scalar, got shape "
            f"{jnp.shape(soft_causal_ratio)}."
        )
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    try:
        return float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(
            f"{caller}: scale must be a Python number (it is compiled into the kernel), "
            f"got {scale!r}."
        ) from None


def padded_rows(
    batch: int,
    q_len: int,
    kv_len: int,
    q_padded: int,
    kv_padded: int,
    *,
    with_positions: bool,
    q_positions,
    kv_positions,
    q_segment_ids,
    kv_segment_ids,
):
    """Positions and segment ids as [B, padded length] int32 rows (None where not needed).

    Positions (only ``with_positions``) default to ``Lk - Lq + i`` for queries and
    ``j`` for keys and are edge-padded: padded entries repeat the last position,
    so block ranges stay tight. Segment ids are padded with 0 (padding). Shared
    with :mod:`effformer.kernels.flash_attention_tpu`.
    Returns ``(q_pos, kv_pos, q_seg, kv_seg)``.
    """

    def rows(x, length, padded, mode):
        if x is None:
            return None
        x = jnp.broadcast_to(jnp.asarray(x, jnp.int32), (batch, length))
        return _pad_axis(x, 1, padded, mode)

    q_pos = kv_pos = None
    if with_positions:
        if q_positions is None:
            q_positions = jnp.arange(kv_len - q_len, kv_len, dtype=jnp.int32)[None]
        if kv_positions is None:
            kv_positions = jnp.arange(kv_len, dtype=jnp.int32)[None]
        q_pos = rows(q_positions, q_len, q_padded, "edge")
        kv_pos = rows(kv_positions, kv_len, kv_padded, "edge")
    q_seg = rows(q_segment_ids, q_len, q_padded, "constant")
    kv_seg = rows(kv_segment_ids, kv_len, kv_padded, "constant")
    return q_pos, kv_pos, q_seg, kv_seg


def _check_mosaic(dtype, **unsupported) -> None:
    """Raises unless the Mosaic GPU kernels compute this call (BlockSizes.mosaic_*)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        raise ValueError(
            f"flash_attention: the Mosaic GPU kernels (BlockSizes.mosaic_forward / "
            f"mosaic_backward) take float16 or bfloat16 inputs (WGMMA operands), got "
            f"{jnp.dtype(dtype).name}; use the Triton kernels for other dtypes."
        )
    given = [name for name, value in unsupported.items() if value is not None]
    if given:
        raise ValueError(
            f"flash_attention: the Mosaic GPU kernels (BlockSizes.mosaic_forward / "
            f"mosaic_backward) compute the masks that need no position or segment rows "
            f"(none, causal, soft-causal with the default positions), got {', '.join(given)}; "
            f"use the Triton kernels for those."
        )


def flash_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = False,
    window_left: int | None = None,
    window_right: int | None = None,
    q_segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
    soft_causal_ratio: Array | float | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> Array:
    """Softmax attention with a structural mask, as a Pallas kernel (module docstring).

    Args:
      q: [B, Lq, H, D] queries.
      k, v: [B, Lk, Hkv, D] keys and values, ``H % Hkv == 0`` (query head ``h``
        uses kv head ``h // (H // Hkv)``).
      causal, window_left, window_right: key ``j`` is visible to query ``i`` iff
        ``pos_j <= pos_i`` (causal), ``pos_i - pos_j <= window_left`` and
        ``pos_j - pos_i <= window_right`` (None: unbounded).
      q_segment_ids, kv_segment_ids: [B, Lq] / [B, Lk] int (batch 1 broadcasts);
        a query sees only keys of its own segment; 0 is padding (sees nothing).
      q_positions, kv_positions: [B, Lq] / [B, Lk] int; default ``Lk - Lq + i``
        for queries and ``j`` for keys (the last query aligned with the last key).
      soft_causal_ratio: iLLaMA's r (a scalar, may be traced): probabilities of
        keys after the query are multiplied by r after the softmax. Exclusive
        with ``causal``. Not differentiated (zero cotangent).
      scale: logit scale (a Python number), default ``1 / sqrt(D)``.
      block_sizes: :class:`BlockSizes`, default :func:`default_block_sizes`.
      interpret: run the kernels in Pallas's interpreter (any backend, e.g. CPU).
    Returns:
      [B, Lq, H, D] in q's dtype.
    """
    scale = validate_arguments(
        "flash_attention",
        q,
        k,
        v,
        causal=causal,
        window_left=window_left,
        window_right=window_right,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
        soft_causal_ratio=soft_causal_ratio,
        scale=scale,
    )
    batch, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    if block_sizes is None:
        block_sizes = default_block_sizes(q.dtype, head_dim)
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(
            f"flash_attention: block_sizes must be a BlockSizes or None, got {block_sizes!r}."
        )

    mosaic = block_sizes.mosaic_forward or block_sizes.mosaic_backward
    if mosaic:
        _check_mosaic(
            q.dtype,
            window_left=window_left,
            window_right=window_right,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            q_positions=q_positions,
            kv_positions=kv_positions,
        )
    # Mosaic blocks are at least 64; the Triton side of a mixed call may use its own.
    smallest = _MOSAIC_MIN_BLOCK if block_sizes.mosaic_forward else _MIN_BLOCK
    smallest_bwd = _MOSAIC_MIN_BLOCK if block_sizes.mosaic_backward else _MIN_BLOCK
    cfg = _Config(
        causal=causal,
        window_left=window_left,
        window_right=window_right,
        soft=soft_causal_ratio is not None,
        scale=scale,
        q_len=q_len,
        kv_len=kv_len,
        block_q=_clip_block(block_sizes.block_q, q_len, smallest),
        block_k=_clip_block(block_sizes.block_k, kv_len, smallest),
        block_q_bwd=_clip_block(block_sizes.block_q_bwd, q_len, smallest_bwd),
        block_k_bwd=_clip_block(block_sizes.block_k_bwd, kv_len, smallest_bwd),
        interpret=interpret,
        num_warps=block_sizes.num_warps,
        num_stages=block_sizes.num_stages,
        fused_backward=block_sizes.fused_backward,
        mosaic_forward=block_sizes.mosaic_forward,
        mosaic_backward=block_sizes.mosaic_backward,
    )
    q_padded, kv_padded = _padded_q_len(cfg), _padded_kv_len(cfg)
    # Triton's dot wants a power-of-two head dim of at least 16 (Mosaic GPU's swizzled
    # tiles at least 64); zero columns change no dot product and are sliced off the output.
    head_padded = max(_MOSAIC_MIN_BLOCK if mosaic else _MIN_BLOCK, _next_power_of_2(head_dim))

    q_pos, kv_pos, q_seg, kv_seg = padded_rows(
        batch,
        q_len,
        kv_len,
        q_padded,
        kv_padded,
        with_positions=cfg.masks_by_position or cfg.soft,
        q_positions=q_positions,
        kv_positions=kv_positions,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    ratio = None
    if cfg.soft:
        ratio = jnp.reshape(jnp.asarray(soft_causal_ratio, _accumulator_dtype(q.dtype)), (1,))

    def pad(x, length):
        return _pad_axis(_pad_axis(x, 1, length), 3, head_padded)

    out = _flash(
        cfg,
        pad(q, q_padded),
        pad(k, kv_padded),
        pad(v, kv_padded),
        ratio,
        q_pos,
        kv_pos,
        q_seg,
        kv_seg,
    )
    return out[:, :q_len, :, :head_dim]
