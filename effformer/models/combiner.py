"""Combiner models: a causal LM and an encoder classifier with Combiner mixers.

Both are :class:`~effformer.models.transformer_lm.TransformerLM` presets whose
layers use the ``combiner`` mixer (:class:`effformer.mixers.CombinerAttention`),
configured by ``combiner_variant`` and ``combiner_segment_length``.

Position information must come from an absolute encoding (``learned``,
``sinusoidal``) added to the tokens: the layer stack hands RoPE / ALiBi / T5
only to softmax-attention layers, so with every layer a Combiner they would
leave the model without positions; the builders refuse them.

Paper LM configuration (Ren et al., 2021, Wiki-40B): 12 x 768, 12 heads,
sequence 2048, segment 128 (REFERENCES.md): the defaults of ``combiner_lm``
with ``combiner_segment_length=128`` (the default segment length is
ceil(sqrt(L)) of each call, and logsparse takes none).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from effformer.mixers.combiner import VARIANTS
from effformer.models.lm_layers import expand_layer_pattern
from effformer.models.registry import register
from effformer.models.transformer_lm import TransformerLM

Array = jax.Array

ABSOLUTE_ENCODINGS = ("learned", "sinusoidal", "none")

_PAPER_LM = dict(
    embed_dim=768,
    num_layers=12,
    num_heads=12,
    ffn_hidden_dim=3072,
    max_length=2048,
    position_encoding="learned",
)
_TINY = dict(
    vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, ffn_hidden_dim=64, max_length=64
)


class CombinerTransformerLM(TransformerLM):
    """A :class:`TransformerLM` whose dummy inputs fit its Combiner layers' segment length.

    The trainer initialises every model with ``dummy_inputs``; TransformerLM's
    8 tokens are too short for a segment length of 8 or more (axial and mixture
    need two rows, fixed a whole segment), although the parameters do not
    depend on the length at all.
    """

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        segment_length = self.mixer_kwargs["combiner"]["segment_length"]
        length = 8 if segment_length is None else max(8, 2 * segment_length)
        if self.position_encoding == "learned":
            length = min(length, self.max_length)  # The table holds max_length positions.
        return {"inputs": jnp.ones((batch_size, length), jnp.int32)}


def _combiner_model(
    kind: str, variant: str, segment_length: int | None, overrides: dict[str, Any]
) -> TransformerLM:
    owner = "combiner_lm" if kind == "decoder" else "combiner_encoder"
    if variant not in VARIANTS:
        raise ValueError(f"{owner}: combiner_variant must be one of {VARIANTS}, got {variant!r}.")
    kwargs = {**_PAPER_LM, "layer_pattern": "combiner", **overrides}
    specs = expand_layer_pattern(
        kwargs["layer_pattern"], kwargs["num_layers"], kwargs.get("layer_overrides")
    )
    if all(spec.kind == "combiner" for spec in specs) and (
        kwargs["position_encoding"] not in ABSOLUTE_ENCODINGS
    ):
        raise ValueError(
            f"{owner}: every layer is a Combiner layer, which sees no relative encoding; "
            f"position_encoding must be one of {ABSOLUTE_ENCODINGS}, "
            f"got {kwargs['position_encoding']!r}."
        )
    mixer_kwargs = dict(kwargs.pop("mixer_kwargs", None) or {})
    mixer_kwargs["combiner"] = {
        "num_heads": kwargs["num_heads"],
        "head_dim": kwargs.get("head_dim"),
        "use_bias": kwargs.get("use_bias", True),
        **dict(mixer_kwargs.get("combiner", {})),
        # The stack gives non-attention mixers no causal mask: the mixer must know.
        "variant": variant,
        "causal": kind == "decoder",
        "segment_length": segment_length,
    }
    return CombinerTransformerLM(kind=kind, mixer_kwargs=mixer_kwargs, **kwargs)


@register("combiner_lm", tiny=dict(combiner_segment_length=None, **_TINY))
def combiner_lm(
    combiner_variant: str = "mixture", combiner_segment_length: int | None = None, **overrides: Any
) -> TransformerLM:
    """Combiner causal LM (paper's Wiki-40B shape: 12 x 768, 12 heads; the paper's segment
    length is 128, give ``combiner_segment_length=128``; default ceil(sqrt(L)))."""
    return _combiner_model("decoder", combiner_variant, combiner_segment_length, overrides)


@register("combiner_encoder", tiny=dict(num_classes=3, combiner_segment_length=None, **_TINY))
def combiner_encoder(
    combiner_variant: str = "mixture", combiner_segment_length: int | None = None, **overrides: Any
) -> TransformerLM:
    """Combiner bidirectional encoder; a classifier with ``num_classes`` (mean pooling)."""
    return _combiner_model("encoder", combiner_variant, combiner_segment_length, overrides)
