"""Continuous integrate-and-fire (CIF), the token-count predictor of Paraformer.

CIF (Dong & Xu, 2020, "CIF: Continuous Integrate-and-Fire for End-to-End Speech
Recognition"; used by Gao et al., 2022, Paraformer) reads encoder frames
``h_t`` with non-negative weights ``alpha_t`` from left to right. It
accumulates ``alpha_t h_t`` until the accumulated weight reaches the threshold
``beta`` (1.0 in Paraformer); then it *fires*: the frame's weight is split,
the part that completes ``beta`` closes the current token and the rest starts
the next one. A frame whose weight is larger than what is left can complete
several tokens (it fires several times; weights above ``beta`` occur after the
training-time scaling below).

Written with the cumulative weight ``c_t = alpha_1 + ... + alpha_t``
(``c_0 = 0``), token ``n`` integrates the weight of the interval
``[n beta, (n + 1) beta)``:

    e_n = sum_t w_nt h_t,   w_nt = |[c_{t-1}, c_t] ∩ [n beta, (n + 1) beta]|     (1)

which is what the left-to-right loop computes (the part of frame t's weight
that falls in token n's interval). Token n has fired once ``c_T >= (n + 1)
beta``. Padding frames (``frame_mask`` False) get weight 0, so they never
contribute.

How many tokens (FunASR's ``CifPredictorV2``, ``modelscope/FunASR``,
``funasr/models/paraformer/cif_predictor.py``):

* in training the weights are scaled to the target length ``L``,
  ``alpha' = alpha * L / sum(alpha)`` (:func:`scale_to_length`, gradients flow
  through the ratio as in FunASR), so exactly ``L`` tokens fire; the quantity
  loss ``|sum(alpha) - L|`` (:func:`quantity_loss`, FunASR's ``mae_loss``)
  teaches the unscaled weights to sum to ``L``;
* at inference FunASR appends one zero frame with weight ``tail_threshold``
  (0.45 in its Paraformer config) after the last real frame, so an unfinished
  last token with at least ``beta - tail_threshold`` of weight still fires; its
  embedding is the partial integral (the appended frame is zero). The count is
  ``floor((sum(alpha) + tail_threshold) / beta)``, here without appending
  anything: the embeddings of (1) already hold the partial integral in the
  row after the last complete token.

:func:`cif` returns ``max_tokens`` rows: row n is (1) for every n, so rows
past the fired count hold the unfinished remainder (row ``floor(c_T / beta)``)
or zeros; ``token_mask`` marks the fired rows. In training the caller uses
its target mask instead, which also covers the case where float rounding
leaves the scaled sum a hair below ``L`` (FunASR then leaves that last token
as a zero row; here it gets its almost complete integral).

FunASR's loop fires at most once per frame (its weights come from a sigmoid,
below 1, except after the scaling); (1) fires as often as the weight allows,
as the CIF paper describes. With every weight below ``beta`` the two agree.

Implementations: :func:`cif` computes the weights ``w [B, N, T]`` of (1) from
the cumulative sums in one vectorised expression and the embeddings as one
contraction (memory ``B N T``; N and T are a few hundred in speech). The
twin for tests is :func:`cif_reference`: the left-to-right integrate-and-fire
loop in NumPy float64.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class CifOutput(NamedTuple):
    """What :func:`cif` returns.

    embeddings: [B, N, D] the integrated embedding of each token slot (module docstring).
    num_tokens: [B] int32, the fired count (with the tail rule), at most N.
    token_mask: [B, N] bool, ``n < num_tokens``.
    """

    embeddings: Array
    num_tokens: Array
    token_mask: Array


def _check_threshold(owner: str, threshold: float, tail_threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold <= 0:
        raise ValueError(f"{owner}: threshold must be a number > 0, got {threshold!r}.")
    if (
        isinstance(tail_threshold, bool)
        or not isinstance(tail_threshold, int | float)
        or not 0 <= tail_threshold < threshold
    ):
        raise ValueError(
            f"{owner}: tail_threshold must be a number in [0, threshold={threshold}), got "
            f"{tail_threshold!r}."
        )


def _check_shapes(owner: str, frames, alphas, frame_mask, max_tokens) -> None:
    if frames.ndim != 3:
        raise ValueError(f"{owner}: frames must be [B, T, D], got shape {tuple(frames.shape)}.")
    if tuple(alphas.shape) != tuple(frames.shape[:2]):
        raise ValueError(
            f"{owner}: alphas must have shape [B, T] = {tuple(frames.shape[:2])}, got "
            f"{tuple(alphas.shape)}."
        )
    if frame_mask is not None and tuple(frame_mask.shape) != tuple(frames.shape[:2]):
        raise ValueError(
            f"{owner}: frame_mask must have shape [B, T] = {tuple(frames.shape[:2])}, got "
            f"{tuple(frame_mask.shape)}."
        )
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int | np.integer):
        raise ValueError(f"{owner}: max_tokens must be an int >= 1, got {max_tokens!r}.")
    if max_tokens < 1:
        raise ValueError(f"{owner}: max_tokens must be an int >= 1, got {max_tokens!r}.")


def cif(
    frames: Array,
    alphas: Array,
    *,
    max_tokens: int,
    frame_mask: Array | None = None,
    threshold: float = 1.0,
    tail_threshold: float = 0.0,
) -> CifOutput:
    """Continuous integrate-and-fire of ``frames`` with weights ``alphas`` (module docstring).

    Args:
      frames: [B, T, D] encoder frames.
      alphas: [B, T] non-negative weights (Paraformer: a sigmoid, scaled in training).
      max_tokens: N, the number of token slots returned (a static int).
      frame_mask: [B, T] bool, True for a real frame; None: every frame is real.
      threshold: beta, the weight of one token (Paraformer: 1.0).
      tail_threshold: weight added after the last frame for counting (FunASR's inference:
        0.45; 0 in training, where the count is the target length).

    Returns:
      :class:`CifOutput`: embeddings [B, N, D] (frames' dtype), num_tokens [B] int32
      (``floor((sum alpha + tail_threshold) / beta)`` capped at N), token_mask [B, N].
    """
    _check_shapes("cif", frames, alphas, frame_mask, max_tokens)
    _check_threshold("cif", threshold, tail_threshold)
    dtype = jnp.promote_types(frames.dtype, jnp.float32)
    alphas = alphas.astype(dtype)
    if frame_mask is not None:
        alphas = jnp.where(frame_mask, alphas, 0.0)
        frames = jnp.where(frame_mask[..., None], frames, 0)  # no NaN from padding's values
    ends = jnp.cumsum(alphas, axis=1)  # c_t
    # c_{t-1} as the previous cumulative sum (not c_t - alpha_t): neighbouring frames'
    # intervals then meet exactly, so no weight is lost or counted twice to rounding.
    starts = jnp.pad(ends[:, :-1], ((0, 0), (1, 0)))
    low = jnp.arange(max_tokens, dtype=dtype) * threshold  # n beta
    overlap = jnp.minimum(ends[:, None, :], low[None, :, None] + threshold) - jnp.maximum(
        starts[:, None, :], low[None, :, None]
    )
    weights = jnp.where(overlap > 0, overlap, 0.0)  # w [B, N, T] of eq. (1)
    embeddings = jnp.einsum("bnt,btd->bnd", weights, frames.astype(dtype))
    total = ends[:, -1]
    count = jnp.floor((jax.lax.stop_gradient(total) + tail_threshold) / threshold)
    num_tokens = jnp.clip(count, 0, max_tokens).astype(jnp.int32)
    token_mask = jnp.arange(max_tokens)[None, :] < num_tokens[:, None]
    return CifOutput(embeddings.astype(frames.dtype), num_tokens, token_mask)


def cif_reference(
    frames: np.ndarray,
    alphas: np.ndarray,
    *,
    max_tokens: int,
    frame_mask: np.ndarray | None = None,
    threshold: float = 1.0,
    tail_threshold: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The left-to-right integrate-and-fire loop in NumPy float64 (the test twin of :func:`cif`).

    Same arguments as :func:`cif`; returns (embeddings [B, N, D], num_tokens [B]).
    """
    _check_shapes("cif_reference", frames, alphas, frame_mask, max_tokens)
    _check_threshold("cif_reference", threshold, tail_threshold)
    frames = np.asarray(frames, np.float64)
    alphas = np.asarray(alphas, np.float64)
    batch, length, dim = frames.shape
    embeddings = np.zeros((batch, max_tokens, dim))
    num_tokens = np.zeros(batch, np.int64)
    for b in range(batch):
        fired: list[np.ndarray] = []
        accumulated, state = 0.0, np.zeros(dim)
        for t in range(length):
            if frame_mask is not None and not frame_mask[b, t]:
                continue
            weight, h = alphas[b, t], frames[b, t]
            while accumulated + weight >= threshold:  # fire, possibly several times
                part = threshold - accumulated
                fired.append(state + part * h)
                weight -= part
                accumulated, state = 0.0, np.zeros(dim)
            accumulated += weight
            state = state + weight * h
        count = len(fired)
        if accumulated + tail_threshold >= threshold:  # the tail completes the last token
            count += 1
        rows = fired + [state]  # the unfinished remainder follows the fired tokens
        for n, row in enumerate(rows[:max_tokens]):
            embeddings[b, n] = row
        num_tokens[b] = min(count, max_tokens)
    return embeddings, num_tokens


def scale_to_length(alphas: Array, target_lengths: Array) -> Array:
    """Training-time scaling ``alpha * L / sum(alpha)``: alphas [B, T], target_lengths [B] -> [B, T].

    The scaled weights sum to ``L`` (up to rounding), so CIF fires exactly L tokens.
    Gradients flow through the ratio, as in FunASR. Padding frames must already have
    weight 0.
    """
    if alphas.ndim != 2 or tuple(target_lengths.shape) != (alphas.shape[0],):
        raise ValueError(
            f"scale_to_length: alphas must be [B, T] and target_lengths [B], got shapes "
            f"{tuple(alphas.shape)} and {tuple(target_lengths.shape)}."
        )
    total = jnp.sum(alphas, axis=1, keepdims=True)
    tiny = jnp.finfo(alphas.dtype).tiny
    return alphas * (target_lengths.astype(alphas.dtype)[:, None] / jnp.maximum(total, tiny))


def quantity_loss(alphas: Array, target_lengths: Array) -> Array:
    """Paraformer's quantity (MAE) loss per example, ``|sum_t alpha_t - L|``: [B, T], [B] -> [B]."""
    if alphas.ndim != 2 or tuple(target_lengths.shape) != (alphas.shape[0],):
        raise ValueError(
            f"quantity_loss: alphas must be [B, T] and target_lengths [B], got shapes "
            f"{tuple(alphas.shape)} and {tuple(target_lengths.shape)}."
        )
    return jnp.abs(jnp.sum(alphas, axis=1) - target_lengths.astype(alphas.dtype))
