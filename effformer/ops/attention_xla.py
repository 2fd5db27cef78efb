"""The materialised-scores attention path with a hand-written backward pass.

Forward: ``S = q k^T + bias`` (q pre-scaled), ``P = softmax(S)`` over the visible
keys, ``O = (P * M) v`` with ``M`` the post-softmax multiplier (dropout's
``keep / p_keep`` times iLLaMA's soft-causal weight ``r + (1 - r) tril``;
absent when neither is used).

Backward (FlashAttention-2's formulation, for any ``M``):

    dV  = (P * M)^T dO
    dPM = dO v^T                      gradient w.r.t. the product P * M
    dP  = dPM * M
    D_i = sum_j P_ij dP_ij = dO_i . O_i
    dS  = P * (dP - D)
    dq  = dS k,   dk = dS^T q,   dbias = dS summed to the bias's shape
    dM  = dPM * P                     (reaches the soft-causal ratio)

Autodiff of the forward computes ``D`` as a reduction of ``P * dP`` over the
keys (``L_k`` terms per query); ``dO . O`` reduces over the head dimension
instead, and on XLA:CPU that reduction was the largest single cost of a CCT
training step (experiments/benchmarks/README.md, "Train step").

Shapes: q ``[B, Lq, Hkv, G, Dh]`` (G query heads per kv head), k and v
``[B, Lk, Hkv, Dh]``; scores and everything of their size ``[B, Hkv, G, Lq, Lk]``,
with ``bias``, ``visible`` and ``multiplier`` broadcastable to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def masked_softmax(logits: Array, visible: Array | None) -> Array:
    """Softmax over the visible keys; a row with none visible is all zeros, not NaN."""
    if visible is not None:
        logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnormalised = jnp.exp(logits - row_max)  # exp(-inf) = 0 for hidden keys
    total = unnormalised.sum(axis=-1, keepdims=True)
    return unnormalised / jnp.where(total == 0.0, 1.0, total)


def _probabilities(q, k, bias, visible) -> Array:
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k)
    if bias is not None:
        logits = logits + bias
    return masked_softmax(logits, visible)


def _weighted(probs: Array, multiplier: Array | None) -> Array:
    return probs if multiplier is None else probs * multiplier


@jax.custom_vjp
def materialised_attention(
    q: Array, k: Array, v: Array, bias: Array | None, visible: Array | None,
    multiplier: Array | None,
) -> Array:  # fmt: skip
    """``(softmax(q k^T + bias | visible) * multiplier) v`` -> ``[B, Lq, Hkv, G, Dh]``.

    ``q`` must already carry the logit scale. ``visible`` is boolean (None: all
    keys); ``multiplier`` is not renormalised (None: 1).
    """
    probs = _probabilities(q, k, bias, visible)
    return jnp.einsum("bhgqk,bkhd->bqhgd", _weighted(probs, multiplier), v)


def _forward(q, k, v, bias, visible, multiplier):
    probs = _probabilities(q, k, bias, visible)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", _weighted(probs, multiplier), v)
    return out, (q, k, v, bias, visible, multiplier, probs, out)


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``x`` over the axes that ``shape`` broadcasts (size 1 or missing)."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, size in enumerate(shape) if size == 1 and x.shape[lead + i] != 1
    )
    return x.sum(axis=axes, keepdims=True).reshape(shape) if axes else x.reshape(shape)


def _backward(residuals, d_out):
    q, k, v, bias, visible, multiplier, probs, out = residuals
    d_v = jnp.einsum("bhgqk,bqhgd->bkhd", _weighted(probs, multiplier), d_out)
    d_weighted = jnp.einsum("bqhgd,bkhd->bhgqk", d_out, v)
    d_probs = _weighted(d_weighted, multiplier)
    row_dot = jnp.einsum("bqhgd,bqhgd->bhgq", d_out, out)[..., None]
    d_logits = probs * (d_probs - row_dot)
    d_q = jnp.einsum("bhgqk,bkhd->bqhgd", d_logits, k)
    d_k = jnp.einsum("bhgqk,bqhgd->bkhd", d_logits, q)
    d_bias = None if bias is None else _sum_to_shape(d_logits, bias.shape).astype(bias.dtype)
    d_multiplier = None
    if multiplier is not None:
        d_multiplier = _sum_to_shape(d_weighted * probs, multiplier.shape).astype(multiplier.dtype)
    return d_q, d_k, d_v, d_bias, None, d_multiplier


materialised_attention.defvjp(_forward, _backward)
