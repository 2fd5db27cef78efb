"""iLLaMA: a LLaMA-style, causally masked vision Transformer (Wang et al., 2024).

"Adapting LLaMA Decoder to Vision Transformer"; the details follow the
official code (techmonsterwang/iLLaMA, ``models/illama.py``), which produced
the published numbers:

* 16x16 patches (a strided conv with bias); the learned class token is
  appended LAST (the "post-sequence class token"), and the prediction reads
  the last position, the one token that sees every patch under a causal mask.
* A learned position table with N + 1 rows is added to the tokens, and 1-D
  RoPE (adjacent channel pairs, base 10000) over the same N + 1 positions
  rotates q and k in every block: the class token sits at position N.
* Pre-norm blocks with RMSNorm (eps 1e-6, float32), attention with qkv and
  output biases, a SwiGLU FFN ``W2(silu(W1 x) * W3 x)`` without biases whose
  width is ``int(8 D / 3)`` rounded up to a multiple of 256, a final RMSNorm
  and a linear head with bias.
* The soft mask: the attention probabilities are multiplied AFTER the softmax
  by ``r * ones + (1 - r) * tril``, without renormalisation
  (``A = softmax(Q K^T / sqrt(d)) * M``). The ratio r is a call argument
  (``soft_mask_ratio``) that the trainer takes from a schedule: 1 early in
  training, 0 afterwards and at evaluation.

Note what r = 0 means in the original: the softmax still runs over all keys
and the future ones are zeroed afterwards, so a patch's output depends on
later patches through the softmax normaliser (its rows sum to less than 1).
``mask="causal"`` gives the strictly causal alternative (the softmax over
earlier keys only), for the ablation of that choice.

Parameter counts at 224x224 and 1000 classes (N = 196 patches, H = SwiGLU
width), equal to the original's ``sum(p.numel() for p in model.parameters())``:
per block ``4 D^2 + 6 D + 3 D H`` (qkv and out with biases, two RMSNorm
scales, three bias-free SwiGLU matrices), plus ``1968 D + 1000``
(patch conv ``16*16*3*D + D``, class token ``D``, position table ``197 D``,
final norm ``D``, head ``1000 D + 1000``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effformer.initializers import trunc_normal
from effformer.models.registry import register
from effformer.nn.block import ResidualBlock
from effformer.nn.ffn import llama_hidden_dim
from effformer.nn.norms import RMSNorm
from effformer.nn.pooling import ClassToken
from effformer.nn.position import LearnedPositionEmbedding, RotaryPositionEncoding
from effformer.nn.tokenizers import PatchEmbed
from effformer.ops import masks
from effformer.ops.masks import AttentionMask

Array = jax.Array

MASK_MODES = ("soft", "causal", "bidirectional")
CLASS_TOKEN_PLACEMENTS = ("first", "last")

truncated_normal_002 = trunc_normal(0.02)
# PyTorch's default Conv2d init (the original leaves the patch conv to it):
# weight and bias uniform in +-1/sqrt(fan_in), fan_in = patch area * channels.
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_conv_bias_init(fan_in: int):
    bound = 1.0 / float(np.sqrt(fan_in))
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


def check_soft_mask_ratio(owner: str, soft_mask_ratio: Any) -> None:
    """A number or a concrete scalar array must lie in [0, 1]; a traced one must be a
    scalar (its value is unknown until run)."""
    if isinstance(soft_mask_ratio, bool) or soft_mask_ratio is None:
        raise ValueError(
            f"{owner}: soft_mask_ratio must be a number in [0, 1] or a scalar array, "
            f"got {soft_mask_ratio!r}."
        )
    if not isinstance(soft_mask_ratio, int | float) and jnp.ndim(soft_mask_ratio) != 0:
        raise ValueError(
            f"{owner}: soft_mask_ratio must be a scalar, got shape {jnp.shape(soft_mask_ratio)}."
        )
    if isinstance(soft_mask_ratio, jax.core.Tracer):
        return
    # A NumPy or JAX scalar outside [0, 1] would otherwise pass as a traced value.
    if not 0.0 <= float(soft_mask_ratio) <= 1.0:  # NaN-safe
        raise ValueError(f"{owner}: soft_mask_ratio must be in [0, 1], got {soft_mask_ratio}.")


class ILlama(nn.Module):
    """iLLaMA image classifier: ``inputs [B, S, S, C] -> logits [B, num_classes]``.

    Attributes:
      num_classes, image_size, num_channels: what the data decides (the task
        passes them to ``effformer.models.create``); ``image_size`` is the side S.
      patch_size: side of the square patches; must divide ``image_size``.
      embed_dim, num_layers, num_heads: the encoder's shape.
      ffn_multiple_of: the SwiGLU width is ``int(8 D / 3)`` rounded up to this
        (256 in iLLaMA; smaller only for test-sized models).
      class_token: ``"last"`` (iLLaMA's post-sequence token) or ``"first"`` (ViT's
        placement, for the ablation: under a causal mask it sees only itself).
      mask: ``"soft"`` (iLLaMA: post-softmax ``r + (1 - r) tril``, r =
        ``soft_mask_ratio``), ``"causal"`` (softmax over earlier keys only) or
        ``"bidirectional"`` (plain ViT attention). Only ``"soft"`` reads
        ``soft_mask_ratio``; the others refuse a non-zero or traced value, so a
        schedule cannot be silently ignored.
      drop_path_rate: stochastic depth, ``rate * i / (num_layers - 1)`` in block i
        (``torch.linspace(0, rate, depth)`` in the original).
      dropout_rate: dropout after the position embedding (the original's ``pos_drop``).
      norm_epsilon: RMSNorm epsilon.
      attention_implementation: passed to ``dot_product_attention``.
    """

    num_classes: int = 1000
    image_size: int = 224
    num_channels: int = 3
    patch_size: int = 16
    embed_dim: int = 192
    num_layers: int = 12
    num_heads: int = 3
    ffn_multiple_of: int = 256
    class_token: str = "last"
    mask: str = "soft"
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    norm_epsilon: float = 1e-6
    attention_implementation: str | None = None

    @property
    def grid_size(self) -> int:
        """Patches per side, ``image_size // patch_size``."""
        return self.image_size // self.patch_size

    @property
    def sequence_length(self) -> int:
        """Tokens per image: N patches + the class token."""
        return self.grid_size**2 + 1

    @property
    def ffn_hidden_dim(self) -> int:
        return llama_hidden_dim(self.embed_dim, self.ffn_multiple_of)

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        shape = (batch_size, self.image_size, self.image_size, self.num_channels)
        return {"inputs": jnp.zeros(shape, jnp.float32)}

    def _validate_fields(self) -> None:
        if self.class_token not in CLASS_TOKEN_PLACEMENTS:
            raise ValueError(
                f"ILlama: class_token must be one of {CLASS_TOKEN_PLACEMENTS}, "
                f"got {self.class_token!r}."
            )
        if self.mask not in MASK_MODES:
            raise ValueError(f"ILlama: mask must be one of {MASK_MODES}, got {self.mask!r}.")
        positive = ("num_classes", "image_size", "num_channels", "patch_size", "embed_dim")
        for field in (*positive, "num_layers", "num_heads", "ffn_multiple_of"):
            value = getattr(self, field)
            # bool is an int to Python; True as a head count is a config slip, not 1.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ILlama: {field} must be a positive int, got {value!r}.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ILlama: patch_size must divide image_size={self.image_size}, "
                f"got patch_size={self.patch_size}."
            )
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 2:
            raise ValueError(
                f"ILlama: num_heads must divide embed_dim={self.embed_dim} into an even head "
                f"dim (RoPE rotates channel pairs), got num_heads={self.num_heads}."
            )
        for field in ("drop_path_rate", "dropout_rate"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:  # NaN-safe
                raise ValueError(f"ILlama: {field} must be in [0, 1), got {value!r}.")

    def attention_mask(self, soft_mask_ratio: float | Array) -> AttentionMask | None:
        """The structural mask of every block for this ``mask`` mode and ratio."""
        check_soft_mask_ratio("ILlama", soft_mask_ratio)
        if self.mask == "soft":
            return AttentionMask(soft_causal_ratio=soft_mask_ratio)
        if not isinstance(soft_mask_ratio, int | float) or soft_mask_ratio != 0:
            raise ValueError(
                f"ILlama: soft_mask_ratio is read only by mask='soft'; with mask={self.mask!r} it "
                f"must be left at 0.0 (no schedule), got {soft_mask_ratio!r}."
            )
        return AttentionMask(causal=True) if self.mask == "causal" else None

    @nn.compact
    def __call__(
        self, inputs: Array, *, train: bool = False, soft_mask_ratio: float | Array = 0.0
    ) -> Array:
        """inputs: [B, image_size, image_size, num_channels] -> logits [B, num_classes].

        ``soft_mask_ratio``: r in [0, 1]; 1 is bidirectional, 0 the original's causal mask.
        """
        self._validate_fields()
        expected = (self.image_size, self.image_size, self.num_channels)
        if inputs.ndim != 4 or tuple(inputs.shape[1:]) != expected:
            raise ValueError(
                f"ILlama: inputs must have shape [B, {', '.join(map(str, expected))}], "
                f"got {tuple(inputs.shape)}."
            )
        mask = self.attention_mask(soft_mask_ratio)
        deterministic = not train
        fan_in = self.patch_size**2 * self.num_channels
        tokens, _ = PatchEmbed(
            self.patch_size,
            self.embed_dim,
            kernel_init=torch_conv_kernel_init,
            bias_init=_torch_conv_bias_init(fan_in),
            name="patch_embed",
        )(inputs)
        class_token = ClassToken(self.class_token, token_init=truncated_normal_002, name="cls")
        x = class_token(tokens)
        batch, length = x.shape[:2]
        # One position per token, the class token included (position N when last):
        # both the learned table and RoPE index these.
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        x = LearnedPositionEmbedding(max_length=length, name="position_embedding").embed(
            x, positions
        )
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)

        rope = RotaryPositionEncoding()
        rates = np.linspace(0.0, self.drop_path_rate, self.num_layers)
        for i in range(self.num_layers):
            x = ResidualBlock(
                mixer="attention",
                mixer_kwargs=dict(
                    num_heads=self.num_heads,
                    qkv_bias=True,
                    out_bias=True,
                    position_encoding=rope,
                    implementation=self.attention_implementation,
                ),
                ffn="swiglu",
                ffn_hidden_dim=self.ffn_hidden_dim,
                ffn_kwargs=dict(use_bias=False),
                norm="rms_norm",
                norm_epsilon=self.norm_epsilon,
                ordering="pre_norm",
                drop_path_rate=float(rates[i]),
                name=f"block_{i}",
            )(x, mask=mask, positions=positions, deterministic=deterministic)
        x = RMSNorm(self.norm_epsilon, name="norm")(x)
        return nn.Dense(self.num_classes, kernel_init=truncated_normal_002, name="head")(
            class_token.pool(x)
        )


