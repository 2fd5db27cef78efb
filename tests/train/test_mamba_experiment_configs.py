"""The arms of experiments/mamba build, at the parameter counts its README reports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import pytest

from effformer.train import validate_config
from effformer.train.experiment import build_experiment

CONFIGS = Path(__file__).parents[2] / "experiments" / "mamba"
# experiments/mamba/README.md, the params column of its tables.
PARAMS = {
    ("digits", "mamba"): 131_658,
    ("digits", "transformer"): 100_874,
    ("digits", "lmu"): 92_556,
    ("digits", "lmuformer"): 143_180,
    ("digits", "spiking_lmuformer"): 152_528,
}


def _config_module(dataset: str):
    path = CONFIGS / f"{dataset}_config.py"
    spec = importlib.util.spec_from_file_location(f"mamba_experiment_{dataset}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dataset, arm", list(PARAMS))
def test_arm_builds_at_the_reported_size(dataset, arm):
    config = _config_module(dataset).get_config(arm)
    validate_config(config)
    experiment = build_experiment(config)
    model = experiment.model
    variables = jax.eval_shape(model.init, jax.random.key(0), **model.dummy_inputs(1))
    assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == PARAMS[dataset, arm]


def test_lmu_window_is_the_sequence_length():
    digits = _config_module("digits").get_config("lmu")
    mnist1d = _config_module("mnist1d").get_config("lmu")
    assert digits.model.kwargs.mixer_kwargs.lmu.theta == 64.0  # 8 x 8 pixels
    assert mnist1d.model.kwargs.mixer_kwargs.lmu.theta == 40.0  # MNIST-1D's 40 steps
