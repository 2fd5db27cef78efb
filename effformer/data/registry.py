"""Datasets by name: what each one is, where its data lives, and its info.

Two kinds of dataset share one interface:

* embedded (``digits``, ``mnist1d``): built locally into data_dir as TFDS
  array_record datasets on first use (see ``effformer/data/embedded``);
* prepared TFDS datasets (``cifar10``, ``cifar100``, ``oxford_flowers102``,
  ``imagenet2012``): read if the user has built them in data_dir with
  ``--file_format=array_record``; otherwise opening them fails at once with the
  command that prepares them;
* generated token datasets (``copy``, ``addition``, ... see
  ``effformer/data/tasks``): examples computed on the fly from a seed, served
  as grain random-access sources; registered with :func:`register_dataset`;
  ``digits_pixels`` (the digits as 64-pixel causal-LM rows) and
  ``wiki40b_en_bytes`` (byte-level rows of prepared TFDS text) share that
  interface.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any

import ml_collections

# Per-channel mean/std of pixels scaled to [0, 1].
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a trainer needs to know about a dataset after preprocessing."""

    name: str
    # The trainer task that reads the records: "image_classification",
    # "sequence_classification", "causal_lm", "seq2seq" or "solo_vqa".
    task: str
    num_classes: int
    # (H, W, C) for images, (L, C) for 1-D signals and frames, (R,) for token rows.
    input_shape: tuple[int, ...]
    splits: dict[str, int]  # split name -> number of examples
    train_split: str
    eval_split: str
    vocab_size: int | None = None  # Token datasets: the model's vocabulary size.


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to find, decode and normalise one dataset.

    Attributes:
      input_key / label_key: feature names in the TFDS records.
      native_shape: per-example shape of the stored input; None where it varies.
      max_value: the stored value of a white pixel (inputs are divided by it to
        lie in [0, 1] before augmentation); None for signals stored as floats.
      mean / std: per-channel statistics of the train split, after the [0, 1]
        scaling, used to normalise.
      builder: "module:Class" of an embedded builder; None for prepared TFDS data.
      default_image_size: 224 where image sizes vary (resize needed), else None.
      prepare_hint: extra instructions for preparing a TFDS dataset.
      generated: a generated dataset (``effformer.data.tasks``) that serves
        ``info``, ``as_data_source(split)``, ``example_transform()`` and
        ``eval_example(source)`` itself, or one with ``with_data_dir(data_dir)``
        that returns such an object (records made from prepared TFDS data,
        ``effformer.data.text_bytes``); None for TFDS data.
    """

    name: str
    tfds_name: str
    task: str
    num_classes: int
    input_key: str
    label_key: str
    native_shape: tuple[int, ...] | None
    channels: int
    max_value: float | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_split: str
    eval_split: str
    builder: str | None = None
    default_image_size: int | None = None
    prepare_hint: str = ""
    generated: Any = None


_SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        # Mean/std measured on the train split (tests/data check them).
        DatasetSpec(
            name="digits",
            tfds_name="digits",
            task="image_classification",
            num_classes=10,
            input_key="image",
            label_key="label",
            native_shape=(8, 8, 1),
            channels=1,
            max_value=16.0,
            mean=(0.30543300,),
            std=(0.37609306,),
            train_split="train",
            eval_split="test",
            builder="effformer.data.embedded.digits:Digits",
        ),
        DatasetSpec(
            name="mnist1d",
            tfds_name="mnist1d",
            task="sequence_classification",
            num_classes=10,
            input_key="signal",
            label_key="label",
            native_shape=(40, 1),
            channels=1,
            max_value=None,
            mean=(-0.00032367169,),
            std=(0.99764797,),
            train_split="train",
            eval_split="test",
            builder="effformer.data.embedded.mnist1d:Mnist1d",
        ),
        # CIFAR statistics: the exact per-channel std of the train split (not the
        # often-copied (0.2023, 0.1994, 0.2010), which are averages of per-image stds).
        DatasetSpec(
            name="cifar10",
            tfds_name="cifar10",
            task="image_classification",
            num_classes=10,
            input_key="image",
            label_key="label",
            native_shape=(32, 32, 3),
            channels=3,
            max_value=255.0,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            train_split="train",
            eval_split="test",
        ),
        DatasetSpec(
            name="cifar100",
            tfds_name="cifar100",
            task="image_classification",
            num_classes=100,
            input_key="image",
            label_key="label",
            native_shape=(32, 32, 3),
            channels=3,
            max_value=255.0,
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            train_split="train",
            eval_split="test",
        ),
        # Flowers-102 is used fine-tuned from ImageNet models, so ImageNet's statistics.
        DatasetSpec(
            name="oxford_flowers102",
            tfds_name="oxford_flowers102",
            task="image_classification",
            num_classes=102,
            input_key="image",
            label_key="label",
            native_shape=None,
            channels=3,
            max_value=255.0,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            train_split="train",
            eval_split="test",
            default_image_size=224,
        ),
        DatasetSpec(
            name="imagenet2012",
            tfds_name="imagenet2012",
            task="image_classification",
            num_classes=1000,
            input_key="image",
            label_key="label",
            native_shape=None,
            channels=3,
            max_value=255.0,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            train_split="train",
            eval_split="validation",
            default_image_size=224,
            prepare_hint=(
                " ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and"
                " ILSVRC2012_img_val.tar in a folder and add --manual_dir=THAT_FOLDER."
            ),
        ),
    )
}


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset is not prepared (as array_record) in the data_dir."""


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Adds ``spec`` under ``spec.name`` (generated datasets register themselves this way)."""
    if spec.name in _SPECS:
        raise ValueError(f"register_dataset: a dataset named {spec.name!r} is already registered.")
    _SPECS[spec.name] = spec
    return spec


def _import_generated_datasets() -> None:
    # These modules register their datasets when imported; they import this
    # module, so they are imported here, on the first lookup, rather than at the top.
    importlib.import_module("effformer.data.tasks")
    importlib.import_module("effformer.data.digits_pixels")
    importlib.import_module("effformer.data.digits_vqa")
    importlib.import_module("effformer.data.text_bytes")


def list_datasets() -> list[str]:
    """Names accepted as ``data_config.name``."""
    _import_generated_datasets()
    return sorted(_SPECS)


def get_dataset_spec(name: str) -> DatasetSpec:
    _import_generated_datasets()
    if name not in _SPECS:
        raise ValueError(
            f"data config field 'name': unknown dataset {name!r}; known: {list_datasets()}."
        )
    return _SPECS[name]


def resolve_data_dir(data_dir: str | None) -> str:
    """``data_dir``, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return os.path.abspath(os.path.expanduser(data_dir))


