"""Initializers that mean what the papers' PyTorch code means.

PyTorch's and timm's ``trunc_normal_(w, std=s)`` (the default ``a=-2, b=2``)
cut the normal at +-2 *in value*: for ``s = 0.02`` that is +-100 standard
deviations, so the weights have std ``s``. Flax's
``nn.initializers.truncated_normal(stddev=s)`` cuts at +-2 *standard
deviations* and does not rescale, which gives std ``0.88 * s``.
:func:`trunc_normal` is the former, for the modules ported from PyTorch code
(ViT/CCT/iLLaMA/TinyViT heads and attention, ToMe, IA-RED, EcoFormer, LMU).
Modules ported from TensorFlow keep flax's (Keras's ``TruncatedNormal`` cuts
at +-2 standard deviations too).
"""

from __future__ import annotations

import numbers

import jax

Initializer = jax.nn.initializers.Initializer


def trunc_normal(std: float) -> Initializer:
    """PyTorch's ``trunc_normal_(std=std)``: N(0, std^2) cut at +-2 in value (std exactly ``std``
    for ``std`` well below 1).

    Raises ValueError for a ``std`` that is not a positive number.
    """
    if isinstance(std, bool) or not isinstance(std, numbers.Real) or not std > 0:
        raise ValueError(f"trunc_normal: std must be a positive number, got {std!r}.")
    bound = 2.0 / float(std)  # flax's bounds are in units of the std
    return jax.nn.initializers.truncated_normal(stddev=float(std), lower=-bound, upper=bound)
