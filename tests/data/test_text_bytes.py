"""Byte-level text datasets (``effformer.data.text_bytes``) and the Wiki-40B experiment config."""

import importlib.util
from pathlib import Path

import jax
import pytest
import tensorflow_datasets as tfds

from effformer import models
from effformer.data import DatasetNotPreparedError
from effformer.data.embedded.base import EmbeddedBuilder, prepare
from effformer.data.text_bytes import BOS, EOS, VOCAB_SIZE, ByteTextDataset, byte_lm_record
from effformer.train import validate_config
from effformer.train.experiment import build_experiment

EXPERIMENT = Path(__file__).parents[2] / "experiments" / "combiner" / "wiki40b.py"


def _reference_record(text, row_length):
    """Token list of the document, then shifted by one, written out position by position."""
    tokens = [BOS] + [3 + byte for byte in text.encode("utf-8")] + [EOS]
    inputs, targets, weights = [0] * row_length, [0] * row_length, [0.0] * row_length
    for position in range(min(row_length, len(tokens) - 1)):
        inputs[position] = tokens[position]
        targets[position] = tokens[position + 1]
        weights[position] = 1.0
    return inputs, targets, weights


@pytest.mark.parametrize("text", ["", "ab", "héllo wörld", "x" * 20])
def test_byte_record_matches_the_reference(text):
    for document in (text, text.encode("utf-8")):
        record = byte_lm_record(document, 8)
        inputs, targets, weights = _reference_record(text, 8)
        assert record["inputs"].tolist() == inputs
        assert record["targets"].tolist() == targets
        assert record["weights"].tolist() == weights
    assert VOCAB_SIZE == 259


class TinyTextForTests(EmbeddedBuilder):
    """Three short documents with a TFDS Text feature, as Wiki-40B stores its articles."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(["héllo", "ab"]),
            "validation": self._generate_examples(["xyz"]),
        }

    def _generate_examples(self, texts):
        for index, text in enumerate(texts):
            yield index, {"text": text}


def test_prepared_tfds_text_reads_as_byte_rows(tmp_path):
    prepare(TinyTextForTests, str(tmp_path))
    dataset = ByteTextDataset(
        name="tiny_text_bytes",
        tfds_name="tiny_text_for_tests",
        tfds_module="tensorflow_datasets",
        text_key="text",
        row_length=8,
        train_split="train",
        eval_split="validation",
    )
    prepared = dataset.with_data_dir(str(tmp_path))
    assert prepared.info.splits == {"train": 2, "validation": 1}
    assert (prepared.info.input_shape, prepared.info.vocab_size) == ((8,), VOCAB_SIZE)
    source = prepared.as_data_source("train")
    # The array_record shuffle may reorder documents: compare as a set.
    rows = {tuple(source[i]["targets"].tolist()) for i in range(len(source))}
    assert rows == {tuple(_reference_record(text, 8)[1]) for text in ("héllo", "ab")}
    padded = prepared.eval_example(prepared.as_data_source("validation"))
    assert padded(0)["mask"] and not padded(1)["mask"] and not padded(1)["weights"].any()
    with pytest.raises(ValueError, match="split must be one of"):
        prepared.as_data_source("test")


def _experiment_module():
    spec = importlib.util.spec_from_file_location("combiner_wiki40b_config", EXPERIMENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wiki40b_config_validates_builds_abstractly_and_asks_for_the_data(tmp_path):
    wiki40b = _experiment_module()
    for arm in wiki40b.ARMS:
        validate_config(wiki40b.get_config(arm))
    config = wiki40b.get_config("mixture")
    model = models.create(config.model.name, vocab_size=VOCAB_SIZE, **config.model.kwargs)
    variables = jax.eval_shape(model.init, jax.random.key(0), **model.dummy_inputs(1))
    assert sum(leaf.size for leaf in jax.tree.leaves(variables)) == 86_827_776
    config.data.data_dir = str(tmp_path)
    with pytest.raises(
        DatasetNotPreparedError, match=r"tfds build wiki40b/en --file_format=array_record"
    ):
        build_experiment(config)
    assert not any(tmp_path.iterdir())  # Asking wrote nothing into the data_dir.
    with pytest.raises(ValueError, match="ARG must be one of"):
        wiki40b.get_config("sparse")
