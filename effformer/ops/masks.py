"""Structural attention masks.

A mask is a small description of which keys a query may see, never an L x L
matrix: fast paths read the structure (causal, window extents, segment ids)
block by block; only the reference path calls :func:`dense_mask`.

Conventions
  * Positions: ``q_positions [B, Lq]`` and ``kv_positions [B, Lk]`` (int32).
    When absent, queries are at ``0..Lq-1`` shifted right so the last query
    aligns with the last key (``Lk - Lq .. Lk - 1``), which is what a chunk
    of new queries attending to a longer cache expects.
  * Causal: key ``k`` is visible to query ``q`` iff ``pos_k <= pos_q``.
  * Sliding window: visible iff ``pos_q - pos_k <= window_left`` and
    ``pos_k - pos_q <= window_right`` (``None`` means unbounded).
  * Segment ids ``[B, L]`` (int32): a query sees only keys of its own segment;
    id 0 marks padding, which sees nothing and is seen by nothing, so a padded
    query's output is exactly zero.
  * Soft-causal ratio r (iLLaMA): the softmax runs over all visible keys, then
    the probabilities are multiplied by ``r + (1 - r) * [pos_k <= pos_q]``
    without renormalisation. r = 0 is causal, r = 1 is bidirectional.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query attends to. See the module docstring."""

    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
    window_left: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    window_right: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    q_segment_ids: Array | None = None
    kv_segment_ids: Array | None = None
    q_positions: Array | None = None
    kv_positions: Array | None = None
    soft_causal_ratio: Array | float | None = None

    def __post_init__(self):
        for name in ("window_left", "window_right"):
            value = getattr(self, name)
            # bool is an int to Python; window_left=True is a config slip, not a window of 1.
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise ValueError(
                    f"AttentionMask.{name} must be a non-negative int or None, got {value!r}."
                )
        if self.causal and self.soft_causal_ratio is not None:
            raise ValueError(
                "AttentionMask: causal=True and soft_causal_ratio are exclusive; the soft-causal "
                "mask already applies the causal structure (ratio 0 is fully causal)."
            )
        ratio = self.soft_causal_ratio
        # A ratio outside [0, 1] scales probabilities up or makes them negative (iLLaMA's
        # r runs from 1, bidirectional, to 0, causal). Traced ratios are checked by callers.
        if isinstance(ratio, int | float) and not 0.0 <= ratio <= 1.0:
            raise ValueError(
                f"AttentionMask.soft_causal_ratio must be in [0, 1] (or None), got {ratio!r}."
            )
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise ValueError(
                "AttentionMask: give both q_segment_ids and kv_segment_ids, or neither "
                "(for self-attention pass the same array twice)."
            )

    @property
    def is_trivial(self) -> bool:
        """True when every query sees every key with weight 1."""
        return (
            not self.causal
            and self.window_left is None
            and self.window_right is None
            and self.q_segment_ids is None
            and self.soft_causal_ratio is None
        )


def causal_mask(**kwargs) -> AttentionMask:
    return AttentionMask(causal=True, **kwargs)


def sliding_window_mask(window_left: int, window_right: int | None = 0, **kwargs) -> AttentionMask:
    """Local attention; ``window_right=0`` makes it causal-local."""
    return AttentionMask(window_left=window_left, window_right=window_right, **kwargs)


def soft_causal_mask(ratio: Array | float, **kwargs) -> AttentionMask:
    return AttentionMask(soft_causal_ratio=ratio, **kwargs)


def default_positions(batch: int, q_len: int, kv_len: int) -> tuple[Array, Array]:
    """Positions used when the mask gives none: queries aligned to the last keys."""
    kv_positions = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
    q_positions = jnp.broadcast_to(
        jnp.arange(kv_len - q_len, kv_len, dtype=jnp.int32), (batch, q_len)
    )
    return q_positions, kv_positions


def resolve_positions(
    mask: AttentionMask, batch: int, q_len: int, kv_len: int
) -> tuple[Array, Array]:
    q_default, kv_default = default_positions(batch, q_len, kv_len)
    q_positions = (
        q_default
        if mask.q_positions is None
        else jnp.broadcast_to(mask.q_positions, (batch, q_len))
    )
    kv_positions = (
        kv_default
        if mask.kv_positions is None
        else jnp.broadcast_to(mask.kv_positions, (batch, kv_len))
    )
    return q_positions.astype(jnp.int32), kv_positions.astype(jnp.int32)