# ---------------------------------------------------------------------------- attention maps


def _find_query_key(tree: dict) -> tuple[Array, Array] | None:
    """The captured outputs of the ``query`` and ``key`` projections inside one block."""
    if "query" in tree and "key" in tree:
        return tree["query"]["__call__"][0], tree["key"]["__call__"][0]
    for value in tree.values():
        if isinstance(value, dict):
            found = _find_query_key(value)
            if found is not None:
                return found
    return None


def attention_maps(
    model: ILlama, variables: dict, images: Array, *, soft_mask_ratio: float | Array = 0.0
) -> Array:
    """Per-layer attention probabilities of ``model`` on ``images`` (evaluation mode).

    The q/k projections of every block are captured during a forward pass
    (``capture_intermediates``), rotated by RoPE at the tokens' positions, and
    turned into the probabilities the blocks used: ``softmax(q k^T / sqrt(d))``
    times the soft mask (``mask="soft"``), the causal softmax (``"causal"``) or
    the plain softmax (``"bidirectional"``). With the soft mask at r < 1 the rows
    sum to less than 1, exactly as in the model.

    Args:
      images: [B, image_size, image_size, num_channels].
    Returns:
      float32 [num_layers, B, num_heads, L, L] (query, key), L = N + 1 tokens in
      sequence order (the class token last unless ``class_token="first"``).
    """
    mask = model.attention_mask(soft_mask_ratio)
    _, state = model.apply(
        variables,
        images,
        train=False,
        soft_mask_ratio=soft_mask_ratio,
        capture_intermediates=lambda module, _: module.name in ("query", "key"),
        mutable=["intermediates"],
    )
    captured = state["intermediates"]
    maps = []
    for i in range(model.num_layers):
        found = _find_query_key(captured[f"block_{i}"])
        if found is None:
            raise RuntimeError(f"attention_maps: no query/key projections captured in block_{i}.")
        q, k = (a.astype(jnp.float32) for a in found)
        batch, length = q.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        q, k = RotaryPositionEncoding().rotate(q, k, positions, positions)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
        if mask is not None and mask.causal:
            visible = masks.dense_mask(mask, batch, length, length)
            probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
        else:
            probs = jax.nn.softmax(logits, axis=-1)
        if mask is not None and mask.soft_causal_ratio is not None:
            q_pos, k_pos = positions[:, None, :, None], positions[:, None, None, :]
            probs = probs * masks.soft_causal_multiplier(mask.soft_causal_ratio, q_pos, k_pos)
        maps.append(probs)
    return jnp.stack(maps)


