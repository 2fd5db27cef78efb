"""Memory-efficient attention: query and key blocks, online softmax, recomputing backward.

The forward pass visits, for each block of ``block_q`` queries, the blocks of
``block_k`` keys with a running max ``m``, a running normaliser ``l`` over every
visible key, and an accumulator of probability-weighted values (Rabe & Staats
2021; FlashAttention, Dao et al. 2022). It saves only the output and the
per-row log-sum-exp, so its memory is linear in the length. The backward pass
(``jax.custom_vjp``) recomputes each block's probabilities from the saved
log-sum-exp, as FlashAttention-2 does (Dao 2023, Algorithm 2), so it is linear
in memory too; autodiff through the loops would save every block's
probabilities.

Everything that multiplies the probabilities after the softmax, without
renormalising, is one per-entry weight ``w``:

* iLLaMA's soft-causal mask ``r + (1 - r) * [pos_k <= pos_q]``;
* dropout's ``keep / p_keep`` (``p_keep = 1 - rate`` to 2^-16: :func:`dropout_keep`).

``out_i = sum_k P_ik w_ik v_k`` with ``P = softmax(s)``, so one accumulator
suffices (the two-accumulator form ``(r * acc_all + (1 - r) * acc_causal) / l``
is the same sum), and ``D_i = sum_k P_ik w_ik dO_i . v_k = dO_i . out_i`` is
still the FlashAttention backward's row term.

Blocks that the causal / window / segment structure hides entirely are
skipped with ``lax.cond`` on per-block bounds of the positions and segment ids
(a conservative test: a block is computed whenever some query of the block,
in some batch row, might see some key of it). With the default positions this
skips the upper triangle of causal attention.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from effformer.ops import masks

Array = jax.Array

# Tuned on the 2-core development CPU (experiments/benchmarks/attention.py):
# large enough that each block is a matmul big enough to amortise the loop,
# small enough that a block of scores stays in cache.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


def grouped_bias(bias: Array, num_heads: int, num_kv_heads: int) -> Array:
    """A bias broadcastable to [B, H, Lq, Lk] as [B|1, Hkv|1, G|1, Lq|1, Lk|1].

    Heads ``h = kv_head * G + g`` (the grouping of ``jax.nn.dot_product_attention``).
    """
    bias = jnp.reshape(bias, (1,) * (4 - bias.ndim) + bias.shape)
    b, h, lq, lk = bias.shape
    if h == 1:
        return bias.reshape(b, 1, 1, lq, lk)
    return bias.reshape(b, num_kv_heads, num_heads // num_kv_heads, lq, lk)


# Dropout draws 16 random bits per entry: two entries per 32-bit word. With
# threefry (JAX's default key), each word costs a full threefry evaluation, which
# made the mask about a tenth of a CCT training step on CPU; the keep probability
# becomes a multiple of 2^-16, within 2^-17 of 1 - rate, and every path scales by
# that exact probability, so the kept values stay unbiased.
_DROPOUT_BITS = 16


def dropout_keep_probability(rate: float) -> float:
    """The exact keep probability of :func:`dropout_keep`: ``1 - rate`` rounded to 2^-16.

    Scale kept entries by ``1 / dropout_keep_probability(rate)``, not ``1 / (1 - rate)``,
    so that the expectation is exactly the undropped value.
    """
    levels = 1 << _DROPOUT_BITS
    return max(1, round((1.0 - rate) * levels)) / levels


def dropout_keep(rng: Array, tile_index: Array | int, rate: float, shape: tuple[int, ...]) -> Array:
    """The dropout keep mask (bool ``shape``) of one tile of attention probabilities.

    Each entry is kept with probability :func:`dropout_keep_probability` ``(rate)``:
    16 random bits per entry, from 32-bit words split in two along the last axis.

    Every implementation draws its mask this way: the reference and the XLA
    path as a single tile (index 0) of shape [B, H, Lq, Lk]; the blockwise path
    per (query block, key block) tile, index ``i * num_k_blocks + j``, so its
    backward regenerates the same mask. One tile covering the whole matrix
    gives the same mask in every implementation (same key, same element order).
    """
    *rows, width = shape
    words = jax.random.bits(
        jax.random.fold_in(rng, tile_index), (*rows, -(-width // 2)), jnp.uint32
    )
    halves = jnp.stack([words & 0xFFFF, words >> 16], axis=-1)  # [..., words, 2]
    bits = halves.reshape(*rows, -1)[..., :width]
    threshold = round(dropout_keep_probability(rate) * (1 << _DROPOUT_BITS))
    return bits < threshold


@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable, trace-time configuration of the blockwise kernel."""

    causal: bool
    window_left: int | None
    window_right: int | None
    block_q: int
    block_k: int
    dropout_rate: float
    # Which bias dims are broadcast (size 1) in the 5-d grouped bias.
    bias_broadcast: tuple[bool, ...] | None

    @property
    def structural_mask(self) -> masks.AttentionMask:
        return masks.AttentionMask(
            causal=self.causal, window_left=self.window_left, window_right=self.window_right
        )

    @property
    def has_structure(self) -> bool:
        return self.causal or self.window_left is not None or self.window_right is not None


