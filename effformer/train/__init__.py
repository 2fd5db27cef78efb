"""The one trainer: ``train_and_evaluate(config, workdir)`` and ``evaluate(workdir)``."""

from effformer.train.config import default_config, load_config_file, validate_config
from effformer.train.evaluate import evaluate
from effformer.train.trainer import NonFiniteLossError, train_and_evaluate

__all__ = [
    "NonFiniteLossError",
    "default_config",
    "evaluate",
    "load_config_file",
    "train_and_evaluate",
    "validate_config",
]