# ---------------------------------------------------------------------------- resolution change


def interpolate_position_embedding(params: dict, source: ILlama, target: ILlama) -> dict:
    """Carry ``source``'s parameters to ``target``, an iLLaMA for another image size.

    The image rows of the position table are resized bicubically on their grid
    (half-pixel centres, no antialiasing), and the class token's row stays where
    the model puts it: LAST for iLLaMA (as the original's ``main_soft_fthr.py``
    keeps its ``extra_tokens``). ``jax.image.resize``'s cubic kernel is Keys'
    with a = -0.5 where PyTorch's bicubic uses a = -0.75; the two differ slightly
    between grid points. RoPE needs nothing: it is computed for any length.
    Every other parameter must have the same shape in both models.

    params: ``source``'s ``params`` collection -> ``target``'s.
    """
    if source.class_token != target.class_token:
        raise ValueError(
            "interpolate_position_embedding: source and target must place the class token "
            f"alike, got {source.class_token!r} and {target.class_token!r}."
        )
    table = params["position_embedding"]["embedding"]
    if table.shape[0] != source.sequence_length:
        raise ValueError(
            f"interpolate_position_embedding: the table has {table.shape[0]} rows but source "
            f"makes {source.sequence_length} tokens."
        )
    dim = table.shape[-1]
    last = source.class_token == "last"
    class_row = table[-1:] if last else table[:1]
    image_rows = table[:-1] if last else table[1:]
    grid = image_rows.reshape(source.grid_size, source.grid_size, dim)
    resized = jax.image.resize(
        grid.astype(jnp.float32),
        (target.grid_size, target.grid_size, dim),
        method="cubic",
        antialias=False,
    ).astype(table.dtype)
    resized = resized.reshape(-1, dim)
    parts = [resized, class_row] if last else [class_row, resized]
    new_params = {**params, "position_embedding": {"embedding": jnp.concatenate(parts, axis=0)}}
    expected = jax.eval_shape(
        lambda: target.init(jax.random.PRNGKey(0), **target.dummy_inputs(1))["params"]
    )
    new_leaves = jax.tree_util.tree_leaves_with_path(new_params)
    expected_leaves = jax.tree_util.tree_leaves(expected)
    if len(new_leaves) != len(expected_leaves):
        raise ValueError(
            "interpolate_position_embedding: source and target have different parameter trees."
        )
    mismatched = [
        jax.tree_util.keystr(path)
        for (path, new), want in zip(new_leaves, expected_leaves, strict=True)
        if new.shape != want.shape
    ]
    if mismatched:
        raise ValueError(
            f"interpolate_position_embedding: parameters differ in shape between source and "
            f"target besides the position table: {mismatched}."
        )
    return new_params