def _block_bounds(positions: Array, segments: Array | None) -> dict[str, Array]:
    """Per-block extremes over (batch, block) of positions [n, B, b] and segment ids."""
    bounds = {"pos_min": positions.min(axis=(1, 2)), "pos_max": positions.max(axis=(1, 2))}
    if segments is not None:
        big = jnp.iinfo(jnp.int32).max
        bounds["seg_min"] = jnp.where(segments == 0, big, segments).min(axis=(1, 2))
        bounds["seg_max"] = segments.max(axis=(1, 2))
    return bounds


def _any_visible(static: _Static, q_bounds, kv_bounds, i, j) -> Array:
    """False only when no key of block j can be visible to any query of block i."""
    visible = jnp.asarray(True)
    q_min, q_max = q_bounds["pos_min"][i], q_bounds["pos_max"][i]
    k_min, k_max = kv_bounds["pos_min"][j], kv_bounds["pos_max"][j]
    if static.causal:
        visible &= k_min <= q_max
    if static.window_left is not None:
        visible &= q_min - k_max <= static.window_left
    if static.window_right is not None:
        visible &= k_min - q_max <= static.window_right
    if "seg_min" in q_bounds:
        # Non-padding id ranges must overlap; an all-padding block has seg_min = int max.
        visible &= (q_bounds["seg_min"][i] <= kv_bounds["seg_max"][j]) & (
            kv_bounds["seg_min"][j] <= q_bounds["seg_max"][i]
        )
    return visible


class _Blocks:
    """Per-tile pieces shared by the forward and backward passes."""

    def __init__(self, static, bias, ratio, q_pos, kv_pos, q_seg, kv_seg, rng, num_k_blocks):
        self.static = static
        self.bias = bias
        self.ratio = ratio
        self.q_pos, self.kv_pos, self.q_seg, self.kv_seg = q_pos, kv_pos, q_seg, kv_seg
        self.rng = rng
        self.num_k_blocks = num_k_blocks

    def bias_tile(self, i, j) -> Array:
        s = self.static
        tile = self.bias
        if not s.bias_broadcast[3]:
            tile = lax.dynamic_slice_in_dim(tile, i * s.block_q, s.block_q, axis=3)
        if not s.bias_broadcast[4]:
            tile = lax.dynamic_slice_in_dim(tile, j * s.block_k, s.block_k, axis=4)
        return tile

    def logits(self, q_i, k_j, i, j) -> Array:
        """[B, Hkv, G, bq, bk]; q is already scaled."""
        s = jnp.einsum("bhgqd,bhkd->bhgqk", q_i, k_j)
        if self.bias is not None:
            s = s + self.bias_tile(i, j)
        return s

    def visible(self, i, j) -> Array | None:
        """bool [B, 1, 1, bq, bk], or None when every key is visible."""
        if not self.static.has_structure and self.q_seg is None:
            return None
        q_seg = kv_seg = None
        if self.q_seg is not None:
            q_seg = self.q_seg[i][:, None, None, :, None]
            kv_seg = self.kv_seg[j][:, None, None, None, :]
        return masks.visibility(
            self.static.structural_mask,
            self.q_pos[i][:, None, None, :, None],
            self.kv_pos[j][:, None, None, None, :],
            q_seg,
            kv_seg,
        )

    def non_causal(self, i, j) -> Array:
        """1 where pos_k > pos_q: the entries the soft-causal ratio scales."""
        q = self.q_pos[i][:, None, None, :, None]
        k = self.kv_pos[j][:, None, None, None, :]
        return (k > q).astype(self.ratio.dtype)

    def dropout_scale(self, i, j, shape, dtype) -> Array | None:
        rate = self.static.dropout_rate
        if rate == 0.0:
            return None
        keep = dropout_keep(self.rng, i * self.num_k_blocks + j, rate, shape)
        return keep.astype(dtype) / dropout_keep_probability(rate)

    def weight(self, i, j, shape, dtype) -> Array | None:
        """The post-softmax per-entry multiplier w (see module docstring), or None for 1."""
        w = None
        if self.ratio is not None:
            # r + (1 - r) * tril == 1 - (1 - r) * [pos_k > pos_q]
            w = 1.0 - (1.0 - self.ratio) * self.non_causal(i, j)
        drop = self.dropout_scale(i, j, shape, dtype)
        if drop is not None:
            w = drop if w is None else w * drop
        return w


