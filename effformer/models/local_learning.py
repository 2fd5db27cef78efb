"""Local learning of a vision Transformer: K gradient-isolated modules (Pathak et al., 2022).

"Local Learning on Transformers via Feature Reconstruction" (arXiv 2212.14215)
splits a network into K modules of consecutive blocks and trains each on its
own loss: no gradient crosses a module boundary, so a module's backward pass
needs only its own activations. Every module but the last ends in an
auxiliary classifier and a decoder; the paper's decoder reconstructs the
module's INPUT features (what the previous module produced), where InfoPro
(Wang et al., 2021, for CNNs) reconstructs the input image. The last module
ends in the network's own head and is trained by the classification loss.

:class:`LocalLearningViT` is a :class:`~effformer.models.vit.VisionTransformer`
(ViT, ViT-Lite, CVT or CCT: every field of the backbone is a field here) with
its ``num_layers`` blocks cut into ``num_modules`` equal groups; the blocks,
tokenizer, position table, final norm, pooling and head have the backbone's
parameter names, so ``num_modules=1`` is the backbone itself. Module k
(k < K - 1) adds

* ``local_head_k``: LayerNorm -> the backbone's pooling (class token, its own
  SeqPool, or mean) -> linear classifier (InfoPro's ``0c1f`` head: pool +
  linear);
* ``decoder_k`` (``reconstruction``):

  - ``"features"`` (the paper): a decoder from module k's output tokens to its
    input tokens, ``decoder = "linear"`` (one Dense), ``"mlp"`` (Dense -> GELU
    -> Dense) or ``"conv"`` (3x3 conv -> ReLU -> 3x3 conv on the token grid,
    image tokens only: a class token has no place on the grid);
  - ``"image"`` (InfoPro-Transformer): the image tokens on their grid,
    resized bilinearly to the image size, 3x3 conv (``decoder_hidden``
    channels, InfoPro's 12) -> ReLU -> 3x3 conv to the image's channels;
  - ``"none"``: no decoder (the auxiliary classifiers alone: greedy
    supervised local learning).

The reconstruction target is stopped (``stop_gradient``): module k's input
tokens (for module 0, the tokens entering the first block: tokenizer, class
token, position table, dropout), or the model's input image. The error is the
mean squared error per example (InfoPro's image decoder ends in a sigmoid and
a binary cross-entropy against [0, 1] pixels; features are unbounded, and
these images are normalised, so both kinds use the MSE here).

Calling the model returns ``{"logits": [K, B, classes], "reconstruction":
[K, B]}``: every module's logits (the last row is the network's prediction)
and each example's reconstruction error (0 in the last row and with
``reconstruction="none"``). The input of module k + 1 is the stopped output
of module k. The task ``local_learning`` (:mod:`effformer.train.local_learning`)
sums the local losses. ``local_module=k`` (with ``features``, module k's
input tokens, for k > 0) runs module k alone and adds its output tokens under
``"features"``; the sequential gradient step of that file uses it.

Differences from the paper, whose method section was not available here
beyond its abstract: the decoders above are this library's choices (the
paper compares three decoder structures on Swin-Tiny), the backbone is the
ViT family rather than Swin, and module 0's feature target is its embedded
tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.models.registry import create, register
from effformer.models.vit import VisionTransformer, truncated_normal_002
from effformer.nn.norms import LayerNorm
from effformer.nn.pooling import ClassToken, SeqPool, mean_pool

Array = jax.Array
Dtype = Any

RECONSTRUCTIONS = ("features", "image", "none")
DECODERS = ("linear", "mlp", "conv")
INFOPRO_DECODER_WIDTH = 12  # InfoPro's image decoder: Conv(12 * widen) -> ReLU -> Conv(3).


def module_boundaries(num_layers: int, num_modules: int) -> tuple[tuple[int, int], ...]:
    """The ``(start, stop)`` block range of each of ``num_modules`` equal local modules."""
    if isinstance(num_modules, bool) or not isinstance(num_modules, int) or num_modules < 1:
        raise ValueError(f"num_modules must be an int >= 1, got {num_modules!r}.")
    if num_layers % num_modules:
        raise ValueError(
            f"num_modules must divide num_layers={num_layers} (equal modules of consecutive "
            f"blocks), got num_modules={num_modules}."
        )
    size = num_layers // num_modules
    return tuple((k * size, (k + 1) * size) for k in range(num_modules))


def reconstruction_error(prediction: Array, target: Array) -> Array:
    """Mean squared error per example: [B, ...] and [B, ...] -> [B] (float32)."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"reconstruction_error: prediction and target must have one shape, got "
            f"{tuple(prediction.shape)} and {tuple(target.shape)}."
        )
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)


