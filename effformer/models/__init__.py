"""Architectures and the registry of named variants."""

from effformer.models.registry import ModelSpec, create, get_spec, list_models, register

__all__ = ["ModelSpec", "create", "get_spec", "list_models", "register"]
