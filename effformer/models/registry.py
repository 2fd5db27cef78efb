"""Models by name.

Each named variant is a small function returning one configurable linen
module, registered with a decorator::

    @register("cct_7_3x1", tiny=dict(num_layers=1, embed_dim=16, num_heads=2))
    def cct_7_3x1(**overrides) -> nn.Module: ...

``create(name, **overrides)`` builds it; ``create(name, tiny=True)`` builds its
test-sized preset (the ``tiny`` overrides, then the caller's). Every module in
``effformer/models`` is imported on the first lookup, so adding a paper means
adding a file there and nothing else.

Every registered module provides ``dummy_inputs(batch_size) -> dict`` giving
the keyword arguments of its ``__call__`` (used for ``init`` and in tests).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

ModelBuilder = Callable[..., nn.Module]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: ModelBuilder
    tiny: Mapping[str, Any]
    description: str


_REGISTRY: dict[str, ModelSpec] = {}
_MODULES_IMPORTED = False


def register(name: str, *, tiny: Mapping[str, Any]) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register ``builder`` under ``name`` with its test-sized ``tiny`` overrides."""

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise ValueError(
                f"A model named {name!r} is already registered by {_REGISTRY[name].builder}."
            )
        doc = (builder.__doc__ or "").strip()
        _REGISTRY[name] = ModelSpec(name, builder, dict(tiny), doc.splitlines()[0] if doc else "")
        return builder

    return decorator


def _import_model_modules() -> None:
    global _MODULES_IMPORTED
    if _MODULES_IMPORTED:
        return
    package = importlib.import_module("effformer.models")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "registry" and not info.name.startswith("_"):
            importlib.import_module(f"effformer.models.{info.name}")
    _MODULES_IMPORTED = True


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching a glob ``pattern``."""
    _import_model_modules()
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def get_spec(name: str) -> ModelSpec:
    _import_model_modules()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise KeyError(
            f"Unknown model name {name!r}.{hint} See effformer.models.list_models() for all "
            f"{len(_REGISTRY)} names."
        )
    return _REGISTRY[name]


def create(name: str, *, tiny: bool = False, **overrides: Any) -> nn.Module:
    """Build the registered model ``name``; ``tiny=True`` applies its test preset first."""
    spec = get_spec(name)
    kwargs = {**spec.tiny, **overrides} if tiny else dict(overrides)
    try:
        return spec.builder(**kwargs)
    except TypeError as error:
        raise TypeError(f"create({name!r}): bad override in {sorted(kwargs)}: {error}") from error
