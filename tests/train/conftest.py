"""A tiny registered classifier and a config factory for trainer tests."""

import functools

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import pytest

from effformer.models import register
from effformer.train import default_config


class TinyClassifier(nn.Module):
    """Flatten -> Dense -> GELU -> dropout -> Dense: enough to exercise the trainer."""

    num_classes: int = 10
    image_size: int = 8
    num_channels: int = 1
    hidden: int = 16
    dropout: float = 0.1

    def dummy_inputs(self, batch_size: int) -> dict:
        return {
            "inputs": jnp.zeros((batch_size, self.image_size, self.image_size, self.num_channels))
        }

    @nn.compact
    def __call__(self, inputs, *, train: bool = False, scale: float = 1.0):
        x = inputs.reshape(inputs.shape[0], -1)
        x = nn.gelu(nn.Dense(self.hidden)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x) * scale


@register("test_tiny_classifier", tiny=dict(hidden=8))
def test_tiny_classifier(**overrides) -> nn.Module:
    """Test-only MLP classifier."""
    return TinyClassifier(**overrides)


class TinyBatchNormClassifier(nn.Module):
    """Flatten -> BatchNorm -> Dense: the running statistics are those of the raw pixels."""

    num_classes: int = 10
    image_size: int = 8
    num_channels: int = 1

    def dummy_inputs(self, batch_size: int) -> dict:
        return {
            "inputs": jnp.zeros((batch_size, self.image_size, self.image_size, self.num_channels))
        }

    @nn.compact
    def __call__(self, inputs, *, train: bool = False):
        x = inputs.reshape(inputs.shape[0], -1)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(self.num_classes)(x)


@register("test_tiny_batch_norm_classifier", tiny={})
def test_tiny_batch_norm_classifier(**overrides) -> nn.Module:
    """Test-only classifier with a BatchNorm."""
    return TinyBatchNormClassifier(**overrides)


class TinyNanGradientClassifier(nn.Module):
    """Flatten -> Dense, plus ``0 * sqrt(w - w)``: a finite loss whose gradients are NaN.

    d sqrt(u) / du is infinite at u = 0, and the chain rule multiplies it by 0, so the
    first step's loss is finite but its update turns every parameter into NaN.
    """

    num_classes: int = 10
    image_size: int = 8
    num_channels: int = 1

    def dummy_inputs(self, batch_size: int) -> dict:
        return {
            "inputs": jnp.zeros((batch_size, self.image_size, self.image_size, self.num_channels))
        }

    @nn.compact
    def __call__(self, inputs, *, train: bool = False):
        w = self.param("w", nn.initializers.ones, ())
        x = inputs.reshape(inputs.shape[0], -1)
        return nn.Dense(self.num_classes)(x) + 0.0 * jnp.sqrt(w - w)


@register("test_nan_gradient_classifier", tiny={})
def test_nan_gradient_classifier(**overrides) -> nn.Module:
    """Test-only classifier whose loss is finite and gradients NaN."""
    return TinyNanGradientClassifier(**overrides)


def build_config(data_dir: str, **changes) -> ml_collections.ConfigDict:
    """A 6-step run of the tiny classifier on digits; ``a__b=v`` sets ``config.a.b = v``."""
    config = default_config()
    config.model.name = "test_tiny_classifier"
    config.data.name = "digits"
    config.data.data_dir = data_dir
    config.task.name = "image_classification"
    config.global_batch_size = 32
    config.num_train_steps = 6
    config.optimizer.learning_rate = 3e-3
    config.log_every_steps = 2
    config.progress_bar = False
    config.checkpoint.async_save = False
    for dotted, value in changes.items():
        parent = config
        *parents, leaf = dotted.split("__")
        for part in parents:
            parent = parent[part]
        parent[leaf] = value
    return config


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def make_config(data_dir):
    return functools.partial(build_config, data_dir)


@pytest.fixture(scope="session")
def session_make_config(data_dir):
    """make_config for session- and module-scoped fixtures."""
    return functools.partial(build_config, data_dir)


@pytest.fixture(scope="session")
def baseline_run(data_dir, tmp_path_factory):
    """One uninterrupted run on all 8 devices that several tests compare against."""
    from effformer.train import train_and_evaluate

    config = build_config(data_dir, log_every_steps=1)
    workdir = tmp_path_factory.mktemp("baseline")
    result = train_and_evaluate(config, workdir)
    return config, workdir, result