def validate_mask(mask: AttentionMask, batch: int, q_len: int, kv_len: int) -> None:
    """Raise a ValueError naming the field whose shape does not fit q/k."""
    expected = {
        "q_segment_ids": (batch, q_len),
        "kv_segment_ids": (batch, kv_len),
        "q_positions": (batch, q_len),
        "kv_positions": (batch, kv_len),
    }
    for name, shape in expected.items():
        value = getattr(mask, name)
        if value is None:
            continue
        if value.ndim != 2 or value.shape[1] != shape[1] or value.shape[0] not in (1, batch):
            raise ValueError(
                f"AttentionMask.{name} must have shape {shape} (or batch 1) to match q/k, "
                f"got {tuple(value.shape)}."
            )
    ratio = mask.soft_causal_ratio
    if ratio is not None and jnp.ndim(ratio) != 0:
        raise ValueError(
            f"AttentionMask.soft_causal_ratio must be a scalar, got shape {jnp.shape(ratio)}."
        )


def token_mask(mask: AttentionMask | None, batch: int, length: int) -> Array | None:
    """bool [batch, length], True for real tokens (segment id != 0), or None without ids.

    For the recurrent mixers (Mamba, LMU), which read a mask only for its padding;
    the mask is validated for a sequence of ``length`` tokens first.
    """
    if mask is None:
        return None
    # A recurrent mixer is causal over the whole prefix by construction: a window or a
    # soft-causal ratio would otherwise be dropped without a word, computing a different
    # function from the one asked for.
    if (
        mask.window_left is not None
        or mask.window_right is not None
        or mask.soft_causal_ratio is not None
    ):
        raise ValueError(
            "token_mask: a recurrent mixer reads the mask for its padding (segment ids) only; "
            "expected window_left=None, window_right=None, soft_causal_ratio=None, got "
            f"window_left={mask.window_left}, window_right={mask.window_right}, "
            f"soft_causal_ratio={mask.soft_causal_ratio}."
        )
    validate_mask(mask, batch, length, length)
    if mask.q_segment_ids is None:
        return None
    return jnp.broadcast_to(mask.q_segment_ids, (batch, length)) != 0


def visibility(
    mask: AttentionMask, q_pos: Array, kv_pos: Array, q_seg: Array | None, kv_seg: Array | None
) -> Array:
    """Boolean visibility for broadcastable position/segment blocks.

    Args:
      q_pos: [..., Lq, 1] query positions; kv_pos: [..., 1, Lk] key positions.
      q_seg, kv_seg: segment ids shaped like q_pos / kv_pos, or None.
    Returns:
      bool [..., Lq, Lk]: True where the key takes part in the softmax.
    """
    visible = jnp.ones(jnp.broadcast_shapes(q_pos.shape, kv_pos.shape), dtype=bool)
    if mask.causal:
        visible &= kv_pos <= q_pos
    if mask.window_left is not None:
        visible &= q_pos - kv_pos <= mask.window_left
    if mask.window_right is not None:
        visible &= kv_pos - q_pos <= mask.window_right
    if q_seg is not None:
        visible &= (q_seg == kv_seg) & (q_seg != 0)
    return visible


def dense_mask(mask: AttentionMask, batch: int, q_len: int, kv_len: int) -> Array:
    """The mask as a bool array [B, 1, Lq, Lk] (reference path only)."""
    q_pos, kv_pos = resolve_positions(mask, batch, q_len, kv_len)
    q_seg = kv_seg = None
    if mask.q_segment_ids is not None:
        q_seg = jnp.broadcast_to(mask.q_segment_ids, (batch, q_len))[:, None, :, None]
        kv_seg = jnp.broadcast_to(mask.kv_segment_ids, (batch, kv_len))[:, None, None, :]
    return visibility(mask, q_pos[:, None, :, None], kv_pos[:, None, None, :], q_seg, kv_seg)


def soft_causal_multiplier(ratio: Array | float, q_pos: Array, kv_pos: Array) -> Array:
    """iLLaMA's ``r + (1 - r) * tril`` for broadcastable position blocks."""
    tril = (kv_pos <= q_pos).astype(jnp.float32)
    return ratio + (1.0 - ratio) * tril
