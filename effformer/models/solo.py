"""SOLO: one decoder-only Transformer over text tokens and raw image patches.

Chen et al., 2024, "A Single Transformer for Scalable Vision-Language Modeling"
(arXiv 2405.20974; official code Yangyi-Chen/SOLO, ``scripts/model/modeling_solo.py``).
There is no vision encoder: an image is cut into ``patch_size x patch_size`` pixel
patches, each patch is flattened and mapped by one linear layer without bias
(``embed_vision_patch``, 32*32*3 -> 4096 in SOLO-7B) to the model width, and the
result is ADDED to the token embedding of a ``<vpatch>`` placeholder token. Every
other token (text, the image's begin/row/end markers) gets a zero row. The
sequence then runs through an unmodified LLM (Mistral-7B in the paper):

    x_t = E[token_t] + (W_patch @ patch[index_t]  if index_t >= 0  else 0)

Layout of one image of R x C patches (:func:`image_token_layout`, as the official
``prepare_inputs_img``): ``<vision>``, then the patches row by row, a
``<vrow_sep>`` before every row but the first, then the end token; the patch
index of a ``<vpatch>`` token is its patch's raster position, ``-1`` elsewhere.
The end token is ``</vision>`` here; the released SFT script and demo notebook
close the image with a second ``<vision>`` token, which ``tokens=`` can reproduce.

Patches (:func:`image_to_patches`): channel-first inside a patch (the official
``unfold(1).unfold(2).permute(1, 2, 0, 3, 4)``), so a patch vector is
``[C, p, p]`` flattened. The official preprocessing normalises with ImageNet's
mean/std and resizes to multiples of 32 keeping the aspect ratio, the longer side
at most 1024 (:func:`resize_shape`; the SFT data script returns 1024 x 1024 for
every image instead).

Batches: this module takes ``patches [B, N, p*p*C]`` per row and ``patch_indices
[B, L]`` into the row's own patches; the official code flattens the patches of a
whole batch into one ``[n_patches, p*p*C]`` array with global indices. The sums are
the same; the per-row form has static shapes. The embedding is computed on the
gathered patches ``W @ patch[index_t]`` (one row per token), which equals gathering
``W @ patch`` and lets a one-token decoding step embed only its own patch.

:class:`SOLO` wraps a :class:`~effformer.models.transformer_lm.TransformerLM`
decoder (field ``lm``; parameters under ``lm``) and the patch embedding
(``patch_embedding``). :func:`generate` decodes with the KV cache of
``effformer.models.generate`` (its forced-prompt loop, one compiled program per
shape), feeding every prompt position its patch.

Presets: ``solo_7b`` is Mistral-7B-v0.1's shape (32 layers, width 4096, 32 query /
8 KV heads, SwiGLU 14336, RMSNorm eps 1e-5, RoPE base 1e4, untied head, no
biases) with SOLO's vocabulary (Mistral's 32,000 + 1,031 added tokens,
:data:`SOLO_VOCAB_SIZE`) and 32x32x3 patches: 7,262,760,960 parameters =
Mistral-7B's 7,241,732,096 + 2 x 1,031 x 4,096 for the added rows of the
embedding and the head + 3,072 x 4,096 for the patch embedding
(tests/models/test_solo.py counts them). Mistral's 4,096-token sliding window is
not applied (global attention; equal for sequences up to 4,096 tokens;
``layer_pattern="local:4096"`` adds it). ``solo_small`` is the same recipe at
CPU scale for ``experiments/solo``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effformer.models import generate as generation
from effformer.models.registry import register
from effformer.models.transformer_lm import TransformerLM

Array = jax.Array

# ------------------------------------------------------------------ SOLO's token ids
# Mistral's tokenizer holds 32,000 pieces; create_solo.py appends these, in this order.
MISTRAL_VOCAB_SIZE = 32000
VISION_START = 32000  # <vision>
VISION_PATCH = 32001  # <vpatch>: one image patch (its embedding is added to this token's)
VISION_ROW_SEP = 32002  # <vrow_sep>: before every patch row but the first
VISION_FRAME_SEP = 32003  # <vframe_sep>: between video frames (unused for one image)
VISION_END = 32004  # </vision>
LOC_TOKENS_START = 32005  # <loc_1> ... <loc_1024> are 32005 ... 33028
NUM_LOC_TOKENS = 1024
IM_START = 33029  # <|im_start|> (chat format)
IM_END = 33030  # <|im_end|>
SOLO_VOCAB_SIZE = 33031
NON_VISION = -1  # the patch index of every token that is not a patch

PATCH_SIZE = 32
MAX_RESOLUTION = 1024


@dataclasses.dataclass(frozen=True)
class VisionTokenIds:
    """The token ids :func:`image_token_layout` writes (a dataset with its own vocabulary
    passes its ids)."""

    start: int = VISION_START
    patch: int = VISION_PATCH
    row_sep: int = VISION_ROW_SEP
    end: int = VISION_END


SOLO_VISION_TOKENS = VisionTokenIds()


def _check_positive_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}.")
    return int(value)


def num_image_tokens(num_rows: int, num_cols: int) -> int:
    """Tokens of one image of ``num_rows x num_cols`` patches: begin, patches, R - 1 row
    separators, end."""
    return num_rows * num_cols + (num_rows - 1) + 2


def image_token_layout(
    num_rows: int,
    num_cols: int,
    *,
    tokens: VisionTokenIds = SOLO_VISION_TOKENS,
    first_patch_index: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """SOLO's token sequence for one image of ``num_rows x num_cols`` patches.

    Returns ``(token_ids, patch_indices)``, both int32 [T] with
    ``T = num_image_tokens(num_rows, num_cols) = R*C + R + 1``:

    * ``token_ids``: ``tokens.start``, then row r's C ``tokens.patch`` tokens for
      r = 0..R-1 with ``tokens.row_sep`` before every row but the first, then
      ``tokens.end``;
    * ``patch_indices``: ``first_patch_index + r*C + c`` at the patch of row r,
      column c (raster order), :data:`NON_VISION` (-1) at every other token.
      ``first_patch_index`` is the number of patches of earlier images in the row.

    Pure numpy; one image, no text (text tokens get patch index -1).
    """
    owner = "image_token_layout"
    rows = _check_positive_int(owner, "num_rows", num_rows)
    cols = _check_positive_int(owner, "num_cols", num_cols)
    if isinstance(first_patch_index, bool) or not isinstance(first_patch_index, int | np.integer):
        raise ValueError(
            f"{owner}: first_patch_index must be an int >= 0, got {first_patch_index!r}."
        )
    if first_patch_index < 0:
        raise ValueError(
            f"{owner}: first_patch_index must be an int >= 0, got {first_patch_index}."
        )
    token_ids = [tokens.start]
    patch_indices = [NON_VISION]
    for row in range(rows):
        if row > 0:
            token_ids.append(tokens.row_sep)
            patch_indices.append(NON_VISION)
        for col in range(cols):
            token_ids.append(tokens.patch)
            patch_indices.append(int(first_patch_index) + row * cols + col)
    token_ids.append(tokens.end)
    patch_indices.append(NON_VISION)
    return np.asarray(token_ids, np.int32), np.asarray(patch_indices, np.int32)


def resize_shape(
    height: int,
    width: int,
    *,
    patch_size: int = PATCH_SIZE,
    max_resolution: int = MAX_RESOLUTION,
) -> tuple[int, int]:
    """(new height, new width) of SOLO's resize, both multiples of ``patch_size``.

    The longer side becomes itself rounded up to a multiple of ``patch_size``, at
    most ``max_resolution``; the shorter side keeps the aspect ratio (truncated),
    then is rounded up to a multiple of ``patch_size`` (official ``image_utils.py``,
    ``get_resize_output_image_size``).
    """
    owner = "resize_shape"
    for name, value in (("height", height), ("width", width), ("patch_size", patch_size),
                        ("max_resolution", max_resolution)):  # fmt: skip
        _check_positive_int(owner, name, value)
    if max_resolution % patch_size:
        raise ValueError(
            f"{owner}: max_resolution must be a multiple of patch_size {patch_size}, got "
            f"{max_resolution}."
        )
    short, long = (width, height) if width <= height else (height, width)
    new_long = min(math.ceil(long / patch_size) * patch_size, max_resolution)
    new_short = int(new_long * short / long)
    new_short = math.ceil(new_short / patch_size) * patch_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def image_to_patches(image: np.ndarray, patch_size: int) -> np.ndarray:
    """image [H, W, C] -> patches [H / p, W / p, C * p * p], each patch ``[C, p, p]`` flattened.

    H and W must be multiples of ``patch_size`` (resize first, :func:`resize_shape`).
    Works on numpy and jax arrays.
    """
    owner = "image_to_patches"
    size = _check_positive_int(owner, "patch_size", patch_size)
    if image.ndim != 3 or image.shape[0] % size or image.shape[1] % size:
        raise ValueError(
            f"{owner}: image must be [H, W, C] with H and W multiples of patch_size {size}, got "
            f"shape {tuple(image.shape)}."
        )
    height, width, channels = image.shape
    rows, cols = height // size, width // size
    patches = image.reshape(rows, size, cols, size, channels)
    patches = patches.transpose(0, 2, 4, 1, 3)  # [rows, cols, C, p, p]
    return patches.reshape(rows, cols, channels * size * size)


def _is_concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


class SOLO(nn.Module):
    """SOLO: a decoder LM whose ``<vpatch>`` tokens carry linearly embedded image patches.

    Attributes:
      lm: the decoder (``TransformerLM(kind="decoder")``, any of its options).
      patch_size, num_channels: patches are ``patch_size x patch_size x num_channels``
        pixels, flattened to ``patch_dim = num_channels * patch_size**2`` values.
    """

    lm: TransformerLM
    patch_size: int = PATCH_SIZE
    num_channels: int = 3

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size**2

    @property
    def vocab_size(self) -> int:
        return self.lm.vocab_size

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        token_ids, patch_indices = image_token_layout(2, 2)
        length = len(token_ids)
        return {
            "inputs": jnp.ones((batch_size, length), jnp.int32),
            "patches": jnp.zeros((batch_size, 4, self.patch_dim), jnp.float32),
            "patch_indices": jnp.broadcast_to(jnp.asarray(patch_indices), (batch_size, length)),
        }

    def _validate(self, inputs: Array, patches: Array | None, patch_indices: Array | None) -> None:
        owner = "SOLO"
        if self.lm.kind != "decoder":
            raise ValueError(
                f"{owner}: lm must be a TransformerLM with kind='decoder', got {self.lm.kind!r}."
            )
        if self.lm.num_classes is not None:
            raise ValueError(
                f"{owner}: lm must be a language model (num_classes=None), got {self.lm.num_classes}."
            )
        if inputs.ndim != 2 or not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(
                f"{owner}: inputs must be integer token ids [B, L], got shape "
                f"{tuple(inputs.shape)} and dtype {inputs.dtype}."
            )
        if (patches is None) != (patch_indices is None):
            raise ValueError(
                f"{owner}: patches and patch_indices must be given together (or neither, for "
                f"text only), got patches={'None' if patches is None else 'an array'}, "
                f"patch_indices={'None' if patch_indices is None else 'an array'}."
            )
        if patches is None:
            return
        batch, length = inputs.shape
        if patches.ndim != 3 or patches.shape[0] != batch or patches.shape[2] != self.patch_dim:
            raise ValueError(
                f"{owner}: patches must be [B={batch}, N, patch_dim={self.patch_dim}] "
                f"(patch_size={self.patch_size}, num_channels={self.num_channels}), got shape "
                f"{tuple(patches.shape)}."
            )
        if patches.shape[1] < 1:
            raise ValueError(f"{owner}: patches must hold at least one patch per row, got N=0.")
        if tuple(patch_indices.shape) != (batch, length) or not jnp.issubdtype(
            patch_indices.dtype, jnp.integer
        ):
            raise ValueError(
                f"{owner}: patch_indices must be integer [B, L] = {(batch, length)} (like inputs), "
                f"got shape {tuple(patch_indices.shape)} and dtype {patch_indices.dtype}."
            )
        if _is_concrete(patch_indices):
            values = np.asarray(patch_indices)
            low, high = int(values.min()), int(values.max())
            if low < NON_VISION or high >= patches.shape[1]:
                raise ValueError(
                    f"{owner}: patch_indices must be -1 (not a patch) or in [0, N={patches.shape[1]}) "
                    f"(the row's patches), got values in [{low}, {high}]."
                )

    def patch_embeddings(self, patches: Array, patch_indices: Array) -> Array:
        """[B, L, embed_dim]: ``W @ patches[b, patch_indices[b, t]]``, zero where the index is -1."""
        valid = patch_indices >= 0
        gathered = jax.vmap(lambda rows, index: rows[index])(
            patches, jnp.where(valid, patch_indices, 0)
        )
        gathered = jnp.where(valid[..., None], gathered, jnp.zeros((), gathered.dtype))
        return nn.Dense(
            self.lm.embed_dim,
            use_bias=False,
            kernel_init=nn.initializers.normal(stddev=0.02),
            dtype=self.lm.dtype,
            name="patch_embedding",
        )(gathered)

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        patches: Array | None = None,
        patch_indices: Array | None = None,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        train: bool = False,
        decode: bool = False,
    ) -> Array:
        """inputs [B, L] int, patches [B, N, patch_dim], patch_indices [B, L] -> logits [B, L, V].

        ``patch_indices[b, t]`` is the index into ``patches[b]`` of the patch whose
        embedding is added to token t, or -1 (no patch). Without patches (both None)
        the model is its language model on text. ``segment_ids``, ``positions``,
        ``train``, ``decode``: as in ``TransformerLM`` (``decode`` needs positions).
        """
        self._validate(inputs, patches, patch_indices)
        extra = None if patches is None else self.patch_embeddings(patches, patch_indices)
        return self.lm(
            inputs,
            segment_ids=segment_ids,
            positions=positions,
            train=train,
            decode=decode,
            input_embeddings=extra,
        )


# --------------------------------------------------------------------------- generation


def _solo_prepare(model: SOLO, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return inputs  # (params, patches, prompt patch indices, prompt lengths)


def _solo_init_cache(model: SOLO, context: tuple[Any, ...], batch: int) -> Any:
    _, patches, _, _ = context
    one = jnp.zeros((batch, 1), jnp.int32)
    return generation.zero_cache(
        lambda patches: model.init(
            jax.random.PRNGKey(0), one, patches, one, positions=one, decode=True
        ),
        patches,
    )


def _solo_step(model: SOLO, context, cache, tokens, positions, prefix_lengths):
    """One call of the forced-prompt loop: a fed position inside its row's prompt gets
    the prompt's patch index there, any later position none."""
    del prefix_lengths  # a decoder
    params, patches, prompt_indices, prompt_lengths = context
    width = prompt_indices.shape[1]
    at = jnp.take_along_axis(prompt_indices, jnp.minimum(positions, width - 1), axis=1)
    indices = jnp.where(positions < prompt_lengths[:, None], at, NON_VISION)
    logits, mutated = model.apply(
        {"params": params, "cache": cache},
        tokens,
        patches,
        indices,
        positions=positions,
        decode=True,
        mutable=["cache"],
    )
    return logits, mutated["cache"]


