"""MNIST-1D (Greydanus & Kobak, 2020) as a TFDS dataset.

Source: generated locally by the mnist1d package,
``mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())`` with the
package's default arguments (5,000 signals of length 40 from ten 1-D digit
templates, with random padding, translation, shear, scale and correlated
noise; seed 42). The generator computes everything from the templates in its
source; nothing is downloaded (the ``url`` in the arguments is only used by
the package's separate ``get_dataset`` download helper, which is not called).

Split: the package's own, the first 80% of its shuffled examples are ``train``
(4,000) and the rest ``test`` (1,000). Features: ``signal`` float32 [40],
``label`` 0..9, ``index`` the row within the split.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from effformer.data.embedded.base import EmbeddedBuilder

SIGNAL_LENGTH = 40


def generate_mnist1d() -> dict[str, np.ndarray]:
    """The package's default dataset: keys x, y (train) and x_test, y_test."""
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset seeds numpy's global generator; leave the caller's untouched.
    global_state = np.random.get_state()
    try:
        return make_dataset(get_dataset_args())
    finally:
        np.random.set_state(global_state)


class Mnist1d(EmbeddedBuilder):
    """MNIST-1D signals of length 40, 4,000 train / 1,000 test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "mnist1d default arguments, the package's 80/20 split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "signal": tfds.features.Tensor(shape=(SIGNAL_LENGTH,), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "index": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=("signal", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        data = generate_mnist1d()
        return {
            "train": self._generate_examples(data["x"], data["y"]),
            "test": self._generate_examples(data["x_test"], data["y_test"]),
        }

    def _generate_examples(
        self, signals: np.ndarray, labels: np.ndarray
    ) -> Iterator[tuple[int, dict]]:
        for row, (signal, label) in enumerate(zip(signals, labels, strict=True)):
            yield row, {"signal": signal.astype(np.float32), "label": int(label), "index": row}
