"""Pooling: class tokens (first, or last as in iLLaMA), SeqPool (CCT), mean."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.initializers import trunc_normal

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


def _check_token_mask(owner: str, token_mask: Array | None, x: Array) -> None:
    if token_mask is None:
        return
    if tuple(token_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"{owner}: token_mask must have shape {tuple(x.shape[:2])}, "
            f"got {tuple(token_mask.shape)}."
        )
    # A 0/1 int mask crashed SeqPool's softmax, and mean_pool read a float mask as weights.
    if token_mask.dtype != jnp.bool_:
        raise ValueError(
            f"{owner}: token_mask must be boolean (True = real token), got dtype "
            f"{token_mask.dtype}; pass mask.astype(bool) for a 0/1 mask."
        )


class ClassToken(nn.Module):
    """A learned class token, added first (ViT) or last (iLLaMA's post-sequence token).

    ``__call__`` adds the token; ``pool`` reads it back after the encoder.
    A last token in a causal model is the one token that sees every other.

    Attributes:
      placement: ``"first"`` or ``"last"``.
      token_init: initialiser of the ``[1, 1, D]`` token (zeros, as ViT and CCT).
    """

    placement: str = "first"
    token_init: Initializer = nn.initializers.zeros
    param_dtype: Dtype = jnp.float32

    def _check_placement(self) -> None:
        if self.placement not in ("first", "last"):
            raise ValueError(
                f"ClassToken: placement must be 'first' or 'last', got {self.placement!r}."
            )

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, N, D] -> [B, N + 1, D]."""
        self._check_placement()
        token = self.param("token", self.token_init, (1, 1, x.shape[-1]), self.param_dtype)
        token = jnp.broadcast_to(token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        parts = [token, x] if self.placement == "first" else [x, token]
        return jnp.concatenate(parts, axis=1)

    def pool(self, x: Array) -> Array:
        """x: [B, N + 1, D] -> the class token's output [B, D]."""
        self._check_placement()
        return x[:, 0] if self.placement == "first" else x[:, -1]


def mean_pool(x: Array, token_mask: Array | None = None) -> Array:
    """Mean over tokens. x: [B, N, D], token_mask: [B, N] (True = real token) -> [B, D].

    A row whose mask is all False gives zeros.
    """
    _check_token_mask("mean_pool", token_mask, x)
    if token_mask is None:
        return jnp.mean(x, axis=1)
    weights = token_mask.astype(x.dtype)[..., None]
    return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)


class SeqPool(nn.Module):
    """CCT's sequence pooling: ``softmax_N(Linear(D -> 1)(x))^T x`` -> [B, D].

    ``token_mask [B, N]`` (True = real token) removes padding from the softmax.
    """

    kernel_init: Initializer = trunc_normal(0.02)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, token_mask: Array | None = None) -> Array:
        """x: [B, N, D] -> [B, D]."""
        _check_token_mask("SeqPool", token_mask, x)
        logits = nn.Dense(
            1,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attention_pool",
        )(x)[..., 0].astype(jnp.float32)
        if token_mask is not None:
            logits = jnp.where(token_mask, logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1, where=token_mask)
        if token_mask is not None:
            weights = jnp.where(token_mask, weights, 0.0)
        return jnp.einsum("bn,bnd->bd", weights.astype(x.dtype), x)
