"""Stochastic depth (DropPath): drop a whole residual branch per example."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class DropPath(nn.Module):
    """Zero the branch for a random subset of examples; scale the rest by ``1 / (1 - rate)``.

    The scaling keeps the expectation of the output equal to the input, so no
    rescaling is needed at evaluation time (when ``deterministic=True`` this is
    the identity).

    Attributes:
      rate: probability of dropping an example's branch, in [0, 1).
      rng_collection: the rng stream used (``"dropout"``, like ``nn.Dropout``).
    """

    rate: float = 0.0
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(
        self, x: Array, *, deterministic: bool = True, rate: float | Array | None = None
    ) -> Array:
        """x: [B, ...] -> [B, ...]. ``rate`` overrides the attribute (a schedule)."""
        rate = self.rate if rate is None else rate
        if isinstance(rate, int | float):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"DropPath: rate must be in [0, 1), got {rate}.")
            if rate == 0.0:
                return x
        if deterministic:
            return x
        keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = jax.random.bernoulli(self.make_rng(self.rng_collection), keep_prob, shape)
        return jnp.where(keep, x / keep_prob.astype(x.dtype), jnp.zeros((), x.dtype))
