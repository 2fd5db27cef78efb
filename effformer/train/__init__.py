"""The one trainer: ``train_and_evaluate(config, workdir)``, ``evaluate(workdir)``, ``restore(workdir)``."""

from effformer.train.config import default_config, load_config_file, validate_config
from effformer.train.evaluate import RestoredRun, evaluate, restore
from effformer.train.trainer import NonFiniteLossError, train_and_evaluate

__all__ = [
    "NonFiniteLossError",
    "RestoredRun",
    "default_config",
    "evaluate",
    "load_config_file",
    "restore",
    "train_and_evaluate",
    "validate_config",
]
