"""scikit-learn's digits as pixel sequences for density modelling (dataset ``digits_pixels``).

Each 8x8 image of :mod:`effformer.data.embedded.digits` (same split: 1,437
train / 360 test) becomes one causal-LM row of 64 tokens in raster order
(row by row, left to right). A pixel's value 0..16 is its token id; token 17 is
``BOS``, which starts every row so that the first pixel is predicted too:

* ``inputs`` int32 [64]: ``BOS, p_0, ..., p_62``;
* ``targets`` int32 [64]: ``p_0, ..., p_63`` (the next pixel);
* ``weights`` float32 [64]: all ones (every pixel is scored);
* ``label`` int32 []: the digit (for inspection; the LM task does not read it).

The model's vocabulary is 18 (17 pixel values and ``BOS``); ``BOS`` is never a
target. With ``config.task.name = "causal_lm"`` the trainer's eval ``loss`` is
the mean negative log-likelihood per pixel in nats, so ``loss / ln 2`` is the
test set's bits per dimension. Token 0 is a pixel value here, not padding;
rows are never padded (packing, if enabled, keeps each row whole because every
weight is 1).

The data come from ``sklearn.datasets.load_digits`` (bundled, no network), read
once per process and kept in memory (115 KB); nothing is written to data_dir.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from effformer.data.registry import DatasetInfo, DatasetSpec, register_dataset
from effformer.data.tasks.base import AddMask, PaddedEvalExample

NAME = "digits_pixels"
PIXEL_LEVELS = 17  # Pixel values 0..16.
BOS = PIXEL_LEVELS
VOCAB_SIZE = PIXEL_LEVELS + 1
IMAGE_SIZE = 8
SEQUENCE_LENGTH = IMAGE_SIZE * IMAGE_SIZE
SPLITS = ("train", "test")


class DigitsPixels:
    """The ``digits_pixels`` dataset (records as in the module docstring)."""

    name = NAME

    @functools.cached_property
    def _split_arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """split -> (pixels uint8 [N, 64] in raster order, labels int32 [N])."""
        from sklearn.datasets import load_digits

        from effformer.data.embedded.digits import digits_split_indices

        digits = load_digits()
        pixels = digits.images.reshape(len(digits.images), SEQUENCE_LENGTH)
        if pixels.min() < 0 or pixels.max() >= PIXEL_LEVELS or np.any(pixels != np.round(pixels)):
            raise ValueError(
                f"{NAME}: load_digits pixels must be integers in [0, {PIXEL_LEVELS - 1}], got "
                f"range [{pixels.min()}, {pixels.max()}]."
            )
        return {
            split: (pixels[rows].astype(np.uint8), digits.target[rows].astype(np.int32))
            for split, rows in digits_split_indices().items()
        }

    @functools.cached_property
    def info(self) -> DatasetInfo:
        return DatasetInfo(
            name=NAME,
            task="causal_lm",
            num_classes=VOCAB_SIZE,
            input_shape=(SEQUENCE_LENGTH,),
            splits={split: len(self._split_arrays[split][0]) for split in SPLITS},
            train_split="train",
            eval_split="test",
            vocab_size=VOCAB_SIZE,
        )

    def example(self, split: str, index: int) -> dict[str, np.ndarray]:
        """The record of image ``index`` of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"{NAME}: split must be one of {SPLITS}, got {split!r}.")
        pixels, labels = self._split_arrays[split]
        if not 0 <= index < len(pixels):
            raise IndexError(
                f"{NAME}: index {index} out of range for split {split!r} ({len(pixels)} examples)."
            )
        return self._record(pixels[index], labels[index])

    @staticmethod
    def _record(pixels: np.ndarray, label: np.integer | int) -> dict[str, np.ndarray]:
        targets = pixels.astype(np.int32)
        return {
            "inputs": np.concatenate([[BOS], targets[:-1]]).astype(np.int32),
            "targets": targets,
            "weights": np.ones(SEQUENCE_LENGTH, np.float32),
            "label": np.int32(label),
        }

    def empty_example(self) -> dict[str, np.ndarray]:
        """A record of zeros (weights 0) with the records' shapes, for padding eval batches."""
        template = self._record(np.zeros(SEQUENCE_LENGTH, np.uint8), 0)
        return {key: np.zeros_like(value) for key, value in template.items()}

    # ----------------------------------------------------- the registry's interface
    def as_data_source(self, split: str) -> DigitsPixelsSource:
        if split not in SPLITS:
            raise ValueError(f"{NAME}: split must be one of {SPLITS}, got {split!r}.")
        return DigitsPixelsSource(self, split)

    def example_transform(self) -> AddMask:
        return AddMask()

    def eval_example(self, source: DigitsPixelsSource) -> PaddedEvalExample:
        return PaddedEvalExample(source, self.empty_example())


@dataclasses.dataclass(frozen=True)
class DigitsPixelsSource:
    """grain random-access source over one split (picklable for grain workers)."""

    dataset: DigitsPixels
    split: str

    def __len__(self) -> int:
        return self.dataset.info.splits[self.split]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.dataset.example(self.split, int(index))


DATASET = DigitsPixels()
register_dataset(
    DatasetSpec(
        name=NAME,
        tfds_name=NAME,
        task="causal_lm",
        num_classes=VOCAB_SIZE,
        input_key="inputs",
        label_key="targets",
        native_shape=(SEQUENCE_LENGTH,),
        channels=1,
        max_value=None,
        mean=(0.0,),
        std=(1.0,),
        train_split="train",
        eval_split="test",
        generated=DATASET,
    )
)
