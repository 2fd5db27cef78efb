"""Pallas kernels, each reached only through its op in :mod:`effformer.ops`."""