_SOLO_FAMILY = generation.DecodeFamily("solo", _solo_prepare, _solo_init_cache, _solo_step)


def generate(
    model: SOLO,
    params: Any,
    prompts: Array,
    patches: Array,
    patch_indices: Array,
    prompt_lengths: Any = None,
    *,
    max_new_tokens: int,
    rng: Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    cache_length: int | None = None,
    return_logits: bool = False,
) -> generation.GenerateOutput:
    """Continue right-padded image+text ``prompts [B, P]`` with SOLO, using a KV cache.

    Args:
      model, params: a :class:`SOLO` and its ``variables["params"]``.
      prompts: [B, P] int, right-padded; prompt_lengths: [B] host ints in [1, P]
        (default all P).
      patches: [B, N, patch_dim] each row's patches; patch_indices: [B, P] the
        prompt's patch index per token (-1: none). Generated tokens get no patch.
      Other arguments as in :func:`effformer.models.generate.generate` (greedy when
      ``temperature`` is 0).

    Returns a ``GenerateOutput``: ``new_tokens`` [B, max_new_tokens] after each row's prompt.
    The loop is ``effformer.models.generate``'s forced-prompt loop: the whole prompt
    width is prefilled in one call, then one token per step from the shortest prompt on.
    """
    owner = "solo.generate"
    if not isinstance(model, SOLO):
        raise ValueError(f"{owner}: model must be a SOLO model, got {type(model).__name__}.")
    generation.check_max_new_tokens(owner, max_new_tokens)
    generation.check_sampling(temperature, top_k, model.vocab_size)
    lengths = generation.check_prompts(prompts, prompt_lengths)
    model._validate(jnp.asarray(prompts), patches, patch_indices)
    if not model.lm.supports_chunked_decode:
        raise ValueError(
            f"{owner}: the prompt is prefilled in one call, so every layer must be attention, "
            f"got layer_pattern={model.lm.layer_pattern!r}."
        )
    needed = prompts.shape[1] + max_new_tokens - 1
    table = model.lm.max_length if model.lm.position_encoding == "learned" else None
    cache_length = generation.check_cache_length(cache_length, needed, table)
    loop = generation.DecodeSettings(
        max_new_tokens, float(temperature), top_k, eos_id, pad_id, return_logits
    )
    decoder = model.clone(lm=model.lm.clone(max_decode_length=cache_length))
    context = (params, jnp.asarray(patches), jnp.asarray(patch_indices, jnp.int32),
               jnp.asarray(lengths))  # fmt: skip
    return generation.run_decode_loop(
        _SOLO_FAMILY, decoder, context, prompts, lengths, None, rng, loop, None
    )


