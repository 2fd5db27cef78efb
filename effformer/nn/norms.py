"""Normalisation layers, computed in float32 whatever the input dtype.

bfloat16 has 8 bits of mantissa: a mean or a mean of squares over a few
hundred channels computed in it loses most of its digits, so both norms
upcast, normalise, apply their parameters in float32 and cast back.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


class LayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + epsilon) * scale + bias`` over the last axis.

    Attributes:
      epsilon: added to the variance (CCT / PyTorch default 1e-5).
      use_scale, use_bias: learn a per-channel scale / offset.
      dtype: output dtype; ``None`` keeps the input's.
      param_dtype: dtype of scale and bias.
    """

    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., D] -> [..., D]."""
        features = x.shape[-1]
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(variance + self.epsilon)
        if self.use_scale:
            scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
            y = y * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + epsilon) * scale`` over the last axis (no centring).

    Attributes:
      epsilon: added to the mean square (iLLaMA / LLaMA 1e-6).
      use_scale: learn a per-channel scale.
      dtype: output dtype; ``None`` keeps the input's.
      param_dtype: dtype of the scale.
    """

    epsilon: float = 1e-6
    use_scale: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., D] -> [..., D]."""
        features = x.shape[-1]
        x32 = x.astype(jnp.float32)
        mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(mean_square + self.epsilon)
        if self.use_scale:
            scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
            y = y * scale.astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


_NORMS = {"layer_norm": LayerNorm, "rms_norm": RMSNorm}


def make_norm(name: str, /, **kwargs: Any) -> nn.Module:
    """Build a norm by name: ``"layer_norm"`` or ``"rms_norm"``; kwargs go to its class."""
    if name not in _NORMS:
        raise ValueError(f"make_norm: unknown name {name!r}; expected one of {sorted(_NORMS)}.")
    return _NORMS[name](**kwargs)
