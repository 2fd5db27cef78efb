"""scikit-learn's handwritten digits as a TFDS dataset.

Source: ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no
network): 1,797 grey 8x8 images of the digits 0-9, pixel values 0..16 (counts
of "on" pixels in 4x4 blocks of the original 32x32 bitmaps, UCI "Optical
Recognition of Handwritten Digits").

Split (fixed, balanced): the examples of each class are permuted with
``numpy.random.default_rng(0)``; the first 36 of each class form ``test``
(360 examples, 20.0%), the rest form ``train`` (1,437 examples). Features:
``image`` uint8 [8, 8, 1] with values 0..16, ``label`` 0..9, ``index`` the row
in ``load_digits``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from effformer.data.embedded.base import EmbeddedBuilder

TEST_EXAMPLES_PER_CLASS = 36
SPLIT_SEED = 0


def digits_split_indices() -> dict[str, np.ndarray]:
    """Row indices of ``load_digits`` in each split (sorted)."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        test.append(rows[:TEST_EXAMPLES_PER_CLASS])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {"train": train, "test": test}


class Digits(EmbeddedBuilder):
    """scikit-learn handwritten digits (8x8), 1,437 train / 360 test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Balanced seeded split: 36 test examples per class."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "index": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {
            name: self._generate_examples(rows) for name, rows in digits_split_indices().items()
        }

    def _generate_examples(self, rows: np.ndarray) -> Iterator[tuple[int, dict]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        for row in rows:
            image = digits.images[row].astype(np.uint8)[:, :, None]
            yield int(row), {"image": image, "label": int(digits.target[row]), "index": int(row)}
