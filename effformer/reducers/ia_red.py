"""IA-RED² (Pan et al., NeurIPS 2021, "IA-RED²: Interpretability-Aware Redundancy
Reduction for Vision Transformers").

The blocks of a vision Transformer are split into groups; before each group a
small policy network, the *multi-head interpreter*, scores every patch token
still in play and decides which ones go on; the class token is always kept.
Dropping is hierarchical: a token dropped before one group stays dropped. The
interpreters' keep scores are the method's interpretability output (heat maps
of the informative patches). The pieces, each a pure function or a small module:

* :class:`MultiHeadInterpreter`: per head ``h``, a query ``q_h`` and keys
  ``k_{h,j}`` (linear projections of the layer-normalised tokens), and the keep
  probability of patch ``j`` is ``p_j = (1/H) sum_h sigmoid(q_h . k_{h,j} / sqrt(d_h))``.
  The query is the class token's projection (the paper's models, DeiT, have one);
  a model without a class token (CCT's SeqPool) uses the mean of the live tokens
  instead (our choice: the paper does not cover that case).
* :func:`sample_decisions` (policy training: Bernoulli samples of keep/drop),
  :func:`threshold_decisions` (inference: keep where ``p > 0.5``) and
  :func:`decision_log_prob` (the log-likelihood of the decisions, for REINFORCE).
* :func:`top_k_keep`: a fixed number of patch tokens kept per stage, the ``k``
  highest scores (our addition, see "static shapes" below).
* :func:`policy_reward`, :func:`leave_one_out_baseline` and
  :func:`reinforce_loss`: the policy-gradient objective.
* :func:`check_stages`, :func:`check_top_k`: validated settings.

**Static shapes.** The paper's decisions give every image its own number of
tokens. Under ``jax.jit`` shapes are static, so two exact realisations are
offered (``effformer.models.vit`` runs them):

* *masking* (policy training with samples, inference with the 0.5 threshold):
  the sequence keeps its length and a dropped token is masked out of every
  attention (segment id 0: it sees nothing and nothing sees it) and out of the
  pooling. A masked token then has no influence at all on the kept ones (tested:
  changing its value changes no kept output, bit for bit, and the result equals
  running the model on the kept tokens only). This is exact but saves nothing;
  it is how the policy is trained and how the paper's decision rule is evaluated.
* *top-k gathering* (inference): each interpreter keeps a fixed number of
  patch tokens, its ``k`` highest scores, and the others are removed by a
  gather, so the following blocks really run on fewer tokens. This trades the
  paper's per-image token counts for a speed-up under static shapes.

**Policy training** (the paper's first stage; see also
``effformer.train.ia_red_task``): the backbone is frozen and only the
interpreters learn, by REINFORCE. Each image's decisions ``u`` (all stages) are
sampled from the interpreters; the reward is ``1 - c^2`` when the prediction is
correct and ``-tau`` when it is wrong (``tau``: ``error_penalty``), where ``c``
is the fraction of the patch-token computation kept: the mean over all blocks
of the fraction of patch tokens each block processes (for a single stage before
the first block, the paper's ``|u|_0 / N``; for several stages this is the
fraction of block-level patch-token work done, as the re-implementation's FLOPs
estimate weighs each group by its blocks). The loss is
``-sum_i (R_i - b_i) log pi(u_i | x_i)`` with ``b_i`` the mean reward of the other
images of the batch (a leave-one-out baseline, which keeps the gradient
estimate unbiased). The interpreters read the tokens through ``stop_gradient``:
the policy loss never reaches the backbone.

Sources and differences. The official code was not found in the search index;
a third-party re-implementation of the model (joon-stack/ltrp,
``score_net/ia_red_utils/IA_RED_model.py``) was read, not copied. From it: the
interpreter's form (a LayerNorm without parameters before the projections, the
class token's query against every token's key, sigmoid, mean over heads, dropped
tokens scored 0), Bernoulli sampling while training and the 0.5 threshold at
inference, the class token always kept, and the blocks split into groups. Not
found in either source available here, so chosen and stated: the baseline
(leave-one-out mean; BlockDrop, whose reward form IA-RED² uses, takes the
greedy policy's reward instead), the reward's ``c`` for several stages (above),
``tau = 1`` by default (the re-implementation's ``error_penalty=-1`` read as the
reward of a wrong prediction), and training all interpreters jointly rather
than in the paper's curriculum from the first group to the last. The paper's
optional second stage (fine-tuning the backbone with the interpreters fixed)
is the ordinary classification task with the interpreters frozen
(``config.optimizer.trainable_modules``); it is not run in ``experiments/ia_red``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.initializers import trunc_normal
from effformer.reducers.zero_tprune import importance_stage

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

KEEP_THRESHOLD = 0.5  # inference keeps a patch token whose probability is above this
DEFAULT_ERROR_PENALTY = 1.0  # tau: the reward of a wrong prediction is -tau
BASELINES = ("leave_one_out", "none")


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}.")


def check_stages(stages: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The blocks an interpreter precedes, validated: strictly ascending ints in
    ``[0, num_layers)``. ``()`` is IA-RED² off. Returns them as a tuple."""
    owner = "ia_red"
    if isinstance(stages, str) or not isinstance(stages, Sequence):
        raise ValueError(
            f"{owner}: stages must be a sequence of block indices (the blocks an interpreter "
            f"precedes), got {stages!r}."
        )
    stages = tuple(stages)
    for i, block in enumerate(stages):
        _check_int(owner, f"stages[{i}]", block, 0)
        if block >= num_layers:
            raise ValueError(
                f"{owner}: stages[{i}]={block} is not a block of this {num_layers}-block model "
                f"(blocks 0..{num_layers - 1})."
            )
    if any(b <= a for a, b in zip(stages, stages[1:], strict=False)):
        raise ValueError(f"{owner}: stages must be strictly ascending, got {stages}.")
    return stages


