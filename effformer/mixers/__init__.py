"""effformer.mixers: token mixers, all with the signature of ``MultiHeadAttention``.

``make_mixer(name, **kwargs)`` builds one by name; a new mixer family adds
itself to ``MIXERS``.
"""

from typing import Any

import flax.linen as nn

from effformer.mixers.attention import CrossAttention, MultiHeadAttention
from effformer.mixers.combiner import CombinerAttention
from effformer.mixers.ecoformer import EcoFormerAttention
from effformer.mixers.lmu import LMUMixer
from effformer.mixers.mamba import MambaMixer

MIXERS: dict[str, type[nn.Module]] = {
    "attention": MultiHeadAttention,
    "mamba": MambaMixer,
    "combiner": CombinerAttention,
    "lmu": LMUMixer,
    "ecoformer": EcoFormerAttention,
}


def make_mixer(name: str, /, **kwargs: Any) -> nn.Module:
    """Build a token mixer by name (see ``MIXERS``); kwargs go to its class."""
    if name not in MIXERS:
        raise ValueError(f"make_mixer: unknown name {name!r}; expected one of {sorted(MIXERS)}.")
    return MIXERS[name](**kwargs)


__all__ = [
    "MIXERS",
    "CombinerAttention",
    "CrossAttention",
    "EcoFormerAttention",
    "LMUMixer",
    "MambaMixer",
    "MultiHeadAttention",
    "make_mixer",
]
