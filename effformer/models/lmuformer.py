"""LMUFormer (Liu et al. 2024): the non-spiking and spiking models of its code, as classifiers.

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

**The spiking model** (``spiking=True``; registered as ``spiking_lmuformer``) is the
official ``slmu_rnn_ms_conv1d``, the default of its ``gsc.yml`` and the paper's
spiking LMUFormer (1.69M parameters on Speech Commands). Its LIF neurons
(:func:`effformer.ops.lif.multi_step_lif`: spikingjelly's ``MultiStepLIFNode``,
tau 2, hard reset to 0, threshold 1, detach_reset, sigmoid surrogate with alpha 4)
run along the sequence axis, each after a BatchNorm, and every convolution or
linear layer reads spikes; the residual stream stays real-valued (the "membrane
shortcut", ``Ms``, of the official names):

    patch embedding (``Conv1d4EBMs``):
        x = Conv_0(x); x = Conv_1(LIF(BN(x))); x = Conv_2(LIF(BN(x))); x = Conv_3(LIF(BN(x)))
        x = x + Conv_pos(LIF(BN(x)))                   kernel-3 convs, no bias
    each block:
        x = x + SLMU(x)                                ``SLMUMs`` with ``SpikingLMUFFTCell``:
            s = LIF_{V_th = 0.5}(BN(x))
            u = LIF(BN(W_u s))                         one memory channel, spikes
            m = LIF(BN(legendre_memory(u)))            order 2D in the original
            h = LIF(BN(W_h [m; s]))
            out = BN(W_o h)                            1x1 conv
        x = x + W_2 LIF(BN(W_1 LIF(BN(x))))            ``ConvFFNMs``, 1x1 convs with bias
    logits = mean_L W_head LIF(BN(x))                  per-position logits of spikes, averaged

Each LIF sows its spike count and its number of neuron-steps into ``intermediates``
(``spikes``) when that collection is mutable; :func:`spike_rates` turns them into the
fraction of neuron-steps that fire, per LIF layer and over all of them (the rate
that spiking models' energy estimates scale with).

What these models are not:

* **Not streaming as written.** The patch embedding's five kernel-3 convolutions
  are centred (padding 1), so the token at position t sees inputs up to t + 5.
  The LMU blocks, the 1x1 convolutions and the LIF neurons are causal. The
  step-by-step path, :mod:`effformer.models.lmuformer_stream`, pays the look-ahead
  as the paper's sequential mode does, as a delay: it carries the convolutions'
  input buffers, the LMU memory states and the LIF membranes, takes one input step
  at a time and, after step n, predicts from the tokens 0 .. n - 5: the running
  mean of their per-position logits (``per_position=True`` here), which is the
  original's ``all_seq`` evaluation at token n - 5 (that one runs this parallel
  forward over the whole sequence and counts tokens, not inputs read). Flushed with
  the convolutions' right padding, it gives this forward's logits on the inputs
  seen. Inference only (BatchNorm with its running statistics).
* Inputs are fixed-length: BatchNorm's statistics would count padding, so there
  is no token mask.
* Not the original's numerics: it trains under fp16 autocast with spikingjelly's CuPy
  kernel; here membranes are float32 at least. As there, they start at 0 for every
  sequence (the original calls ``reset_net`` after each batch).

Initialisation as the original's: its ``ConvLMU._init_weights`` gives every ``nn.Linear``
(the LMU cells' ``W_u`` and ``W_h``, the head) truncated N(0, 0.02) weights and zero biases;
the convolutions (patch embedding, the LMU's 1x1 output projection, the ConvFFN's 1x1
layers) keep PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.

Inputs come as in :class:`~effformer.models.mamba_classifier.MambaClassifier`:
signals ``[B, L, input_dim]`` (``sequence_classification``) or images
``[B, H, W, num_channels]`` read pixel by pixel in raster order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effformer.mixers.lmu import LMUMixer, linear_init
from effformer.mixers.mamba import symmetric_uniform, torch_default_init
from effformer.models.mamba_classifier import as_step_sequence, step_sequence_dummy
from effformer.models.registry import register
from effformer.ops.legendre_memory import legendre_memory
from effformer.ops.lif import multi_step_lif

Array = jax.Array
Dtype = Any


def _conv3(features: int, dtype: Dtype | None, name: str) -> nn.Conv:
    """The patch embedding's kernel-3 ``Conv1d`` (padding 1, no bias), PyTorch's default init."""
    return nn.Conv(
        features,
        (3,),
        padding=((1, 1),),
        use_bias=False,
        kernel_init=torch_default_init,
        dtype=dtype,
        name=name,
    )


def _conv1x1(features: int, fan_in: int, dtype: Dtype | None, name: str) -> nn.Dense:
    """A 1x1 ``Conv1d`` of the original (with bias), as a Dense with PyTorch's default init."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=torch_default_init,
        bias_init=symmetric_uniform(fan_in**-0.5),
        name=name,
    )


