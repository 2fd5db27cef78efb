"""FIT: far-reaching interleaved Transformers (Chen and Li, 2023), encoder and decoder.

The input is cut into ``T`` groups of ``n`` tokens (``[B, T, n, D]``); every
group owns ``m`` latent tokens (``[B, T, m, Dl]``). A **layer plan** string
such as ``"(2)4(2)"`` lists the blocks: each ``(k)`` is ``k`` *local*
Transformer layers, run on every group separately (batch ``B*T``, length
``n``), optionally followed by ``g`` *global* layers. A block with global
layers does, in order (google-research/pix2seq ``architectures/transformers.py``):

1. local layers on the tokens of every group;
2. READ: ``latents += CrossAttention(latents -> their own group's tokens)``;
3. global layers on all latents together (length ``T*m``);
4. WRITE: ``tokens += CrossAttention(tokens -> their own group's latents)``,
   except after the last block (nothing would read the tokens' update).

So a local layer costs ``O(n^2)`` per group (``O(L n)`` for all ``T = L/n``
groups) and a global layer ``O((T m)^2) = O((L m / n)^2)``: the sum is least
at ``n ~ (L m^2)^(1/3)``, i.e. ``n ~ L^(1/3)`` and ``T ~ L^(2/3)`` for a fixed
``m``, where both terms, and the whole, cost ``O(L^(4/3))``. Latents start from a learned table ``[T, m, Dl]`` (a
per-group, per-slot embedding); the token position table ``[n, D]`` is shared
by every group (the group identity reaches the tokens through the latents).

**Decoder** (:class:`FITLM`): local layers are causal inside a group; global
layers are chunk-causal (a latent sees the latents of its own and earlier
groups); before the WRITE the latents are shifted right by one group, so
group ``t`` reads the summary of groups ``< t`` and group 0 reads zeros.
Position ``i``'s output therefore depends on tokens ``<= i`` only.

Layers are pre-norm (LayerNorm; attention then a GELU MLP); READ and WRITE
are cross-attention layers with their own MLP, the query and the context each
normalised. ``remat=True`` rematerialises every layer in the backward pass
(activation memory of one layer instead of all).

Lengths: an LM sequence whose length is not a multiple of ``group_size`` is
padded on the right inside the model and the padding's outputs dropped; this
is exact because the decoder is causal. An image's patch grid must be cut
exactly into ``group_size x group_size`` sub-grids (else a ValueError).

Intermediates (``mutable=["intermediates"]``) record, per block ``i``,
``block_{i}_tokens`` (the tokens after its local layers) and, in the decoder,
``block_{i}_write_latents`` (the shifted latents the WRITE reads).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.mixers.attention import CrossAttention, MultiHeadAttention
from effformer.models.lm_layers import LMLayer
from effformer.models.registry import register
from effformer.nn.ffn import make_ffn
from effformer.nn.norms import make_norm
from effformer.nn.position import LearnedPositionEmbedding
from effformer.nn.tokenizers import PatchEmbed
from effformer.ops.masks import AttentionMask

Array = jax.Array
Dtype = Any

_BLOCK = re.compile(r"\((\d+)\)(\d*)")
MASK_KINDS = ("none", "causal", "chunk_causal")


@dataclasses.dataclass(frozen=True)
class FITBlock:
    """One block of a layer plan: ``num_local`` local layers, then ``num_global`` global ones."""

    num_local: int
    num_global: int

    @property
    def has_global(self) -> bool:
        return self.num_global > 0


def parse_layer_plan(plan: str) -> tuple[FITBlock, ...]:
    """``"(2)4(2)"`` -> ``(FITBlock(2, 4), FITBlock(2, 0))``.

    Grammar: one or more ``(k)g`` with ``k`` local and ``g`` global layers
    (``g`` may be omitted, meaning 0). Every block needs at least one layer,
    and the last block has no global layers: no WRITE follows the last block,
    so its global layers could never reach a token.
    """
    if not isinstance(plan, str):
        raise ValueError(f"layer_plan must be a string like '(2)4(2)', got {plan!r}.")
    text = plan.replace(" ", "")
    position, blocks = 0, []
    while position < len(text):
        match = _BLOCK.match(text, position)
        if match is None:
            raise ValueError(
                f"layer_plan {plan!r}: malformed at character {position} ({text[position:]!r}); "
                "expected blocks '(k)g': k local layers in parentheses, then g global layers, "
                "e.g. '(2)4(2)'."
            )
        blocks.append(FITBlock(int(match.group(1)), int(match.group(2) or 0)))
        position = match.end()
    if not blocks:
        raise ValueError(f"layer_plan must hold at least one block '(k)g', got {plan!r}.")
    for index, block in enumerate(blocks):
        if block.num_local + block.num_global == 0:
            raise ValueError(f"layer_plan {plan!r}: block {index} has no layers, got '(0)'.")
    if blocks[-1].has_global:
        raise ValueError(
            f"layer_plan {plan!r}: the last block has {blocks[-1].num_global} global layers, but "
            "no WRITE follows the last block, so they would reach no token; end the plan with a "
            "local-only block such as '(2)'."
        )
    return tuple(blocks)


class FITLayer(nn.Module):
    """A pre-norm Transformer layer over ``[B', L, D]`` with a mask fixed by ``mask_kind``.

    ``"none"``: bidirectional; ``"causal"``: causal over the L positions;
    ``"chunk_causal"``: the L positions are consecutive chunks of
    ``chunk_size`` and a query sees the keys of its own and earlier chunks
    (the decoder's global layers over ``T*m`` latents). Every option is a
    module field so that ``nn.remat`` sees a call on arrays only.
    """

    num_heads: int
    ffn_hidden_dim: int
    mask_kind: str = "none"
    chunk_size: int = 1
    norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    attention_implementation: str | None = None
    deterministic: bool = True
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B', L, D] -> [B', L, D]."""
        if self.mask_kind not in MASK_KINDS:
            raise ValueError(
                f"FITLayer: mask_kind must be one of {MASK_KINDS}, got {self.mask_kind!r}."
            )
        batch, length, _ = x.shape
        mask = None
        if self.mask_kind == "causal":
            mask = AttentionMask(causal=True)
        elif self.mask_kind == "chunk_causal":
            # Equal positions see each other under causal=True, so one position per chunk
            # makes the mask block lower-triangular.
            chunk = jnp.arange(length, dtype=jnp.int32) // self.chunk_size
            chunk = jnp.broadcast_to(chunk, (batch, length))
            mask = AttentionMask(causal=True, q_positions=chunk, kv_positions=chunk)
        layer = LMLayer(
            mixer=MultiHeadAttention(
                num_heads=self.num_heads,
                attention_dropout_rate=self.attention_dropout_rate,
                implementation=self.attention_implementation,
                dtype=self.dtype,
                name="attention",
            ),
            ffn=make_ffn(
                "gelu",
                self.ffn_hidden_dim,
                dropout_rate=self.dropout_rate,
                dtype=self.dtype,
                name="ffn",
            ),
            norm_kwargs={"epsilon": self.norm_epsilon},
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            name="layer",
        )
        return layer(x, mask=mask, positions=None, deterministic=self.deterministic, decode=False)


class FITCrossLayer(nn.Module):
    """READ or WRITE: ``x += CA(norm(x), norm(context)); x += MLP(norm(x))``.

    x: [B', Lq, Dq] queries (latents for READ, tokens for WRITE), context:
    [B', Lk, Dk] (the same group's tokens or latents) -> [B', Lq, Dq].
    """

    num_heads: int
    ffn_hidden_dim: int
    norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    attention_implementation: str | None = None
    deterministic: bool = True
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        norm = lambda name: make_norm(
            "layer_norm", epsilon=self.norm_epsilon, dtype=self.dtype, name=name
        )
        dropout = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
        attended = CrossAttention(
            num_heads=self.num_heads,
            attention_dropout_rate=self.attention_dropout_rate,
            implementation=self.attention_implementation,
            dtype=self.dtype,
            name="cross_attention",
        )(norm("query_norm")(x), norm("context_norm")(context), deterministic=self.deterministic)
        x = x + dropout(attended)
        ffn = make_ffn(
            "gelu",
            self.ffn_hidden_dim,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            name="ffn",
        )
        return x + dropout(ffn(norm("ffn_norm")(x), deterministic=self.deterministic))


def shift_latents_right(latents: Array) -> Array:
    """[B, T, m, Dl] -> [B, T, m, Dl]: group t gets group t-1's latents, group 0 zeros."""
    return jnp.concatenate([jnp.zeros_like(latents[:, :1]), latents[:, :-1]], axis=1)


class FITCore(nn.Module):
    """The interleaved local/global stack on grouped tokens (see the module docstring).

    Attributes:
      layer_plan: blocks ``(k)g`` (:func:`parse_layer_plan`).
      max_groups: rows of the learned latent table; a call may use fewer groups
        (the first rows).
      num_latents: latents per group, m >= 1.
      latent_dim: latent width Dl (default the token width).
      num_heads: heads of every attention (must divide D and Dl).
      mlp_ratio: MLP width = ratio x the layer's width.
      causal: the decoder (causal local layers, chunk-causal global layers,
        latents shifted right by one group before the WRITE).
      remat: rematerialise each layer in the backward pass.
    """

    layer_plan: str
    max_groups: int
    num_latents: int
    latent_dim: int | None = None
    num_heads: int = 4
    mlp_ratio: float = 4.0
    causal: bool = False
    remat: bool = False
    norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    attention_implementation: str | None = None
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, tokens: Array, *, deterministic: bool = True) -> Array:
        """tokens [B, T, n, D] (positions already embedded) -> [B, T, n, D] (not normalised)."""
        blocks = parse_layer_plan(self.layer_plan)
        batch, groups, group_size, dim = tokens.shape
        if groups > self.max_groups:
            raise ValueError(
                f"FITCore: at most max_groups={self.max_groups} groups (the latent table's rows), "
                f"got {groups} groups."
            )
        latent_dim = self.latent_dim or dim
        m = self.num_latents
        common = dict(
            num_heads=self.num_heads,
            norm_epsilon=self.norm_epsilon,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            attention_implementation=self.attention_implementation,
            deterministic=deterministic,
            dtype=self.dtype,
        )
        layer_cls = nn.remat(FITLayer) if self.remat else FITLayer
        cross_cls = nn.remat(FITCrossLayer) if self.remat else FITCrossLayer
        token_ffn = int(dim * self.mlp_ratio)
        latent_ffn = int(latent_dim * self.mlp_ratio)

        latents = None
        if any(block.has_global for block in blocks):
            table = self.param(
                "latent_embedding",
                nn.initializers.truncated_normal(stddev=0.02),
                (self.max_groups, m, latent_dim),
            )
            latents = jnp.broadcast_to(table[:groups], (batch, groups, m, latent_dim))
            latents = latents.astype(self.dtype or tokens.dtype)

        x = tokens.reshape(batch * groups, group_size, dim)
        for i, block in enumerate(blocks):
            for j in range(block.num_local):
                x = layer_cls(
                    ffn_hidden_dim=token_ffn,
                    mask_kind="causal" if self.causal else "none",
                    name=f"block_{i}_local_{j}",
                    **common,
                )(x)
            self.sow("intermediates", f"block_{i}_tokens", x.reshape(tokens.shape))
            if not block.has_global:
                continue
            # READ: each group's latents attend to that group's tokens (batch B*T).
            z = latents.reshape(batch * groups, m, latent_dim)
            z = cross_cls(ffn_hidden_dim=latent_ffn, name=f"block_{i}_read", **common)(z, x)
            z = z.reshape(batch, groups * m, latent_dim)
            for j in range(block.num_global):
                z = layer_cls(
                    ffn_hidden_dim=latent_ffn,
                    mask_kind="chunk_causal" if self.causal else "none",
                    chunk_size=m,
                    name=f"block_{i}_global_{j}",
                    **common,
                )(z)
            latents = z.reshape(batch, groups, m, latent_dim)
            # The parser guarantees a later block, so every global block writes.
            written = shift_latents_right(latents) if self.causal else latents
            if self.causal:
                self.sow("intermediates", f"block_{i}_write_latents", written)
            x = cross_cls(ffn_hidden_dim=token_ffn, name=f"block_{i}_write", **common)(
                x, written.reshape(batch * groups, m, latent_dim)
            )
        return x.reshape(tokens.shape)


class _FITFields(nn.Module):
    """Fields shared by the FIT models (documented on :class:`FITCore`)."""

    embed_dim: int = 256
    layer_plan: str = "(2)2(2)"
    num_latents: int = 16
    latent_dim: int | None = None
    num_heads: int = 4
    mlp_ratio: float = 4.0
    remat: bool = False
    norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    attention_implementation: str | None = None
    dtype: Dtype | None = None

    def _check_common(self) -> None:
        name = type(self).__name__
        parse_layer_plan(self.layer_plan)
        if not isinstance(self.num_latents, int) or self.num_latents < 1:
            raise ValueError(f"{name}: num_latents must be an int >= 1, got {self.num_latents!r}.")
        for field in ("embed_dim", "num_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {field} must be a positive int, got {value!r}.")
        if self.latent_dim is not None and (
            not isinstance(self.latent_dim, int) or self.latent_dim < 1
        ):  # 0 would silently mean embed_dim
            raise ValueError(
                f"{name}: latent_dim must be a positive int or None (embed_dim), "
                f"got {self.latent_dim!r}."
            )
        if not self.mlp_ratio > 0:  # 0 would build MLPs of no hidden units
            raise ValueError(f"{name}: mlp_ratio must be > 0, got {self.mlp_ratio!r}.")
        latent_dim = self.latent_dim or self.embed_dim
        for field, width in (("embed_dim", self.embed_dim), ("latent_dim", latent_dim)):
            if width % self.num_heads:
                raise ValueError(
                    f"{name}: num_heads={self.num_heads} must divide {field}, got {field}={width}."
                )

    def _core(self, max_groups: int, causal: bool) -> FITCore:
        return FITCore(
            layer_plan=self.layer_plan,
            max_groups=max_groups,
            num_latents=self.num_latents,
            latent_dim=self.latent_dim,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            causal=causal,
            remat=self.remat,
            norm_epsilon=self.norm_epsilon,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            attention_implementation=self.attention_implementation,
            dtype=self.dtype,
            name="fit",
        )

    def _embed_positions(self, tokens: Array) -> Array:
        """tokens [B, T, n, D] + the shared table [n, D] (one row per in-group position)."""
        batch, groups, group_size, dim = tokens.shape
        flat = tokens.reshape(batch * groups, group_size, dim)
        positions = jnp.broadcast_to(jnp.arange(group_size, dtype=jnp.int32), flat.shape[:2])
        flat = LearnedPositionEmbedding(max_length=group_size, name="position_encoding").embed(
            flat, positions
        )
        return flat.reshape(tokens.shape)

    def _final_norm(self, x: Array) -> Array:
        return make_norm(
            "layer_norm", epsilon=self.norm_epsilon, dtype=self.dtype, name="final_norm"
        )(x)


class FITClassifier(_FITFields):
    """FIT encoder image classifier: ``inputs [B, H, W, C] -> logits [B, num_classes]``.

    Patches of ``patch_size`` (any divisor of ``image_size``) form a grid; each
    ``group_size x group_size`` sub-grid of patches is a group (``n =
    group_size^2`` tokens, ``T = (grid / group_size)^2`` groups). The head is a
    linear layer on the mean of the final (normalised) tokens.
    """

    num_classes: int = 1000
    image_size: int = 224
    num_channels: int = 3
    patch_size: int = 16
    group_size: int = 7

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_groups(self) -> int:
        return (self.grid // self.group_size) ** 2

    def check_config(self) -> None:
        name = type(self).__name__
        self._check_common()
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(
                f"{name}: patch_size must be a positive divisor of image_size={self.image_size}, "
                f"got patch_size={self.patch_size}."
            )
        if self.group_size < 1 or self.grid % self.group_size:
            raise ValueError(
                f"{name}: group_size (patches per group side) must divide the patch grid side "
                f"{self.grid} (image_size {self.image_size} / patch_size {self.patch_size}), "
                f"got group_size={self.group_size}."
            )

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        shape = (batch_size, self.image_size, self.image_size, self.num_channels)
        return {"inputs": jnp.zeros(shape, jnp.float32)}

    @nn.compact
    def __call__(self, inputs: Array, *, train: bool = False) -> Array:
        """inputs [B, H, W, C] -> logits [B, num_classes]."""
        self.check_config()
        expected = (self.image_size, self.image_size, self.num_channels)
        if inputs.ndim != 4 or tuple(inputs.shape[1:]) != expected:
            raise ValueError(
                f"FITClassifier: inputs must be [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got shape {tuple(inputs.shape)}."
            )
        tokens, (rows, cols) = PatchEmbed(
            self.patch_size, self.embed_dim, dtype=self.dtype, name="tokenizer"
        )(inputs)
        batch, g = inputs.shape[0], self.group_size
        # [B, rows*cols, D] -> sub-grids of g x g patches, row-major inside each group.
        tokens = tokens.reshape(batch, rows // g, g, cols // g, g, self.embed_dim)
        tokens = tokens.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, g * g, self.embed_dim)
        tokens = self._embed_positions(tokens)
        tokens = nn.Dropout(self.dropout_rate)(tokens, deterministic=not train)
        x = self._core(self.num_groups, causal=False)(tokens, deterministic=not train)
        pooled = self._final_norm(x).mean(axis=(1, 2))
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.initializers.truncated_normal(stddev=0.02),
            dtype=self.dtype,
            name="head",
        )(pooled)


class FITLM(_FITFields):
    """Autoregressive FIT decoder: ``inputs [B, L] int -> logits [B, L, vocab_size]``.

    The sequence is cut into groups of ``group_size`` tokens (right-padded
    inside the model to a multiple of it; exact, since the model is causal).
    ``max_length`` bounds L (it sizes the latent table: ``ceil(max_length /
    group_size)`` groups). The LM head is the transposed token embedding.
    """

    vocab_size: int = 256
    group_size: int = 64
    max_length: int = 2048

    @property
    def max_groups(self) -> int:
        return -(-self.max_length // self.group_size)

    def check_config(self) -> None:
        name = type(self).__name__
        self._check_common()
        for field in ("vocab_size", "group_size", "max_length"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {field} must be a positive int, got {value!r}.")

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        return {
            "inputs": jnp.ones((batch_size, min(2 * self.group_size, self.max_length)), jnp.int32)
        }

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        train: bool = False,
    ) -> Array:
        """inputs [B, L] int -> logits [B, L, vocab_size]. One sequence per row."""
        self.check_config()
        if segment_ids is not None or positions is not None:
            raise ValueError(
                "FITLM: packed sequences (segment_ids / positions) are not supported: groups "
                "would mix sequences; give one sequence per row, got "
                f"segment_ids={None if segment_ids is None else tuple(segment_ids.shape)}, "
                f"positions={None if positions is None else tuple(positions.shape)}."
            )
        if inputs.ndim != 2 or not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(
                f"FITLM: inputs must be integer token ids [B, L], got shape "
                f"{tuple(inputs.shape)} and dtype {inputs.dtype}."
            )
        batch, length = inputs.shape
        if length > self.max_length:
            raise ValueError(
                f"FITLM: sequence length must be <= max_length={self.max_length}, got {length}."
            )
        n = self.group_size
        padded = -(-length // n) * n
        # Right padding is invisible to earlier positions of a causal model.
        inputs = jnp.pad(inputs, ((0, 0), (0, padded - length)))
        embedding = nn.Embed(
            self.vocab_size,
            self.embed_dim,
            embedding_init=nn.initializers.normal(stddev=0.02),
            dtype=self.dtype,
            name="token_embedding",
        )
        tokens = embedding(inputs).reshape(batch, padded // n, n, self.embed_dim)
        tokens = self._embed_positions(tokens)
        tokens = nn.Dropout(self.dropout_rate)(tokens, deterministic=not train)
        x = self._core(self.max_groups, causal=True)(tokens, deterministic=not train)
        x = self._final_norm(x).reshape(batch, padded, self.embed_dim)[:, :length]
        return embedding.attend(x)


_TINY = dict(embed_dim=16, num_heads=2, num_latents=2, layer_plan="(1)1(1)", mlp_ratio=2.0)


@register("fit_classifier", tiny=dict(_TINY, image_size=8, patch_size=2, group_size=2))
def fit_classifier(**overrides: Any) -> FITClassifier:
    """FIT encoder image classifier (defaults: 224px, patch 16, 2x2 groups of 7x7 patches)."""
    return FITClassifier(**overrides)


@register("fit_lm", tiny=dict(_TINY, group_size=4, max_length=32))
def fit_lm(**overrides: Any) -> FITLM:
    """Autoregressive FIT decoder LM (defaults: groups of 64 tokens, 16 latents each)."""
    return FITLM(**overrides)
