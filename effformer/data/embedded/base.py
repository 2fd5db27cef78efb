"""Shared behaviour of the embedded TFDS builders, and race-safe building.

TFDS generates into ``<name>/incomplete.XXXX_<version>`` and renames it to
``<name>/<version>`` at the end, so a reader never sees half a dataset. Two
processes building the same dataset at once would both generate, and the
loser's rename fails ("Directory not empty"). ``prepare`` therefore holds an
exclusive file lock in data_dir while checking and building, so the second
process waits and then finds the dataset prepared.
"""

from __future__ import annotations

import fcntl
import os

import tensorflow_datasets as tfds
from etils import epath


class EmbeddedBuilder(tfds.core.GeneratorBasedBuilder):
    """A TFDS builder whose data is produced locally (no downloads)."""

    # TFDS derives code_path through `importlib_resources`, which is not a
    # dependency here; the path only serves to look for a checksums file that
    # embedded datasets do not have, so point it at this module directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)


def prepare(builder_cls: type[EmbeddedBuilder], data_dir: str) -> EmbeddedBuilder:
    """Returns a prepared (array_record) builder of ``builder_cls`` in ``data_dir``.

    Builds on first use; safe when several processes call it at once.
    """
    builder = builder_cls(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    os.makedirs(data_dir, exist_ok=True)
    lock_path = os.path.join(data_dir, f".{builder.name}.build.lock")
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            # Another process may have finished while this one waited.
            builder = builder_cls(data_dir=data_dir, file_format="array_record")
            if not builder.is_prepared():
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
                )
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return builder_cls(data_dir=data_dir, file_format="array_record")
