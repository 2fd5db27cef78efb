"""Prepared TFDS text datasets as byte-level causal-LM rows (dataset ``wiki40b_en_bytes``).

The library has no subword tokenizer, so text is modelled as UTF-8 bytes:
token ``3 + b`` for byte ``b``, plus ``<pad>`` 0, ``<bos>`` 1 and ``<eos>`` 2,
a vocabulary of 259. One record per document (TFDS example):

* ``inputs`` int32 [R]: ``<bos> b_0 b_1 ...``, zero-padded;
* ``targets`` int32 [R]: the next token (``b_0 b_1 ... <eos>``);
* ``weights`` float32 [R]: 1 on every real target, 0 on padding.

A document longer than the row is cut: its first R bytes are the targets
(no ``<eos>``), ``<bos>`` and its first R - 1 bytes the inputs; the rest is not used.
With ``data.packing = True`` shorter documents are packed several to a row.

The TFDS dataset must be prepared by the user as array_record in ``data_dir``
(reading needs neither TensorFlow nor network); until then opening it fails
with :class:`~effformer.data.registry.DatasetNotPreparedError` and the command
that prepares it.

``wiki40b_en_bytes``: TFDS ``wiki40b/en`` (1.3.0; train / validation / test
articles), field ``text`` as stored (it keeps Wiki-40B's ``_START_ARTICLE_``,
``_START_SECTION_``, ``_START_PARAGRAPH_`` and ``_NEWLINE_`` markers), rows of
2048 tokens, evaluated on ``validation``.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import numpy as np

from effformer.data.registry import (
    DatasetInfo,
    DatasetSpec,
    load_builder,
    register_dataset,
)
from effformer.data.tasks.base import AddMask, PaddedEvalExample

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = BYTE_OFFSET + 256


def byte_lm_record(text: str | bytes, row_length: int) -> dict[str, np.ndarray]:
    """One document -> ``{"inputs", "targets", "weights"}`` of ``[row_length]`` (see above)."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    data = np.frombuffer(bytes(text), np.uint8).astype(np.int32) + BYTE_OFFSET
    tokens = np.concatenate([[BOS], data, [EOS]]).astype(np.int32)[: row_length + 1]
    used = len(tokens) - 1
    inputs = np.zeros(row_length, np.int32)
    targets = np.zeros(row_length, np.int32)
    weights = np.zeros(row_length, np.float32)
    inputs[:used] = tokens[:-1]
    targets[:used] = tokens[1:]
    weights[:used] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}


@dataclasses.dataclass(frozen=True)
class ByteTextSource:
    """grain random-access source: the TFDS data source's documents as records."""

    documents: Any  # A TFDS data source (index -> feature dict).
    text_key: str
    row_length: int

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return byte_lm_record(self.documents[int(index)][self.text_key], self.row_length)


@dataclasses.dataclass(frozen=True)
class PreparedByteText:
    """A :class:`ByteTextDataset` bound to a prepared TFDS builder (the registry's interface)."""

    dataset: ByteTextDataset
    builder: Any  # The prepared tfds builder.

    @property
    def info(self) -> DatasetInfo:
        splits = {name: int(split.num_examples) for name, split in self.builder.info.splits.items()}
        return DatasetInfo(
            name=self.dataset.name,
            task="causal_lm",
            num_classes=VOCAB_SIZE,
            input_shape=(self.dataset.row_length,),
            splits=splits,
            train_split=self.dataset.train_split,
            eval_split=self.dataset.eval_split,
            vocab_size=VOCAB_SIZE,
        )

    def as_data_source(self, split: str) -> ByteTextSource:
        splits = sorted(self.builder.info.splits)
        if split not in splits:
            raise ValueError(f"{self.dataset.name}: split must be one of {splits}, got {split!r}.")
        documents = self.builder.as_data_source(split)
        return ByteTextSource(documents, self.dataset.text_key, self.dataset.row_length)

    def example_transform(self) -> AddMask:
        return AddMask()

    def eval_example(self, source: ByteTextSource) -> PaddedEvalExample:
        record = byte_lm_record(b"", self.dataset.row_length)
        return PaddedEvalExample(
            source, {key: np.zeros_like(value) for key, value in record.items()}
        )


@dataclasses.dataclass(frozen=True)
class ByteTextDataset:
    """A TFDS text dataset read as byte-level causal-LM rows.

    Attributes:
      name: the registry name.
      tfds_name: the TFDS name (``"wiki40b/en"``).
      tfds_module: module that defines the TFDS builder, imported before opening
        it (TFDS skips builders whose optional dependencies are missing).
      text_key: the feature holding the document text.
      row_length: tokens per row (R).
      train_split, eval_split: TFDS split names.
      prepare_hint: what preparing the TFDS dataset needs, added to the error.
    """

    name: str
    tfds_name: str
    tfds_module: str
    text_key: str
    row_length: int
    train_split: str
    eval_split: str
    prepare_hint: str = ""

    def with_data_dir(self, data_dir: str | None) -> PreparedByteText:
        """Opens the prepared TFDS dataset in ``data_dir``.

        Raises:
          DatasetNotPreparedError: it is not prepared there as array_record (with the command).
        """
        importlib.import_module(self.tfds_module)
        source_spec = DatasetSpec(
            name=self.name,
            tfds_name=self.tfds_name,
            task="causal_lm",
            num_classes=VOCAB_SIZE,
            input_key=self.text_key,
            label_key=self.text_key,
            native_shape=None,
            channels=1,
            max_value=None,
            mean=(0.0,),
            std=(1.0,),
            train_split=self.train_split,
            eval_split=self.eval_split,
            prepare_hint=self.prepare_hint,
        )
        return PreparedByteText(self, load_builder(source_spec, data_dir))


WIKI40B_EN_BYTES = ByteTextDataset(
    name="wiki40b_en_bytes",
    tfds_name="wiki40b/en",
    tfds_module="tensorflow_datasets.text.wiki40b",
    text_key="text",
    row_length=2048,
    train_split="train",
    eval_split="validation",
    prepare_hint=(
        " Wiki-40B is an Apache Beam dataset read from TFDS's public GCS bucket: building it"
        " needs apache-beam and tensorflow installed (reading it afterwards needs neither)"
        " and a --beam_pipeline_options=... runner (see TFDS's Beam datasets guide)."
    ),
)
register_dataset(
    DatasetSpec(
        name=WIKI40B_EN_BYTES.name,
        tfds_name=WIKI40B_EN_BYTES.tfds_name,
        task="causal_lm",
        num_classes=VOCAB_SIZE,
        input_key="inputs",
        label_key="targets",
        native_shape=(WIKI40B_EN_BYTES.row_length,),
        channels=1,
        max_value=None,
        mean=(0.0,),
        std=(1.0,),
        train_split=WIKI40B_EN_BYTES.train_split,
        eval_split=WIKI40B_EN_BYTES.eval_split,
        generated=WIKI40B_EN_BYTES,
    )
)