def _forward(static, q, k, v, bias, ratio, q_pos, kv_pos, q_seg, kv_seg, rng):
    """q [nq, B, Hkv, G, bq, D]; k, v [nk, B, Hkv, bk, D] -> out like q, lse [nq, B, Hkv, G, bq]."""
    num_k_blocks = k.shape[0]
    blocks = _Blocks(static, bias, ratio, q_pos, kv_pos, q_seg, kv_seg, rng, num_k_blocks)
    q_bounds, kv_bounds = _block_bounds(q_pos, q_seg), _block_bounds(kv_pos, kv_seg)
    may_skip = static.has_structure or q_seg is not None

    def query_block(_, xs):
        q_i, i = xs
        row_shape = q_i.shape[:-1]

        def update(carry, j):
            m, row_sum, acc = carry
            s = blocks.logits(q_i, k[j], i, j)
            vis = blocks.visible(i, j)
            if vis is not None:
                s = jnp.where(vis, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            # A row with nothing visible yet keeps m = -inf; shift by 0 so exp gives 0, not NaN.
            m_shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_shift[..., None])
            correction = jnp.exp(m - m_shift)
            row_sum = row_sum * correction + p.sum(axis=-1)
            w = blocks.weight(i, j, s.shape, s.dtype)
            pw = p if w is None else p * w
            acc = acc * correction[..., None] + jnp.einsum("bhgqk,bhkd->bhgqd", pw, v[j])
            return m_new, row_sum, acc

        def body(j, carry):
            if not may_skip:
                return update(carry, j)
            visible = _any_visible(static, q_bounds, kv_bounds, i, j)
            return lax.cond(visible, update, lambda c, _: c, carry, j)

        init = (
            jnp.full(row_shape, -jnp.inf, q.dtype),
            jnp.zeros(row_shape, q.dtype),
            jnp.zeros(q_i.shape, q.dtype),
        )
        m, row_sum, acc = lax.fori_loop(0, num_k_blocks, body, init)
        empty = row_sum == 0.0  # fully masked row: output exactly 0
        safe_sum = jnp.where(empty, 1.0, row_sum)
        out = acc / safe_sum[..., None]
        lse = jnp.where(empty, 0.0, m + jnp.log(safe_sum))
        return None, (out, lse)

    _, (out, lse) = lax.scan(query_block, None, (q, jnp.arange(q.shape[0])))
    return out, lse


