"""The ``digits_pixels`` dataset: records, registry entry, pipeline, and the experiment's config."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from effformer import models
from effformer.data import create_input_pipeline, default_data_config, get_dataset_info
from effformer.data.digits_pixels import BOS, DATASET, VOCAB_SIZE
from effformer.data.embedded.digits import digits_split_indices
from effformer.train import validate_config
from effformer.train.experiment import build_experiment

EXPERIMENT = Path(__file__).parents[2] / "experiments" / "combiner" / "digits.py"


def test_info_and_records_match_the_images_in_raster_order():
    info = get_dataset_info(default_data_config("digits_pixels"))
    assert (info.task, info.input_shape, info.vocab_size) == ("causal_lm", (64,), VOCAB_SIZE)
    assert VOCAB_SIZE == 18 and BOS == 17
    digits = load_digits()
    for split, rows in digits_split_indices().items():
        assert info.splits[split] == len(rows)
        for index in (0, len(rows) - 1):
            image = digits.images[rows[index]]
            record = DATASET.example(split, index)
            pixels = [int(image[r, c]) for r in range(8) for c in range(8)]
            assert record["targets"].tolist() == pixels
            assert record["inputs"].tolist() == [BOS] + pixels[:-1]
            assert record["weights"].tolist() == [1.0] * 64
            assert int(record["label"]) == digits.target[rows[index]]


def test_eval_pipeline_pads_the_last_batch_with_masked_rows():
    pipeline = create_input_pipeline(
        default_data_config("digits_pixels"),
        split="test",
        global_batch_size=64,
        train=False,
        seed=0,
    )
    batches = list(pipeline)
    assert len(batches) == pipeline.num_batches == 6  # 360 images.
    assert batches[0]["inputs"].shape == batches[0]["targets"].shape == (64, 64)
    assert int(sum(batch["mask"].sum() for batch in batches)) == 360
    last = batches[-1]
    assert not last["mask"][360 - 5 * 64 :].any()
    assert not last["weights"][~last["mask"]].any()
    targets = np.concatenate([batch["targets"][batch["mask"]] for batch in batches])
    assert targets.min() >= 0 and targets.max() <= 16


def test_bad_split_and_index_fail_clearly():
    with pytest.raises(ValueError, match="split must be one of"):
        DATASET.as_data_source("validation")
    with pytest.raises(IndexError, match="out of range for split 'test'"):
        DATASET.example("test", 360)


def _experiment_module():
    spec = importlib.util.spec_from_file_location("combiner_digits_config", EXPERIMENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experiment_configs_build_at_equal_size():
    digits = _experiment_module()
    sizes = {}
    for arm in digits.ARMS:
        config = digits.get_config(arm)
        validate_config(config)
        model = models.create(config.model.name, vocab_size=VOCAB_SIZE, **config.model.kwargs)
        variables = jax.eval_shape(model.init, jax.random.key(0), **model.dummy_inputs(1))
        sizes[arm] = sum(leaf.size for leaf in jax.tree.leaves(variables))
    # Axial alone adds its abstraction-key projections; the rest match the baseline exactly.
    assert {arm: n for arm, n in sizes.items() if arm != "axial"} == dict.fromkeys(
        ("full", "fixed", "logsparse", "mixture"), sizes["full"]
    )
    assert sizes["axial"] > sizes["full"]
    assert build_experiment(digits.get_config("mixture")).info.vocab_size == VOCAB_SIZE
    with pytest.raises(ValueError, match="ARG must be one of"):
        digits.get_config("sparse")
