"""The Transformer baseline of the Mamba experiments, registered as ``signal_transformer``.

The same classifier skeleton as ``mamba_classifier`` (a Dense embedding of
each time step, a stack, mean pooling over time, a Dense head) with a
bidirectional pre-norm Transformer encoder (softmax attention with RoPE and a
GELU MLP, effformer's ``LayerStack``) in place of the Mamba blocks, so the
comparison differs only in the token mixing. Images are read pixel by pixel
in raster order, as the Mamba classifier reads them.

The same skeleton also builds the LMU arm: ``layer_pattern="lmu"`` with
``causal=True`` and no position encoding gives LMUFormer-style blocks (the LMU
mixer, then the MLP channel mixer, each with a pre-norm residual).

It lives here, not in ``effformer/models``, because it exists only for this
comparison; importing this file registers it (the configs do).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.models import list_models, register
from effformer.models.lm_layers import LayerStack
from effformer.nn.pooling import mean_pool

Array = jax.Array


class SignalTransformer(nn.Module):
    """Signals [B, L, C] or images [B, H, W, C] -> logits [B, num_classes]."""

    num_classes: int = 10
    seq_len: int = 40
    input_dim: int = 1
    image_size: int | None = None
    num_channels: int | None = None
    embed_dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    dropout_rate: float = 0.0
    layer_pattern: str = "global"  # "lmu": LMU mixers instead of attention
    causal: bool = False
    position_encoding: str = "rope"
    mixer_kwargs: Any = None  # {mixer name: kwargs} for non-attention mixers

    @property
    def channels(self) -> int:
        return self.num_channels if self.image_size is not None else self.input_dim

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        if self.image_size is not None:
            return {
                "inputs": jnp.zeros((batch_size, self.image_size, self.image_size, self.channels))
            }
        return {"inputs": jnp.zeros((batch_size, self.seq_len, self.channels))}

    @nn.compact
    def __call__(self, inputs: Array, *, train: bool = False) -> Array:
        sequence = inputs.reshape(inputs.shape[0], -1, self.channels)  # raster order for images
        batch, length, _ = sequence.shape
        hidden = LayerStack(
            num_layers=self.num_layers, causal=self.causal, num_heads=self.num_heads,
            ffn="gelu", ffn_hidden_dim=self.mlp_ratio * self.embed_dim,
            layer_pattern=self.layer_pattern, mixer_kwargs=self.mixer_kwargs,
            position_encoding=self.position_encoding, dropout_rate=self.dropout_rate,
            name="encoder",
        )(
            nn.Dense(self.embed_dim, name="embedding")(sequence),
            positions=jnp.broadcast_to(jnp.arange(length), (batch, length)),
            deterministic=not train,
        )  # fmt: skip
        return nn.Dense(self.num_classes, name="head")(mean_pool(hidden))


def signal_transformer(**overrides: Any) -> SignalTransformer:
    """Transformer encoder classifier of signals / pixel sequences (Mamba baseline)."""
    return SignalTransformer(**overrides)


if "signal_transformer" not in list_models():
    register("signal_transformer", tiny=dict(embed_dim=16, num_layers=1, num_heads=2))(
        signal_transformer
    )