def _batch_norm(deterministic: bool, name: str) -> nn.BatchNorm:
    # PyTorch's BatchNorm1d: momentum 0.1 (flax counts the other way), epsilon 1e-5.
    # dtype None: the input's promoted with the float32 parameters (bfloat16 inputs are
    # normalised in float32), and flax reduces the statistics in float32 at least.
    return nn.BatchNorm(use_running_average=deterministic, momentum=0.9, epsilon=1e-5, name=name)


class LIF(nn.Module):
    """LMUFormer's ``MultiStepLIFNode(tau=2.0, detach_reset=True)`` along the sequence axis.

    [B, L, C] -> spikes [B, L, C] in x's dtype (:func:`effformer.ops.lif.multi_step_lif`,
    membrane from 0 for every sequence, hard reset to 0). Sows ``spikes``: [spike count,
    neuron-steps] (float32) into ``intermediates`` when that collection is mutable.
    """

    v_threshold: float = 1.0
    tau: float = 2.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim != 3:
            raise ValueError(f"LIF: x must have shape [B, L, C], got {tuple(x.shape)}.")
        spikes = multi_step_lif(
            x, time_axis=1, tau=self.tau, v_threshold=self.v_threshold, v_reset=0.0
        )
        count = jnp.sum(spikes, dtype=jnp.float32)
        self.sow("intermediates", "spikes", jnp.stack([count, jnp.float32(spikes.size)]))
        return spikes


def _norm_and_fire(
    x: Array, deterministic: bool, norm: str, lif: str, v_threshold: float = 1.0
) -> Array:
    """LIF(BN(x)), every LIF of the spiking model: spikes in x's dtype."""
    return LIF(v_threshold=v_threshold, name=lif)(
        _batch_norm(deterministic, norm)(x).astype(x.dtype)
    )


