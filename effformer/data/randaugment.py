"""RandAugment (Cubuk et al., 2020) in numpy, on float images in [0, 1].

``rand_augment`` applies ``num_layers`` operations drawn uniformly (with
replacement) from ``OPS``, each at the same ``magnitude`` m in [0, 10]. The op
list is the paper's fourteen: Identity, AutoContrast, Equalize, Rotate,
Solarize, Color, Posterize, Contrast, Brightness, Sharpness, ShearX, ShearY,
TranslateX, TranslateY. Each op follows PIL's definition (as used by the
paper's and timm's code), transcribed to floats in [0, 1]; ops defined on
8-bit levels (Equalize, Posterize, Solarize) quantise to 256 levels first.

Magnitude m maps to an op's strength as in timm's "increasing" variants
(posterize excepted, below), so larger m is always stronger: rotate 30 m/10
degrees; shear 0.3 m/10; translate 0.45 m/10 of the side; solarize pixels at
or above the 8-bit level 256 (1 - m/10); posterize to 8 - int(4 m/10) bits;
colour, contrast, brightness and sharpness blend with factor 1 +/- 0.9 m/10.
Signed ops pick the sign at random. Geometric ops sample bilinearly and fill
with grey (0.5).

Differences from the references, deliberately: ops are always applied (the
paper's form; timm applies each with probability 0.5 by default); the
magnitude is the same for every op (timm's ``mstd0.5`` in the recipes' policy
``rand-m9-mstd0.5-inc1`` draws it per op around m with std 0.5); posterize keeps
8 - int(4 m/10) bits, 8 to 4, so that m = 0 is the identity (timm's
``PosterizeIncreasing`` keeps 4 - int(4 m/10), 4 to 0: 1 bit at the recipes'
m = 9 where this keeps 5); and intermediate results are not rounded to 8 bits
between ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

MAX_MAGNITUDE = 10.0
FILL_VALUE = 0.5
_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2 luma, as PIL "L".


def _to_levels(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.int32)


def _grey(image: np.ndarray) -> np.ndarray:
    """[H, W, 1] luma of an RGB image (the image itself if it has one channel)."""
    if image.shape[-1] == 1:
        return image
    return (image @ _GREY_WEIGHTS[: image.shape[-1]])[..., None]


def _blend(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance: degenerate + factor (image - degenerate), clipped."""
    return np.clip(degenerate + factor * (image - degenerate), 0.0, 1.0).astype(np.float32)


