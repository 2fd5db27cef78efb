"""Flash attention with structured masks and iLLaMA's soft-causal mask, for Mosaic TPU.

The same computation and argument contract as
:func:`effformer.kernels.flash_attention.flash_attention` (its module docstring
has the math: the soft-causal weight ``w_ij = r + (1 - r) [pos_j <= pos_i]``
applied after the softmax with the full row's normaliser, one weighted
accumulator, and the backward derivation showing that FlashAttention-2's row
term ``D_i = dO_i . o_i`` holds with the weights). What differs is the layout,
written for Mosaic TPU's (8, 128) tiling:

* q, k, v are transposed to [B, H, L, D] here, so every block is
  ``(None, None, block, D)``: the last two dims are a block of rows (a multiple
  of 128) and the full head dim.
* Row statistics (running max, normaliser, log-sum-exp) live lane-replicated
  as [block, 128], as Mosaic's own TPU kernels keep them; they are widened to
  [block, width] by tiling or slicing (``_lanes``), never by a 1-D reshape.
* Positions and segment ids come in two layouts: as columns [B, L, 128]
  (lane-broadcast, for the side laid along a tile's rows) and as rows [B, 1, L]
  (for the side laid along the lanes). Rows are a (1, block) block of an array
  whose second-minor dim is 1, which satisfies the tiling because it equals the
  array's dim; it is 8 times smaller than an [B, 8, L] sublane broadcast.
* The soft-causal ratio is a scalar in SMEM.

Forward: grid (B, H, query blocks, key blocks), the key axis "arbitrary"
(sequential) with VMEM scratch for the running max ``m``, normaliser ``l`` (both
[block_q, 128]) and the accumulator [block_q, D]; they are reset at the first
key step and the output and row log-sum-exp are written at the last.

Backward (``jax.custom_vjp``), recomputing ``p`` from the saved log-sum-exp:
a dK/dV kernel over (B, H, key blocks, query blocks), the query axis
"arbitrary", with [block_k, D] scratch accumulators; it computes the transposed
scores ``k q^T`` [block_k, block_q] so that the log-sum-exp and ``D`` enter as
[1, block_q] rows and every matmul is a plain or transposed-right-hand one.
A dQ kernel over (B, H, query blocks, key blocks) like the forward. With
grouped-query attention the dK/dV kernel writes one float32 partial per query
head, summed over each kv head's group in XLA.

Skipping: which key blocks each query block may see (and the reverse) is
bounded outside the kernels by
:func:`effformer.kernels.flash_attention.block_ranges` from per-block extremes
of positions and segment ids (causal triangle, window band, segments). The
spans are scalar-prefetched (``PrefetchScalarGridSpec``); the inner block
index is clamped into the span, so the grid steps outside it keep the block
already in VMEM (the pipeline issues no new DMA for an unchanged block index),
and ``pl.when`` skips their compute.

Lengths that are not multiples of the blocks are padded: padded keys are
hidden by their index, padded queries are sliced away (their zero cotangent
makes them contribute nothing to dK, dV). A query that sees no key outputs
exactly 0 with zero gradients.

Verified on CPU only: in Pallas's TPU interpret mode against the op's
float64 reference (tests/kernels/test_flash_attention_tpu.py), and lowered to
Mosaic MLIR for TPU from the CPU host (Pallas's Mosaic lowering rules, not
libtpu's compiler). It has NOT been compiled or run on a TPU: no TPU was
available when it was written, and the default block sizes are untuned.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effformer.kernels.flash_attention import block_ranges, padded_rows, validate_arguments

Array = jax.Array

_LANES = 128  # a TPU vector register is 8 sublanes x 128 lanes
# Contract the last dims of both operands: a b^T, which Mosaic's matmul takes directly.
_TRANSPOSED_RHS = (((1,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes (multiples of 128) of the three TPU kernels.

    ``block_q, block_k``: forward query / key blocks; ``block_q_bwd,
    block_k_bwd``: the query / key blocks of both backward kernels. Each is
    clipped to the length rounded up to 128, so short sequences use one block.
    Multiples of 128 because positions, segment ids and the log-sum-exp enter
    some kernels as [1, block] rows, whose lane dim must be a multiple of 128.
    The defaults (128 everywhere) are a common starting point for TPU attention
    kernels and are NOT tuned: no TPU was available when they were set.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 128
    block_k_bwd: int = 128

    def __post_init__(self):
        for field in dataclasses.fields(self):
            size = getattr(self, field.name)
            if not isinstance(size, int) or size < _LANES or size % _LANES:
                raise ValueError(
                    f"BlockSizes.{field.name} must be a positive multiple of {_LANES} "
                    f"(Mosaic's lane tiling), got {size!r}."
                )


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
    q_padded: int  # multiples of the forward and the backward blocks
    kv_padded: int
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    interpret: pltpu.InterpretParams | None

    @property
    def masks_by_position(self) -> bool:
        """Whether positions hide keys (the soft-causal weight also reads positions)."""
        return self.causal or self.window_left is not None or self.window_right is not None

    @property
    def with_positions(self) -> bool:
        return self.masks_by_position or self.soft


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _accumulator_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------- in-kernel pieces


def _lanes(x: Array, width: int) -> Array:
    """A lane-replicated [rows, 128] statistic widened (or cut) to [rows, width]."""
    if width > _LANES:
        x = jnp.tile(x, (1, -(-width // _LANES)))
    return x if x.shape[1] == width else x[:, :width]


@dataclasses.dataclass(frozen=True)
class _MaskInputs:
    """One tile's mask operands, laid out to broadcast to the tile's [rows, cols] shape.

    Query-major tiles (forward, dQ: rows are queries): query-side values are
    [bq, bk], key-side [1, bk]. Key-major tiles (dK/dV: rows are keys):
    query-side [1, bq], key-side [bk, bq]. The predicates are elementwise, so
    one function serves both. ``kv_index`` is the key's index in the padded
    sequence, or None when no key is padding.
    """

    q_pos: Array | None
    kv_pos: Array | None
    q_seg: Array | None
    kv_seg: Array | None
    kv_index: Array | None


def _query_major_mask(cfg, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref, kv_block, bq, bk):
    """Mask operands of a [bq, bk] tile: query columns [bq, 128] widened, key rows [1, bk]."""
    kv_index = None
    if cfg.kv_padded != cfg.kv_len:
        kv_index = kv_block * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    return _MaskInputs(
        q_pos=None if q_pos_ref is None else _lanes(q_pos_ref[...], bk),
        kv_pos=None if kv_pos_ref is None else kv_pos_ref[...],
        q_seg=None if q_seg_ref is None else _lanes(q_seg_ref[...], bk),
        kv_seg=None if kv_seg_ref is None else kv_seg_ref[...],
        kv_index=kv_index,
    )


def _key_major_mask(cfg, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref, kv_block, bq, bk):
    """Mask operands of a [bk, bq] tile: query rows [1, bq], key columns [bk, 128] widened."""
    kv_index = None
    if cfg.kv_padded != cfg.kv_len:
        kv_index = kv_block * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
    return _MaskInputs(
        q_pos=None if q_pos_ref is None else q_pos_ref[...],
        kv_pos=None if kv_pos_ref is None else _lanes(kv_pos_ref[...], bq),
        q_seg=None if q_seg_ref is None else q_seg_ref[...],
        kv_seg=None if kv_seg_ref is None else _lanes(kv_seg_ref[...], bq),
        kv_index=kv_index,
    )


def _visible(cfg: _Config, mask: _MaskInputs) -> Array | None:
    """bool tile: which (query, key) pairs take part in the softmax; None for all."""
    visible = None

    def both(a, b):
        return b if a is None else a & b

    q_pos, kv_pos = mask.q_pos, mask.kv_pos
    if cfg.causal:
        visible = both(visible, kv_pos <= q_pos)
    if cfg.window_left is not None:
        visible = both(visible, q_pos - kv_pos <= cfg.window_left)
    if cfg.window_right is not None:
        visible = both(visible, kv_pos - q_pos <= cfg.window_right)
    if mask.q_seg is not None:
        visible = both(visible, (mask.q_seg == mask.kv_seg) & (mask.q_seg != 0))
    if mask.kv_index is not None:
        visible = both(visible, mask.kv_index < cfg.kv_len)
    return visible


def _weight(cfg: _Config, ratio_ref, mask: _MaskInputs, x: Array) -> Array:
    """x * w with w = r + (1 - r)[pos_k <= pos_q]: keys after the query are scaled by r."""
    if not cfg.soft:
        return x
    return jnp.where(mask.kv_pos > mask.q_pos, x * ratio_ref[0], x)


def _clamp_to_span(step, start, end):
    """The inner block to hold at grid step ``step`` when only [start, end) is visited.

    Steps before the span already hold its first block and steps after it keep
    its last, so they fetch nothing new; an empty span (0, 0) holds block 0.
    """
    return jnp.minimum(jnp.maximum(step, start), jnp.maximum(end - 1, start))


def _forward_kernel(
    starts_ref,
    ends_ref,
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
    m_scratch,
    l_scratch,
    acc_scratch,
    *,
    cfg: _Config,
):
    """One (batch, head, query block) at one key block. q [bq, D]; k, v [bk, D]."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bq, bk = cfg.block_q, cfg.block_k
    span = b * (cfg.q_padded // bq) + i
    head_dim = acc_scratch.shape[1]
    dtype = acc_scratch.dtype

    @pl.when(j == 0)
    def _init():
        m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, dtype)
        l_scratch[...] = jnp.zeros(l_scratch.shape, dtype)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, dtype)

    @pl.when((starts_ref[span] <= j) & (j < ends_ref[span]))
    def _compute():
        s = lax.dot_general(q_ref[...], k_ref[...], _TRANSPOSED_RHS, preferred_element_type=dtype)
        s = s * cfg.scale  # [bq, bk]
        mask = _query_major_mask(cfg, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref, j, bq, bk)
        visible = _visible(cfg, mask)
        if visible is not None:
            s = jnp.where(visible, s, -jnp.inf)
        m_prev = m_scratch[...]  # [bq, 128], lane-replicated
        m_next = jnp.maximum(m_prev, s.max(axis=1)[:, None])
        # A row that has seen no visible key keeps m = -inf: shift by 0 so exp gives 0, not NaN.
        m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        e = jnp.exp(s - _lanes(m_shift, bk))
        correction = jnp.exp(m_prev - m_shift)
        l_scratch[...] = l_scratch[...] * correction + e.sum(axis=1)[:, None]
        m_scratch[...] = m_next
        e = _weight(cfg, ratio_ref, mask, e)  # after the normaliser: it sums unweighted terms
        v = v_ref[...]
        acc_scratch[...] = acc_scratch[...] * _lanes(correction, head_dim) + jnp.dot(
            e.astype(v.dtype), v, preferred_element_type=dtype
        )

    @pl.when(j == pl.num_programs(3) - 1)
    def _finalize():
        row_sum = l_scratch[...]
        empty = row_sum == 0.0  # no visible key: output exactly 0
        safe_sum = jnp.where(empty, 1.0, row_sum)
        out_ref[...] = (acc_scratch[...] / _lanes(safe_sum, head_dim)).astype(out_ref.dtype)
        # 0 for empty rows: every p there is masked to 0 in the backward anyway.
        lse_ref[...] = jnp.where(empty, 0.0, m_scratch[...] + jnp.log(safe_sum))