def _grid(tokens: Array, grid: tuple[int, int]) -> Array:
    """Image tokens [B, rows * cols, D] -> [B, rows, cols, D] (row-major, as the tokenizers)."""
    return tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1])


class LocalHead(nn.Module):
    """Auxiliary classifier: tokens [B, N, D] -> LayerNorm -> pooling -> logits [B, classes]."""

    num_classes: int
    pooling: str
    norm_epsilon: float = 1e-6
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = LayerNorm(self.norm_epsilon, dtype=self.dtype, name="norm")(x)
        if self.pooling == "class_token":
            pooled = x[:, 0]
        elif self.pooling == "seq_pool":
            pooled = SeqPool(dtype=self.dtype, name="seq_pool")(x)
        else:
            pooled = mean_pool(x)
        return nn.Dense(
            self.num_classes, kernel_init=truncated_normal_002, dtype=self.dtype, name="classifier"
        )(pooled)


class FeatureDecoder(nn.Module):
    """Module output tokens [B, N, D] -> reconstructed input tokens.

    ``kind``: ``"linear"`` and ``"mlp"`` map every token, [B, N, D] -> [B, N, D];
    ``"conv"`` maps the image tokens on their ``grid``, [B, N, D] -> [B, rows * cols, D]
    (the first ``num_prefix_tokens`` tokens are left out).
    """

    kind: str
    hidden: int
    grid: tuple[int, int]
    num_prefix_tokens: int = 0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        width = x.shape[-1]
        if self.kind == "linear":
            return nn.Dense(width, dtype=self.dtype, name="out")(x)
        if self.kind == "mlp":
            x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
            return nn.Dense(width, dtype=self.dtype, name="out")(x)
        x = _grid(x[:, self.num_prefix_tokens :], self.grid)
        x = nn.relu(nn.Conv(self.hidden, (3, 3), padding=1, dtype=self.dtype, name="hidden")(x))
        x = nn.Conv(width, (3, 3), padding=1, dtype=self.dtype, name="out")(x)
        return x.reshape(x.shape[0], -1, width)


class ImageDecoder(nn.Module):
    """InfoPro's decoder on a token grid: [B, N, D] -> image [B, image_size, image_size, channels].

    The image tokens are resized bilinearly to the image (InfoPro: ``F.interpolate(...,
    mode='bilinear', align_corners=True)``; here half-pixel centres), then 3x3 conv
    (``hidden`` channels) -> ReLU -> 3x3 conv. No BatchNorm (InfoPro has one after the
    first conv) and no sigmoid (the targets are normalised images, scored by MSE).
    """

    image_size: int
    num_channels: int
    hidden: int
    grid: tuple[int, int]
    num_prefix_tokens: int = 0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = _grid(x[:, self.num_prefix_tokens :], self.grid)
        shape = (x.shape[0], self.image_size, self.image_size, x.shape[-1])
        x = jax.image.resize(x, shape, method="bilinear", antialias=False)
        x = nn.relu(nn.Conv(self.hidden, (3, 3), padding=1, dtype=self.dtype, name="hidden")(x))
        return nn.Conv(self.num_channels, (3, 3), padding=1, dtype=self.dtype, name="out")(x)


