"""The data part of a run's config: fields, defaults and validation."""

from __future__ import annotations

from typing import Any

import ml_collections

# Field name -> default. `image_size` is set per dataset by `default_data_config`.
_DEFAULTS: dict[str, Any] = {
    "name": None,
    "data_dir": None,
    "image_size": None,
    "crop_padding": 0,
    "flip": False,
    "randaugment_num_layers": 0,
    "randaugment_magnitude": 0.0,
    "random_erasing": 0.0,
    "num_workers": 0,
    "packing": False,
    "packing_row_length": None,
    # "" rather than None, so that --config.data.teacher_store=DIR can set it.
    "teacher_store": "",
}
FIELDS = tuple(_DEFAULTS)
# The types of the fields whose default is None. The ConfigDict holds them as typed
# placeholders: a plain None field cannot be set from the command line
# (`--config.data.image_size=16` fails in ml_collections with "NoneType ... not supported").
_NONE_DEFAULT_TYPES: dict[str, type] = {
    "data_dir": str,
    "image_size": int,
    "packing_row_length": int,
}
IMAGE_AUGMENTATION_FIELDS = ("crop_padding", "flip", "randaugment_num_layers", "random_erasing")
# Dataset formats whose records are token rows of one width, which packing can cut and join.
PACKABLE_TASKS = ("causal_lm",)
# Dataset formats whose examples a teacher store can label.
CLASSIFICATION_TASKS = ("image_classification", "sequence_classification")


def default_data_config(name: str) -> ml_collections.ConfigDict:
    """Every data field for dataset ``name``, augmentation off, in-process loading.

    Fields: ``name``; ``data_dir`` (None: $TFDS_DATA_DIR or ~/tensorflow_datasets);
    ``image_size`` (resize target; None keeps the native size, 224 by default for
    datasets whose images vary in size); ``crop_padding`` (random crop after zero
    padding by this many pixels, 0 = off); ``flip`` (random horizontal flip);
    ``randaugment_num_layers`` and ``randaugment_magnitude`` (0 = off; magnitude in
    [0, 10]); ``random_erasing`` (probability, 0 = off); ``num_workers`` (worker
    processes, 0 = in-process); ``packing`` (training batches of packed rows:
    several examples per row with segment ids and positions, see
    ``effformer.data.pipeline``; causal_lm datasets only) and
    ``packing_row_length`` (the packed rows' length, e.g. the model's sequence
    length; None: the dataset's own row length); ``teacher_store`` (a directory
    written by ``effformer save-teacher-logits`` for this training stream: the
    training examples carry the teacher's top-K probabilities, see
    ``effformer.data.teacher_store``; classification datasets; "" = off).
    """
    from effformer.data.registry import get_dataset_spec

    spec = get_dataset_spec(name)
    fields = dict(_DEFAULTS)
    for field, kind in _NONE_DEFAULT_TYPES.items():
        fields[field] = ml_collections.config_dict.placeholder(kind)
    config = ml_collections.ConfigDict(fields)
    config.name = name
    config.image_size = spec.default_image_size
    return config


def _fail(field: str, expected: str, value: Any) -> None:
    raise ValueError(f"data config field {field!r}: expected {expected}, got {value!r}.")


def validate_data_config(data_config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """Checks field names and values; returns a plain dict with defaults filled in.

    Raises:
      ValueError naming the field, what it expects and what it received.
    """
    given = dict(data_config.to_dict() if hasattr(data_config, "to_dict") else data_config)
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise ValueError(
            f"Unknown data config field(s) {unknown}; known fields are {list(FIELDS)}."
        )
    if given.get("name") is None:
        raise ValueError("data config field 'name' is required (a dataset name), got None.")
    from effformer.data.registry import get_dataset_spec

    spec = get_dataset_spec(given["name"])
    config = dict(_DEFAULTS)
    config["image_size"] = spec.default_image_size
    config.update(given)

    if config["data_dir"] is not None and not isinstance(config["data_dir"], str):
        _fail("data_dir", "a path string or None", config["data_dir"])
    size = config["image_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        _fail("image_size", "a positive int or None", size)
    for field in ("crop_padding", "randaugment_num_layers", "num_workers"):
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            _fail(field, "an int >= 0", value)
    if not isinstance(config["flip"], bool):
        _fail("flip", "a bool", config["flip"])
    magnitude = config["randaugment_magnitude"]
    if (
        isinstance(magnitude, bool)
        or not isinstance(magnitude, int | float)
        or not 0 <= magnitude <= 10
    ):
        _fail("randaugment_magnitude", "a number in [0, 10]", magnitude)
    erasing = config["random_erasing"]
    if isinstance(erasing, bool) or not isinstance(erasing, int | float) or not 0 <= erasing <= 1:
        _fail("random_erasing", "a probability in [0, 1]", erasing)

    if not isinstance(config["packing"], bool):
        _fail("packing", "a bool", config["packing"])
    row_length = config["packing_row_length"]
    if row_length is not None and (
        isinstance(row_length, bool) or not isinstance(row_length, int) or row_length < 1
    ):
        _fail("packing_row_length", "a positive int or None", row_length)
    if row_length is not None and not config["packing"]:
        # Without packing nothing reads it: a run that meant to pack would silently not.
        _fail("packing_row_length", "None when packing is False (or set packing=True)", row_length)
    if config["packing"] and spec.task not in PACKABLE_TASKS:
        _fail(
            "packing",
            f"False for {spec.name!r} ({spec.task}: packing needs one of {PACKABLE_TASKS})",
            True,
        )

    store = config["teacher_store"]
    if not isinstance(store, str):
        _fail("teacher_store", 'a directory path string ("" = off)', store)
    if store and spec.task not in CLASSIFICATION_TASKS:
        _fail("teacher_store", f'"" for {spec.name!r} ({spec.task}: not classification)', store)

    if spec.task != "image_classification":
        for field in IMAGE_AUGMENTATION_FIELDS:
            if config[field]:
                _fail(
                    field,
                    f"0/False for {spec.name!r} ({spec.task}: image augmentation does not apply)",
                    config[field],
                )
        if config["image_size"] is not None:
            _fail("image_size", f"None for {spec.name!r} ({spec.task})", config["image_size"])
    elif spec.default_image_size is not None and config["image_size"] is None:
        _fail("image_size", f"a positive int for {spec.name!r} (its images vary in size)", None)
    return config