def _backward(static, residuals, cotangents):
    q, k, v, bias, ratio, q_pos, kv_pos, q_seg, kv_seg, rng, out, lse = residuals
    d_out, _ = cotangents
    num_q_blocks, num_k_blocks = q.shape[0], k.shape[0]
    blocks = _Blocks(static, bias, ratio, q_pos, kv_pos, q_seg, kv_seg, rng, num_k_blocks)
    q_bounds, kv_bounds = _block_bounds(q_pos, q_seg), _block_bounds(kv_pos, kv_seg)
    may_skip = static.has_structure or q_seg is not None
    # FlashAttention-2's D_i = dO_i . O_i (also right with the weights w, see module docstring).
    delta = jnp.sum(d_out * out, axis=-1)

    def add_bias_grad(d_bias, ds, i, j):
        broadcast = static.bias_broadcast
        reduce_axes = tuple(a for a, b in enumerate(broadcast) if b and ds.shape[a] != 1)
        tile = ds.sum(axis=reduce_axes, keepdims=True) if reduce_axes else ds
        start = [
            0,
            0,
            0,
            0 if broadcast[3] else i * static.block_q,
            0 if broadcast[4] else j * static.block_k,
        ]
        start = [jnp.asarray(x, jnp.int32) for x in start]
        current = lax.dynamic_slice(d_bias, start, tile.shape)
        return lax.dynamic_update_slice(d_bias, current + tile, start)

    def key_block(carry, xs):
        k_j, v_j, j = xs

        def update(inner, i):
            dk_j, dv_j, dq, d_bias, d_ratio = inner
            q_i, do_i = q[i], d_out[i]
            s = blocks.logits(q_i, k_j, i, j)
            p = jnp.exp(s - lse[i][..., None])
            vis = blocks.visible(i, j)
            if vis is not None:
                p = jnp.where(vis, p, 0.0)
            w = blocks.weight(i, j, s.shape, s.dtype)
            pw = p if w is None else p * w
            dv_j = dv_j + jnp.einsum("bhgqk,bhgqd->bhkd", pw, do_i)
            d_pw = jnp.einsum("bhgqd,bhkd->bhgqk", do_i, v_j)
            dp = d_pw if w is None else d_pw * w
            ds = p * (dp - delta[i][..., None])
            dq = dq.at[i].add(jnp.einsum("bhgqk,bhkd->bhgqd", ds, k_j))
            dk_j = dk_j + jnp.einsum("bhgqk,bhgqd->bhkd", ds, q_i)
            if d_bias is not None:
                d_bias = add_bias_grad(d_bias, ds, i, j)
            if d_ratio is not None:
                # d out / d r = sum_k P (1 - tril) keep/(1-rate) v_k
                dw_dr = blocks.non_causal(i, j)
                drop = blocks.dropout_scale(i, j, s.shape, s.dtype)
                if drop is not None:
                    dw_dr = dw_dr * drop
                d_ratio = d_ratio + jnp.sum(p * dw_dr * d_pw)
            return dk_j, dv_j, dq, d_bias, d_ratio

        def body(i, inner):
            if not may_skip:
                return update(inner, i)
            visible = _any_visible(static, q_bounds, kv_bounds, i, j)
            return lax.cond(visible, update, lambda c, _: c, inner, i)

        dq, d_bias, d_ratio = carry
        init = (jnp.zeros_like(k_j), jnp.zeros_like(v_j), dq, d_bias, d_ratio)
        dk_j, dv_j, dq, d_bias, d_ratio = lax.fori_loop(0, num_q_blocks, body, init)
        return (dq, d_bias, d_ratio), (dk_j, dv_j)

    init = (
        jnp.zeros_like(q),
        None if bias is None else jnp.zeros_like(bias),
        None if ratio is None else jnp.zeros_like(ratio),
    )
    (dq, d_bias, d_ratio), (dk, dv) = lax.scan(key_block, init, (k, v, jnp.arange(num_k_blocks)))
    return dq, dk, dv, d_bias, d_ratio, None, None, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel(static, q, k, v, bias, ratio, q_pos, kv_pos, q_seg, kv_seg, rng):
    return _forward(static, q, k, v, bias, ratio, q_pos, kv_pos, q_seg, kv_seg, rng)


def _kernel_forward(static, q, k, v, bias, ratio, q_pos, kv_pos, q_seg, kv_seg, rng):
    out, lse = _forward(static, q, k, v, bias, ratio, q_pos, kv_pos, q_seg, kv_seg, rng)
    # Only the inputs, the output and the per-row log-sum-exp: linear in length.
    return (out, lse), (q, k, v, bias, ratio, q_pos, kv_pos, q_seg, kv_seg, rng, out, lse)


_kernel.defvjp(_kernel_forward, _backward)


