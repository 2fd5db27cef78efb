"""TinyViT (Wu et al. 2022): MBConv stages, then windowed attention with learned offset biases.

Written from the paper and the official code (microsoft/Cream,
``TinyViT/models/tiny_vit.py``). Images are NHWC throughout:

* stem: two 3x3 stride-2 convolutions (widths ``D0 / 2`` then ``D0``) with a
  GELU between them: ``image_size / 4`` tokens a side;
* stage 1: MBConv blocks ``GELU(x + drop_path(proj(GELU(dw3x3(GELU(expand(x)))))))``
  (1x1 expansion by ``mbconv_expand_ratio``, 3x3 depthwise, 1x1 projection);
* stages 2..S: TinyViT blocks: ``x + drop_path(window_attention(x))``, then a
  3x3 depthwise "local" convolution (no residual, no activation), then
  ``x + drop_path(MLP(LayerNorm(x)))``;
* between stages, patch merging: 1x1 conv, GELU, 3x3 stride-2 depthwise
  conv, GELU, 1x1 conv (halves the grid, changes the width);
* head: mean over positions, LayerNorm, linear.

Window attention (:class:`WindowAttention`) normalises its input with a
LayerNorm, projects to per-head q/k/v (key dim = value dim = ``D / heads``,
the original's ``attn_ratio=1``) and adds a learned bias per head indexed by
the *absolute* offset ``(|dy|, |dx|)`` between two positions of a window
(``window_size**2`` values per head, initialised to zero: the original's
``attention_biases``, in its order, index ``|dy| * window_size + |dx|``). The
bias is shared by every window. A grid that is not a multiple of the window is
zero-padded at the bottom and right before the attention's LayerNorm, and as
in the original the padded positions are ordinary keys (not masked); their
outputs are cropped. The attention itself is
:func:`effformer.ops.attention.dot_product_attention` with that ``bias``.

Every convolution in the original is followed by BatchNorm (``Conv2d_BN``).
``conv_norm="batch_norm"`` is that: running statistics in the ``batch_stats``
collection (PyTorch's momentum 0.1, epsilon 1e-5), which the trainer updates in
the train step over the whole batch and evaluation uses. The default,
``conv_norm="layer_norm"``, is what this library had before its trainer could
carry ``batch_stats``, kept so earlier runs restore: a LayerNorm over the
channels at each position (epsilon 1e-5) with a learned per-channel scale and
offset, the same 2 parameters per channel as BatchNorm's affine (parameter
counts are the original's either way) but statistics per example and position
and no running averages. The original's zero initialisation of the scale after
MBConv's projection (``bn_weight_init=0``) is kept with both, so each MBConv
block starts as ``GELU(x)``. Other initialisations follow the original: linear layers
truncated normal (std 0.02) with zero biases, convolutions PyTorch's default
(uniform, bound ``1 / sqrt(fan_in)``), attention biases zero.

Image sizes: the original's grid arithmetic (``image_size // 4`` tokens, halved
per stage) matches what its convolutions compute only when ``image_size`` is
a multiple of ``4 * 2**(S - 1)`` (32 for four stages: 224 -> 56, 28, 14, 7),
so that is required here.

TinyViT's pretraining distillation (the teacher's top-K probabilities stored
on disk and replayed with the augmentation) is a training method, not part of
the model: ``effformer save-teacher-logits``, ``effformer/data/teacher_store.py``,
``config.data.teacher_store`` and the ``distillation`` task; experiment in
``experiments/tinyvit``.

Named variants at 224x224x3, 1000 classes (the original's ``tiny_vit_*_224``
configurations; parameter counts equal the original's
``sum(p.numel() for p in model.parameters())``, derived independently in
tests/models/test_tinyvit.py):
``tinyvit_5m`` 5,392,764, ``tinyvit_11m`` 10,996,972, ``tinyvit_21m`` 21,198,568
(published: 5.4M, 11M, 21M).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effformer.initializers import trunc_normal
from effformer.models.registry import register
from effformer.nn.droppath import DropPath
from effformer.nn.ffn import MLP
from effformer.nn.norms import LayerNorm
from effformer.ops.attention import dot_product_attention

Array = jax.Array
Dtype = Any

truncated_normal_002 = trunc_normal(0.02)
# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), +).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _gelu(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)  # PyTorch's nn.GELU (exact erf)


def attention_bias_index(window_size: int) -> np.ndarray:
    """``[N, N]`` int32, N = window_size**2: the bias index of each (query, key) pair.

    Positions are numbered row-major in the window; the index of a pair is
    ``|dy| * window_size + |dx|``, the order in which the original enumerates
    the distinct offsets.
    """
    if not isinstance(window_size, int) or window_size < 1:
        raise ValueError(
            f"attention_bias_index: window_size must be a positive int, got {window_size!r}."
        )
    rows, cols = np.divmod(np.arange(window_size * window_size), window_size)
    dy = np.abs(rows[:, None] - rows[None, :])
    dx = np.abs(cols[:, None] - cols[None, :])
    return (dy * window_size + dx).astype(np.int32)


def window_partition(x: Array, window_size: int) -> Array:
    """[B, H, W, C] with H, W multiples of ``window_size`` -> [B * nH * nW, window_size**2, C].

    Windows are ordered row-major over the grid of windows, positions row-major in each.
    """
    batch, height, width, channels = x.shape
    if height % window_size or width % window_size:
        raise ValueError(
            f"window_partition: height and width must be multiples of window_size={window_size}, "
            f"got x.shape={x.shape}."
        )
    rows, cols = height // window_size, width // window_size
    x = x.reshape(batch, rows, window_size, cols, window_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch * rows * cols, window_size * window_size, channels)


def window_merge(windows: Array, window_size: int, height: int, width: int) -> Array:
    """Inverse of :func:`window_partition`: [B * nH * nW, window_size**2, C] -> [B, H, W, C]."""
    rows, cols = height // window_size, width // window_size
    channels = windows.shape[-1]
    x = windows.reshape(-1, rows, cols, window_size, window_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, channels)


CONV_NORMS = ("layer_norm", "batch_norm")


class ConvNorm(nn.Module):
    """Convolution without bias, then a norm with a per-channel affine: the original's
    ``Conv2d_BN`` (``norm="batch_norm"``) or a per-position channel LayerNorm (module
    docstring).

    Attributes:
      features, kernel_size, stride, groups: the convolution; padding is
        ``kernel_size // 2`` on every side (PyTorch-style explicit padding).
      scale_init: initial value of the norm's scale (the original's ``bn_weight_init``).
      norm: one of :data:`CONV_NORMS`.
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1
    scale_init: float = 1.0
    epsilon: float = 1e-5
    norm: str = "layer_norm"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        """x: [B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), features] (odd kernels).

        ``deterministic``: with BatchNorm, use the running statistics (evaluation) instead
        of the batch's (training, which updates them).
        """
        pad = self.kernel_size // 2
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=self.stride,
            padding=((pad, pad), (pad, pad)),
            feature_group_count=self.groups,
            use_bias=False,
            kernel_init=torch_conv_init,
            dtype=self.dtype,
            name="conv",
        )(x)
        if self.norm == "batch_norm":
            y = nn.BatchNorm(
                use_running_average=deterministic,
                momentum=0.9,  # PyTorch's momentum 0.1
                epsilon=self.epsilon,
                use_scale=False,
                use_bias=False,
                dtype=jnp.float32,
                name="batch_norm",
            )(x)
        else:
            # The library's LayerNorm normalises (in float32); the affine is this module's
            # own so that its scale can start at zero.
            y = LayerNorm(self.epsilon, use_scale=False, use_bias=False, dtype=jnp.float32)(x)
        scale = self.param(
            "scale", nn.initializers.constant(self.scale_init), (self.features,), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return (y * scale + bias).astype(self.dtype or x.dtype)


class MBConv(nn.Module):
    """``GELU(x + drop_path(ConvNorm1x1(GELU(ConvNorm_dw3x3(GELU(ConvNorm1x1(x)))))))``."""

    expand_ratio: float = 4.0
    conv_norm: str = "layer_norm"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(
        self, x: Array, *, deterministic: bool = True, drop_path_rate: float | Array = 0.0
    ) -> Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        channels = x.shape[-1]
        hidden = int(channels * self.expand_ratio)
        conv = functools.partial(ConvNorm, norm=self.conv_norm, dtype=self.dtype)
        y = _gelu(conv(hidden, name="expand")(x, deterministic=deterministic))
        y = conv(hidden, 3, groups=hidden, name="depthwise")(y, deterministic=deterministic)
        y = conv(channels, scale_init=0.0, name="project")(_gelu(y), deterministic=deterministic)
        y = DropPath()(y, deterministic=deterministic, rate=drop_path_rate)
        return _gelu(x + y)


class PatchMerging(nn.Module):
    """1x1 ConvNorm, GELU, 3x3 stride-2 depthwise ConvNorm, GELU, 1x1 ConvNorm."""

    features: int
    conv_norm: str = "layer_norm"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        """x: [B, H, W, C] -> [B, ceil(H / 2), ceil(W / 2), features]."""
        conv = functools.partial(ConvNorm, self.features, norm=self.conv_norm, dtype=self.dtype)
        x = _gelu(conv(name="conv1")(x, deterministic=deterministic))
        x = conv(3, stride=2, groups=self.features, name="conv2")(x, deterministic=deterministic)
        return conv(name="conv3")(_gelu(x), deterministic=deterministic)


class WindowAttention(nn.Module):
    """Multi-head attention inside non-overlapping windows, with learned offset biases.

    ``LayerNorm -> q, k, v -> softmax(q k^T / sqrt(d) + B[h, |dy|, |dx|]) v -> linear``
    in each window of ``window_size x window_size`` positions; the grid is
    zero-padded (bottom, right) to a multiple of the window first and cropped
    after. Parameters: ``norm``, ``qkv`` (heads-major: each head's q, k, v
    together, as the original lays them out), ``proj`` and
    ``attention_biases [num_heads, window_size**2]``.

    Attributes:
      num_heads: heads; must divide the width.
      window_size: side of the square windows.
      implementation: passed to ``dot_product_attention``.
    """

    num_heads: int
    window_size: int
    norm_epsilon: float = 1e-5
    implementation: str | None = None
    dtype: Dtype | None = None

    def bias_table(self, attention_biases: Array) -> Array:
        """[heads, window_size**2] learned biases -> the dense [heads, N, N] table, N = window_size**2."""
        return attention_biases[:, attention_bias_index(self.window_size)]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        if x.ndim != 4:
            raise ValueError(f"WindowAttention: x must be [B, H, W, C], got shape {x.shape}.")
        batch, height, width, channels = x.shape
        if channels % self.num_heads:
            raise ValueError(
                f"WindowAttention: num_heads={self.num_heads} must divide the width, "
                f"got x.shape[-1]={channels}."
            )
        if not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(
                f"WindowAttention: window_size must be a positive int, got {self.window_size!r}."
            )
        size = self.window_size
        pad_h, pad_w = (-height) % size, (-width) % size
        if pad_h or pad_w:
            x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        windows = window_partition(x, size)  # [B * nW, N, C]
        windows = LayerNorm(self.norm_epsilon, dtype=self.dtype, name="norm")(windows)
        head_dim = channels // self.num_heads
        qkv = nn.Dense(
            3 * channels, kernel_init=truncated_normal_002, dtype=self.dtype, name="qkv"
        )(windows)
        qkv = qkv.reshape(*windows.shape[:2], self.num_heads, 3, head_dim)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        attention_biases = self.param(
            "attention_biases", nn.initializers.zeros, (self.num_heads, size * size), jnp.float32
        )
        # One [1, heads, N, N] table, broadcast over every window of every image.
        bias = self.bias_table(attention_biases)[None]
        out = dot_product_attention(q, k, v, bias=bias, implementation=self.implementation)
        out = out.reshape(*windows.shape[:2], channels)
        out = nn.Dense(channels, kernel_init=truncated_normal_002, dtype=self.dtype, name="proj")(
            out
        )
        out = window_merge(out, size, height + pad_h, width + pad_w)
        return out[:, :height, :width]


class TinyViTBlock(nn.Module):
    """Window attention, 3x3 depthwise local conv, MLP; residuals on attention and MLP."""

    num_heads: int
    window_size: int
    mlp_ratio: float = 4.0
    local_conv_size: int = 3
    dropout_rate: float = 0.0
    norm_epsilon: float = 1e-5
    conv_norm: str = "layer_norm"
    attention_implementation: str | None = None
    dtype: Dtype | None = None

    @nn.compact
    def __call__(
        self, x: Array, *, deterministic: bool = True, drop_path_rate: float | Array = 0.0
    ) -> Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        channels = x.shape[-1]
        y = WindowAttention(
            self.num_heads,
            self.window_size,
            norm_epsilon=self.norm_epsilon,
            implementation=self.attention_implementation,
            dtype=self.dtype,
            name="attention",
        )(x)
        x = x + DropPath(name="drop_path_attention")(
            y, deterministic=deterministic, rate=drop_path_rate
        )
        x = ConvNorm(
            channels,
            self.local_conv_size,
            groups=channels,
            norm=self.conv_norm,
            dtype=self.dtype,
            name="local_conv",
        )(x, deterministic=deterministic)
        y = LayerNorm(self.norm_epsilon, dtype=self.dtype, name="mlp_norm")(x)
        y = MLP(
            int(channels * self.mlp_ratio),
            activation="gelu",
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            name="mlp",
        )(y, deterministic=deterministic)
        return x + DropPath(name="drop_path_mlp")(
            y, deterministic=deterministic, rate=drop_path_rate
        )


class TinyViT(nn.Module):
    """Image classifier: ``inputs [B, image_size, image_size, num_channels] -> logits [B, num_classes]``.

    Attributes:
      num_classes, image_size, num_channels: what the data decides.
      embed_dims, depths: width and number of blocks of each stage; stage 1 is
        MBConv, the others TinyViT blocks.
      num_heads, window_sizes: per stage, as in the original's configs (their
        first entry belongs to the convolutional stage 1 and is unused).
      mlp_ratio: MLP width over the stage width.
      mbconv_expand_ratio: MBConv expansion.
      local_conv_size: kernel of the depthwise conv between attention and MLP.
      dropout_rate: dropout inside the MLPs (the original's ``drop_rate``).
      drop_path_rate: stochastic depth of the last block; block k of all
        ``sum(depths)`` (MBConv blocks included) drops with ``rate * k / (n - 1)``.
      norm_epsilon: every LayerNorm's epsilon (PyTorch's 1e-5).
      conv_norm: the norm after every convolution, one of :data:`CONV_NORMS`:
        ``"batch_norm"`` as the original (a ``batch_stats`` collection), or
        ``"layer_norm"`` per position (the default; module docstring).
      attention_implementation: passed to ``dot_product_attention``.
    """

    num_classes: int = 1000
    image_size: int = 224
    num_channels: int = 3
    embed_dims: tuple[int, ...] = (96, 192, 384, 576)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 18)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.1
    norm_epsilon: float = 1e-5
    conv_norm: str = "layer_norm"
    attention_implementation: str | None = None
    dtype: Dtype | None = None

    def __post_init__(self) -> None:
        # Lists (from a config file or config.json) become tuples: modules must hash.
        for field in ("embed_dims", "depths", "num_heads", "window_sizes"):
            value = getattr(self, field)
            if isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
        super().__post_init__()

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stage_grids(self) -> tuple[int, ...]:
        """Side of the token grid in each stage: ``image_size / 4``, halved per stage."""
        return tuple(self.image_size // 4 // 2**i for i in range(self.num_stages))

    def check_config(self) -> None:
        """Raise ValueError naming the field for any configuration that cannot be built."""
        name = type(self).__name__
        for field in ("num_classes", "image_size", "num_channels"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {field} must be a positive int, got {value!r}.")
        if self.conv_norm not in CONV_NORMS:
            raise ValueError(
                f"{name}: conv_norm must be one of {CONV_NORMS}, got {self.conv_norm!r}."
            )
        stages = self.num_stages
        if stages < 1:
            raise ValueError(f"{name}: depths must have at least one stage, got {self.depths!r}.")
        for field in ("embed_dims", "num_heads", "window_sizes"):
            value = getattr(self, field)
            if len(value) != stages:
                raise ValueError(
                    f"{name}: {field} must have one entry per stage ({stages}, from depths="
                    f"{self.depths}), got {value!r}."
                )
        for field in ("embed_dims", "depths"):
            values = getattr(self, field)
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
                raise ValueError(
                    f"{name}: {field} must be positive ints, got {getattr(self, field)!r}."
                )
        if self.embed_dims[0] % 2:
            raise ValueError(
                f"{name}: embed_dims[0] must be even (the stem's first conv has half its width), "
                f"got {self.embed_dims[0]}."
            )
        for i in range(1, stages):
            heads, window = self.num_heads[i], self.window_sizes[i]
            # bool is an int to Python; True as a head count is a config slip, not 1.
            is_int = isinstance(heads, int) and not isinstance(heads, bool)
            if not is_int or heads < 1 or self.embed_dims[i] % heads:
                raise ValueError(
                    f"{name}: num_heads[{i}] must be a positive divisor of embed_dims[{i}]="
                    f"{self.embed_dims[i]}, got {heads!r}."
                )
            if not isinstance(window, int) or window < 1:
                raise ValueError(
                    f"{name}: window_sizes[{i}] must be a positive int, got {window!r}."
                )
        # Each ratio must give a hidden layer at least 1 wide in every stage that uses it.
        ratios = (("mbconv_expand_ratio", self.embed_dims[:1]), ("mlp_ratio", self.embed_dims[1:]))
        for field, widths in ratios:
            ratio = getattr(self, field)
            number = isinstance(ratio, int | float) and not isinstance(ratio, bool)
            # "not > 0" also refuses NaN.
            if (
                not number
                or not 0 < ratio < float("inf")
                or any(int(w * ratio) < 1 for w in widths)
            ):
                raise ValueError(
                    f"{name}: {field} must be a positive number giving hidden layers at least 1 "
                    f"wide (int(width * {field}) >= 1 for the widths {tuple(widths)}), "
                    f"got {ratio!r}."
                )
        size = self.local_conv_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1 or size % 2 == 0:
            # Padding size // 2 keeps the grid only for an odd kernel (an even one grows it).
            raise ValueError(f"{name}: local_conv_size must be a positive odd int, got {size!r}.")
        for field in ("dropout_rate", "drop_path_rate"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:  # NaN-safe
                raise ValueError(f"{name}: {field} must be in [0, 1), got {value!r}.")
        multiple = 4 * 2 ** (stages - 1)
        if self.image_size % multiple:
            raise ValueError(
                f"{name}: image_size must be a multiple of 4 * 2**(stages - 1) = {multiple} "
                f"({stages} stages: a stride-4 stem, then the grid halves {stages - 1} times), "
                f"got image_size={self.image_size}."
            )

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        shape = (batch_size, self.image_size, self.image_size, self.num_channels)
        return {"inputs": jnp.zeros(shape, jnp.float32)}

    def _check_inputs(self, inputs: Array) -> None:
        expected = (self.image_size, self.image_size, self.num_channels)
        if inputs.ndim != 4 or tuple(inputs.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__}: inputs must be [B, {expected[0]}, {expected[1]}, "
                f"{expected[2]}] (image_size={self.image_size}, num_channels="
                f"{self.num_channels}), got shape {tuple(inputs.shape)}. Build the model for "
                "that size (create(..., image_size=...))."
            )

    @nn.compact
    def __call__(
        self, inputs: Array, *, train: bool = False, drop_path_rate: float | Array | None = None
    ) -> Array:
        """inputs [B, H, W, C] -> logits [B, num_classes].

        ``drop_path_rate`` (a trainer schedule) replaces the attribute as the
        last block's stochastic-depth rate.
        """
        self.check_config()
        self._check_inputs(inputs)
        deterministic = not train
        width = self.embed_dims[0]
        conv = functools.partial(ConvNorm, norm=self.conv_norm, dtype=self.dtype)
        x = conv(width // 2, 3, stride=2, name="stem_conv1")(inputs, deterministic=deterministic)
        x = conv(width, 3, stride=2, name="stem_conv2")(_gelu(x), deterministic=deterministic)

        max_rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        total = sum(self.depths)
        block_index = 0
        for stage, depth in enumerate(self.depths):
            for j in range(depth):
                # torch.linspace(0, rate, total) over all blocks; a Python 0.0 skips DropPath.
                fraction = block_index / (total - 1) if total > 1 else 0.0
                rate = max_rate * fraction
                name = f"stage_{stage}_block_{j}"
                if stage == 0:
                    block = MBConv(
                        self.mbconv_expand_ratio,
                        conv_norm=self.conv_norm,
                        dtype=self.dtype,
                        name=name,
                    )
                else:
                    block = TinyViTBlock(
                        self.num_heads[stage],
                        self.window_sizes[stage],
                        mlp_ratio=self.mlp_ratio,
                        local_conv_size=self.local_conv_size,
                        dropout_rate=self.dropout_rate,
                        norm_epsilon=self.norm_epsilon,
                        conv_norm=self.conv_norm,
                        attention_implementation=self.attention_implementation,
                        dtype=self.dtype,
                        name=name,
                    )
                x = block(x, deterministic=deterministic, drop_path_rate=rate)
                block_index += 1
            if stage + 1 < self.num_stages:
                x = PatchMerging(
                    self.embed_dims[stage + 1],
                    conv_norm=self.conv_norm,
                    dtype=self.dtype,
                    name=f"stage_{stage}_merge",
                )(x, deterministic=deterministic)

        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
        pooled = LayerNorm(self.norm_epsilon, dtype=self.dtype, name="head_norm")(pooled)
        return nn.Dense(
            self.num_classes, kernel_init=truncated_normal_002, dtype=self.dtype, name="head"
        )(pooled)


# ---------------------------------------------------------------------------- variants

# Test-sized: two stages at 8x8 (the digits' size): stem -> 2x2 -> merge -> 1x1, padded to
# the 2x2 window. Few distinct parameter shapes, so that an unjitted init compiles little.
_TINY = dict(
    image_size=8,
    embed_dims=(8, 8),
    depths=(1, 1),
    num_heads=(1, 2),
    window_sizes=(1, 2),
    mlp_ratio=1.0,
    mbconv_expand_ratio=1.0,
)


def _tinyvit(overrides: dict[str, Any], **config: Any) -> TinyViT:
    common = dict(image_size=224, num_classes=1000, depths=(2, 2, 6, 2), window_sizes=(7, 7, 14, 7))
    return TinyViT(**{**common, **config, **overrides})


@register("tinyvit_5m", tiny=_TINY)
def tinyvit_5m(**overrides: Any) -> TinyViT:
    """TinyViT-5M at 224x224x3, 1000 classes: 5,392,764 parameters (published 5.4M)."""
    return _tinyvit(
        overrides, embed_dims=(64, 128, 160, 320), num_heads=(2, 4, 5, 10), drop_path_rate=0.0
    )


@register("tinyvit_11m", tiny=_TINY)
def tinyvit_11m(**overrides: Any) -> TinyViT:
    """TinyViT-11M at 224x224x3, 1000 classes: 10,996,972 parameters (published 11M)."""
    return _tinyvit(
        overrides, embed_dims=(64, 128, 256, 448), num_heads=(2, 4, 8, 14), drop_path_rate=0.1
    )


@register("tinyvit_21m", tiny=_TINY)
def tinyvit_21m(**overrides: Any) -> TinyViT:
    """TinyViT-21M at 224x224x3, 1000 classes: 21,198,568 parameters (published 21M)."""
    return _tinyvit(
        overrides, embed_dims=(96, 192, 384, 576), num_heads=(3, 6, 12, 18), drop_path_rate=0.2
    )
