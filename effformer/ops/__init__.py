"""effformer.ops: pure array functions, each with a plain reference beside its fast paths."""

from effformer.ops.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from effformer.ops.attention import dot_product_attention
from effformer.ops.decode_attention import decode_attention
from effformer.ops.masks import (
    AttentionMask,
    causal_mask,
    dense_mask,
    sliding_window_mask,
    soft_causal_mask,
    validate_mask,
    visibility,
)
from effformer.ops.selective_scan import selective_scan

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "AttentionMask",
    "causal_mask",
    "decode_attention",
    "dense_mask",
    "dot_product_attention",
    "selective_scan",
    "sliding_window_mask",
    "soft_causal_mask",
    "validate_mask",
    "visibility",
]
