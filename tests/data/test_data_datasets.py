"""Embedded datasets, the dataset registry, data config validation."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from effformer.data import (
    DatasetNotPreparedError,
    create_input_pipeline,
    default_data_config,
    get_dataset_info,
    list_datasets,
)
from effformer.data.embedded.digits import digits_split_indices
from effformer.data.embedded.mnist1d import generate_mnist1d
from effformer.data.registry import get_dataset_spec, load_builder


def _all_examples(config, split):
    info = get_dataset_info(config)
    pipeline = create_input_pipeline(
        config,
        split=split,
        global_batch_size=info.splits[split],
        train=False,
        seed=0,
        process_index=0,
        process_count=1,
    )
    (batch,) = list(pipeline)
    return batch


def _raw_split(data_dir, name, split):
    spec = get_dataset_spec(name)
    source = load_builder(spec, data_dir).as_data_source(split)
    records = [source[i] for i in range(len(source))]
    inputs = np.stack([r[spec.input_key] for r in records]).astype(np.float64)
    return inputs, np.array([r["label"] for r in records]), np.array([r["index"] for r in records])


def test_list_datasets():
    names = list_datasets()
    assert names == sorted(names)
    assert {"cifar10", "cifar100", "digits", "imagenet2012", "mnist1d", "oxford_flowers102"} <= set(
        names
    )
    # The generated sequence tasks register themselves too, as LM and seq2seq datasets.
    assert {"copy", "copy_seq2seq"} <= set(names)


def test_digits_info_and_split(make_config, data_dir):
    info = get_dataset_info(make_config("digits"))
    assert info.task == "image_classification" and info.num_classes == 10
    assert info.input_shape == (8, 8, 1)
    assert info.splits == {"train": 1437, "test": 360}
    assert (info.train_split, info.eval_split) == ("train", "test")
    _, train_labels, train_rows = _raw_split(data_dir, "digits", "train")
    _, test_labels, test_rows = _raw_split(data_dir, "digits", "test")
    # The documented split: balanced test set, disjoint from train, covering all rows.
    assert np.bincount(test_labels).tolist() == [36] * 10
    assert set(train_rows).isdisjoint(test_rows)
    assert sorted([*train_rows, *test_rows]) == list(range(1797))
    assert sorted(test_rows) == digits_split_indices()["test"].tolist()


def test_digits_records_match_sklearn(data_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels, rows = _raw_split(data_dir, "digits", "test")
    np.testing.assert_array_equal(images[..., 0], digits.images[rows])
    np.testing.assert_array_equal(labels, digits.target[rows])


def test_mnist1d_matches_generator(make_config, data_dir):
    info = get_dataset_info(make_config("mnist1d"))
    assert info.task == "sequence_classification" and info.input_shape == (40, 1)
    assert info.splits == {"train": 4000, "test": 1000}
    state = np.random.get_state()
    generated = generate_mnist1d()
    # The generator must leave numpy's global generator as it found it.
    assert np.array_equal(np.random.get_state()[1], state[1])
    signals, labels, rows = _raw_split(data_dir, "mnist1d", "test")
    np.testing.assert_allclose(signals, generated["x_test"][rows], rtol=1e-6)
    np.testing.assert_array_equal(labels, generated["y_test"][rows])


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_stored_mean_std_are_those_of_the_train_split(data_dir, name):
    spec = get_dataset_spec(name)
    inputs, _, _ = _raw_split(data_dir, name, "train")
    if spec.max_value is not None:
        inputs = inputs / spec.max_value
    np.testing.assert_allclose(spec.mean, [inputs.mean()], rtol=1e-6)
    np.testing.assert_allclose(spec.std, [inputs.std()], rtol=1e-6)


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_eval_batches_are_normalised(make_config, name):
    batch = _all_examples(make_config(name), "train")
    assert batch["inputs"].dtype == np.float32 and batch["label"].dtype == np.int32
    assert batch["mask"].dtype == np.bool_ and batch["mask"].all()
    assert batch["label"].min() >= 0 and batch["label"].max() == 9
    assert abs(batch["inputs"].mean()) < 1e-4
    assert abs(batch["inputs"].std() - 1) < 1e-4


def test_digits_inputs_are_scaled_then_normalised(make_config, data_dir):
    raw, _, _ = _raw_split(data_dir, "digits", "test")
    batch = _all_examples(make_config("digits"), "test")
    spec = get_dataset_spec("digits")
    np.testing.assert_allclose(batch["inputs"], (raw / 16 - spec.mean[0]) / spec.std[0], rtol=1e-5)


def test_concurrent_builds_do_not_collide(tmp_path):
    script = textwrap.dedent(
        f"""
        from effformer.data.embedded.base import prepare
        from effformer.data.embedded.digits import Digits
        builder = prepare(Digits, {str(tmp_path)!r})
        print(builder.info.splits["train"].num_examples)
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in processes]
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr.decode()[-2000:]
        assert stdout.decode().split()[-1] == "1437"
    assert not [p for p in os.listdir(tmp_path / "digits") if p.startswith("incomplete")]


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "oxford_flowers102", "imagenet2012"])
def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path, name):
    config = default_data_config(name)
    config.data_dir = str(tmp_path)
    with pytest.raises(DatasetNotPreparedError) as error:
        get_dataset_info(config)
    message = str(error.value)
    assert f"tfds build {name} --file_format=array_record --data_dir={tmp_path}" in message
    if name == "imagenet2012":
        assert "--manual_dir" in message
    with pytest.raises(DatasetNotPreparedError):
        create_input_pipeline(
            config,
            split="train",
            global_batch_size=2,
            train=True,
            seed=0,
            process_index=0,
            process_count=1,
        )


