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
