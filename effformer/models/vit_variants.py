"""Named variants of :class:`~effformer.models.vit.VisionTransformer`.

CCT, CVT and ViT-Lite follow SHI-Labs/Compact-Transformers (``src/cct.py``,
``src/cvt.py``, ``src/vit.py``): ``cct_L_KxN`` has L encoder layers and N
blocks of KxK convolutions in its tokenizer; ``cvt_L_P`` / ``vit_lite_L_P``
use PxP patches. Widths: L = 2, 4 -> dim 128, 2 heads, MLP ratio 1; L = 6, 7
-> 256, 4 heads, ratio 2; L = 14 -> 384, 6 heads, ratio 3. All of them:
attention dropout 0.1, stochastic depth 0.1, no other dropout, learned
position table initialised with std 0.2, LayerNorm epsilon 1e-5, no q/k/v
bias, the CCT layer ordering; CVT's and ViT-Lite's patch projection
initialised as the original's ``Tokenizer`` (``patch_init="kaiming_normal"``).
Defaults (image size, classes) are the original's; ``create(name,
num_classes=..., image_size=...)`` builds any other.
``position_embedding="sinusoidal"`` gives the original's ``*_sine`` variants
(a fixed table, no parameters: fewer parameters than the learned ones by
the table's size).

ViT-Tiny/Small/Base are the standard ViT (timm / big_vision): pre-norm,
q/k/v biases, class token, learned position table (std 0.02), final
LayerNorm, epsilon 1e-6, ``patch_size`` any divisor of ``image_size``.

Parameter counts stated below are at each variant's defaults and equal the
original implementation's ``sum(p.numel() for p in model.parameters())``
(timm's for ViT); tests/models/test_vit.py derives them from the
architecture.
"""

from __future__ import annotations

from typing import Any

from effformer.models.registry import register
from effformer.models.vit import VisionTransformer

_CCT_WIDTHS = {
    2: dict(embed_dim=128, num_heads=2, mlp_ratio=1.0),
    4: dict(embed_dim=128, num_heads=2, mlp_ratio=1.0),
    6: dict(embed_dim=256, num_heads=4, mlp_ratio=2.0),
    7: dict(embed_dim=256, num_heads=4, mlp_ratio=2.0),
    14: dict(embed_dim=384, num_heads=6, mlp_ratio=3.0),
}

# Compact-Transformers' TransformerClassifier as CCT / CVT / ViT-Lite build it.
_COMPACT_COMMON = dict(
    block_ordering="cct",
    qkv_bias=False,
    norm_epsilon=1e-5,
    position_embedding="learned",
    position_init_std=0.2,
    dropout_rate=0.0,
    attention_dropout_rate=0.1,
    drop_path_rate=0.1,
)

# CVT and ViT-Lite: the patch conv is Compact-Transformers' Tokenizer (kaiming-normal weight).
_COMPACT_PATCHES = dict(image_size=32, num_classes=10, patch_init="kaiming_normal")

_CCT_TINY = dict(num_layers=1, embed_dim=16, num_heads=2, mlp_ratio=1.0, conv_planes=8)
_PATCH_TINY = dict(num_layers=1, embed_dim=16, num_heads=2, mlp_ratio=1.0)


def _compact(num_layers: int, overrides: dict[str, Any], **family: Any) -> VisionTransformer:
    kwargs = {**_COMPACT_COMMON, "num_layers": num_layers, **_CCT_WIDTHS[num_layers], **family}
    return VisionTransformer(**{**kwargs, **overrides})


def _cct(num_layers: int, kernel: int, conv_layers: int, image_size: int, classes: int, overrides):
    family = dict(
        tokenizer="conv",
        conv_kernel_size=kernel,
        conv_layers=conv_layers,
        pooling="seq_pool",
        image_size=image_size,
        num_classes=classes,
    )
    return _compact(num_layers, overrides, **family)


@register("cct_2_3x2", tiny=_CCT_TINY)
def cct_2_3x2(**overrides: Any) -> VisionTransformer:
    """CCT-2/3x2, 32x32x3, 10 classes: 283,723 parameters (64 tokens)."""
    return _cct(2, 3, 2, 32, 10, overrides)


@register("cct_4_3x2", tiny=_CCT_TINY)
def cct_4_3x2(**overrides: Any) -> VisionTransformer:
    """CCT-4/3x2, 32x32x3, 10 classes: 482,123 parameters (64 tokens)."""
    return _cct(4, 3, 2, 32, 10, overrides)


@register("cct_6_3x1", tiny=_CCT_TINY)
def cct_6_3x1(**overrides: Any) -> VisionTransformer:
    """CCT-6/3x1, 32x32x3, 10 classes: 3,233,803 parameters (256 tokens)."""
    return _cct(6, 3, 1, 32, 10, overrides)


@register("cct_6_3x2", tiny=_CCT_TINY)
def cct_6_3x2(**overrides: Any) -> VisionTransformer:
    """CCT-6/3x2, 32x32x3, 10 classes: 3,326,923 parameters (64 tokens)."""
    return _cct(6, 3, 2, 32, 10, overrides)


