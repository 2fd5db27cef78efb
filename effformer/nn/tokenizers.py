"""Tokenizers: images ``[B, H, W, C]`` to tokens ``[B, N, D]`` and their grid shape."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# PyTorch's kaiming_normal_ default (fan_in, gain sqrt(2), untruncated normal).
kaiming_normal_relu = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default ``Conv2d`` / ``Linear`` bias init: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    # bool is an int to Python; True as a width is a config slip, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}.")


class PatchEmbed(nn.Module):
    """Non-overlapping patches, each linearly projected to ``embed_dim``.

    Any patch size that divides the image works, down to 1x1 (one token per
    pixel). ``use_conv`` picks a strided convolution instead of a Dense over
    flattened patches; both use the same ``kernel [ph, pw, C, D]`` and give the
    same result (the conv is usually faster for large patches on accelerators).

    Attributes:
      patch_size: int or (ph, pw).
      embed_dim: token width D.
    """

    patch_size: int | tuple[int, int]
    embed_dim: int
    use_bias: bool = True
    use_conv: bool = False
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> tuple[Array, tuple[int, int]]:
        """images: [B, H, W, C] -> (tokens [B, (H/ph)*(W/pw), D], grid (H/ph, W/pw))."""
        if images.ndim != 4:
            raise ValueError(f"PatchEmbed: images must be [B, H, W, C], got shape {images.shape}.")
        patch = self.patch_size
        sides = tuple(patch) if isinstance(patch, tuple | list) else (patch, patch)
        if len(sides) != 2 or any(
            not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in sides
        ):
            raise ValueError(
                f"PatchEmbed: patch_size must be a positive int or a pair of them, got {patch!r}."
            )
        _check_positive_int("PatchEmbed", "embed_dim", self.embed_dim)
        ph, pw = sides
        batch, height, width, channels = images.shape
        if height % ph or width % pw:
            raise ValueError(
                f"PatchEmbed: patch_size {(ph, pw)} must divide the image size; got image "
                f"(H, W) = {(height, width)}."
            )
        grid = (height // ph, width // pw)
        kernel = self.param(
            "kernel", self.kernel_init, (ph, pw, channels, self.embed_dim), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.embed_dim,), self.param_dtype)
            if self.use_bias
            else None
        )
        images, kernel, bias = nn.dtypes.promote_dtype(images, kernel, bias, dtype=self.dtype)
        if self.use_conv:
            tokens = jax.lax.conv_general_dilated(
                images,
                kernel,
                window_strides=(ph, pw),
                padding="VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        else:
            patches = images.reshape(batch, grid[0], ph, grid[1], pw, channels)
            patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, *grid, ph * pw * channels)
            tokens = patches @ kernel.reshape(ph * pw * channels, self.embed_dim)
        if bias is not None:
            tokens = tokens + bias
        return tokens.reshape(batch, grid[0] * grid[1], self.embed_dim), grid


class ConvTokenizer(nn.Module):
    """CCT's convolutional tokenizer (SHI-Labs/Compact-Transformers ``Tokenizer``).

    ``num_conv_layers`` blocks of Conv(k, stride max(1, k//2 - 1), padding
    max(1, k//2), no bias) -> ReLU -> MaxPool(3, stride 2, padding 1);
    channels C -> ``in_planes`` (intermediate blocks) -> ``embed_dim``.
    Kaiming-normal (fan_in, relu) conv init. Max pooling pads with -inf as
    PyTorch's MaxPool2d does. 32x32 with 3x1 gives 256 tokens, 3x2 gives 64,
    224x224 with 7x2 gives 196.
    """

    embed_dim: int
    kernel_size: int = 3
    num_conv_layers: int = 1
    in_planes: int = 64
    max_pool: bool = True
    kernel_init: Initializer = kaiming_normal_relu
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> tuple[Array, tuple[int, int]]:
        """images: [B, H, W, C] -> (tokens [B, h*w, embed_dim], grid (h, w))."""
        if images.ndim != 4:
            raise ValueError(
                f"ConvTokenizer: images must be [B, H, W, C], got shape {images.shape}."
            )
        if self.num_conv_layers < 1:
            raise ValueError(
                f"ConvTokenizer: num_conv_layers must be >= 1, got {self.num_conv_layers}."
            )
        _check_positive_int("ConvTokenizer", "embed_dim", self.embed_dim)
        _check_positive_int("ConvTokenizer", "kernel_size", self.kernel_size)
        if self.num_conv_layers > 1:  # the widths between the conv blocks
            _check_positive_int("ConvTokenizer", "in_planes", self.in_planes)
        k = self.kernel_size
        stride, padding = max(1, k // 2 - 1), max(1, k // 2)
        widths = [self.in_planes] * (self.num_conv_layers - 1) + [self.embed_dim]
        x = images
        for i, width in enumerate(widths):
            x = nn.Conv(
                width,
                (k, k),
                strides=(stride, stride),
                padding=((padding, padding),) * 2,
                use_bias=False,
                kernel_init=self.kernel_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv_{i}",
            )(x)
            x = jax.nn.relu(x)
            if self.max_pool:
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        batch, h, w, d = x.shape
        return x.reshape(batch, h * w, d), (h, w)