class LocalLearningViT(VisionTransformer):
    """A vision Transformer trained as ``num_modules`` local modules (module docstring).

    Attributes (besides every :class:`VisionTransformer` field):
      num_modules: K, a divisor of ``num_layers``; module k holds blocks
        ``[k * L / K, (k + 1) * L / K)``. 1: the backbone itself.
      reconstruction: ``"features"`` (the paper), ``"image"`` (InfoPro) or ``"none"``.
      decoder: the feature decoder, ``"linear"``, ``"mlp"`` or ``"conv"`` (the image
        decoder is always InfoPro's convolutional one).
      decoder_hidden: hidden width of the decoder; None: ``embed_dim`` for the
        feature decoders, 12 (InfoPro's) for the image decoder.

    Token merging, pruning, IA-RED² and MatFormer granularities are not supported.
    """

    num_modules: int = 2
    reconstruction: str = "features"
    decoder: str = "mlp"
    decoder_hidden: int | None = None

    def check_config(self) -> None:
        super().check_config()
        name = type(self).__name__
        try:
            module_boundaries(self.num_layers, self.num_modules)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(
                f"{name}: reconstruction must be one of {RECONSTRUCTIONS}, got "
                f"{self.reconstruction!r}."
            )
        if self.decoder not in DECODERS:
            raise ValueError(f"{name}: decoder must be one of {DECODERS}, got {self.decoder!r}.")
        hidden = self.decoder_hidden
        if hidden is not None and (
            isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1
        ):
            raise ValueError(f"{name}: decoder_hidden must be None or an int >= 1, got {hidden!r}.")
        reducers = {
            "tome_r": self.tome_r,
            "zero_tprune_importance": self.zero_tprune_importance,
            "zero_tprune_similarity": self.zero_tprune_similarity,
            "ia_red_stages": self.ia_red_stages,
        }
        active = {field: value for field, value in reducers.items() if value not in (0, ())}
        if active:
            raise ValueError(
                f"{name}: local learning runs the plain encoder; token merging, pruning and "
                f"IA-RED² must be off, got {active}."
            )

    @property
    def boundaries(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` blocks of every local module."""
        return module_boundaries(self.num_layers, self.num_modules)

    def module_param_names(self, k: int) -> tuple[str, ...]:
        """Top-level ``params`` entries that module ``k`` owns (trained by its loss alone)."""
        self._check_module_index(k)
        start, stop = self.boundaries[k]
        names = [f"block_{i}" for i in range(start, stop)]
        if k == 0:
            embedding = ["tokenizer"]
            if self.pooling == "class_token":
                embedding.append("class_token")
            if self.position_embedding == "learned":
                embedding.append("position_embedding")
            names = embedding + names
        if k == self.num_modules - 1:
            names += (
                ["final_norm", "seq_pool", "head"]
                if self.pooling == "seq_pool"
                else [
                    "final_norm",
                    "head",
                ]
            )
        else:
            names.append(f"local_head_{k}")
            if self.reconstruction != "none":
                names.append(f"decoder_{k}")
        return tuple(names)

    def _check_module_index(self, k: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_modules:
            raise ValueError(
                f"{type(self).__name__}: local_module must be an int in [0, {self.num_modules}) "
                f"(num_modules={self.num_modules}), got {k!r}."
            )

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        *,
        train: bool = False,
        drop_path_rate: float | Array | None = None,
        local_module: int | None = None,
        features: Array | None = None,
    ) -> dict[str, Array]:
        """inputs [B, H, W, C] -> ``{"logits": [K, B, classes], "reconstruction": [K, B]}``.

        ``drop_path_rate`` (a trainer schedule) replaces the attribute as the last
        block's stochastic-depth rate. ``local_module=k`` runs module k alone on
        ``features`` ([B, N, D], module k's input tokens; None for k = 0, which starts
        from ``inputs``) and returns ``{"logits": [B, classes], "reconstruction": [B],
        "features": [B, N, D]}``, its output tokens (not stopped).
        """
        self.check_config()
        self._check_inputs(inputs)
        deterministic = not train
        max_rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        if local_module is not None:
            self._check_module_index(local_module)
            if local_module == 0:
                if features is not None:
                    raise ValueError(
                        f"{type(self).__name__}: module 0 starts from inputs; features must be "
                        f"None, got shape {tuple(features.shape)}."
                    )
                x = self._embed(inputs, deterministic)
            else:
                expected = (inputs.shape[0], self.sequence_length, self.embed_dim)
                if features is None or tuple(features.shape) != expected:
                    got = None if features is None else tuple(features.shape)
                    raise ValueError(
                        f"{type(self).__name__}: local_module={local_module} needs features "
                        f"[B, N, D] = {expected} (module {local_module}'s input tokens), got {got}."
                    )
                x = jax.lax.stop_gradient(features)
            h, logits, error = self._module(
                local_module, x, inputs, deterministic=deterministic, max_rate=max_rate
            )
            return {"logits": logits, "reconstruction": error, "features": h}

        x = self._embed(inputs, deterministic)
        all_logits, all_errors = [], []
        for k in range(self.num_modules):
            h, logits, error = self._module(
                k, x, inputs, deterministic=deterministic, max_rate=max_rate
            )
            all_logits.append(logits)
            all_errors.append(error)
            # No gradient crosses a module boundary: the next module's input is a constant.
            x = jax.lax.stop_gradient(h)
        return {"logits": jnp.stack(all_logits), "reconstruction": jnp.stack(all_errors)}

    def _embed(self, inputs: Array, deterministic: bool) -> Array:
        """Image -> the tokens entering block 0 (as VisionTransformer, same parameter names)."""
        x = self._tokenize(inputs)
        if self.pooling == "class_token":
            x = ClassToken(name="class_token")(x)
        x = self._embed_positions(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)

    def _module(
        self,
        k: int,
        x: Array,
        inputs: Array,
        *,
        deterministic: bool,
        max_rate: float | Array,
    ) -> tuple[Array, Array, Array]:
        """Module k on its input tokens x: (output tokens, logits [B, classes], error [B])."""
        target = jax.lax.stop_gradient(x)
        start, stop = self.boundaries[k]
        h = x
        for i in range(start, stop):
            # torch.linspace(0, rate, L) over the whole network, as in VisionTransformer.
            fraction = i / (self.num_layers - 1) if self.num_layers > 1 else 0.0
            h = self._block(i)(h, deterministic=deterministic, drop_path_rate=max_rate * fraction)
        batch = inputs.shape[0]
        if k == self.num_modules - 1:
            return h, self._final_head(h), jnp.zeros((batch,), jnp.float32)
        logits = LocalHead(
            self.num_classes,
            self.pooling,
            norm_epsilon=self.norm_epsilon,
            dtype=self.dtype,
            name=f"local_head_{k}",
        )(h)
        if self.reconstruction == "none":
            return h, logits, jnp.zeros((batch,), jnp.float32)
        prefix = self.num_prefix_tokens
        if self.reconstruction == "image":
            decoded = ImageDecoder(
                self.image_size,
                self.num_channels,
                self.decoder_hidden or INFOPRO_DECODER_WIDTH,
                self.token_grid,
                prefix,
                dtype=self.dtype,
                name=f"decoder_{k}",
            )(h)
            return h, logits, reconstruction_error(decoded, jax.lax.stop_gradient(inputs))
        decoded = FeatureDecoder(
            self.decoder,
            self.decoder_hidden or self.embed_dim,
            self.token_grid,
            prefix,
            dtype=self.dtype,
            name=f"decoder_{k}",
        )(h)
        if self.decoder == "conv":
            target = target[:, prefix:]
        return h, logits, reconstruction_error(decoded, target)

    def _final_head(self, h: Array) -> Array:
        """The backbone's final LayerNorm, pooling and head (its parameter names)."""
        x = LayerNorm(self.norm_epsilon, dtype=self.dtype, name="final_norm")(h)
        if self.pooling == "class_token":
            pooled = x[:, 0]
        elif self.pooling == "seq_pool":
            pooled = SeqPool(dtype=self.dtype, name="seq_pool")(x)
        else:
            pooled = mean_pool(x)
        return nn.Dense(
            self.num_classes, kernel_init=truncated_normal_002, dtype=self.dtype, name="head"
        )(pooled)


def local_learning_model(backbone: VisionTransformer, **fields: Any) -> LocalLearningViT:
    """``backbone`` (a VisionTransformer) as a :class:`LocalLearningViT` with ``fields`` set."""
    if not isinstance(backbone, VisionTransformer):
        raise ValueError(
            f"local_learning_model: backbone must be a VisionTransformer (the ViT family), got "
            f"{type(backbone).__name__}."
        )
    kwargs = {
        field.name: getattr(backbone, field.name)
        for field in dataclasses.fields(backbone)
        if field.init and field.name not in ("parent", "name")
    }
    return LocalLearningViT(**{**kwargs, **fields})


@register(
    "local_learning_vit",
    tiny=dict(
        backbone="cct_2_3x2",
        num_layers=2,
        embed_dim=16,
        num_heads=2,
        mlp_ratio=1.0,
        conv_planes=8,
        image_size=8,
        num_channels=1,
    ),
)
def local_learning_vit(
    backbone: str = "cct_2_3x2",
    num_modules: int = 2,
    reconstruction: str = "features",
    decoder: str = "mlp",
    decoder_hidden: int | None = None,
    **overrides: Any,
) -> LocalLearningViT:
    """A registered ViT-family ``backbone`` (with ``overrides``) trained as local modules."""
    return local_learning_model(
        create(backbone, **overrides),
        num_modules=num_modules,
        reconstruction=reconstruction,
        decoder=decoder,
        decoder_hidden=decoder_hidden,
    )