def test_data_dir_defaults_to_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetNotPreparedError, match=str(tmp_path)):
        get_dataset_info(default_data_config("cifar10"))


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ValueError, match=r"'name'.*'mnist2d'.*digits.*mnist1d"):
        default_data_config("mnist2d")
    with pytest.raises(ValueError, match="unknown dataset 'mnist2d'"):
        get_dataset_info({"name": "mnist2d"})


def test_default_config_fields():
    config = default_data_config("imagenet2012")
    assert config.image_size == 224
    assert sorted(config) == sorted(
        [
            "name",
            "data_dir",
            "image_size",
            "crop_padding",
            "flip",
            "randaugment_num_layers",
            "randaugment_magnitude",
            "random_erasing",
            "num_workers",
            "packing",
            "packing_row_length",
            "teacher_store",
        ]
    )
    assert default_data_config("digits").image_size is None


@pytest.mark.parametrize(
    "name, field, value, expected",
    [
        ("digits", "crop_padding", -1, "an int >= 0"),
        ("digits", "flip", 1, "a bool"),
        ("digits", "randaugment_magnitude", 11, r"\[0, 10\]"),
        ("digits", "random_erasing", 1.5, r"\[0, 1\]"),
        ("digits", "num_workers", 0.5, "an int >= 0"),
        ("digits", "image_size", 0, "a positive int"),
        ("oxford_flowers102", "image_size", None, "a positive int"),
        ("mnist1d", "flip", True, "image augmentation does not apply"),
        ("mnist1d", "image_size", 32, "None"),
        ("copy", "packing_row_length", 64, "None when packing is False"),
    ],
)
def test_impossible_field_values(name, field, value, expected):
    # A plain dict: ConfigDict itself refuses some of these types.
    config = {**default_data_config(name).to_dict(), field: value}
    with pytest.raises(ValueError, match=rf"field '{field}': expected .*{expected}.*got {value!r}"):
        get_dataset_info(config)


def test_unknown_field_is_named(make_config):
    config = make_config("digits")
    config.randaugment_layers = 2
    with pytest.raises(
        ValueError, match=r"Unknown data config field\(s\) \['randaugment_layers'\]"
    ):
        get_dataset_info(config)


def test_missing_name():
    with pytest.raises(ValueError, match="'name' is required"):
        get_dataset_info({"data_dir": "/tmp"})
