"""Combiner (Ren et al., 2021): full attention support at sub-quadratic cost.

Every query keeps every visible token reachable, either *directly* (its logit
``q_i . k_j``) or through an *abstraction* of a region ``Omega`` of tokens: one
logit ``q_i . key(Omega)`` whose probability mass is spread over the region by
a distribution computed inside it. All logits of a query, direct and
abstraction, go through ONE softmax, so all parts share one normaliser (the
paper's Eq. 4-6; google-research ``combiner/``). The implied attention
distribution is therefore

    A[i, j] = w_direct[i, j] + sum_Omega w[i, Omega] * p_Omega(j),

whose rows are non-negative and sum to one; :mod:`effformer.ops.combiner_reference`
builds it densely for tests. This module never builds an ``L x L`` array.

Conventions taken from the official code:
  * q, k, v and the output projection have no bias; q is divided by
    ``sqrt(head_dim)`` before anything else (so the region summaries below see
    the scaled query too).
  * A region's key is the elementwise max of its keys; its distribution
    ``p_Omega`` is the softmax of ``qbar . k_j`` over ``j in Omega`` where
    ``qbar`` is the elementwise max of the region's queries; its value is
    ``sum_j p_Omega(j) v_j``. (Axial differs; see below.)

The sequence is viewed as ``S = ceil(L / c)`` segments (rows) of ``c =
segment_length`` tokens (default ``ceil(sqrt(L))``); a length that is not a
multiple of ``c`` is zero-padded inside the mixer and the padded tokens are
excluded from every region, direct part and pooled max, so they are
invisible outside. Token ``i`` sits at row ``i // c``, column ``i % c``.

Variants (query ``i`` at row ``s``, column ``a``):
  * ``fixed``: direct to its own segment (causal: ``j <= i``); one abstraction
    per other segment (causal: earlier segments).
  * ``logsparse`` (causal only): direct to itself; for each bit ``l`` set in
    ``i``, an abstraction of the dyadic block ``[(i // 2^l - 1) 2^l, (i // 2^l)
    2^l)``. These blocks partition ``[0, i)``; cost O(L log L).
  * ``axial`` (row-major): direct to its own row (causal: columns ``<= a``);
    for every other row ``t`` (causal: ``t < s``) the abstraction at ``(t,
    a)``: its distribution is full attention inside row ``t`` with the query of
    token ``(t, a)``, and its key is a projection of that row-attention output
    (official JAX code: ``LayerNorm(x + W_o row_out) W_k``).
  * ``mixture`` (official ``_AxialMixtureAtt``): direct to its own column in
    other rows (causal: earlier rows) and to its own row (causal: columns
    ``<= a``); abstractions of the column-``b`` prefix above the row (``b !=
    a``), for every other row ``t`` the left part ``{(t, b): b < a}`` and the
    right part ``{(t, b): b > a}``, all with cumulative-max pooled keys and
    queries. The bidirectional form adds the column suffixes below the row.
    The parts overlap (the paper's "mixture"), rows still sum to one.

Bidirectional ``fixed`` and ``axial`` exclude the query's own segment/row from
the abstractions (it is already covered directly), following the paper's
partition; the TF code with ``causal=False`` also summarises the own segment.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from effformer.ops.masks import AttentionMask

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

VARIANTS = ("fixed", "logsparse", "axial", "mixture")
BIDIRECTIONAL_VARIANTS = ("fixed", "axial", "mixture")
# Masked logits; finite so that a row with nothing visible (a padded query, whose
# output is discarded) gives a uniform softmax instead of NaN gradients.
_MASKED = -1e30


def resolve_segment_length(
    variant: str, causal: bool, segment_length: int | None, length: int, owner: str = "combiner"
) -> int:
    """Validate the configuration for a sequence of ``length`` tokens; return ``c``.

    Logsparse has no segment length (its blocks are dyadic) and returns 0.
    """
    if variant not in VARIANTS:
        raise ValueError(f"{owner}: variant must be one of {VARIANTS}, got {variant!r}.")
    if not causal and variant not in BIDIRECTIONAL_VARIANTS:
        raise ValueError(
            f"{owner}: variant {variant!r} is defined for causal attention only; "
            f"bidirectional variants are {BIDIRECTIONAL_VARIANTS}."
        )
    if length < 1:
        raise ValueError(f"{owner}: sequence length must be >= 1, got {length}.")
    if variant == "logsparse":
        if segment_length is not None:
            raise ValueError(
                f"{owner}: variant 'logsparse' uses dyadic blocks and takes no segment_length, "
                f"got segment_length={segment_length}."
            )
        return 0
    if segment_length is None:
        segment_length = math.isqrt(length - 1) + 1 if length > 1 else 1  # ceil(sqrt(L))
        if variant in ("axial", "mixture") and length > 1:
            segment_length = min(segment_length, length - 1)
    if not isinstance(segment_length, int) or segment_length < 1:
        raise ValueError(f"{owner}: segment_length must be a positive int, got {segment_length!r}.")
    if segment_length > length:
        raise ValueError(
            f"{owner}: segment_length must be <= the sequence length {length}, "
            f"got {segment_length}."
        )
    if variant in ("axial", "mixture") and segment_length >= length:
        raise ValueError(
            f"{owner}: variant {variant!r} lays the sequence out in rows of segment_length "
            f"tokens and needs at least two rows: segment_length must be < the sequence length "
            f"{length}, got {segment_length}."
        )
    return segment_length


# ----------------------------------------------------------------------------- helpers


def _softmax_dtype(dtype) -> Any:
    """At least float32 (bf16 logits), float64 when the inputs are."""
    return jnp.promote_types(dtype, jnp.float32)


def _softmax(logits: Array, visible: Array) -> Array:
    """Softmax over the last axis of the visible logits, in at least float32."""
    logits = jnp.where(visible, logits.astype(_softmax_dtype(logits.dtype)), _MASKED)
    return jax.nn.softmax(logits, axis=-1)


def _joint_softmax(parts: list[tuple[Array, Array]], dtype) -> list[Array]:
    """ONE softmax over the concatenated logits of all parts (shared normaliser).

    parts: (logits [..., n_i], visible broadcastable to it). Returns each part's
    probabilities [..., n_i] in ``dtype``.
    """
    shape = jnp.broadcast_shapes(*(logits.shape[:-1] for logits, _ in parts))
    masked = [
        jnp.broadcast_to(
            jnp.where(visible, logits.astype(_softmax_dtype(logits.dtype)), _MASKED),
            shape + logits.shape[-1:],
        )
        for logits, visible in parts
    ]
    weights = jax.nn.softmax(jnp.concatenate(masked, axis=-1), axis=-1).astype(dtype)
    splits = np.cumsum([m.shape[-1] for m in masked])[:-1].tolist()
    return jnp.split(weights, splits, axis=-1)


def _pool(x: Array, valid: Array, axis: int, cumulative: bool, reverse: bool = False):
    """Elementwise max of the valid entries of ``x`` [..., H, Dh] along ``axis``.

    valid has x's shape without the last two axes. Returns (pooled, nonempty):
    the max (0 where the region is empty) and whether the region has a valid token.
    """
    masked = jnp.where(valid[..., None, None], x, -jnp.inf)
    flags = valid.astype(jnp.int32)
    if cumulative:
        pooled = lax.cummax(masked, axis=axis, reverse=reverse)
        nonempty = lax.cummax(flags, axis=axis, reverse=reverse) > 0
    else:
        pooled = jnp.max(masked, axis=axis)
        nonempty = jnp.max(flags, axis=axis) > 0
    return jnp.where(nonempty[..., None, None], pooled, 0).astype(x.dtype), nonempty


def _block_summaries(q: Array, k: Array, v: Array, valid: Array):
    """Whole-block abstractions. q, k, v [B, N, n, H, Dh], valid [B, N, n] ->
    key, value [B, N, H, Dh] and nonempty [B, N]."""
    key, nonempty = _pool(k, valid, axis=2, cumulative=False)
    query, _ = _pool(q, valid, axis=2, cumulative=False)
    probs = _softmax(jnp.einsum("bnhd,bnmhd->bnhm", query, k), valid[:, :, None, :])
    value = jnp.einsum("bnhm,bnmhd->bnhd", probs.astype(v.dtype), v)
    return key, value, nonempty


def _prefix_summaries(q: Array, k: Array, v: Array, valid: Array, axis: int, reverse: bool):
    """Abstractions of every inclusive prefix (suffix if ``reverse``) along a grid axis.

    q, k, v [B, S, c, H, Dh], valid [B, S, c]; axis 1 (down the rows) or 2
    (along a row). Entry ``[s, a]`` summarises the tokens from the start (end)
    of its line up to and including ``[s, a]``: key and query are cumulative
    maxima, the value is attention with that query over those tokens.
    Returns key, value [B, S, c, H, Dh] and nonempty [B, S, c].
    """
    if axis == 2:
        q, k, v, valid = (jnp.swapaxes(t, 1, 2) for t in (q, k, v, valid))
    key, nonempty = _pool(k, valid, axis=1, cumulative=True, reverse=reverse)
    query, _ = _pool(q, valid, axis=1, cumulative=True, reverse=reverse)
    n = q.shape[1]
    index = jnp.arange(n)
    inside = (index[None, :] >= index[:, None]) if reverse else (index[None, :] <= index[:, None])
    # valid [B, t, m] -> [B, m, 1, 1, t]; inside [r, t] -> [1, 1, 1, r, t]
    visible = jnp.swapaxes(valid, 1, 2)[:, :, None, None, :] & inside[None, None, None]
    probs = _softmax(jnp.einsum("brmhd,btmhd->bmhrt", query, k), visible)
    value = jnp.einsum("bmhrt,btmhd->brmhd", probs.astype(v.dtype), v)
    if axis == 2:
        key, value, nonempty = (jnp.swapaxes(t, 1, 2) for t in (key, value, nonempty))
    return key, value, nonempty


def _shift(x: Array, axis: int, offset: int) -> Array:
    """``out[i] = x[i - offset]`` along ``axis``, zero (False) where that is outside."""
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (offset, 0) if offset > 0 else (0, -offset)
    padded = jnp.pad(x, pad)
    start = 0 if offset > 0 else -offset
    return lax.slice_in_dim(padded, start, start + n, axis=axis)


def _other_rows(num_rows: int, causal: bool) -> Array:
    """bool [s, t]: row t is an "other" row for a query in row s (earlier if causal)."""
    index = jnp.arange(num_rows)
    return index[None, :] < index[:, None] if causal else index[None, :] != index[:, None]


def _row_direct(length: int, causal: bool) -> Array:
    """bool [a, b]: column b of the own row is attended directly by column a."""
    index = jnp.arange(length)
    tril = index[None, :] <= index[:, None]
    return tril if causal else jnp.ones_like(tril)


# ----------------------------------------------------------------------------- variants


def _fixed(q, k, v, valid, causal):
    """Grid inputs [B, S, c, H, Dh], valid [B, S, c] -> [B, S, c, H, Dh]."""
    num_rows, width = q.shape[1:3]
    key, value, nonempty = _block_summaries(q, k, v, valid)
    local = jnp.einsum("bsqhd,bskhd->bsqhk", q, k)
    local_visible = valid[:, :, None, None, :] & _row_direct(width, causal)[None, None, :, None, :]
    prev = jnp.einsum("bsqhd,bthd->bsqht", q, key)
    prev_visible = (
        nonempty[:, None, None, None, :] & _other_rows(num_rows, causal)[None, :, None, None, :]
    )
    w_local, w_prev = _joint_softmax([(local, local_visible), (prev, prev_visible)], v.dtype)
    return jnp.einsum("bsqhk,bskhd->bsqhd", w_local, v) + jnp.einsum(
        "bsqht,bthd->bsqhd", w_prev, value
    )


def _logsparse(q, k, v, valid):
    """Causal only. q, k, v [B, L, H, Dh], valid [B, L] -> [B, L, H, Dh]."""
    length = q.shape[1]
    position = jnp.arange(length)
    parts = [(jnp.sum(q * k, axis=-1)[..., None], valid[:, :, None, None])]
    values = [v]
    for level in range((length - 1).bit_length()):
        size = 2**level
        blocks = length // size
        tokens = blocks * size

        def grid(t, size=size, blocks=blocks, tokens=tokens):
            return t[:, :tokens].reshape(t.shape[0], blocks, size, *t.shape[2:])

        key, value, nonempty = _block_summaries(grid(q), grid(k), grid(v), grid(valid))
        # Query i uses block (i >> l) - 1 iff bit l of i is set; that block ends at or
        # before i, so it is always complete.
        block = jnp.clip((position >> level) - 1, 0, blocks - 1)
        bit_set = ((position >> level) & 1) == 1
        logits = jnp.sum(q * key[:, block], axis=-1)[..., None]
        visible = (bit_set[None, :] & nonempty[:, block])[:, :, None, None]
        parts.append((logits, visible))
        values.append(value[:, block])
    weights = _joint_softmax(parts, v.dtype)
    return sum(w * value for w, value in zip(weights, values, strict=True))


def _axial(q, k, v, valid, causal, row_key_fn):
    """Grid inputs [B, S, c, H, Dh] -> [B, S, c, H, Dh]; ``row_key_fn(row_out) -> keys``."""
    num_rows, width = q.shape[1:3]
    row_logits = jnp.einsum("bsqhd,bskhd->bsqhk", q, k)
    row_probs = _softmax(row_logits, valid[:, :, None, None, :])
    row_out = jnp.einsum("bsqhk,bskhd->bsqhd", row_probs.astype(v.dtype), v)
    row_key = row_key_fn(row_out)
    row_nonempty = jnp.any(valid, axis=-1)
    local_visible = valid[:, :, None, None, :] & _row_direct(width, causal)[None, None, :, None, :]
    global_logits = jnp.einsum("bsahd,btahd->bsaht", q, row_key)
    global_visible = (
        row_nonempty[:, None, None, None, :] & _other_rows(num_rows, causal)[None, :, None, None, :]
    )
    w_local, w_global = _joint_softmax(
        [(row_logits, local_visible), (global_logits, global_visible)], v.dtype
    )
    return jnp.einsum("bsqhk,bskhd->bsqhd", w_local, v) + jnp.einsum(
        "bsaht,btahd->bsahd", w_global, row_out
    )


def _mixture(q, k, v, valid, causal):
    """Grid inputs [B, S, c, H, Dh] -> [B, S, c, H, Dh]."""
    num_rows, width = q.shape[1:3]
    other_rows = _other_rows(num_rows, causal)[None, :, None, None, :]  # [1, s, 1, 1, t]
    other_columns = ~jnp.eye(width, dtype=bool)[None, None, :, None, :]  # [1, 1, a, 1, b]

    def column_part(keys, nonempty):  # one logit per row t, at the query's column
        logits = jnp.einsum("bsahd,btahd->bsaht", q, keys)
        return logits, jnp.swapaxes(nonempty, 1, 2)[:, None, :, None, :] & other_rows

    def row_part(keys, nonempty, visible):  # one logit per column b, in the query's row
        logits = jnp.einsum("bsahd,bsehd->bsahe", q, keys)
        return logits, nonempty[:, :, None, None, :] & visible

    parts = [
        column_part(k, valid),
        row_part(k, valid, _row_direct(width, causal)[None, None, :, None, :]),
    ]
    values = [v, v]
    # Column prefixes above the row: the summary of rows <= s - 1 in column b.
    summaries = [(_prefix_summaries(q, k, v, valid, axis=1, reverse=False), 1)]
    if not causal:  # column suffixes below the row: rows >= s + 1
        summaries.append((_prefix_summaries(q, k, v, valid, axis=1, reverse=True), -1))
    for (key, value, nonempty), offset in summaries:
        parts.append(row_part(_shift(key, 1, offset), _shift(nonempty, 1, offset), other_columns))
        values.append(_shift(value, 1, offset))
    # Left {(t, b): b < a} and right {(t, b): b > a} parts of the other rows.
    for reverse, offset in ((False, 1), (True, -1)):
        key, value, nonempty = _prefix_summaries(q, k, v, valid, axis=2, reverse=reverse)
        parts.append(column_part(_shift(key, 2, offset), _shift(nonempty, 2, offset)))
        values.append(_shift(value, 2, offset))
    weights = _joint_softmax(parts, v.dtype)
    out = jnp.einsum("bsaht,btahd->bsahd", weights[0], values[0])
    out += jnp.einsum("bsahe,bsehd->bsahd", weights[1], values[1])
    for index in range(2, 2 + len(summaries)):
        out += jnp.einsum("bsahe,bsehd->bsahd", weights[index], values[index])
    for index in range(2 + len(summaries), len(parts)):
        out += jnp.einsum("bsaht,btahd->bsahd", weights[index], values[index])
    return out


def combiner_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    variant: str,
    causal: bool,
    segment_length: int | None = None,
    valid: Array | None = None,
    row_key_fn: Callable[[Array], Array] | None = None,
) -> Array:
    """Combiner attention of pre-scaled queries.

    Args:
      q, k, v: [B, L, H, Dh]; q already divided by sqrt(Dh).
      variant: one of :data:`VARIANTS`; causal: causal or bidirectional.
      segment_length: tokens per segment/row (default ceil(sqrt(L)); none for logsparse).
      valid: [B, L] bool, False for padding tokens (seen by nothing; their
        outputs are meaningless). Default: all valid.
      row_key_fn: axial only: maps the row-attention outputs [B, S, c, H, Dh]
        (zero-padded grid) to the abstraction keys of the same shape.
    Returns:
      [B, L, H, Dh].
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"combiner_attention: q, k, v must all be [B, L, H, Dh] of one shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    batch, length = q.shape[:2]
    width = resolve_segment_length(variant, causal, segment_length, length, "combiner_attention")
    if valid is None:
        valid = jnp.ones((batch, length), bool)
    elif tuple(valid.shape) != (batch, length):
        raise ValueError(
            f"combiner_attention: valid must have shape {(batch, length)}, got {tuple(valid.shape)}."
        )
    if variant == "axial" and row_key_fn is None:
        raise ValueError("combiner_attention: variant 'axial' needs row_key_fn, got None.")
    if variant == "logsparse":
        return _logsparse(q, k, v, valid)

    num_rows = -(-length // width)
    pad = num_rows * width - length

    def grid(t):
        t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        return t.reshape(batch, num_rows, width, *t.shape[2:])

    q, k, v, valid = grid(q), grid(k), grid(v), grid(valid)
    if variant == "fixed":
        out = _fixed(q, k, v, valid, causal)
    elif variant == "axial":
        out = _axial(q, k, v, valid, causal, row_key_fn)
    else:
        out = _mixture(q, k, v, valid, causal)
    return out.reshape(batch, num_rows * width, *out.shape[3:])[:, :length]


# ----------------------------------------------------------------------------- the mixer


class CombinerAttention(nn.Module):
    """Combiner self-attention with the shared mixer signature.

    Attributes:
      num_heads: attention heads; head_dim: per-head width (default D // num_heads).
      variant: ``fixed``, ``logsparse``, ``axial`` or ``mixture`` (module docstring).
      causal: causal (language / image modelling) or bidirectional (encoders;
        not ``logsparse``). The mixer's own setting: an LM stack passes no
        causal mask to non-attention mixers.
      segment_length: tokens per segment / row; default ceil(sqrt(L)) of each call's L.
      use_bias: biases on q/k/v/out (the official code has none).
      layer_norm_epsilon: of the axial abstraction-key LayerNorm (Flax default, as
        in the official code).
    """

    num_heads: int = 8
    variant: str = "fixed"
    causal: bool = True
    segment_length: int | None = None
    head_dim: int | None = None
    use_bias: bool = False
    layer_norm_epsilon: float = 1e-6
    kernel_init: Initializer = nn.initializers.truncated_normal(stddev=0.02)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _dense(self, features, name: str, axis=-1) -> nn.Module:
        return nn.DenseGeneral(
            features,
            axis=axis,
            use_bias=self.use_bias,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _head_dim(self, dim: int) -> int:
        owner = type(self).__name__
        if self.num_heads < 1:
            raise ValueError(f"{owner}: num_heads must be >= 1, got {self.num_heads}.")
        # 0 would silently have meant the default, D // num_heads.
        if self.head_dim is not None and not self.head_dim >= 1:
            raise ValueError(
                f"{owner}: head_dim must be a positive int or None (D // num_heads), "
                f"got {self.head_dim!r}."
            )
        if self.head_dim is None and dim % self.num_heads:
            raise ValueError(
                f"{owner}: num_heads must divide the model width {dim} (or give head_dim), "
                f"got num_heads={self.num_heads}."
            )
        return self.head_dim or dim // self.num_heads

    def _project_qkv(self, x: Array) -> tuple[Array, Array, Array]:
        """x [B, L, D] -> q (pre-scaled by 1/sqrt(Dh)), k, v [B, L, H, Dh]."""
        head_dim = self._head_dim(x.shape[-1])
        shape = (self.num_heads, head_dim)
        q = self._dense(shape, "query")(x)
        k = self._dense(shape, "key")(x)
        v = self._dense(shape, "value")(x)
        return q / jnp.sqrt(head_dim).astype(q.dtype), k, v

    def _axial_row_keys(self, row_out: Array, x: Array) -> Array:
        """Axial abstraction keys: row_out [B, ..., H, Dh], x [B, ..., D] (the mixer
        input at the same tokens) -> [B, ..., H, Dh] = W_k LayerNorm(x + W_o row_out)."""
        projected = self._dense(x.shape[-1], "row_out", axis=(-2, -1))(row_out)
        normed = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype, name="row_norm")(
            x + projected
        )
        return self._dense(row_out.shape[-2:], "row_key")(normed)

    def _validate(self, x, mask, decode) -> Array | None:
        owner = type(self).__name__
        if x.ndim != 3:
            raise ValueError(f"{owner}: x must be [B, L, D], got shape {tuple(x.shape)}.")
        if decode:
            raise ValueError(f"{owner}: decode=True (incremental decoding) is not supported.")
        resolve_segment_length(self.variant, self.causal, self.segment_length, x.shape[1], owner)
        if mask is None:
            return None
        if (
            mask.window_left is not None
            or mask.window_right is not None
            or mask.soft_causal_ratio is not None
            or mask.q_positions is not None
            or mask.kv_positions is not None
        ):
            raise ValueError(
                f"{owner}: the mask may only carry causal and segment ids (padding); windows, "
                f"soft-causal ratios and explicit positions are not supported, got {mask}."
            )
        if mask.causal and not self.causal:
            raise ValueError(
                f"{owner}: a causal mask was given to a bidirectional mixer (causal=False); "
                "set causal=True."
            )
        if mask.q_segment_ids is None:
            return None
        if tuple(mask.q_segment_ids.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"{owner}: mask.q_segment_ids must have shape {tuple(x.shape[:2])}, "
                f"got {tuple(mask.q_segment_ids.shape)}."
            )
        return mask.q_segment_ids != 0

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        mask: AttentionMask | None = None,
        positions: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """x [B, L, D] -> [B, L, D].

        ``mask``: None, or an AttentionMask whose segment ids mark padding (0);
        segment ids are read as a padding mask only (packing several sequences
        in a row is not supported: they would see each other's summaries).
        Padded tokens are zeroed on entry, seen by nothing, and output zero
        before the output projection. ``positions`` is unused: tokens are
        ordered by index (use an absolute position encoding in the model).
        ``deterministic`` is unused (no attention dropout).
        """
        del positions, deterministic
        valid = self._validate(x, mask, decode)
        if valid is not None:
            x = jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))
        q, k, v = self._project_qkv(x)
        row_key_fn = None
        if self.variant == "axial":
            width = resolve_segment_length(
                self.variant, self.causal, self.segment_length, x.shape[1]
            )
            num_rows = -(-x.shape[1] // width)
            x_grid = jnp.pad(x, [(0, 0), (0, num_rows * width - x.shape[1]), (0, 0)])
            x_grid = x_grid.reshape(x.shape[0], num_rows, width, x.shape[-1])

            def row_key_fn(row_out):
                return self._axial_row_keys(row_out, x_grid)

        out = combiner_attention(
            q,
            k,
            v,
            variant=self.variant,
            causal=self.causal,
            segment_length=self.segment_length,
            valid=valid,
            row_key_fn=row_key_fn,
        )
        if valid is not None:
            out = jnp.where(valid[..., None, None], out, jnp.zeros((), out.dtype))
        return self._dense(x.shape[-1], "out", axis=(-2, -1))(out)