# ----------------------------------------------------------------------------- registry

# Mistral-7B-v0.1 (its config.json): the LM of SOLO-7B.
MISTRAL_7B = dict(
    num_layers=32,
    embed_dim=4096,
    num_heads=32,
    num_kv_heads=8,
    ffn="swiglu",
    ffn_hidden_dim=14336,
    use_bias=False,
    norm="rms_norm",
    norm_epsilon=1e-5,
    ordering="pre_norm",
    position_encoding="rope",
    position_kwargs={"base": 10000.0},
    tie_embeddings=False,
)

# The same recipe at CPU scale (experiments/solo): 4 x 64, 4 query / 2 KV heads, SwiGLU
# 3.5 x wide as Mistral's; 4x4 grey patches (digits_vqa's); the data sets the vocabulary.
SMALL = dict(MISTRAL_7B, num_layers=4, embed_dim=64, num_heads=4, num_kv_heads=2,
             ffn_hidden_dim=224, vocab_size=64)  # fmt: skip

_TINY = dict(num_layers=2, embed_dim=16, num_heads=2, num_kv_heads=1, ffn_hidden_dim=32,
             vocab_size=32, patch_size=2, num_channels=1)  # fmt: skip


def _solo(lm_defaults: dict[str, Any], patch_size: int, num_channels: int, overrides) -> SOLO:
    lm = TransformerLM(kind="decoder", **{**lm_defaults, **overrides})
    return SOLO(lm=lm, patch_size=patch_size, num_channels=num_channels)


@register("solo_7b", tiny=_TINY)
def solo_7b(patch_size: int = PATCH_SIZE, num_channels: int = 3, **overrides: Any) -> SOLO:
    """SOLO-7B: Mistral-7B's decoder, SOLO's 33,031-token vocabulary, 32x32x3 patches."""
    return _solo(dict(MISTRAL_7B, vocab_size=SOLO_VOCAB_SIZE), patch_size, num_channels, overrides)


@register("solo_small", tiny=_TINY)
def solo_small(patch_size: int = 4, num_channels: int = 1, **overrides: Any) -> SOLO:
    """SOLO at CPU scale (4 x 64, Mistral's recipe, 4x4 grey patches) for experiments/solo."""
    return _solo(SMALL, patch_size, num_channels, overrides)
