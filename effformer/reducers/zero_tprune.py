"""Zero-TPrune (Wang, Dedhia and Jha, CVPR 2024, "Zero-TPrune: Zero-Shot Token Pruning
through Leveraging of the Attention Graph in Pre-Trained Transformers").

Inside a Transformer block, right after its attention, Zero-TPrune drops tokens
using that block's attention graph, with no training. The pieces, each a pure
function of arrays:

* :func:`weighted_page_rank` (WPR): the attention probabilities ``A[h, i, j]``
  (query ``i`` attends to key ``j``; rows sum to 1) are a graph whose edge
  ``i -> j`` carries how much ``i`` draws from ``j``. A token is important if
  important tokens attend to it: ``s_{t+1}[j] = sum_i A[i, j] s_t[i]``, i.e.
  ``s_{t+1} = A^T s_t``, from the uniform ``s_0 = 1 / N``, per head. ``A`` is
  row-stochastic, so the scores keep summing to 1 at every step.
* :func:`aggregate_heads`: the per-head scores combined by the paper's
  "emphasizing informative region" aggregation, the root mean square over
  heads (a token that one head finds very important keeps a high score).
* :func:`importance_stage` (I-stage): keep the most important tokens.
* :func:`similarity_stage` (S-stage): the tokens, ranked by importance, are
  partitioned into the more important half (set B) and the less important
  half (set A); each A token finds its most similar B token (cosine
  similarity of a ``metric``, the attention keys averaged over heads as in
  ToMe); the ``k`` A tokens with the most similar partners are dropped (a
  near-copy of a more important token carries little new information).
* :func:`zero_tprune` runs both stages in one block; :func:`prune_schedule`
  turns the per-block counts of a model into validated values;
  :func:`wpr_iterations` gives the paper's iteration count per block.

Pruned tokens are dropped (not merged): the kept tokens keep their values and
their original order. The first ``num_protected`` tokens (a class token) are
never pruned, but they do take part in the page rank (they attend and are
attended to). Everything is traceable with static counts (shapes depend on
them): ``top_k`` for the rankings, a gather to drop.

Scope, as honestly as the sources allowed: the official code was not found
in the search index (a third-party re-implementation was read, not copied).
Implemented from the paper: WPR with a fixed iteration count (the paper
iterates to a tolerance, and suggests 30-50 iterations in the first three
layers, 5-10 in the middle ones, 1 in the last three; :func:`wpr_iterations`
takes the low end of each range), root-mean-square head aggregation, the
I-stage, and the S-stage with the importance-sorted ("sequential")
partition. Not implemented: the paper's variance-based head filter (an
optional refinement that drops heads whose score variance lies outside a
tuned range) and the other partitions of its ablation (random, alternate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# The paper's ranges (first three layers, middle layers, last three layers): 30-50, 5-10, 1.
EARLY_ITERATIONS, MIDDLE_ITERATIONS, LATE_ITERATIONS = 30, 5, 1
DEFAULT_ITERATIONS = EARLY_ITERATIONS


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}.")


def _check_protected(owner: str, num_tokens: int, num_protected: int) -> None:
    _check_int(owner, "num_protected", num_protected, 0)
    if num_protected > num_tokens:
        raise ValueError(
            f"{owner}: num_protected must be <= the number of tokens N={num_tokens}, "
            f"got {num_protected}."
        )


def wpr_iterations(block: int, num_layers: int) -> int:
    """The paper's WPR iteration count for ``block`` of ``num_layers``: 30 in the first
    three blocks (attention there is flat and converges slowly), 1 in the last three,
    5 in between. Where the two ends overlap (fewer than 6 blocks) the first rule wins."""
    _check_int("wpr_iterations", "num_layers", num_layers, 1)
    _check_int("wpr_iterations", "block", block, 0)
    if block >= num_layers:
        raise ValueError(
            f"wpr_iterations: block must be < num_layers={num_layers}, got block={block}."
        )
    if block < 3:
        return EARLY_ITERATIONS
    if block >= num_layers - 3:
        return LATE_ITERATIONS
    return MIDDLE_ITERATIONS


def weighted_page_rank(attention: Array, num_iterations: int = DEFAULT_ITERATIONS) -> Array:
    """Per-head WPR scores: ``attention [B, H, N, N]`` (row i: query i's probabilities
    over the keys) -> ``scores [B, H, N]``, ``s <- A^T s`` ``num_iterations`` times from
    ``s = 1 / N``. Computes in at least float32 (float64 stays float64)."""
    owner = "weighted_page_rank"
    if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(
            f"{owner}: attention must be [B, H, N, N], got shape {tuple(attention.shape)}."
        )
    _check_int(owner, "num_iterations", num_iterations, 1)
    dtype = jnp.promote_types(attention.dtype, jnp.float32)
    a = attention.astype(dtype)
    num_tokens = a.shape[-1]
    scores = jnp.full(a.shape[:-1], 1.0 / num_tokens, dtype)

    def step(_, s: Array) -> Array:
        return jnp.einsum("bhij,bhi->bhj", a, s)  # s_new[j] = sum_i A[i, j] s[i]

    return jax.lax.fori_loop(0, num_iterations, step, scores)


def aggregate_heads(scores: Array) -> Array:
    """Emphasizing-informative-region aggregation: ``scores [B, H, N] -> [B, N]``,
    ``sqrt(mean_h scores[h] ** 2)``."""
    if scores.ndim != 3:
        raise ValueError(f"aggregate_heads: scores must be [B, H, N], got {tuple(scores.shape)}.")
    return jnp.sqrt(jnp.mean(jnp.square(scores), axis=1))


def token_importance(attention: Array, num_iterations: int = DEFAULT_ITERATIONS) -> Array:
    """``attention [B, H, N, N] -> importance [B, N]``: WPR per head, then
    :func:`aggregate_heads`."""
    return aggregate_heads(weighted_page_rank(attention, num_iterations))


def _keep_sorted(protected: int, kept_rest: Array, batch: int) -> Array:
    """Protected indices, then the kept others (offset by ``protected``) in original order."""
    head = jnp.broadcast_to(jnp.arange(protected, dtype=jnp.int32), (batch, protected))
    rest = jnp.sort(kept_rest.astype(jnp.int32), axis=-1) + protected
    return jnp.concatenate([head, rest], axis=1)


def importance_stage(importance: Array, k: int, *, num_protected: int = 0) -> Array:
    """I-stage: ``importance [B, N] -> keep [B, N - k]`` (int32, ascending), the indices of
    the tokens kept: the protected ones and the ``N - num_protected - k`` most important
    others. Equal scores: the lower index is kept. Raises ValueError if ``k`` is negative
    or more than the unprotected tokens."""
    owner = "importance_stage"
    if importance.ndim != 2:
        raise ValueError(f"{owner}: importance must be [B, N], got {tuple(importance.shape)}.")
    batch, num_tokens = importance.shape
    _check_protected(owner, num_tokens, num_protected)
    _check_int(owner, "k", k, 0)
    limit = num_tokens - num_protected
    if k > limit:
        raise ValueError(
            f"{owner}: k must be <= N - num_protected = {limit} (N={num_tokens}), got k={k}."
        )
    rest = jax.lax.stop_gradient(importance[:, num_protected:])
    _, kept = jax.lax.top_k(rest, limit - k)  # ties: lower index first
    return _keep_sorted(num_protected, kept, batch)


def max_similarity_pruned(num_tokens: int, num_protected: int = 0) -> int:
    """The most tokens one S-stage can drop: the size of set A, ``(N - num_protected) // 2``."""
    return max(num_tokens - num_protected, 0) // 2