# ---------------------------------------------------------------------------- named variants

_TINY = dict(
    embed_dim=16,
    num_layers=2,
    num_heads=2,
    patch_size=4,
    image_size=16,
    num_classes=10,
    ffn_multiple_of=16,
)


def _variant(embed_dim: int, num_layers: int, num_heads: int, overrides: dict) -> ILlama:
    return ILlama(
        **{"embed_dim": embed_dim, "num_layers": num_layers, "num_heads": num_heads, **overrides}
    )


@register("illama_tiny", tiny=_TINY)
def illama_tiny(**overrides: Any) -> ILlama:
    """iLLaMA-T: 192 wide, 12 layers, 3 heads, SwiGLU 512; 5,701,096 parameters at 224 / 1000.

    12 * (4*192^2 + 6*192 + 3*192*512) + 1968*192 + 1000 = 12 * 443,520 + 378,856.
    ImageNet-1K top-1 75.0 (published).
    """
    return _variant(192, 12, 3, overrides)


@register("illama_small", tiny=_TINY)
def illama_small(**overrides: Any) -> ILlama:
    """iLLaMA-S: 384 wide, 12 layers, 6 heads, SwiGLU 1024; 22,018,024 parameters at 224 / 1000.

    12 * (4*384^2 + 6*384 + 3*384*1024) + 1968*384 + 1000 = 12 * 1,771,776 + 756,712.
    ImageNet-1K top-1 79.9 (published).
    """
    return _variant(384, 12, 6, overrides)


@register("illama_base", tiny=_TINY)
def illama_base(**overrides: Any) -> ILlama:
    """iLLaMA-B: 768 wide, 12 layers, 12 heads, SwiGLU 2048; 86,502,376 parameters at 224 / 1000.

    12 * (4*768^2 + 6*768 + 3*768*2048) + 1968*768 + 1000 = 12 * 7,082,496 + 1,512,424.
    ImageNet-1K top-1 81.6 (published).
    """
    return _variant(768, 12, 12, overrides)


@register("illama_large", tiny=_TINY)
def illama_large(**overrides: Any) -> ILlama:
    """iLLaMA-L: 1024 wide, 24 layers, 16 heads, SwiGLU 2816; 310,445,032 parameters at 224 / 1000.

    24 * (4*1024^2 + 6*1024 + 3*1024*2816) + 1968*1024 + 1000 = 24 * 12,851,200 + 2,016,232.
    (int(8*1024/3) = 2730, rounded up to 2816.) Published for ImageNet-21K pre-training.
    """
    return _variant(1024, 24, 16, overrides)
