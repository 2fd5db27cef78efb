"""A Mamba classifier of sequences of vectors (1-D signals, or images read pixel by pixel).

    tokens = Dense(input_dim -> D)(inputs)          [B, L, C] -> [B, L, D]
    hidden = MambaStack(tokens)                     Add -> RMSNorm -> Mixer blocks, final RMSNorm
    pooled = mean over real tokens (or last real token)
    logits = Dense(D -> num_classes)(pooled)

Inputs come in two forms, matching what the tasks pass to ``create``:

* signals (``sequence_classification``: ``num_classes``, ``seq_len``,
  ``input_dim``): ``inputs [B, L, input_dim]``;
* images (``image_classification``: ``num_classes``, ``image_size``,
  ``num_channels``): ``inputs [B, H, W, num_channels]`` are read in raster
  order (row by row, left to right) as a sequence of H * W pixels, each a
  ``num_channels`` vector: the "pixel-by-pixel" (sequential MNIST) setting.

Pooling: ``"mean"`` (default) averages the final states of the real tokens,
as S4 and Mamba classifiers usually do; ``"last"`` takes the last real token,
the only one that has seen the whole sequence. The blocks are causal, so
padding at the end of a row never changes the real tokens; ``token_mask``
[B, L] (True = real) excludes padded tokens from the pooling and makes the
mixers pass their state through them, so a padded batch (left or right
padding) gives the logits of its sequences run unpadded.

``seq_len`` only sizes ``dummy_inputs``: a Mamba has no position table, so
any length is accepted.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.models.mamba_lm import MambaStack
from effformer.models.registry import register
from effformer.nn.pooling import mean_pool
from effformer.ops.selective_scan import DEFAULT_CHUNK_SIZE

Array = jax.Array
Dtype = Any

POOLINGS = ("mean", "last")


def last_real_token(x: Array, token_mask: Array | None) -> Array:
    """x [B, L, D], token_mask [B, L] (True = real) -> the last real token of each row [B, D].

    A row whose mask is all False gives zeros, as :func:`effformer.nn.mean_pool` does
    (rather than its last padded token).
    """
    if token_mask is None:
        return x[:, -1]
    length = token_mask.shape[1]
    # Index of the last True: L - 1 - (position of the first True in the reversed row).
    last = length - 1 - jnp.argmax(token_mask[:, ::-1], axis=1)
    picked = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    return jnp.where(token_mask.any(axis=1)[:, None], picked, jnp.zeros((), x.dtype))


def step_sequence_dummy(
    batch_size: int, seq_len: int, image_size: int | None, channels: int
) -> dict[str, Array]:
    """Zero inputs of a sequence classifier: images [B, S, S, C] if ``image_size``, else
    signals [B, seq_len, C]."""
    if image_size is not None:
        shape = (batch_size, image_size, image_size, channels)
    else:
        shape = (batch_size, seq_len, channels)
    return {"inputs": jnp.zeros(shape, jnp.float32)}


def as_step_sequence(owner: str, inputs: Array, image_size: int | None, channels: int) -> Array:
    """Check a sequence classifier's ``inputs`` and return them as steps [B, L, channels]:
    signals [B, L, channels] as they are, images [B, S, S, channels] (``image_size`` S)
    read pixel by pixel in raster order."""
    if image_size is not None:
        expected = (image_size, image_size, channels)
        if inputs.ndim != 4 or tuple(inputs.shape[1:]) != expected:
            raise ValueError(
                f"{owner}: inputs must be images [B, {', '.join(map(str, expected))}] "
                f"(image_size={image_size}), got {tuple(inputs.shape)}."
            )
        return inputs.reshape(inputs.shape[0], -1, channels)
    if inputs.ndim != 3 or inputs.shape[-1] != channels:
        raise ValueError(
            f"{owner}: inputs must be signals [B, L, input_dim={channels}], got "
            f"{tuple(inputs.shape)}."
        )
    return inputs


class MambaClassifier(nn.Module):
    """Mamba sequence classifier: signals [B, L, C] or images [B, H, W, C] -> logits [B, classes].

    Attributes:
      num_classes: output classes.
      seq_len, input_dim: length (for ``dummy_inputs`` only) and channels of signals.
      image_size, num_channels: set for images, read as image_size**2 pixel steps.
      embed_dim, num_layers: width D and depth of the Mamba stack.
      d_state, d_conv, expand, dt_rank, norm_epsilon, implementation, chunk_size:
        see :class:`~effformer.models.mamba_lm.MambaStack`.
      pooling: ``"mean"`` over real tokens or ``"last"`` real token.
      dropout_rate: on each mixer output and on the pooled features (``dropout`` RNG).
      dtype: compute dtype (None: that of the inputs' embedding, float32).
    """

    num_classes: int = 10
    seq_len: int = 40
    input_dim: int = 1
    image_size: int | None = None
    num_channels: int | None = None
    embed_dim: int = 64
    num_layers: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    norm_epsilon: float = 1e-5
    pooling: str = "mean"
    dropout_rate: float = 0.0
    implementation: str | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    dtype: Dtype | None = None

    @property
    def channels(self) -> int:
        """Features per time step."""
        if self.image_size is not None and self.num_channels is not None:
            return self.num_channels
        return self.input_dim

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        return step_sequence_dummy(batch_size, self.seq_len, self.image_size, self.channels)

    def _as_sequence(self, inputs: Array) -> Array:
        """Check ``inputs`` and return them as [B, L, channels]."""
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"MambaClassifier: pooling must be one of {POOLINGS}, got {self.pooling!r}."
            )
        return as_step_sequence("MambaClassifier", inputs, self.image_size, self.channels)

    @nn.compact
    def __call__(
        self, inputs: Array, *, token_mask: Array | None = None, train: bool = False
    ) -> Array:
        """inputs [B, L, C] or [B, H, W, C], token_mask [B, L] bool -> logits [B, num_classes]."""
        sequence = self._as_sequence(inputs)
        batch, length, _ = sequence.shape
        if token_mask is not None and tuple(token_mask.shape) != (batch, length):
            raise ValueError(
                f"MambaClassifier: token_mask must have shape [B, L] = {(batch, length)}, got "
                f"{tuple(token_mask.shape)}."
            )
        if token_mask is not None:
            token_mask = token_mask.astype(bool)
        tokens = nn.Dense(self.embed_dim, dtype=self.dtype, name="embedding")(sequence)
        hidden = MambaStack(
            num_layers=self.num_layers, embed_dim=self.embed_dim, d_state=self.d_state,
            d_conv=self.d_conv, expand=self.expand, dt_rank=self.dt_rank,
            norm_epsilon=self.norm_epsilon, dropout_rate=self.dropout_rate,
            implementation=self.implementation, chunk_size=self.chunk_size, name="backbone",
        )(tokens, token_mask=token_mask, deterministic=not train)  # fmt: skip
        if self.pooling == "mean":
            pooled = mean_pool(hidden, token_mask)
        else:
            pooled = last_real_token(hidden, token_mask)
        pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=not train)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(pooled)


@register("mamba_classifier", tiny=dict(embed_dim=16, num_layers=1, d_state=4))
def mamba_classifier(**overrides: Any) -> MambaClassifier:
    """Mamba sequence classifier (defaults: 2 x 64, mean pooling) for signals or pixel sequences."""
    return MambaClassifier(**overrides)