@register("cct_7_3x1", tiny=_CCT_TINY)
def cct_7_3x1(**overrides: Any) -> VisionTransformer:
    """CCT-7/3x1, 32x32x3, 10 classes: 3,760,139 parameters (256 tokens); 100 classes: 3,783,269."""
    return _cct(7, 3, 1, 32, 10, overrides)


@register("cct_7_3x2", tiny=_CCT_TINY)
def cct_7_3x2(**overrides: Any) -> VisionTransformer:
    """CCT-7/3x2, 32x32x3, 10 classes: 3,853,259 parameters (64 tokens)."""
    return _cct(7, 3, 2, 32, 10, overrides)


@register("cct_7_7x2", tiny={**_CCT_TINY, "image_size": 32})
def cct_7_7x2(**overrides: Any) -> VisionTransformer:
    """CCT-7/7x2, 224x224x3, 102 classes (Flowers-102): 4,573,735 parameters (196 tokens)."""
    return _cct(7, 7, 2, 224, 102, overrides)


@register("cct_14_7x2", tiny={**_CCT_TINY, "image_size": 32})
def cct_14_7x2(**overrides: Any) -> VisionTransformer:
    """CCT-14/7x2, 224x224x3, 1000 classes (ImageNet): 22,367,273 parameters (196 tokens);
    at 384x384 (576 tokens): 22,513,193."""
    return _cct(14, 7, 2, 224, 1000, overrides)


@register("cvt_7_4", tiny=_PATCH_TINY)
def cvt_7_4(**overrides: Any) -> VisionTransformer:
    """CVT-7/4, 32x32x3, 10 classes: 3,716,619 parameters (64 tokens, SeqPool)."""
    family = dict(tokenizer="patch", patch_size=4, pooling="seq_pool", **_COMPACT_PATCHES)
    return _compact(7, overrides, **family)


@register("vit_lite_7_4", tiny=_PATCH_TINY)
def vit_lite_7_4(**overrides: Any) -> VisionTransformer:
    """ViT-Lite-7/4, 32x32x3, 10 classes: 3,716,874 parameters (64 tokens + class token)."""
    family = dict(tokenizer="patch", patch_size=4, pooling="class_token", **_COMPACT_PATCHES)
    return _compact(7, overrides, **family)


_VIT_COMMON = dict(
    tokenizer="patch",
    pooling="class_token",
    block_ordering="pre_norm",
    qkv_bias=True,
    norm_epsilon=1e-6,
    position_embedding="learned",
    position_init_std=0.02,
    num_layers=12,
    mlp_ratio=4.0,
    image_size=224,
    num_classes=1000,
    patch_size=16,
)
_VIT_TINY = dict(
    num_layers=1, embed_dim=16, num_heads=2, mlp_ratio=1.0, image_size=32, patch_size=8
)


def _vit(embed_dim: int, num_heads: int, overrides: dict[str, Any]) -> VisionTransformer:
    kwargs = {**_VIT_COMMON, "embed_dim": embed_dim, "num_heads": num_heads}
    return VisionTransformer(**{**kwargs, **overrides})


@register("vit_tiny", tiny=_VIT_TINY)
def vit_tiny(**overrides: Any) -> VisionTransformer:
    """ViT-Ti (dim 192, 12 layers, 3 heads), patch 16 at 224x224x3, 1000 classes: 5,717,416
    parameters; patch 1 on 8x8x1, 10 classes: 5,353,738."""
    return _vit(192, 3, overrides)


@register("vit_small", tiny=_VIT_TINY)
def vit_small(**overrides: Any) -> VisionTransformer:
    """ViT-S (dim 384, 12 layers, 6 heads), patch 16 at 224x224x3, 1000 classes: 22,050,664
    parameters."""
    return _vit(384, 6, overrides)


@register("vit_base", tiny=_VIT_TINY)
def vit_base(**overrides: Any) -> VisionTransformer:
    """ViT-B (dim 768, 12 layers, 12 heads), patch 16 at 224x224x3, 1000 classes: 86,567,656
    parameters."""
    return _vit(768, 12, overrides)


@register("vit_digits", tiny=dict(num_layers=1, embed_dim=16, num_heads=2, mlp_ratio=1.0))
def vit_digits(**overrides: Any) -> VisionTransformer:
    """A small pre-norm ViT for the 8x8x1 digits demo: patch 2 (16 tokens + class token),
    dim 64, 4 layers, 4 heads, MLP ratio 2: 136,138 parameters."""
    kwargs = {
        **_VIT_COMMON,
        "image_size": 8,
        "num_channels": 1,
        "num_classes": 10,
        "patch_size": 2,
        "embed_dim": 64,
        "num_layers": 4,
        "num_heads": 4,
        "mlp_ratio": 2.0,
    }
    return VisionTransformer(**{**kwargs, **overrides})