def similarity_stage(metric: Array, importance: Array, k: int, *, num_protected: int = 0) -> Array:
    """S-stage: ``metric [B, N, C], importance [B, N] -> keep [B, N - k]`` (int32, ascending).

    The unprotected tokens, ranked by importance (descending; equal scores: lower
    index first), are split: the first ``ceil(n / 2)`` form set B, the rest set A.
    Each A token's score is its highest cosine similarity to a B token; the ``k``
    A tokens with the highest scores are dropped (equal scores: the less important
    A token, the later in the ranking, is dropped first). Raises ValueError if
    ``k`` is negative or more than ``(N - num_protected) // 2``.
    """
    owner = "similarity_stage"
    if metric.ndim != 3:
        raise ValueError(f"{owner}: metric must be [B, N, C], got {tuple(metric.shape)}.")
    if tuple(importance.shape) != tuple(metric.shape[:2]):
        raise ValueError(
            f"{owner}: importance must have shape {tuple(metric.shape[:2])} (metric's [B, N]), "
            f"got {tuple(importance.shape)}."
        )
    batch, num_tokens, _ = metric.shape
    _check_protected(owner, num_tokens, num_protected)
    _check_int(owner, "k", k, 0)
    limit = max_similarity_pruned(num_tokens, num_protected)
    if k > limit:
        raise ValueError(
            f"{owner}: k must be <= (N - num_protected) // 2 = {limit} (N={num_tokens}, "
            f"num_protected={num_protected}), got k={k}."
        )
    num_rest = num_tokens - num_protected
    if k == 0:
        return jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))

    dtype = jnp.promote_types(metric.dtype, jnp.float32)
    m = jax.lax.stop_gradient(metric[:, num_protected:]).astype(dtype)
    m = m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), jnp.finfo(dtype).tiny)
    # Rank by importance: top_k over all tokens is a stable descending sort.
    _, order = jax.lax.top_k(jax.lax.stop_gradient(importance[:, num_protected:]), num_rest)
    num_b = num_rest - num_rest // 2
    b_index, a_index = order[:, :num_b], order[:, num_b:]  # [B, nb], [B, na]
    gather = lambda idx: jnp.take_along_axis(m, idx[..., None], axis=1)
    similarity = jnp.einsum("bic,bjc->bij", gather(a_index), gather(b_index))
    best = jnp.max(similarity, axis=-1)  # [B, na], in ranking order
    # Keep the na - k A tokens with the lowest best similarity. top_k breaks ties towards
    # the lower index, the earlier (more important) A token: the less important one goes.
    _, kept_a = jax.lax.top_k(-best, a_index.shape[1] - k)
    kept = jnp.concatenate([b_index, jnp.take_along_axis(a_index, kept_a, axis=1)], axis=1)
    return _keep_sorted(num_protected, kept, batch)