def load_builder(spec: DatasetSpec, data_dir: str | None) -> Any:
    """A prepared TFDS builder for ``spec``: embedded ones are built on first use.

    Raises:
      DatasetNotPreparedError: a TFDS dataset missing from data_dir (or stored in a
        format other than array_record), with the command that prepares it.
    """
    if spec.generated is not None:
        with_data_dir = getattr(spec.generated, "with_data_dir", None)
        return spec.generated if with_data_dir is None else with_data_dir(data_dir)
    import tensorflow_datasets as tfds

    data_dir = resolve_data_dir(data_dir)
    if spec.builder is not None:
        from effformer.data.embedded.base import prepare

        module_name, class_name = spec.builder.split(":")
        return prepare(getattr(importlib.import_module(module_name), class_name), data_dir)

    command = f"tfds build {spec.tfds_name} --file_format=array_record --data_dir={data_dir}"
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"Dataset {spec.name!r} is not prepared in data_dir {data_dir!r}. Prepare it once with:"
            f"\n  {command}\n{spec.prepare_hint}".rstrip()
        )
    stored_format = builder.info.file_format
    if (
        stored_format is not None
        and str(getattr(stored_format, "value", stored_format)) != "array_record"
    ):
        raise DatasetNotPreparedError(
            f"Dataset {spec.name!r} in {data_dir!r} is stored as {stored_format}, but reading it "
            "through grain needs array_record. Prepare it again with:"
            f"\n  {command}{spec.prepare_hint}"
        )
    return builder


def _input_shape(spec: DatasetSpec, image_size: int | None) -> tuple[int, ...]:
    if spec.task == "image_classification" and image_size is not None:
        return (image_size, image_size, spec.channels)
    assert spec.native_shape is not None  # validate_data_config ensures image_size otherwise.
    return spec.native_shape


def dataset_info(spec: DatasetSpec, builder: Any, image_size: int | None) -> DatasetInfo:
    if spec.generated is not None:
        return builder.info  # The generated dataset (bound to its data_dir where it reads one).
    splits = {name: int(split.num_examples) for name, split in builder.info.splits.items()}
    return DatasetInfo(
        name=spec.name,
        task=spec.task,
        num_classes=spec.num_classes,
        input_shape=_input_shape(spec, image_size),
        splits=splits,
        train_split=spec.train_split,
        eval_split=spec.eval_split,
    )


def get_dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
    """The ``DatasetInfo`` of the dataset named by ``data_config`` (built if embedded)."""
    from effformer.data.config import validate_data_config

    config = validate_data_config(data_config)
    spec = get_dataset_spec(config["name"])
    return dataset_info(spec, load_builder(spec, config["data_dir"]), config["image_size"])
