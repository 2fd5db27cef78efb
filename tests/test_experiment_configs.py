"""Every experiment config validates, and where its data is local, builds and initialises.

A config that has gone stale (a renamed model argument, a removed option) should fail
here, not minutes into someone's run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import pytest

from effformer import models
from effformer.data.registry import DatasetNotPreparedError
from effformer.train import validate_config
from effformer.train.experiment import build_experiment

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
CONFIG_FILES = sorted(
    path for path in EXPERIMENTS.glob("*/*.py") if "def get_config" in path.read_text()
)


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"config_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_config_files_are_found():
    assert len(CONFIG_FILES) >= 10, CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_default_config_validates_and_builds(path):
    models.list_models()  # the registry, before configs that register experiment models
    config = _load(path).get_config()
    validate_config(config)
    try:
        experiment = build_experiment(config)
    except DatasetNotPreparedError:
        return  # a TFDS dataset this machine does not have: validation is what can be checked
    model = experiment.model
    variables = jax.eval_shape(model.init, jax.random.key(0), **model.dummy_inputs(1))
    assert jax.tree.leaves(variables["params"])


@pytest.mark.parametrize(
    "argv, ignored",
    [
        (["eval", "--workdir", "w", "--top_k", "3"], "--top_k"),
        (["generate", "--workdir", "w", "--top_k", "3"], "--top_k"),
        (["train", "--workdir", "w", "--step", "5"], "--step"),
        (
            ["eval", "--workdir", "w", "--config", str(EXPERIMENTS / "digits" / "vit.py")],
            "--config",
        ),
    ],
)
def test_cli_refuses_a_flag_its_command_does_not_read(argv, ignored):
    from absl import app, flags

    from effformer import main

    remaining = flags.FLAGS(["effformer", *argv])  # absl's parse, as app.run does
    try:
        with pytest.raises(app.UsageError, match=f"{argv[0]} does not read {ignored};"):
            main.main(remaining)
    finally:
        flags.FLAGS.unparse_flags()


def test_local_learning_schedule_can_be_overridden_from_the_command_line():
    # experiments/local_learning/README.md: `effformer train` runs either schedule through
    # config.task.local_schedule; a --config.FIELD override needs the field in the config.
    config = _load(EXPERIMENTS / "local_learning" / "digits.py").get_config("k2_features")
    assert config.task.local_schedule == "joint"


@pytest.mark.parametrize(
    "field, value, expected",
    [("image_size", "16", 16), ("packing_row_length", "64", 64), ("data_dir", "/data", "/data")],
)
def test_data_fields_that_default_to_none_can_be_set_from_the_command_line(field, value, expected):
    # Regression: ml_collections refused `--config.data.image_size=16` ("Type NoneType ...
    # is not supported for overriding") while the field held a plain None.
    from absl import flags
    from ml_collections import config_flags

    argv = [
        "prog",
        f"--config={EXPERIMENTS / 'digits' / 'vit.py'}",
        f"--config.data.{field}={value}",
    ]
    flag_values = flags.FlagValues()
    # sys_argv: config_flags reads the config file's path from it when the flag is defined.
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    assert flag_values.config.data[field] == expected