def gather_tokens(x: Array, keep: Array) -> Array:
    """``x [B, N, ...], keep [B, M]`` (indices) -> ``[B, M, ...]``."""
    if x.ndim < 2 or keep.ndim != 2 or keep.shape[0] != x.shape[0]:
        raise ValueError(
            "gather_tokens: x must be [B, N, ...] and keep [B, M] with the same B, "
            f"got {tuple(x.shape)} and {tuple(keep.shape)}."
        )
    index = keep.reshape(keep.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def zero_tprune(
    attention: Array,
    metric: Array,
    num_importance: int,
    num_similarity: int,
    *,
    num_iterations: int = DEFAULT_ITERATIONS,
    num_protected: int = 0,
) -> Array:
    """One block's pruning: ``attention [B, H, N, N], metric [B, N, C]`` ->
    ``keep [B, N - num_importance - num_similarity]`` (int32, ascending).

    The I-stage drops ``num_importance`` tokens by WPR importance; the S-stage then
    drops ``num_similarity`` of the rest, partitioned by the same importance scores.
    Apply with :func:`gather_tokens`.
    """
    owner = "zero_tprune"
    if attention.ndim != 4 or metric.ndim != 3 or attention.shape[-1] != metric.shape[1]:
        raise ValueError(
            f"{owner}: attention must be [B, H, N, N] and metric [B, N, C] with the same N, "
            f"got {tuple(attention.shape)} and {tuple(metric.shape)}."
        )
    importance = token_importance(attention, num_iterations)
    keep = importance_stage(importance, num_importance, num_protected=num_protected)
    _check_int(owner, "num_similarity", num_similarity, 0)
    if num_similarity == 0:
        return keep
    kept_similarity = similarity_stage(
        gather_tokens(metric, keep),
        gather_tokens(importance, keep),
        num_similarity,
        num_protected=num_protected,
    )
    return jnp.take_along_axis(keep, kept_similarity, axis=1)


def prune_schedule(
    num_tokens: int,
    num_layers: int,
    num_importance: int | Sequence[int],
    num_similarity: int | Sequence[int],
    num_protected: int = 0,
) -> tuple[tuple[int, int], ...]:
    """``(I-stage, S-stage)`` tokens dropped in each of ``num_layers`` blocks.

    Each count is an int (that many in every block, clipped in each block to what
    its tokens allow, as :func:`effformer.reducers.tome.merge_schedule` does) or one
    value per block (taken exactly; too large is an error). The I-stage may drop all
    but one unprotected token (all unprotected tokens when there are protected
    ones); the S-stage at most half of the unprotected tokens it sees.
    """
    owner = "prune_schedule"
    _check_int(owner, "num_tokens", num_tokens, 1)
    _check_int(owner, "num_layers", num_layers, 1)
    _check_protected(owner, num_tokens, num_protected)

    def per_block(name: str, value) -> tuple[list[int], bool]:
        if isinstance(value, int) and not isinstance(value, bool):
            _check_int(owner, name, value, 0)
            return [value] * num_layers, True
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) != num_layers:
                raise ValueError(
                    f"{owner}: {name} as a sequence must have one value per block "
                    f"({num_layers}), got {len(value)} values: {tuple(value)}."
                )
            for i, v in enumerate(value):
                _check_int(owner, f"{name}[{i}]", v, 0)
            return list(value), False
        raise ValueError(f"{owner}: {name} must be an int or a sequence of ints, got {value!r}.")

    importance, clip_importance = per_block("num_importance", num_importance)
    similarity, clip_similarity = per_block("num_similarity", num_similarity)
    schedule, tokens = [], num_tokens
    for i in range(num_layers):
        limit = tokens - max(num_protected, 1)
        if importance[i] > limit and not clip_importance:
            raise ValueError(
                f"{owner}: num_importance[{i}]={importance[i]} is too large: block {i} sees "
                f"{tokens} tokens ({num_protected} protected), so at most {limit} can go."
            )
        dropped_i = min(importance[i], limit)
        tokens -= dropped_i
        limit = max_similarity_pruned(tokens, num_protected)
        if similarity[i] > limit and not clip_similarity:
            raise ValueError(
                f"{owner}: num_similarity[{i}]={similarity[i]} is too large: block {i} has "
                f"{tokens} tokens after its I-stage ({num_protected} protected), so at most "
                f"{limit} can go."
            )
        dropped_s = min(similarity[i], limit)
        tokens -= dropped_s
        schedule.append((dropped_i, dropped_s))
    return tuple(schedule)