def _dq_kernel(
    starts_ref,
    ends_ref,
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
    dq_scratch,
    *,
    cfg: _Config,
):
    """One (batch, head, query block) at one key block. q, dO [bq, D]; k, v [bk, D]."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    span = b * (cfg.q_padded // bq) + i
    dtype = dq_scratch.dtype

    @pl.when(j == 0)
    def _init():
        dq_scratch[...] = jnp.zeros(dq_scratch.shape, dtype)

    @pl.when((starts_ref[span] <= j) & (j < ends_ref[span]))
    def _compute():
        k, v = k_ref[...], v_ref[...]
        s = lax.dot_general(q_ref[...], k, _TRANSPOSED_RHS, preferred_element_type=dtype)
        p = jnp.exp(s * cfg.scale - _lanes(lse_ref[...], bk))  # [bq, bk]
        mask = _query_major_mask(cfg, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref, j, bq, bk)
        visible = _visible(cfg, mask)
        if visible is not None:
            p = jnp.where(visible, p, 0.0)
        dp = lax.dot_general(d_out_ref[...], v, _TRANSPOSED_RHS, preferred_element_type=dtype)
        # ds_ij = p_ij (w_ij dO_i . v_j - D_i), without the scale (applied once at the end).
        ds = p * (_weight(cfg, ratio_ref, mask, dp) - _lanes(delta_ref[...], bk))
        dq_scratch[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=dtype)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finalize():
        dq_ref[...] = (dq_scratch[...] * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(
    starts_ref,
    ends_ref,
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
    dk_ref,
    dv_ref,
    dk_scratch,
    dv_scratch,
    *,
    cfg: _Config,
):
    """One (batch, query head, key block) at one query block, in transposed tiles [bk, bq].

    k, v [bk, D]; q, dO [bq, D]; lse and D as [1, bq] rows.
    """
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    span = b * (cfg.kv_padded // bk) + j
    dtype = dk_scratch.dtype

    @pl.when(i == 0)
    def _init():
        dk_scratch[...] = jnp.zeros(dk_scratch.shape, dtype)
        dv_scratch[...] = jnp.zeros(dv_scratch.shape, dtype)

    @pl.when((starts_ref[span] <= i) & (i < ends_ref[span]))
    def _compute():
        q, d_out = q_ref[...], d_out_ref[...]
        s_t = lax.dot_general(k_ref[...], q, _TRANSPOSED_RHS, preferred_element_type=dtype)
        p_t = jnp.exp(s_t * cfg.scale - lse_ref[...])  # [bk, bq]
        mask = _key_major_mask(cfg, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref, j, bq, bk)
        visible = _visible(cfg, mask)
        if visible is not None:
            p_t = jnp.where(visible, p_t, 0.0)
        # dv_j = sum_i p_ij w_ij dO_i
        pw_t = _weight(cfg, ratio_ref, mask, p_t)
        dv_scratch[...] += jnp.dot(pw_t.astype(d_out.dtype), d_out, preferred_element_type=dtype)
        dp_t = lax.dot_general(v_ref[...], d_out, _TRANSPOSED_RHS, preferred_element_type=dtype)
        ds_t = p_t * (_weight(cfg, ratio_ref, mask, dp_t) - delta_ref[...])
        dk_scratch[...] += jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=dtype)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finalize():
        dk_ref[...] = (dk_scratch[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls


def _columns(rows: Array | None) -> Array | None:
    """[B, L] int32 -> [B, L, 128], lane-broadcast (the side laid along a tile's rows)."""
    return None if rows is None else jnp.broadcast_to(rows[:, :, None], (*rows.shape, _LANES))


def _lane_rows(rows: Array | None) -> Array | None:
    """[B, L] int32 -> [B, 1, L] (the side laid along a tile's lanes)."""
    return None if rows is None else rows[:, None, :]


def _spans(ranges: Array) -> tuple[Array, Array]:
    """[B, n, 2] block spans -> flat int32 starts, ends [B * n] (scalar-prefetched to SMEM)."""
    return ranges[..., 0].reshape(-1), ranges[..., 1].reshape(-1)


def _kv_head(head, groups: int):
    """The kv head of a query head. lax.div, not //: jnp's floor division of signed ints
    lowers through sign(), which Mosaic lowers only for a known TPU generation."""
    return lax.div(head, jnp.int32(groups))


def _optional(x, spec):
    return None if x is None else spec


def _ratio_spec(ratio):
    return None if ratio is None else pl.BlockSpec(memory_space=pltpu.SMEM)


def _call(cfg: _Config, kernel, name: str, grid, in_specs, out_specs, out_shape, scratch):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        # The innermost axis accumulates into scratch: sequential. The rest are independent.
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=False if cfg.interpret is None else cfg.interpret,
        name=name,
    )