def _pad_to(x: Array, axis: int, length: int, value=0) -> Array:
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    if value == "edge":
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths, constant_values=value)


def blockwise_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: masks.AttentionMask,
    bias: Array | None,
    scale: float,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> Array:
    """Blockwise attention; arguments already validated by ``dot_product_attention``.

    q [B, Lq, H, Dh], k and v [B, Lk, Hkv, Dh] -> [B, Lq, H, Dh] in q's dtype.
    Computes in float32 (float64 for float64 inputs). Lengths need not be
    multiples of the block sizes: the tail block is padded and its padded keys
    masked out.
    """
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    block_q, block_k = min(block_q, q_len), min(block_k, kv_len)
    num_q_blocks, num_k_blocks = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
    q_padded, kv_padded = num_q_blocks * block_q, num_k_blocks * block_k

    q_pos, kv_pos = masks.resolve_positions(mask, batch, q_len, kv_len)
    q_seg = kv_seg = None
    if mask.q_segment_ids is not None:
        q_seg = jnp.broadcast_to(mask.q_segment_ids, (batch, q_len)).astype(jnp.int32)
        kv_seg = jnp.broadcast_to(mask.kv_segment_ids, (batch, kv_len)).astype(jnp.int32)
    if kv_padded != kv_len and kv_seg is None:
        # Padded keys must be invisible: express them as padding segments.
        q_seg = jnp.ones((batch, q_len), jnp.int32)
        kv_seg = jnp.ones((batch, kv_len), jnp.int32)

    def to_blocks(x, length, block):  # [B, L, ...] -> [n, B, ..., block, ...]
        x = _pad_to(x, 1, length)
        return jnp.moveaxis(x.reshape(batch, length // block, block, *x.shape[2:]), 1, 0)

    # [nq, B, bq, Hkv, G, D] -> [nq, B, Hkv, G, bq, D]
    qb = (q.astype(dtype) * jnp.asarray(scale, dtype)).reshape(
        batch, q_len, num_kv_heads, groups, head_dim
    )
    qb = to_blocks(qb, q_padded, block_q).transpose(0, 1, 3, 4, 2, 5)
    kb = to_blocks(k.astype(dtype), kv_padded, block_k).transpose(0, 1, 3, 2, 4)
    vb = to_blocks(v.astype(dtype), kv_padded, block_k).transpose(0, 1, 3, 2, 4)

    def index_blocks(x, length, block, value):
        if x is None:
            return None
        x = _pad_to(x, 1, length, value)
        return jnp.moveaxis(x.reshape(batch, length // block, block), 1, 0)

    q_pos_b = index_blocks(q_pos, q_padded, block_q, "edge")
    kv_pos_b = index_blocks(kv_pos, kv_padded, block_k, "edge")
    q_seg_b = index_blocks(q_seg, q_padded, block_q, 0)
    kv_seg_b = index_blocks(kv_seg, kv_padded, block_k, 0)

    bias_b = broadcast = None
    if bias is not None:
        bias_b = grouped_bias(bias.astype(dtype), num_heads, num_kv_heads)
        bias_b = _pad_to(bias_b, 3, q_padded) if bias_b.shape[3] != 1 else bias_b
        bias_b = _pad_to(bias_b, 4, kv_padded) if bias_b.shape[4] != 1 else bias_b
        broadcast = tuple(d == 1 for d in bias_b.shape)
    ratio = None
    if mask.soft_causal_ratio is not None:
        ratio = jnp.asarray(mask.soft_causal_ratio, dtype)

    static = _Static(
        causal=mask.causal,
        window_left=mask.window_left,
        window_right=mask.window_right,
        block_q=block_q,
        block_k=block_k,
        dropout_rate=float(dropout_rate),
        bias_broadcast=broadcast,
    )
    rng = dropout_rng if dropout_rate > 0.0 else None
    out, _ = _kernel(static, qb, kb, vb, bias_b, ratio, q_pos_b, kv_pos_b, q_seg_b, kv_seg_b, rng)
    # [nq, B, Hkv, G, bq, D] -> [B, Lq, H, D]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, q_padded, num_heads, head_dim)
    return out[:, :q_len].astype(q.dtype)