def check_top_k(top_k: Sequence[int], num_stages: int, num_patches: int) -> tuple[int, ...]:
    """Patch tokens kept by each interpreter in top-k mode, validated: one int per
    stage, each in ``[1, num_patches]`` and none above the one before (a dropped
    token stays dropped). ``()`` is the paper's thresholding. Returns a tuple."""
    owner = "ia_red"
    if isinstance(top_k, str) or not isinstance(top_k, Sequence):
        raise ValueError(
            f"{owner}: top_k must be a sequence of patch-token counts, one per stage, got "
            f"{top_k!r}."
        )
    top_k = tuple(top_k)
    if not top_k:
        return top_k
    if len(top_k) != num_stages:
        raise ValueError(
            f"{owner}: top_k must give one count per stage ({num_stages}), got {len(top_k)} "
            f"values: {top_k}."
        )
    previous = num_patches
    for i, count in enumerate(top_k):
        _check_int(owner, f"top_k[{i}]", count, 1)
        if count > previous:
            raise ValueError(
                f"{owner}: top_k[{i}]={count} is more than the {previous} patch tokens "
                f"{'of the image' if i == 0 else f'kept by stage {i - 1}'}."
            )
        previous = count
    return top_k


class MultiHeadInterpreter(nn.Module):
    """The multi-head interpreter: ``x [B, N, D], alive [B, N]`` -> keep probabilities
    ``[B, N - num_protected]`` of the patch tokens (after the ``num_protected`` leading ones).

    ``p_j = (1/H) sum_h sigmoid(q_h . k_{h,j} / sqrt(D / H))`` with ``k_{h,j}`` the
    key projection of the layer-normalised token ``j`` and ``q_h`` the query
    projection of the layer-normalised class token (token 0) when
    ``num_protected > 0``, else of the mean of the live tokens' normalised
    features. Tokens with ``alive`` False are zeroed before anything is computed
    and get probability 0, so they have no influence on the others' scores.
    The tokens are read through ``stop_gradient`` (the backbone is not trained
    by the policy). Computes in at least float32 (float64 stays float64).

    Attributes:
      num_heads: interpreter heads; must divide ``D``.
      epsilon: of the parameter-free LayerNorm.
    """

    num_heads: int
    epsilon: float = 1e-5
    kernel_init: Initializer = trunc_normal(0.02)
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, alive: Array, *, num_protected: int = 0) -> Array:
        owner = type(self).__name__
        if x.ndim != 3:
            raise ValueError(f"{owner}: x must be [B, N, D], got shape {tuple(x.shape)}.")
        batch, num_tokens, dim = x.shape
        if tuple(alive.shape) != (batch, num_tokens):
            raise ValueError(
                f"{owner}: alive must have shape {(batch, num_tokens)} (x's [B, N]), "
                f"got {tuple(alive.shape)}."
            )
        _check_int(owner, "num_heads", self.num_heads, 1)
        if dim % self.num_heads:
            raise ValueError(
                f"{owner}: num_heads must divide the token width {dim}, got {self.num_heads}."
            )
        _check_int(owner, "num_protected", num_protected, 0)
        if num_protected >= num_tokens:
            raise ValueError(
                f"{owner}: num_protected must leave at least one patch token of N={num_tokens}, "
                f"got {num_protected}."
            )
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        live = alive.astype(dtype)[..., None]
        h = jax.lax.stop_gradient(x).astype(dtype) * live
        mean = jnp.mean(h, axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(jnp.var(h, axis=-1, keepdims=True) + self.epsilon)
        if num_protected:
            summary = h[:, 0]
        else:
            summary = jnp.sum(h * live, axis=1) / jnp.maximum(jnp.sum(live, axis=1), 1.0)
        head_dim = dim // self.num_heads
        dense = lambda name: nn.Dense(  # noqa: E731
            dim, kernel_init=self.kernel_init, param_dtype=self.param_dtype, dtype=dtype, name=name
        )
        q = dense("query")(summary).reshape(batch, self.num_heads, head_dim)
        k = dense("key")(h[:, num_protected:]).reshape(batch, -1, self.num_heads, head_dim)
        logits = jnp.einsum("bhd,bjhd->bhj", q, k) / jnp.sqrt(jnp.asarray(head_dim, dtype))
        probs = jnp.mean(jax.nn.sigmoid(logits), axis=1)
        return probs * alive[:, num_protected:].astype(dtype)


def _check_probs(owner: str, probs: Array, alive: Array) -> None:
    if probs.ndim != 2 or tuple(alive.shape) != tuple(probs.shape):
        raise ValueError(
            f"{owner}: probs and alive must both be [B, n] (the patch tokens), got probs "
            f"{tuple(probs.shape)} and alive {tuple(alive.shape)}."
        )


def threshold_decisions(probs: Array, alive: Array) -> Array:
    """Inference: ``probs [B, n], alive [B, n]`` -> keep [B, n] (bool), ``p > 0.5`` among
    the live patch tokens (a dropped token stays dropped)."""
    _check_probs("threshold_decisions", probs, alive)
    return alive & (jax.lax.stop_gradient(probs) > KEEP_THRESHOLD)


def sample_decisions(key: Array, probs: Array, alive: Array) -> Array:
    """Policy training: ``probs [B, n], alive [B, n]`` -> keep [B, n] (bool), each live
    patch token kept with probability ``p`` (independent Bernoulli draws)."""
    _check_probs("sample_decisions", probs, alive)
    draws = jax.random.bernoulli(key, jax.lax.stop_gradient(probs).astype(jnp.float32))
    return alive & draws


def decision_log_prob(probs: Array, decisions: Array, alive: Array) -> Array:
    """``log pi(u)`` per image: ``sum_j [u_j log p_j + (1 - u_j) log(1 - p_j)]`` over the
    patch tokens live before the decision (a token dropped earlier makes no decision).
    ``probs, decisions, alive [B, n]`` -> ``[B]``, differentiable in ``probs``; the
    probabilities are clipped to ``[eps, 1 - eps]`` of their dtype so a saturated
    sigmoid gives a finite log."""
    _check_probs("decision_log_prob", probs, alive)
    if tuple(decisions.shape) != tuple(probs.shape):
        raise ValueError(
            f"decision_log_prob: decisions must have shape {tuple(probs.shape)} (probs'), "
            f"got {tuple(decisions.shape)}."
        )
    eps = jnp.finfo(probs.dtype).eps
    p = jnp.clip(probs, eps, 1.0 - eps)
    u = decisions.astype(probs.dtype)
    terms = u * jnp.log(p) + (1.0 - u) * jnp.log1p(-p)
    return jnp.sum(jnp.where(alive, terms, 0.0), axis=-1)


def top_k_keep(probs: Array, k: int, *, num_protected: int = 0) -> Array:
    """Top-k mode: ``probs [B, n]`` (the patch tokens, after ``num_protected`` leading
    ones) -> ``keep [B, num_protected + k]`` (int32, ascending): indices into the full
    sequence of the protected tokens and of the ``k`` most probable patch tokens
    (equal scores: the lower index). Apply with
    :func:`effformer.reducers.zero_tprune.gather_tokens`."""
    if probs.ndim != 2:
        raise ValueError(f"top_k_keep: probs must be [B, n], got shape {tuple(probs.shape)}.")
    _check_int("top_k_keep", "k", k, 1)
    if k > probs.shape[1]:
        raise ValueError(f"top_k_keep: k must be <= the {probs.shape[1]} patch tokens, got k={k}.")
    _check_int("top_k_keep", "num_protected", num_protected, 0)
    protected = jnp.ones((probs.shape[0], num_protected), probs.dtype)
    scores = jnp.concatenate([protected, probs], axis=1)
    return importance_stage(scores, probs.shape[1] - k, num_protected=num_protected)


def policy_reward(correct: Array, kept_fraction: Array, error_penalty: float) -> Array:
    """The reward per image: ``1 - c^2`` if correct, ``-error_penalty`` if wrong.
    ``correct [B]`` (bool), ``kept_fraction c [B]`` -> ``[B]`` (no gradient)."""
    if isinstance(error_penalty, bool) or not isinstance(error_penalty, int | float):
        raise ValueError(f"policy_reward: error_penalty must be a number, got {error_penalty!r}.")
    if error_penalty < 0:
        raise ValueError(
            f"policy_reward: error_penalty (tau, a wrong prediction's reward is -tau) must be "
            f">= 0, got {error_penalty}."
        )
    if correct.shape != kept_fraction.shape or correct.ndim != 1:
        raise ValueError(
            f"policy_reward: correct and kept_fraction must both be [B], got "
            f"{tuple(correct.shape)} and {tuple(kept_fraction.shape)}."
        )
    c = jax.lax.stop_gradient(kept_fraction)
    return jnp.where(correct, 1.0 - jnp.square(c), -jnp.asarray(error_penalty, c.dtype))


def leave_one_out_baseline(rewards: Array, weights: Array) -> Array:
    """``b_i``: the weighted mean reward of the other images of the batch, ``[B] -> [B]``;
    0 where there is no other image with weight. Weights are 1 for real examples and 0
    for padding, which then neither has nor gives a baseline."""
    if rewards.ndim != 1 or weights.shape != rewards.shape:
        raise ValueError(
            f"leave_one_out_baseline: rewards and weights must both be [B], got "
            f"{tuple(rewards.shape)} and {tuple(weights.shape)}."
        )
    rewards = jax.lax.stop_gradient(rewards)
    weights = weights.astype(rewards.dtype)
    others = jnp.sum(weights) - weights
    total = jnp.sum(weights * rewards) - weights * rewards
    return jnp.where(others > 0, total / jnp.where(others > 0, others, 1.0), 0.0)


def reinforce_loss(log_prob: Array, rewards: Array, baseline: Array, weights: Array) -> Array:
    """REINFORCE's surrogate, a SUM over the batch (the trainer divides by the weight):
    ``-sum_i w_i (R_i - b_i) log pi(u_i | x_i)``. Its gradient is the policy-gradient
    estimate ``-sum_i w_i (R_i - b_i) grad log pi``; rewards and baselines carry no
    gradient. All arguments ``[B]``."""
    for name, array in (("rewards", rewards), ("baseline", baseline), ("weights", weights)):
        if array.shape != log_prob.shape or log_prob.ndim != 1:
            raise ValueError(
                f"reinforce_loss: log_prob and {name} must both be [B], got "
                f"{tuple(log_prob.shape)} and {tuple(array.shape)}."
            )
    advantage = jax.lax.stop_gradient(rewards - baseline).astype(log_prob.dtype)
    return -jnp.sum(weights.astype(log_prob.dtype) * advantage * log_prob)