def _query_major_specs(cfg: _Config, groups: int, bq: int, bk: int, head_dim: int):
    """Block specs of a (B, H, query block, key block) grid: q-like, kv-like, q/kv rows."""
    num_q = cfg.q_padded // bq

    def kv_block(b, i, j, starts, ends):
        span = b * num_q + i
        return _clamp_to_span(j, starts[span], ends[span])

    return dict(
        q=pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0)),
        kv=pl.BlockSpec(
            (None, None, bk, head_dim),
            lambda b, h, i, j, st, en: (b, _kv_head(h, groups), kv_block(b, i, j, st, en), 0),
        ),
        q_column=pl.BlockSpec((None, bq, _LANES), lambda b, h, i, j, *_: (b, i, 0)),
        kv_row=pl.BlockSpec(
            (None, 1, bk), lambda b, h, i, j, st, en: (b, 0, kv_block(b, i, j, st, en))
        ),
        statistic=pl.BlockSpec((None, None, bq, _LANES), lambda b, h, i, j, *_: (b, h, i, 0)),
    )


def _forward_call(cfg: _Config, q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg):
    """[B, H, Lq, D] q and [B, Hkv, Lk, D] k, v (padded) -> out like q, lse [B, H, Lq]."""
    batch, num_heads, q_len, head_dim = q.shape
    groups = num_heads // k.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    ranges, _ = block_ranges(
        cfg, batch, q_pos, kv_pos, q_seg, kv_seg, bq, bk, cfg.q_padded, cfg.kv_padded
    )
    specs = _query_major_specs(cfg, groups, bq, bk, head_dim)
    dtype = _accumulator_dtype(q.dtype)
    out, lse = _call(
        cfg,
        _forward_kernel,
        "flash_attention_tpu_forward",
        grid=(batch, num_heads, q_len // bq, k.shape[2] // bk),
        in_specs=[
            _ratio_spec(ratio),
            specs["q"],
            specs["kv"],
            specs["kv"],
            _optional(q_pos, specs["q_column"]),
            _optional(kv_pos, specs["kv_row"]),
            _optional(q_seg, specs["q_column"]),
            _optional(kv_seg, specs["kv_row"]),
        ],
        out_specs=[specs["q"], specs["statistic"]],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, q_len, _LANES), dtype),
        ],
        scratch=[
            pltpu.VMEM((bq, _LANES), dtype),  # running max m
            pltpu.VMEM((bq, _LANES), dtype),  # normaliser l
            pltpu.VMEM((bq, head_dim), dtype),  # accumulator
        ],
    )(
        *_spans(ranges),
        ratio,
        q,
        k,
        v,
        _columns(q_pos),
        _lane_rows(kv_pos),
        _columns(q_seg),
        _lane_rows(kv_seg),
    )
    # Keep one lane: the residual is [B, H, Lq], not 128 times that.
    return out, lse[..., 0]


