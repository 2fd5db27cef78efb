"""Turns one TFDS record into one model example: decode, resize, augment, normalise.

Per example, in order: scale the stored input to [0, 1] (images) or read it
as float (signals) -> resize (images, where asked) -> when training: random
crop with zero padding, horizontal flip, RandAugment -> normalise with the
dataset's mean/std -> when training: random erasing.

Randomness: the augmentation of the example at position p of the training
stream (p counts examples over all epochs and all hosts) draws from
``numpy.random.default_rng([seed, p])``, so it depends only on the pipeline
seed and the position: the same on every machine, in every worker, and after
a restore.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from effformer.data import augment, randaugment
from effformer.data.registry import DatasetSpec

# Eval-style resize for images of varying size: the shorter side to
# image_size / CENTER_CROP_FRACTION, then a centred image_size square (the
# ImageNet convention, e.g. 256 -> 224).
CENTER_CROP_FRACTION = 0.875


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic, antialiased resize of a float [H, W, C] image (PIL, per channel)."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    channels = [
        np.asarray(Image.fromarray(image[:, :, c], mode="F").resize((width, height), Image.BICUBIC))
        for c in range(image.shape[2])
    ]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)


def resize_and_center_crop(image: np.ndarray, image_size: int) -> np.ndarray:
    """Shorter side to image_size / 0.875, then the centred image_size x image_size crop."""
    height, width, _ = image.shape
    short_side = max(image_size, int(round(image_size / CENTER_CROP_FRACTION)))
    scale = short_side / min(height, width)
    new_height = max(image_size, int(round(height * scale)))
    new_width = max(image_size, int(round(width * scale)))
    image = _resize(image, new_height, new_width)
    top = (new_height - image_size) // 2
    left = (new_width - image_size) // 2
    return image[top : top + image_size, left : left + image_size]


class ExampleTransform:
    """Callable ``(position, record) -> example``; picklable, for grain workers.

    The example is ``{"inputs": float32 input_shape, "label": int32, "mask": True}``.
    """

    def __init__(self, spec: DatasetSpec, config: dict[str, Any], *, train: bool, seed: int):
        self.spec = spec
        self.config = config
        self.train = train
        self.seed = seed
        self.mean = np.asarray(spec.mean, np.float32)
        self.std = np.asarray(spec.std, np.float32)

    def decode(self, record: dict[str, Any]) -> np.ndarray:
        """The record's input as float32 [H, W, C] in [0, 1], or [L, C] for signals."""
        value = np.asarray(record[self.spec.input_key])
        if self.spec.task != "image_classification":
            return value.astype(np.float32).reshape(self.spec.native_shape)
        image = value.astype(np.float32) / self.spec.max_value
        if image.ndim == 2:
            image = image[:, :, None]
        size = self.config["image_size"]
        if size is None:
            return image
        if self.spec.native_shape is None:
            return resize_and_center_crop(image, size)
        return _resize(image, size, size)

    def __call__(self, position: int, record: dict[str, Any]) -> dict[str, np.ndarray]:
        inputs = self.decode(record)
        rng = np.random.default_rng([self.seed, position]) if self.train else None
        config = self.config
        if rng is not None:
            if config["crop_padding"]:
                inputs = augment.random_crop_with_padding(inputs, config["crop_padding"], rng)
            if config["flip"]:
                inputs = augment.random_horizontal_flip(inputs, rng)
            if config["randaugment_num_layers"] and config["randaugment_magnitude"]:
                inputs = randaugment.rand_augment(
                    inputs, config["randaugment_num_layers"], config["randaugment_magnitude"], rng
                )
        inputs = (inputs - self.mean) / self.std
        if rng is not None and config["random_erasing"]:
            inputs = augment.random_erasing(inputs, config["random_erasing"], rng)
        return {
            "inputs": np.ascontiguousarray(inputs, dtype=np.float32),
            "label": np.int32(record[self.spec.label_key]),
            "mask": np.bool_(True),
        }


class EvalExample:
    """Callable ``index -> example`` over a split padded to a whole number of batches.

    Indices at or beyond the split's size give a padding example: zeros, label 0,
    mask False.
    """

    def __init__(self, source: Any, transform: ExampleTransform, input_shape: tuple[int, ...]):
        self.source = source
        self.transform = transform
        self.input_shape = input_shape
        self.num_examples = len(source)

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        if index < self.num_examples:
            return self.transform(index, self.source[index])
        return {
            "inputs": np.zeros(self.input_shape, np.float32),
            "label": np.int32(0),
            "mask": np.bool_(False),
        }
