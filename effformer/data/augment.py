"""Per-example image augmentation on the host, in numpy.

Images are float32 [H, W, C]. Crop and flip act on pixels scaled to [0, 1]
(before normalisation, so zero padding is black, as in torchvision's
``RandomCrop(padding=p)``); random erasing acts on normalised images, as in
timm. Every function draws only from the ``numpy.random.Generator`` it is
given, so an example's augmentation is fixed by its generator's seed.
"""

from __future__ import annotations

import math

import numpy as np


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3:
        raise ValueError(f"image: expected shape [H, W, C], got {image.shape}.")


def random_crop_with_padding(
    image: np.ndarray, padding: int, rng: np.random.Generator
) -> np.ndarray:
    """Zero-pads ``padding`` pixels on every side, then crops back to [H, W, C] at random."""
    _check_image(image)
    if isinstance(padding, bool) or not isinstance(padding, int | np.integer) or padding < 0:
        raise ValueError(f"padding: expected an int >= 0, got {padding!r}.")
    if padding == 0:
        return image
    height, width, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top, left = rng.integers(0, 2 * padding + 1, size=2)
    return padded[top : top + height, left : left + width]


def random_horizontal_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirrors left-right with probability 1/2."""
    _check_image(image)
    return image[:, ::-1] if rng.random() < 0.5 else image


def random_erasing(
    image: np.ndarray,
    probability: float,
    rng: np.random.Generator,
    *,
    area_range: tuple[float, float] = (0.02, 1 / 3),
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 10,
) -> np.ndarray:
    """Random erasing (Zhong et al., 2020) as timm's ``RandomErasing(mode="pixel")``.

    With ``probability``, one rectangle of area fraction in ``area_range`` and
    aspect ratio (height / width, log-uniform) in ``aspect_range`` is replaced by
    standard-normal noise (the image is normalised, so noise matches its
    statistics). Up to ``max_attempts`` draws are made for a rectangle that fits;
    if none fits, the image is unchanged.
    """
    _check_image(image)
    if not 0 <= probability <= 1:
        raise ValueError(f"probability: expected a value in [0, 1], got {probability}.")
    # Checked before the coin flip, so a bad range fails on the first call, not by chance.
    for name, (low, high), top in (
        ("area_range", area_range, 1.0),
        ("aspect_range", aspect_range, math.inf),
    ):
        if not 0 < low <= high <= top:
            raise ValueError(
                f"{name}: expected (low, high) with 0 < low <= high <= {top}, got {(low, high)}."
            )
    if rng.random() >= probability:
        return image
    height, width, channels = image.shape
    log_aspect = (math.log(aspect_range[0]), math.log(aspect_range[1]))
    for _ in range(max_attempts):
        area = rng.uniform(*area_range) * height * width
        aspect = math.exp(rng.uniform(*log_aspect))
        box_height = int(round(math.sqrt(area * aspect)))
        box_width = int(round(math.sqrt(area / aspect)))
        if 0 < box_height < height and 0 < box_width < width:
            top = int(rng.integers(0, height - box_height + 1))
            left = int(rng.integers(0, width - box_width + 1))
            erased = image.copy()
            noise = rng.standard_normal((box_height, box_width, channels))
            erased[top : top + box_height, left : left + box_width] = noise.astype(image.dtype)
            return erased
    return image
