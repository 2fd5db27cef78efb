"""LMUFormer (Liu et al. 2024): the non-spiking model of its code, with BatchNorm, as a classifier.

The official ``lmu_rnn_conv1d`` (``ConvLMU`` with the ``Tokenizer`` patch embedding,
``LMU`` blocks and ``ConvFFN``), on a sequence ``x [B, L, C]``:

    convolutional patch embedding (the ``Tokenizer``), 4 times:
        x = BN(ReLU(Conv1d_k3(x)))          no conv bias, C -> D, then D -> D
    x = x + Conv1d_k3(x)                    relative position embedding (no bias)
    each of ``num_layers`` blocks:
        x = x + BN(LMU(x))                  LMUMixer: u = ReLU(W_u x), Legendre memory,
                                            h = ReLU(W_h [m; x]), 1x1 conv out
        x = x + ReLU(BN(W_2 GELU(BN(W_1 x))))   ConvFFN, 1x1 convs with bias
    logits = W_head mean_L(x)               the original averages per-position logits:
                                            the same, for a linear head

BatchNorm normalises each channel over the batch and all positions (PyTorch's
BatchNorm1d on [B, D, L]), momentum 0.1 (flax's 0.9), epsilon 1e-5; the running
statistics live in ``batch_stats``, which the trainer updates in the train step
and evaluation uses. There is no LayerNorm anywhere, as in the original.

The memory is :class:`effformer.mixers.lmu.LMUMixer` (LMUFormer's ``LMUFFTCell``:
one memory channel, ``order`` Legendre coefficients, window ``theta``; the original
sets ``order = D`` and ``theta = 128``, its Speech Commands sequence length).

What this model is not:

* **Not streaming as written.** The patch embedding's five kernel-3 convolutions
  are centred (padding 1), so the token at position t sees inputs up to t + 5;
  the paper's sequential mode pays this as a delay of a few steps. The LMU blocks
  and the 1x1 convolutions are causal.
* **Not the spiking model.** The spiking variants (LIF neurons after every BN,
  a spiking LMU cell) are not built.
* Inputs are fixed-length: BatchNorm's statistics would count padding, so there
  is no token mask.

Inputs come as in :class:`~effformer.models.mamba_classifier.MambaClassifier`:
signals ``[B, L, input_dim]`` (``sequence_classification``) or images
``[B, H, W, num_channels]`` read pixel by pixel in raster order.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.mixers.lmu import LMUMixer
from effformer.models.mamba_classifier import as_step_sequence, step_sequence_dummy
from effformer.models.registry import register

Array = jax.Array
Dtype = Any


def _batch_norm(deterministic: bool, name: str) -> nn.BatchNorm:
    # PyTorch's BatchNorm1d: momentum 0.1 (flax counts the other way), epsilon 1e-5.
    # dtype None: the input's promoted with the float32 parameters (bfloat16 inputs are
    # normalised in float32), and flax reduces the statistics in float32 at least.
    return nn.BatchNorm(use_running_average=deterministic, momentum=0.9, epsilon=1e-5, name=name)


class ConvTokenizer(nn.Module):
    """LMUFormer's ``Tokenizer``: [B, L, C] -> [B, L, D] (centred kernel-3 convs, no biases)."""

    embed_dim: int
    num_conv_layers: int = 4
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        for i in range(self.num_conv_layers):
            x = nn.Conv(
                self.embed_dim,
                (3,),
                padding=((1, 1),),
                use_bias=False,
                dtype=self.dtype,
                name=f"conv_{i}",
            )(x)
            x = _batch_norm(deterministic, f"norm_{i}")(nn.relu(x)).astype(x.dtype)
        position = nn.Conv(
            self.embed_dim,
            (3,),
            padding=((1, 1),),
            use_bias=False,
            dtype=self.dtype,
            name="position_conv",
        )(x)
        return x + position


class ConvFFN(nn.Module):
    """LMUFormer's ``ConvFFN`` (non-spiking): ``ReLU(BN(W_2 GELU(BN(W_1 x))))``."""

    hidden_dim: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        width = x.shape[-1]
        y = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x)
        y = _batch_norm(deterministic, "norm1")(y).astype(x.dtype)
        # PyTorch's GELU is the exact one.
        y = nn.Dense(width, dtype=self.dtype, name="fc2")(nn.gelu(y, approximate=False))
        return nn.relu(_batch_norm(deterministic, "norm2")(y)).astype(x.dtype)


class LMUFormer(nn.Module):
    """LMUFormer classifier: signals [B, L, C] or images [B, H, W, C] -> logits [B, classes].

    Attributes:
      num_classes: output classes.
      seq_len, input_dim: length (for ``dummy_inputs`` only) and channels of signals.
      image_size, num_channels: set for images, read as image_size**2 pixel steps.
      embed_dim, num_layers: width D and number of LMU blocks.
      mlp_ratio: ConvFFN hidden width over D.
      order: Legendre coefficients of the memory (None: D, as the original).
      theta: the memory's window in steps (the original: 128).
      num_conv_layers: convolutions of the patch embedding (the original: 4).
      dtype: compute dtype of the convolutions and dense layers.
    """

    num_classes: int = 35
    seq_len: int = 128
    input_dim: int = 128
    image_size: int | None = None
    num_channels: int | None = None
    embed_dim: int = 256
    num_layers: int = 1
    mlp_ratio: float = 4.0
    order: int | None = None
    theta: float = 128.0
    num_conv_layers: int = 4
    dtype: Dtype | None = None

    @property
    def channels(self) -> int:
        """Features per time step."""
        if self.image_size is not None and self.num_channels is not None:
            return self.num_channels
        return self.input_dim

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        return step_sequence_dummy(batch_size, self.seq_len, self.image_size, self.channels)

    def _check(self, inputs: Array) -> Array:
        """Check the configuration and ``inputs``; return them as [B, L, channels]."""
        for field in ("num_classes", "embed_dim", "num_layers", "num_conv_layers"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LMUFormer: {field} must be a positive int, got {value!r}.")
        return as_step_sequence("LMUFormer", inputs, self.image_size, self.channels)

    @nn.compact
    def __call__(self, inputs: Array, *, train: bool = False) -> Array:
        """inputs [B, L, C] or [B, H, W, C] -> logits [B, num_classes].

        ``train``: BatchNorm uses (and updates) the batch's statistics; otherwise the
        running ones.
        """
        x = self._check(inputs)
        deterministic = not train
        x = ConvTokenizer(self.embed_dim, self.num_conv_layers, dtype=self.dtype, name="tokenizer")(
            x, deterministic=deterministic
        )
        for i in range(self.num_layers):
            memory = LMUMixer(
                d_model=self.embed_dim,
                order=self.order or self.embed_dim,
                theta=self.theta,
                dtype=self.dtype,
                name=f"block_{i}_lmu",
            )(x)
            x = x + _batch_norm(deterministic, f"block_{i}_lmu_norm")(memory).astype(x.dtype)
            x = x + ConvFFN(
                int(self.embed_dim * self.mlp_ratio), dtype=self.dtype, name=f"block_{i}_ffn"
            )(x, deterministic=deterministic)
        pooled = jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(pooled)


@register(
    "lmuformer",
    tiny=dict(embed_dim=16, num_layers=1, order=8, theta=16.0, input_dim=4, seq_len=16),
)
def lmuformer(**overrides: Any) -> LMUFormer:
    """LMUFormer (non-spiking, BatchNorm) with the Speech Commands config of its code:
    128 mel channels x 128 frames, D = 256, one block, MLP ratio 4, 35 classes."""
    return LMUFormer(**overrides)