def spike_counts(intermediates: Mapping[str, Any]) -> dict[str, Array]:
    """Per LIF layer, [spike count, neuron-steps] from a spiking LMUFormer's ``intermediates``.

    ``intermediates``: the collection of ``model.apply(..., mutable=["intermediates"])``.
    Keys are the layers' paths ("tokenizer/lif_0", "block_0_lmu/memory_lif", ...). Works on
    traced arrays (inside jit); sum the counts of several batches before :func:`spike_rates`.
    """
    counts: dict[str, Array] = {}

    def walk(tree: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, value in tree.items():
            if key == "spikes":
                counts["/".join(path)] = sum(value[1:], value[0])  # sown once per call
            elif isinstance(value, Mapping):
                walk(value, (*path, key))

    walk(intermediates, ())
    if not counts:
        raise ValueError(
            "spike_counts: intermediates hold no LIF spike counts; apply a spiking LMUFormer "
            "with mutable=['intermediates']."
        )
    return counts


def spike_rates(counts: Mapping[str, Any]) -> dict[str, float]:
    """Fraction of neuron-steps that fired, per LIF layer and over all of them (``"all"``).

    ``counts``: :func:`spike_counts` (or their sums over batches).
    """
    totals = {name: np.asarray(value, np.float64) for name, value in counts.items()}
    rates = {name: float(total[0] / total[1]) for name, total in totals.items()}
    spikes = sum(total[0] for total in totals.values())
    rates["all"] = float(spikes / sum(total[1] for total in totals.values()))
    return rates


class ConvTokenizer(nn.Module):
    """LMUFormer's ``Tokenizer``: [B, L, C] -> [B, L, D] (centred kernel-3 convs, no biases)."""

    embed_dim: int
    num_conv_layers: int = 4
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        for i in range(self.num_conv_layers):
            x = _conv3(self.embed_dim, self.dtype, f"conv_{i}")(x)
            x = _batch_norm(deterministic, f"norm_{i}")(nn.relu(x)).astype(x.dtype)
        position = _conv3(self.embed_dim, self.dtype, "position_conv")(x)
        return x + position


class ConvFFN(nn.Module):
    """LMUFormer's ``ConvFFN`` (non-spiking): ``ReLU(BN(W_2 GELU(BN(W_1 x))))``."""

    hidden_dim: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        width = x.shape[-1]
        y = _conv1x1(self.hidden_dim, width, self.dtype, "fc1")(x)
        y = _batch_norm(deterministic, "norm1")(y).astype(x.dtype)
        # PyTorch's GELU is the exact one.
        y = _conv1x1(width, self.hidden_dim, self.dtype, "fc2")(nn.gelu(y, approximate=False))
        return nn.relu(_batch_norm(deterministic, "norm2")(y)).astype(x.dtype)


class SpikingConvTokenizer(nn.Module):
    """The spiking patch embedding ``Conv1d4EBMs``: [B, L, C] -> [B, L, D] (real-valued).

    ``conv_0``, then ``conv_i(LIF(BN(x)))`` for the others, then ``x + position_conv(LIF(BN(x)))``;
    centred kernel-3 convolutions without biases, as the non-spiking one.
    """

    embed_dim: int
    num_conv_layers: int = 4
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        def conv(name: str) -> nn.Conv:
            return _conv3(self.embed_dim, self.dtype, name)

        x = conv("conv_0")(x)
        for i in range(1, self.num_conv_layers):
            x = conv(f"conv_{i}")(_norm_and_fire(x, deterministic, f"norm_{i - 1}", f"lif_{i - 1}"))
        last = self.num_conv_layers - 1
        spikes = _norm_and_fire(x, deterministic, f"norm_{last}", f"lif_{last}")
        return x + conv("position_conv")(spikes)


class SpikingLMU(nn.Module):
    """The spiking LMU block ``SLMUMs`` (with ``SpikingLMUFFTCell``): [B, L, D] -> [B, L, D].

    ``s = LIF_0.5(BN(x))``, ``u = LIF(BN(W_u s))`` (one memory channel), ``m =
    LIF(BN(legendre_memory(u)))`` (``order`` coefficients, FFT), ``h = LIF(BN(W_h [m; s]))``,
    out ``BN(W_o h)``. Causal along L (BatchNorm acts per position).
    """

    d_model: int
    order: int
    theta: float
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        def dense(features: int, name: str) -> nn.Dense:  # the cell's nn.Linear layers
            return nn.Dense(features, dtype=self.dtype, kernel_init=linear_init, name=name)

        s = _norm_and_fire(x, deterministic, "input_norm", "input_lif", v_threshold=0.5)
        u = _norm_and_fire(
            dense(1, "memory_input")(s), deterministic, "memory_input_norm", "memory_input_lif"
        )
        memory = legendre_memory(u, order=self.order, theta=self.theta)  # [B, L, 1, order]
        memory = memory.reshape(*memory.shape[:2], self.order)
        m = _norm_and_fire(memory, deterministic, "memory_norm", "memory_lif").astype(s.dtype)
        hidden = dense(self.d_model, "hidden")(jnp.concatenate([m, s], axis=-1))
        h = _norm_and_fire(hidden, deterministic, "hidden_norm", "hidden_lif")
        out = _conv1x1(self.d_model, self.d_model, self.dtype, "out_proj")(h)
        return _batch_norm(deterministic, "out_norm")(out).astype(x.dtype)


class SpikingConvFFN(nn.Module):
    """The spiking ``ConvFFNMs``: ``W_2 LIF(BN(W_1 LIF(BN(x))))``, 1x1 convs with biases."""

    hidden_dim: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        width = x.shape[-1]
        y = _conv1x1(self.hidden_dim, width, self.dtype, "fc1")(
            _norm_and_fire(x, deterministic, "norm1", "lif1")
        )
        return _conv1x1(width, self.hidden_dim, self.dtype, "fc2")(
            _norm_and_fire(y, deterministic, "norm2", "lif2")
        )


class LMUFormer(nn.Module):
    """LMUFormer classifier: signals [B, L, C] or images [B, H, W, C] -> logits [B, classes].

    Attributes:
      num_classes: output classes.
      seq_len, input_dim: length (for ``dummy_inputs`` only) and channels of signals.
      image_size, num_channels: set for images, read as image_size**2 pixel steps.
      embed_dim, num_layers: width D and number of LMU blocks.
      mlp_ratio: ConvFFN hidden width over D.
      order: Legendre coefficients of the memory (None: D, or 2D when spiking, as the
        original).
      theta: the memory's window in steps (the original: 128).
      num_conv_layers: convolutions of the patch embedding (the original: 4).
      spiking: the spiking model (module docstring) instead of the non-spiking one.
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
    spiking: bool = False
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
        if self.order is not None and (not isinstance(self.order, int) or self.order < 1):
            # 0 would silently mean the default order (D, or 2D when spiking).
            raise ValueError(
                f"LMUFormer: order must be a positive int or None (the original's), "
                f"got {self.order!r}."
            )
        if not int(self.embed_dim * self.mlp_ratio) >= 1:
            raise ValueError(
                f"LMUFormer: mlp_ratio must give the FFN at least one hidden unit "
                f"(int(embed_dim * mlp_ratio) >= 1), got mlp_ratio={self.mlp_ratio!r}."
            )
        return as_step_sequence("LMUFormer", inputs, self.image_size, self.channels)

    @nn.compact
    def __call__(self, inputs: Array, *, train: bool = False, per_position: bool = False) -> Array:
        """inputs [B, L, C] or [B, H, W, C] -> logits [B, num_classes].

        ``train``: BatchNorm uses (and updates) the batch's statistics; otherwise the
        running ones. ``per_position``: return the head applied to every position's
        features instead, [B, L, num_classes] (the logits are their mean over L; the
        original's ``all_seq`` evaluation averages their first n + 1 for each n).
        """
        x = self._check(inputs)
        deterministic = not train
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.spiking:
            x = SpikingConvTokenizer(
                self.embed_dim, self.num_conv_layers, dtype=self.dtype, name="tokenizer"
            )(x, deterministic=deterministic)
            for i in range(self.num_layers):
                x = x + SpikingLMU(
                    self.embed_dim,
                    self.order or 2 * self.embed_dim,
                    self.theta,
                    dtype=self.dtype,
                    name=f"block_{i}_lmu",
                )(x, deterministic=deterministic)
                x = x + SpikingConvFFN(hidden, dtype=self.dtype, name=f"block_{i}_ffn")(
                    x, deterministic=deterministic
                )
            x = _norm_and_fire(x, deterministic, "head_norm", "head_lif")
        else:
            x = ConvTokenizer(
                self.embed_dim, self.num_conv_layers, dtype=self.dtype, name="tokenizer"
            )(x, deterministic=deterministic)
            for i in range(self.num_layers):
                memory = LMUMixer(
                    d_model=self.embed_dim,
                    order=self.order or self.embed_dim,
                    theta=self.theta,
                    dtype=self.dtype,
                    name=f"block_{i}_lmu",
                )(x)
                x = x + _batch_norm(deterministic, f"block_{i}_lmu_norm")(memory).astype(x.dtype)
                x = x + ConvFFN(hidden, dtype=self.dtype, name=f"block_{i}_ffn")(
                    x, deterministic=deterministic
                )
        head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=linear_init, name="head")
        if per_position:
            return head(x)
        # Per-position logits averaged over L (the original) = the head of the average.
        pooled = jnp.mean(x, axis=1, dtype=jnp.promote_types(x.dtype, jnp.float32))
        pooled = pooled.astype(x.dtype)
        return head(pooled)


@register(
    "lmuformer",
    tiny=dict(embed_dim=16, num_layers=1, order=8, theta=16.0, input_dim=4, seq_len=16),
)
def lmuformer(**overrides: Any) -> LMUFormer:
    """LMUFormer (non-spiking, BatchNorm) with the Speech Commands config of its code:
    128 mel channels x 128 frames, D = 256, one block, MLP ratio 4, 35 classes."""
    return LMUFormer(**overrides)


@register(
    "spiking_lmuformer",
    tiny=dict(embed_dim=16, num_layers=1, order=8, theta=16.0, input_dim=4, seq_len=16),
)
def spiking_lmuformer(**overrides: Any) -> LMUFormer:
    """Spiking LMUFormer (the official ``slmu_rnn_ms_conv1d``) with its Speech Commands config:
    128 mel channels x 128 frames, D = 256, memory order 2D = 512, one block, 35 classes."""
    return LMUFormer(**{"spiking": True, **overrides})