def _affine(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Resamples ``image`` so that output pixel (x, y) reads input ``matrix @ (x, y, 1)``.

    Coordinates are of pixel centres (x + 0.5, y + 0.5), as PIL's transform;
    bilinear interpolation, points outside the input read FILL_VALUE.
    """
    height, width, _ = image.shape
    ys, xs = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    source_x = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2] - 0.5
    source_y = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2] - 0.5
    # A one-pixel border of fill lets out-of-range neighbours read the fill value.
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), constant_values=FILL_VALUE)
    source_x = np.clip(source_x + 1, 0, width + 1)
    source_y = np.clip(source_y + 1, 0, height + 1)
    x0 = np.clip(np.floor(source_x).astype(np.int32), 0, width)
    y0 = np.clip(np.floor(source_y).astype(np.int32), 0, height)
    wx = (source_x - x0)[..., None]
    wy = (source_y - y0)[..., None]
    top = padded[y0, x0] * (1 - wx) + padded[y0, x0 + 1] * wx
    bottom = padded[y0 + 1, x0] * (1 - wx) + padded[y0 + 1, x0 + 1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def identity(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    del magnitude, rng
    return image


def auto_contrast(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Per channel, stretches [min, max] to [0, 1] (PIL ImageOps.autocontrast)."""
    del magnitude, rng
    low = image.min(axis=(0, 1), keepdims=True)
    high = image.max(axis=(0, 1), keepdims=True)
    span = high - low
    stretched = (image - low) / np.where(span > 0, span, 1.0)
    return np.where(span > 0, stretched, image).astype(np.float32)


def equalize(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Per-channel histogram equalisation on 8-bit levels (PIL ImageOps.equalize)."""
    del magnitude, rng
    levels = _to_levels(image)
    out = np.empty_like(image)
    for channel in range(image.shape[-1]):
        histogram = np.bincount(levels[..., channel].ravel(), minlength=256)
        last_nonzero = histogram[np.flatnonzero(histogram)[-1]]
        step = (histogram.sum() - last_nonzero) // 255
        if step == 0:
            out[..., channel] = image[..., channel]
            continue
        # lut[i] = (step // 2 + sum(histogram[:i])) // step, as PIL builds it.
        cumulative = np.concatenate([[0], np.cumsum(histogram)[:-1]])
        lut = np.minimum((step // 2 + cumulative) // step, 255)
        out[..., channel] = lut[levels[..., channel]] / 255.0
    return out


def rotate(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Rotates counter-clockwise about the centre by +/- 30 m/10 degrees."""
    angle = math.radians(_signed(30.0 * magnitude / MAX_MAGNITUDE, rng))
    height, width, _ = image.shape
    centre_x, centre_y = width / 2, height / 2
    cos, sin = math.cos(angle), math.sin(angle)
    # Inverse of the counter-clockwise rotation (y points down).
    matrix = np.array(
        [
            [cos, -sin, centre_x - cos * centre_x + sin * centre_y],
            [sin, cos, centre_y - sin * centre_x - cos * centre_y],
        ]
    )
    return _affine(image, matrix)


def solarize(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Inverts pixels at or above 8-bit level 256 (1 - m/10) (PIL ImageOps.solarize)."""
    del rng
    threshold = 256.0 * (1.0 - magnitude / MAX_MAGNITUDE)
    return np.where(_to_levels(image) >= threshold, 1.0 - image, image).astype(np.float32)


def color(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Blends with the grey image (PIL ImageEnhance.Color)."""
    return _blend(_grey(image), image, _enhance_factor(magnitude, rng))


def posterize(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Keeps the top 8 - int(4 m/10) bits of each 8-bit level (PIL ImageOps.posterize)."""
    del rng
    bits = 8 - int(4 * magnitude / MAX_MAGNITUDE)
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return ((_to_levels(image) & mask) / 255.0).astype(np.float32)


def contrast(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Blends with a uniform image at the mean grey level (PIL ImageEnhance.Contrast)."""
    degenerate = np.full_like(image, _grey(image).mean())
    return _blend(degenerate, image, _enhance_factor(magnitude, rng))


def brightness(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Blends with black (PIL ImageEnhance.Brightness)."""
    return _blend(np.zeros_like(image), image, _enhance_factor(magnitude, rng))


def sharpness(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Blends with a smoothed image (PIL ImageEnhance.Sharpness, SMOOTH filter on the interior)."""
    factor = _enhance_factor(magnitude, rng)
    height, width, _ = image.shape
    if height < 3 or width < 3:
        return image
    # PIL's SMOOTH kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13; border pixels are kept.
    smoothed = image.copy()
    total = 4 * image[1:-1, 1:-1]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            total = total + image[1 + dy : height - 1 + dy, 1 + dx : width - 1 + dx]
    smoothed[1:-1, 1:-1] = total / 13.0
    return _blend(smoothed, image, factor)


def shear_x(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Output (x, y) reads input (x + s y, y), s = +/- 0.3 m/10."""
    shear = _signed(0.3 * magnitude / MAX_MAGNITUDE, rng)
    return _affine(image, np.array([[1.0, shear, 0.0], [0.0, 1.0, 0.0]]))


def shear_y(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Output (x, y) reads input (x, y + s x), s = +/- 0.3 m/10."""
    shear = _signed(0.3 * magnitude / MAX_MAGNITUDE, rng)
    return _affine(image, np.array([[1.0, 0.0, 0.0], [shear, 1.0, 0.0]]))


def translate_x(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Shifts by +/- 0.45 m/10 of the width."""
    pixels = _signed(0.45 * magnitude / MAX_MAGNITUDE, rng) * image.shape[1]
    return _affine(image, np.array([[1.0, 0.0, pixels], [0.0, 1.0, 0.0]]))


def translate_y(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Shifts by +/- 0.45 m/10 of the height."""
    pixels = _signed(0.45 * magnitude / MAX_MAGNITUDE, rng) * image.shape[0]
    return _affine(image, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, pixels]]))


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _enhance_factor(magnitude: float, rng: np.random.Generator) -> float:
    return 1.0 + _signed(0.9 * magnitude / MAX_MAGNITUDE, rng)


Op = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
OPS: dict[str, Op] = {
    "Identity": identity,
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Rotate": rotate,
    "Solarize": solarize,
    "Color": color,
    "Posterize": posterize,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
}
_OP_LIST = tuple(OPS.values())


def rand_augment(
    image: np.ndarray, num_layers: int, magnitude: float, rng: np.random.Generator
) -> np.ndarray:
    """Applies ``num_layers`` random ops of ``OPS`` at ``magnitude`` to an image.

    ``image`` is float [H, W, C] in [0, 1]; the result has the same shape.
    """
    if image.ndim != 3:
        raise ValueError(f"image: expected shape [H, W, C], got {image.shape}.")
    if not 0 <= magnitude <= MAX_MAGNITUDE:
        raise ValueError(f"magnitude: expected a value in [0, {MAX_MAGNITUDE}], got {magnitude}.")
    is_int = isinstance(num_layers, int | np.integer) and not isinstance(num_layers, bool)
    if not is_int or num_layers < 0:
        raise ValueError(f"num_layers: expected an int >= 0, got {num_layers!r}.")
    image = image.astype(np.float32, copy=False)
    for op_index in rng.integers(0, len(_OP_LIST), size=num_layers):
        image = _OP_LIST[op_index](image, magnitude, rng)
    return image