def _backward_calls(cfg: _Config, residuals, d_out):
    """The dQ and dK/dV kernels; returns dq like q and dk, dv like k, v ([B, H, L, D])."""
    q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg, out, lse = residuals
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    dtype = _accumulator_dtype(q.dtype)
    # FlashAttention-2's row term D_i = dO_i . o_i (right with the soft weights too), [B, H, Lq].
    delta = jnp.einsum("bhqd,bhqd->bhq", d_out.astype(dtype), out.astype(dtype))
    q_ranges, kv_ranges = block_ranges(
        cfg, batch, q_pos, kv_pos, q_seg, kv_seg, bq, bk, cfg.q_padded, cfg.kv_padded
    )

    # dQ: like the forward, with lse and D lane-replicated as [bq, 128] columns.
    specs = _query_major_specs(cfg, groups, bq, bk, head_dim)
    replicated = lambda x: jnp.broadcast_to(x[..., None], (*x.shape, _LANES))  # noqa: E731
    dq = _call(
        cfg,
        _dq_kernel,
        "flash_attention_tpu_dq",
        grid=(batch, num_heads, q_len // bq, kv_len // bk),
        in_specs=[
            _ratio_spec(ratio),
            specs["q"],
            specs["kv"],
            specs["kv"],
            _optional(q_pos, specs["q_column"]),
            _optional(kv_pos, specs["kv_row"]),
            _optional(q_seg, specs["q_column"]),
            _optional(kv_seg, specs["kv_row"]),
            specs["q"],
            specs["statistic"],
            specs["statistic"],
        ],
        out_specs=specs["q"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch=[pltpu.VMEM((bq, head_dim), dtype)],
    )(
        *_spans(q_ranges),
        ratio,
        q,
        k,
        v,
        _columns(q_pos),
        _lane_rows(kv_pos),
        _columns(q_seg),
        _lane_rows(kv_seg),
        d_out,
        replicated(lse),
        replicated(delta),
    )

    # dK, dV: grid over key blocks, the query axis inner; lse and D as [1, bq] rows.
    num_k = cfg.kv_padded // bk

    def q_block(b, j, i, starts, ends):
        span = b * num_k + j
        return _clamp_to_span(i, starts[span], ends[span])

    q_like = pl.BlockSpec(
        (None, None, bq, head_dim),
        lambda b, h, j, i, st, en: (b, h, q_block(b, j, i, st, en), 0),
    )
    kv_like = pl.BlockSpec(
        (None, None, bk, head_dim), lambda b, h, j, i, *_: (b, _kv_head(h, groups), j, 0)
    )
    q_row = pl.BlockSpec((None, 1, bq), lambda b, h, j, i, st, en: (b, 0, q_block(b, j, i, st, en)))
    kv_column = pl.BlockSpec((None, bk, _LANES), lambda b, h, j, i, *_: (b, j, 0))
    statistic_row = pl.BlockSpec(
        (None, None, 1, bq), lambda b, h, j, i, st, en: (b, h, 0, q_block(b, j, i, st, en))
    )
    # One partial per query head when grouped (summed below), so no two programs share a block.
    partial_dtype = k.dtype if groups == 1 else dtype
    partial = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j, i, *_: (b, h, j, 0))
    dk, dv = _call(
        cfg,
        _dkdv_kernel,
        "flash_attention_tpu_dkdv",
        grid=(batch, num_heads, kv_len // bk, q_len // bq),
        in_specs=[
            _ratio_spec(ratio),
            q_like,
            kv_like,
            kv_like,
            _optional(q_pos, q_row),
            _optional(kv_pos, kv_column),
            _optional(q_seg, q_row),
            _optional(kv_seg, kv_column),
            q_like,
            statistic_row,
            statistic_row,
        ],
        out_specs=[partial, partial],
        out_shape=[jax.ShapeDtypeStruct((batch, num_heads, kv_len, head_dim), partial_dtype)] * 2,
        scratch=[pltpu.VMEM((bk, head_dim), dtype), pltpu.VMEM((bk, head_dim), dtype)],
    )(
        *_spans(kv_ranges),
        ratio,
        q,
        k,
        v,
        _lane_rows(q_pos),
        _columns(kv_pos),
        _lane_rows(q_seg),
        _columns(kv_seg),
        d_out,
        lse[:, :, None, :],
        delta[:, :, None, :],
    )
    if groups > 1:
        grouped = (batch, num_kv_heads, groups, kv_len, head_dim)
        dk = dk.reshape(grouped).sum(axis=2).astype(k.dtype)
        dv = dv.reshape(grouped).sum(axis=2).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg):
    return _forward_call(cfg, q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg)[0]


def _flash_forward(cfg, q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = _forward_call(cfg, q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg)
    return out, (q, k, v, ratio, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _flash_backward(cfg, residuals, d_out):
    dq, dk, dv = _backward_calls(cfg, residuals, d_out)
    # The ratio is a schedule value: zero cotangent; positions and segment ids are integers.
    return dq, dk, dv, None, None, None, None, None


_flash.defvjp(_flash_forward, _flash_backward)


# ----------------------------------------------------------------------------- public entry


def _clip_block(size: int, length: int) -> int:
    return min(size, _round_up(length, _LANES))


def flash_attention_tpu(
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
    interpret: bool | pltpu.InterpretParams = False,
) -> Array:
    """Softmax attention with a structural mask, as Mosaic TPU kernels (module docstring).

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
      block_sizes: :class:`BlockSizes` (this module's), default ``BlockSizes()``.
      interpret: run in Pallas's TPU interpreter on any backend (e.g. CPU):
        ``True`` for default ``pltpu.InterpretParams()``, or the params themselves.
    Returns:
      [B, Lq, H, D] in q's dtype.
    """
    scale = validate_arguments(
        "flash_attention_tpu",
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
    block_sizes = BlockSizes() if block_sizes is None else block_sizes
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(
            "flash_attention_tpu: block_sizes must be a flash_attention_tpu.BlockSizes or None, "
            f"got {block_sizes!r}."
        )
    if interpret is True:
        interpret = pltpu.InterpretParams()
    elif interpret is False:
        interpret = None
    elif not isinstance(interpret, pltpu.InterpretParams):
        raise ValueError(
            "flash_attention_tpu: interpret must be a bool or a pltpu.InterpretParams, "
            f"got {interpret!r}."
        )
    batch, q_len, _, _ = q.shape
    kv_len = k.shape[1]
    blocks = {
        "block_q": _clip_block(block_sizes.block_q, q_len),
        "block_k": _clip_block(block_sizes.block_k, kv_len),
        "block_q_bwd": _clip_block(block_sizes.block_q_bwd, q_len),
        "block_k_bwd": _clip_block(block_sizes.block_k_bwd, kv_len),
    }
    cfg = _Config(
        causal=causal,
        window_left=window_left,
        window_right=window_right,
        soft=soft_causal_ratio is not None,
        scale=scale,
        q_len=q_len,
        kv_len=kv_len,
        q_padded=_round_up(q_len, math.lcm(blocks["block_q"], blocks["block_q_bwd"])),
        kv_padded=_round_up(kv_len, math.lcm(blocks["block_k"], blocks["block_k_bwd"])),
        interpret=interpret,
        **blocks,
    )
    q_pos, kv_pos, q_seg, kv_seg = padded_rows(
        batch,
        q_len,
        kv_len,
        cfg.q_padded,
        cfg.kv_padded,
        with_positions=cfg.with_positions,
        q_positions=q_positions,
        kv_positions=kv_positions,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    ratio = None
    if cfg.soft:
        ratio = jnp.reshape(jnp.asarray(soft_causal_ratio, _accumulator_dtype(q.dtype)), (1,))

    def heads_major(x, padded):
        """[B, L, H, D] -> [B, H, padded L, D]: the head axis out of Mosaic's tiled dims."""
        x = jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3)

    out = _flash(
        cfg,
        heads_major(q, cfg.q_padded),
        heads_major(k, cfg.kv_padded),
        heads_major(v, cfg.kv_padded),
        ratio,
        q_pos,
        kv_pos,
        q_seg,
        kv_seg,
    )
    return out.transpose(0, 2, 1, 3)[:, :q_len]
