"""Token merging (ToMe; Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster").

Inside each Transformer block, between the attention and the MLP, ToMe merges
the ``r`` most similar pairs of tokens, so every block after it runs on fewer
tokens. The pieces, each a pure function of arrays:

* :func:`bipartite_soft_matching` decides which tokens merge. The tokens
  after the ``num_protected`` leading ones (a class token) alternate into sets
  A (even) and B (odd); each A token is joined to its most similar B token
  (cosine similarity of a ``metric``: the paper uses the attention keys
  averaged over heads); the ``r`` A tokens with the most similar partners are
  merged into them. The result is a *destination* map: for each input token,
  the index of the output token it becomes.
* :func:`merge_tokens` applies a destination map: each output token is the
  size-weighted mean of the tokens sent to it, and the sizes (how many
  original tokens each one stands for) add up.
* :func:`proportional_attention_bias` is the paper's proportional attention:
  ``log(size)`` of each key added to the attention logits, so that a token of
  size ``s`` counts as ``s`` identical keys.
* :func:`size_weighted_mean` and :class:`SizeWeightedSeqPool` pool merged
  tokens as if they were their ``s`` copies.
* :func:`compose_token_map` tracks, for each original token, the merged token
  that holds it (the paper's "source" for visualisations);
  :func:`unmerge_tokens` copies the merged tokens back to the original
  positions.
* :func:`merge_schedule` turns ``r`` into one value per block.

Output order: protected tokens, then the unmerged A tokens, then the B tokens,
each group in its original order. Differences from the official code
(facebookresearch/ToMe, ``tome/merge.py``): there the class token takes part
in the alternation (it is A token 0, kept out by a score of -inf), so the
A/B phase of the image tokens is shifted by one from ours, and the unmerged A
tokens stay in order of similarity unless there is a class token; here
protected tokens take no part in matching and every group keeps its order.
The two give the same merges for models without protected tokens.

Everything is traceable with static ``r`` (shapes depend on it): the matching
uses one ``top_k``, the merge one scatter-add.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.initializers import trunc_normal

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}.")


def max_merges(num_tokens: int, num_protected: int = 0) -> int:
    """The most tokens one matching can merge: ``(num_tokens - num_protected) // 2``.

    That is the size of set B (every B token can take one A token) and, as in
    the official code, the clip applied to ``r``.
    """
    return max(num_tokens - num_protected, 0) // 2


def bipartite_soft_matching(metric: Array, r: int, *, num_protected: int = 0) -> Array:
    """Which tokens merge: ``metric [B, N, C] -> destination [B, N]`` (int32).

    ``destination[b, i]`` is the index, among the ``N - r`` output tokens, of
    the token that input token ``i`` becomes. The first ``num_protected``
    tokens keep their places (0 .. num_protected - 1) and never merge.
    Ties (exactly equal similarities) go to the lower index.

    No gradient flows through the matching (the metric is a stop_gradient):
    which tokens merge is a discrete choice, as in the paper.

    Raises ValueError if ``r`` is negative or larger than
    ``max_merges(N, num_protected)``.
    """
    owner = "bipartite_soft_matching"
    if metric.ndim != 3:
        raise ValueError(f"{owner}: metric must be [B, N, C], got shape {tuple(metric.shape)}.")
    batch, num_tokens, _ = metric.shape
    _check_int(owner, "num_protected", num_protected, 0)
    if num_protected > num_tokens:
        raise ValueError(
            f"{owner}: num_protected must be <= the number of tokens N={num_tokens}, "
            f"got {num_protected}."
        )
    _check_int(owner, "r", r, 0)
    limit = max_merges(num_tokens, num_protected)
    if r > limit:
        raise ValueError(
            f"{owner}: r must be <= (N - num_protected) // 2 = {limit} for N={num_tokens} tokens "
            f"and num_protected={num_protected}, got r={r}."
        )
    identity = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))
    if r == 0:
        return identity

    dtype = jnp.promote_types(metric.dtype, jnp.float32)
    m = jax.lax.stop_gradient(metric).astype(dtype)
    # Cosine similarity; a zero vector (norm clipped) is equally unlike everything.
    m = m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), jnp.finfo(dtype).tiny)
    rest = m[:, num_protected:]
    a, b = rest[:, 0::2], rest[:, 1::2]  # [B, Na, C], [B, Nb, C]; Na = Nb or Nb + 1
    num_a, num_b = a.shape[1], b.shape[1]
    scores = jnp.einsum("bic,bjc->bij", a, b)
    best_score = jnp.max(scores, axis=-1)  # [B, Na]
    best_match = jnp.argmax(scores, axis=-1).astype(jnp.int32)  # first maximum: lower index

    # The r A tokens with the best scores (top_k: equal scores go to the lower index).
    # One top_k instead of ranking all of A by two argsorts: the matching took 2.6 ms
    # instead of 5.5 on the 2-core CPU (B=256, N=64, C=64, r=8).
    _, top = jax.lax.top_k(best_score, r)  # [B, r]
    merged = jnp.any(jnp.arange(num_a)[None, :, None] == top[:, None, :], axis=-1)  # [B, Na]

    num_kept = num_a - r
    kept_place = num_protected + jnp.cumsum(~merged, axis=-1, dtype=jnp.int32) - 1
    first_b = num_protected + num_kept
    a_destination = jnp.where(merged, first_b + best_match, kept_place)
    b_destination = jnp.broadcast_to(first_b + jnp.arange(num_b, dtype=jnp.int32), (batch, num_b))
    rest_destination = jnp.zeros((batch, num_tokens - num_protected), jnp.int32)
    rest_destination = rest_destination.at[:, 0::2].set(a_destination)
    rest_destination = rest_destination.at[:, 1::2].set(b_destination)
    return jnp.concatenate([identity[:, :num_protected], rest_destination], axis=1)


def merge_tokens(
    x: Array, sizes: Array, destination: Array, num_outputs: int
) -> tuple[Array, Array]:
    """Size-weighted average merge: ``x [B, N, D], sizes [B, N], destination [B, N]`` ->
    ``(merged [B, num_outputs, D], merged sizes [B, num_outputs])``.

    ``merged[b, j] = sum_i sizes[b, i] x[b, i] / sum_i sizes[b, i]`` over the
    tokens ``i`` with ``destination[b, i] == j``; merged sizes are those sums
    of sizes. So the size-weighted sum of the tokens is preserved. Every
    output index must receive at least one token (a destination map from
    :func:`bipartite_soft_matching` ensures it). Computes in at least float32,
    returns ``x``'s dtype; sizes keep theirs.
    """
    owner = "merge_tokens"
    if x.ndim != 3:
        raise ValueError(f"{owner}: x must be [B, N, D], got shape {tuple(x.shape)}.")
    for name, array in (("sizes", sizes), ("destination", destination)):
        if tuple(array.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"{owner}: {name} must have shape {tuple(x.shape[:2])} (x's [B, N]), "
                f"got {tuple(array.shape)}."
            )
    _check_int(owner, "num_outputs", num_outputs, 1)
    if num_outputs > x.shape[1]:
        raise ValueError(
            f"{owner}: num_outputs must be <= the number of tokens N={x.shape[1]}, "
            f"got {num_outputs}."
        )
    batch = jnp.arange(x.shape[0])[:, None]
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    weights = sizes.astype(dtype)
    totals = jnp.zeros((x.shape[0], num_outputs, x.shape[2]), dtype)
    totals = totals.at[batch, destination].add(x.astype(dtype) * weights[..., None])
    merged_sizes = (
        jnp.zeros((x.shape[0], num_outputs), sizes.dtype).at[batch, destination].add(sizes)
    )
    merged = totals / merged_sizes.astype(dtype)[..., None]
    return merged.astype(x.dtype), merged_sizes


def proportional_attention_bias(sizes: Array) -> Array:
    """ToMe's proportional attention: ``sizes [B, Lk] -> bias [B, 1, 1, Lk] = log(sizes)``.

    Added to the attention logits, it makes a key of size ``s`` weigh as
    ``s`` copies of itself: ``exp(l + log s) = s exp(l)`` in the softmax.
    Float32 at least (float64 for float64 sizes).
    """
    if sizes.ndim != 2:
        raise ValueError(
            f"proportional_attention_bias: sizes must be [B, Lk], got shape {tuple(sizes.shape)}."
        )
    dtype = jnp.promote_types(sizes.dtype, jnp.float32)
    return jnp.log(sizes.astype(dtype))[:, None, None, :]


def size_weighted_mean(x: Array, sizes: Array) -> Array:
    """Mean over the original tokens: ``x [B, N, D], sizes [B, N] -> [B, D]``,
    ``sum_i sizes_i x_i / sum_i sizes_i``."""
    if x.ndim != 3 or tuple(sizes.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"size_weighted_mean: x must be [B, N, D] and sizes [B, N], got x "
            f"{tuple(x.shape)} and sizes {tuple(sizes.shape)}."
        )
    weights = sizes.astype(x.dtype)[..., None]
    return jnp.sum(x * weights, axis=1) / jnp.sum(weights, axis=1)


class SizeWeightedSeqPool(nn.Module):
    """CCT's SeqPool over merged tokens: ``softmax_N(Linear(D -> 1)(x) + log(sizes))^T x``.

    A token of size ``s`` gets the weight of its ``s`` copies (the proportional
    attention of ToMe, applied to the pooling's attention). Its parameters are
    those of :class:`effformer.nn.pooling.SeqPool` (a Dense named
    ``attention_pool``), so a model trained without merging loads unchanged;
    with all sizes 1 it computes the same function. The softmax runs in float32
    at least, float64 for float64 inputs (SeqPool's always in float32).
    """

    kernel_init: Initializer = trunc_normal(0.02)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, sizes: Array) -> Array:
        """x: [B, N, D], sizes: [B, N] -> [B, D]."""
        if x.ndim != 3 or tuple(sizes.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"SizeWeightedSeqPool: x must be [B, N, D] and sizes [B, N], got x "
                f"{tuple(x.shape)} and sizes {tuple(sizes.shape)}."
            )
        logits = nn.Dense(
            1,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attention_pool",
        )(x)[..., 0]
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        logits = logits + jnp.log(sizes.astype(logits.dtype))
        weights = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bn,bnd->bd", weights.astype(x.dtype), x)


def compose_token_map(token_map: Array, destination: Array) -> Array:
    """Follow one more merge: ``token_map [B, N0]`` (the current token holding each
    original token), ``destination [B, N]`` -> the new token map [B, N0]."""
    if token_map.ndim != 2 or destination.ndim != 2 or token_map.shape[0] != destination.shape[0]:
        raise ValueError(
            "compose_token_map: token_map must be [B, N0] and destination [B, N] with the same B, "
            f"got {tuple(token_map.shape)} and {tuple(destination.shape)}."
        )
    return jnp.take_along_axis(destination, token_map, axis=1)


def unmerge_tokens(x: Array, token_map: Array) -> Array:
    """Copy merged tokens back to the original positions: ``x [B, N, D]``,
    ``token_map [B, N0]`` -> ``[B, N0, D]`` (each original token gets its merged token)."""
    if x.ndim != 3 or token_map.ndim != 2 or token_map.shape[0] != x.shape[0]:
        raise ValueError(
            "unmerge_tokens: x must be [B, N, D] and token_map [B, N0] with the same B, "
            f"got {tuple(x.shape)} and {tuple(token_map.shape)}."
        )
    return jnp.take_along_axis(x, token_map[..., None], axis=1)


def merge_schedule(
    num_tokens: int, num_layers: int, r: int | Sequence[int], num_protected: int = 0
) -> tuple[int, ...]:
    """Tokens merged in each of ``num_layers`` blocks, starting from ``num_tokens``.

    ``r`` an int: that many per block, clipped in each block to what its
    tokens allow (``max_merges``), as the official code does. ``r`` a sequence
    (one value per block): taken exactly; a value larger than its block's
    tokens allow is an error. The tokens left after block ``i`` are
    ``num_tokens - sum(schedule[: i + 1])``.
    """
    owner = "merge_schedule"
    _check_int(owner, "num_tokens", num_tokens, 1)
    _check_int(owner, "num_layers", num_layers, 1)
    _check_int(owner, "num_protected", num_protected, 0)
    if isinstance(r, int) and not isinstance(r, bool):
        _check_int(owner, "r", r, 0)
        per_block, clip = [r] * num_layers, True
    elif isinstance(r, Sequence) and not isinstance(r, str):
        if len(r) != num_layers:
            raise ValueError(
                f"{owner}: r as a sequence must have one value per block ({num_layers}), "
                f"got {len(r)} values: {tuple(r)}."
            )
        for i, value in enumerate(r):
            _check_int(owner, f"r[{i}]", value, 0)
        per_block, clip = list(r), False
    else:
        raise ValueError(f"{owner}: r must be an int or a sequence of ints, got {r!r}.")
    schedule, tokens = [], num_tokens
    for i, value in enumerate(per_block):
        limit = max_merges(tokens, num_protected)
        if value > limit and not clip:
            raise ValueError(
                f"{owner}: r[{i}]={value} is too large: block {i} sees {tokens} tokens "
                f"({num_protected} protected), so at most {limit} can merge."
            )
        value = min(value, limit)
        schedule.append(value)
        tokens -= value
    return tuple(schedule)
