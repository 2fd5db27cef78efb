"""effformer.nn: norms, FFNs, position encodings, tokenizers, pooling, DropPath, blocks."""

from effformer.nn.block import ORDERINGS, ResidualBlock
from effformer.nn.droppath import DropPath
from effformer.nn.ffn import FFNS, MLP, GatedMLP, PrefixDense, llama_hidden_dim, make_ffn
from effformer.nn.norms import LayerNorm, RMSNorm, make_norm
from effformer.nn.pooling import ClassToken, SeqPool, mean_pool
from effformer.nn.position import (
    POSITION_ENCODINGS,
    ALiBi,
    LearnedPositionEmbedding,
    NoPositionEncoding,
    PositionEncoding,
    Rotary2DPositionEncoding,
    RotaryPositionEncoding,
    SinusoidalPositionEncoding,
    T5RelativeBias,
    alibi_slopes,
    make_position_encoding,
    sinusoidal_table,
    t5_relative_position_bucket,
)
from effformer.nn.tokenizers import ConvTokenizer, PatchEmbed

__all__ = [
    "FFNS",
    "MLP",
    "ORDERINGS",
    "POSITION_ENCODINGS",
    "ALiBi",
    "ClassToken",
    "ConvTokenizer",
    "DropPath",
    "GatedMLP",
    "LayerNorm",
    "LearnedPositionEmbedding",
    "NoPositionEncoding",
    "PatchEmbed",
    "PositionEncoding",
    "PrefixDense",
    "RMSNorm",
    "ResidualBlock",
    "Rotary2DPositionEncoding",
    "RotaryPositionEncoding",
    "SeqPool",
    "SinusoidalPositionEncoding",
    "T5RelativeBias",
    "alibi_slopes",
    "llama_hidden_dim",
    "make_ffn",
    "make_norm",
    "make_position_encoding",
    "mean_pool",
    "sinusoidal_table",
    "t5_relative_position_bucket",
]
