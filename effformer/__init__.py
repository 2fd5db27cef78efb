"""effformer: efficient Transformer architectures in JAX/Flax.

Submodules are imported on first use (``effformer.models``, ``effformer.ops``,
...), so ``import effformer`` stays cheap and never imports the trainer.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("data", "kernels", "mixers", "models", "nn", "ops", "reducers", "train")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"effformer.{name}")
    raise AttributeError(f"module 'effformer' has no attribute {name!r}")
