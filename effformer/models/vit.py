"""One configurable encoder classifier: ViT, ViT-Lite, CVT and CCT.

The four families differ only in parts chosen by fields of
:class:`VisionTransformer` (SHI-Labs/Compact-Transformers, ``src/cct.py``,
``src/vit.py``, ``src/cvt.py``; Dosovitskiy et al. for ViT):

=========== ============================ ============ ================== ==========
family      tokenizer                    pooling      layer ordering     qkv bias
=========== ============================ ============ ================== ==========
ViT         patches (any size down to 1) class token  pre-norm           yes
ViT-Lite    patches                      class token  CCT                no
CVT         patches                      SeqPool      CCT                no
CCT         convolutions + max pooling   SeqPool      CCT                no
=========== ============================ ============ ================== ==========

Every family: tokens -> (class token) -> + position embedding -> dropout ->
encoder blocks -> final LayerNorm -> pooling -> linear classifier. The
learned position table has one row per token *including* the class token, as
in both original codes. Stochastic depth grows linearly with depth,
``rate * i / (num_layers - 1)`` for block i (``torch.linspace(0, rate, L)``).

Token merging (ToMe, :mod:`effformer.reducers.tome`) is opt-in: with
``tome_r`` > 0 every block merges that many token pairs between its attention
and its MLP (similarity: the attention keys averaged over heads, as in the
paper), attends with proportional attention, and the pooling weighs each
token by its size (the class token is never merged). It adds no parameters,
so a model trained without merging is evaluated with it by rebuilding it with
``tome_r`` set (``model.clone(tome_r=8)``). With ``tome_r=0`` (the default) the
model is the same program as without the option.

Token pruning (Zero-TPrune, :mod:`effformer.reducers.zero_tprune`) is opt-in
the same way: ``zero_tprune_importance`` and ``zero_tprune_similarity`` tokens
are dropped per block, at the same place, by that block's attention graph
(weighted page rank) and key similarity; the class token is never pruned and
the pooling runs over the kept tokens. Not together with ``tome_r``.

IA-RED² (:mod:`effformer.reducers.ia_red`) is opt-in too: ``ia_red_stages``
names the blocks that a multi-head interpreter precedes; each interpreter
scores the live patch tokens and drops some, the class token is always kept.
With ``train=True`` the decisions are Bernoulli samples (the ``dropout`` RNG
stream), with ``train=False`` the tokens scored above 0.5 are kept; both run
by masking (a dropped token is out of every attention and of the pooling, with
no influence on the kept ones; nothing is saved). ``ia_red_top_k`` instead
keeps a fixed number of patch tokens per interpreter, the highest scores, and
gathers them, so later blocks run on fewer tokens. ``return_ia_red_policy=True``
returns ``(logits, policy)`` for the REINFORCE task
(``effformer.train.ia_red_task``). The interpreters are the only parameters
the option adds (``ia_red_interpreter_<stage>``).

The token mixer is softmax attention by default; ``mixer`` names another from
``effformer.mixers.MIXERS`` (e.g. ``"ecoformer"``), built with ``mixer_kwargs``
over the fields it shares with the model (heads, q/k/v bias, width, dtype).
Token merging and pruning need the attention mixer.

MatFormer's nested FFNs (Devvrit et al., 2023; scenic's MatViT) are call
arguments, as in the language models and with the same resolver
(:mod:`effformer.nn.ffn_widths`): ``ffn_widths`` runs block i's MLP at the
first ``widths[i]`` of its ``ffn_hidden_dim`` hidden units (one number for
every block, or one per block; an int of units or a float fraction), and
``ffn_granularities`` runs the encoder once per ``ffn_widths`` value and
stacks the logits, which the image classification tasks sum losses over
(``config.task.matformer_widths``). Without them the model is the same program.

A model is built for one input size (``image_size``, ``num_channels``); a
learned table trained at one size is carried to another by
:func:`interpolate_position_embedding` (CCT-14/7x2 224 -> 384 fine-tuning).

The named variants (and their parameter counts) are in
:mod:`effformer.models.vit_variants`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from effformer.initializers import trunc_normal
from effformer.mixers import MIXERS
from effformer.nn.block import ORDERINGS, ResidualBlock
from effformer.nn.ffn_widths import FfnWidths, granularity_runs, resolve_ffn_widths
from effformer.nn.norms import LayerNorm
from effformer.nn.pooling import ClassToken, SeqPool, mean_pool
from effformer.nn.position import LearnedPositionEmbedding, SinusoidalPositionEncoding
from effformer.nn.tokenizers import (
    ConvTokenizer,
    PatchEmbed,
    kaiming_normal_relu,
    torch_default_bias_init,
)
from effformer.ops.masks import AttentionMask
from effformer.reducers.ia_red import (
    MultiHeadInterpreter,
    check_stages,
    check_top_k,
    decision_log_prob,
    sample_decisions,
    threshold_decisions,
    top_k_keep,
)
from effformer.reducers.tome import (
    SizeWeightedSeqPool,
    compose_token_map,
    merge_schedule,
    size_weighted_mean,
)
from effformer.reducers.zero_tprune import gather_tokens, prune_schedule, wpr_iterations

Array = jax.Array
Dtype = Any

TOKENIZERS = ("patch", "conv")
PATCH_INITS = ("lecun_normal", "kaiming_normal")
POOLINGS = ("class_token", "seq_pool", "mean")
POSITION_EMBEDDINGS = ("learned", "sinusoidal", "none")

truncated_normal_002 = trunc_normal(0.02)


def conv_tokenizer_grid(image_size: int, kernel_size: int, num_conv_layers: int) -> int:
    """Side of the token grid of CCT's conv tokenizer on a square ``image_size`` input.

    Each block: Conv(k, stride max(1, k//2 - 1), padding max(1, k//2)) then
    MaxPool(3, stride 2, padding 1), with PyTorch's floor rounding.
    """
    stride, padding = max(1, kernel_size // 2 - 1), max(1, kernel_size // 2)
    side = image_size
    for _ in range(num_conv_layers):
        side = (side + 2 * padding - kernel_size) // stride + 1
        side = (side + 2 * 1 - 3) // 2 + 1
    return side


class VisionTransformer(nn.Module):
    """Image classifier: ``inputs [B, image_size, image_size, num_channels] -> logits [B, num_classes]``.

    Attributes:
      num_classes, image_size, num_channels: what the data decides (the task
        passes them to ``effformer.models.create``).
      tokenizer: ``"patch"`` (non-overlapping ``patch_size`` patches, any
        divisor of ``image_size`` down to 1) or ``"conv"`` (CCT's
        ``conv_layers`` blocks of ``conv_kernel_size`` convolutions).
      patch_init: the patch projection's initialisation: ``"lecun_normal"``
        (ViT, zero bias) or ``"kaiming_normal"`` (CVT and ViT-Lite: Compact-Transformers'
        ``Tokenizer`` applies ``kaiming_normal_`` to the weight and leaves the bias at
        PyTorch's default, uniform in +-1/sqrt(fan_in)).
      embed_dim, num_layers, num_heads, mlp_ratio: encoder shape; the FFN is
        ``int(embed_dim * mlp_ratio)`` wide.
      pooling: ``"class_token"`` (first token), ``"seq_pool"`` (CCT) or ``"mean"``.
      position_embedding: ``"learned"`` (truncated normal, ``position_init_std``:
        CCT 0.2, ViT 0.02), ``"sinusoidal"`` (fixed, sin/cos interleaved as in
        CCT's ``sine`` option: no parameters) or ``"none"``.
      block_ordering: ``"pre_norm"`` (ViT) or ``"cct"`` (see ``ResidualBlock``).
      qkv_bias: biases on q/k/v (ViT yes, CCT no; the output projection always has one).
      norm_epsilon: LayerNorm epsilon (ViT 1e-6, CCT's PyTorch default 1e-5).
      dropout_rate: CCT's ``dropout``: after the position embedding, on the
        attention output projection and inside the FFN.
      attention_dropout_rate: on the attention probabilities.
      drop_path_rate: stochastic depth of the last block (linear from 0).
      attention_implementation: passed to ``dot_product_attention``.
      mixer: the blocks' token mixer, a name in ``effformer.mixers.MIXERS``; a mixer
        other than ``"attention"`` gets ``num_heads``, ``qkv_bias``, ``out_bias=True``,
        ``d_model``, ``dtype`` and ``causal=False`` (the encoder is bidirectional)
        where it has such fields (not the attention dropout or implementation), then
        ``mixer_kwargs`` over them.
      mixer_kwargs: keyword arguments of the mixer, over the defaults above.
      tome_r: token merging: tokens merged per block (an int, clipped in each
        block to what its tokens allow, as the official code does) or one value
        per block (a sequence, taken exactly: too large is an error). 0: off.
        ``tome_schedule`` gives the per-block values.
      tome_proportional_attention: with merging, add ``log(size)`` of each key
        to the attention logits (the paper's choice for models evaluated off
        the shelf).
      zero_tprune_importance, zero_tprune_similarity: token pruning: tokens
        dropped per block by the I-stage (least important) and the S-stage
        (most similar to a more important token); each an int (clipped per
        block) or one value per block (exact). 0 and 0: off.
        ``zero_tprune_schedule`` gives the per-block pairs.
      zero_tprune_iterations: weighted-page-rank iterations in every pruning
        block; None: the paper's per-block counts (``wpr_iterations``).

      ia_red_stages: IA-RED²: the blocks a multi-head interpreter precedes (strictly
        ascending block indices, e.g. ``(0, 4, 8)`` for three groups of four
        blocks). () (the default): off.
      ia_red_heads: heads of each interpreter; None: ``num_heads``.
      ia_red_top_k: patch tokens each interpreter keeps, one count per stage
        (non-increasing), the highest-scoring ones, gathered; () (the default):
        the paper's decisions (samples when training, ``p > 0.5`` otherwise) by masking.

    With IA-RED², ``apply(..., mutable=["intermediates"])`` also returns, per stage,
    ``ia_red_keep_probs [B, P]`` (each original patch token's keep probability: the
    interpretability heat map; 0 for a token already dropped) and ``ia_red_kept
    [B, P]`` (bool, the patch tokens kept after that stage), P the image's patch tokens.

    With pruning, ``apply(..., mutable=["intermediates"])`` also returns
    ``zero_tprune_kept [B, N]``: the original index of each final token.

    With merging, ``apply(..., mutable=["intermediates"])`` also returns
    ``tome_token_sizes [B, N]`` (original tokens per final token) and
    ``tome_token_map [B, sequence_length]`` (the final token holding each
    original token; see ``effformer.reducers.tome.unmerge_tokens``).
    """

    num_classes: int = 1000
    image_size: int = 224
    num_channels: int = 3
    tokenizer: str = "patch"
    patch_size: int = 16
    patch_init: str = "lecun_normal"
    conv_kernel_size: int = 3
    conv_layers: int = 1
    conv_planes: int = 64
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    pooling: str = "class_token"
    position_embedding: str = "learned"
    position_init_std: float = 0.02
    block_ordering: str = "pre_norm"
    qkv_bias: bool = True
    norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_implementation: str | None = None
    dtype: Dtype | None = None
    mixer: str = "attention"
    mixer_kwargs: Mapping[str, Any] | None = None
    tome_r: int | tuple[int, ...] = 0
    tome_proportional_attention: bool = True
    zero_tprune_importance: int | tuple[int, ...] = 0
    zero_tprune_similarity: int | tuple[int, ...] = 0
    zero_tprune_iterations: int | None = None
    ia_red_stages: tuple[int, ...] = ()
    ia_red_heads: int | None = None
    ia_red_top_k: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # A list (from a config file or config.json) becomes a tuple: modules must hash.
        lists = ("tome_r", "zero_tprune_importance", "zero_tprune_similarity", "ia_red_stages")
        for field in (*lists, "ia_red_top_k"):
            if isinstance(getattr(self, field), list):
                object.__setattr__(self, field, tuple(getattr(self, field)))
        if self.mixer_kwargs is not None and not isinstance(self.mixer_kwargs, FrozenDict):
            object.__setattr__(self, "mixer_kwargs", FrozenDict(self.mixer_kwargs))
        super().__post_init__()

    # ------------------------------------------------------------------ shape arithmetic

    def check_config(self) -> None:
        """Raise ValueError naming the field for any configuration that cannot be built."""
        name = type(self).__name__
        choices = (
            ("tokenizer", self.tokenizer, TOKENIZERS),
            ("pooling", self.pooling, POOLINGS),
            ("position_embedding", self.position_embedding, POSITION_EMBEDDINGS),
            ("patch_init", self.patch_init, PATCH_INITS),
        )
        for field, value, allowed in choices:
            if value not in allowed:
                raise ValueError(f"{name}: {field} must be one of {allowed}, got {value!r}.")
        if self.mixer not in MIXERS:
            raise ValueError(f"{name}: mixer must be one of {sorted(MIXERS)}, got {self.mixer!r}.")
        if self.block_ordering not in ORDERINGS:
            raise ValueError(
                f"{name}: block_ordering must be one of {ORDERINGS}, got {self.block_ordering!r}."
            )
        positive = ("num_classes", "image_size", "num_channels", "embed_dim", "num_layers")
        tokenizer = ("patch_size",) if self.tokenizer == "patch" else ("conv_kernel_size",)
        if self.tokenizer == "conv" and self.conv_layers != 1:  # 1 block: no planes between
            tokenizer += ("conv_layers", "conv_planes")
        for field in (*positive, "num_heads", *tokenizer):
            value = getattr(self, field)
            # bool is an int to Python; True as a head count is a config slip, not 1.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: {field} must be a positive int, got {value!r}.")
        ratio = self.mlp_ratio
        number = isinstance(ratio, int | float) and not isinstance(ratio, bool)
        # "not > 0" also refuses NaN; the width check then needs a finite ratio.
        if not number or not ratio > 0 or ratio == float("inf") or self.ffn_hidden_dim < 1:
            raise ValueError(
                f"{name}: mlp_ratio must give an FFN at least 1 wide (int(embed_dim * "
                f"mlp_ratio) >= 1 with embed_dim={self.embed_dim}), got {ratio!r}."
            )
        for field in ("dropout_rate", "attention_dropout_rate", "drop_path_rate"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:  # NaN-safe
                raise ValueError(f"{name}: {field} must be in [0, 1), got {value!r}.")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"{name}: num_heads must divide embed_dim={self.embed_dim}, "
                f"got num_heads={self.num_heads}."
            )
        if self.tokenizer == "patch" and self.image_size % self.patch_size:
            raise ValueError(
                f"{name}: patch_size must be a positive divisor of image_size={self.image_size}, "
                f"got patch_size={self.patch_size}."
            )
        # With padding max(1, k//2) every conv and pool keeps at least one row, so any
        # positive image_size gives a non-empty grid for the conv tokenizer.
        try:
            merge_schedule(
                self.sequence_length, self.num_layers, self.tome_r, self.num_prefix_tokens
            )
        except ValueError as error:
            raise ValueError(f"{name}: tome_r={self.tome_r!r} is invalid: {error}") from None
        try:
            pruning = any(i or s for i, s in self.zero_tprune_schedule)
        except ValueError as error:
            raise ValueError(
                f"{name}: zero_tprune_importance={self.zero_tprune_importance!r} / "
                f"zero_tprune_similarity={self.zero_tprune_similarity!r} is invalid: {error}"
            ) from None
        if pruning and any(self.tome_schedule):
            raise ValueError(
                f"{name}: token pruning (zero_tprune_*) and token merging (tome_r) cannot be "
                f"combined, got tome_r={self.tome_r!r}, zero_tprune_importance="
                f"{self.zero_tprune_importance!r}, zero_tprune_similarity="
                f"{self.zero_tprune_similarity!r}."
            )
        iterations = self.zero_tprune_iterations
        if iterations is not None and (
            not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1
        ):
            raise ValueError(
                f"{name}: zero_tprune_iterations must be None or an int >= 1, got {iterations!r}."
            )
        self._check_ia_red(name, pruning)

    def _check_ia_red(self, name: str, pruning: bool) -> None:
        if self.ia_red_top_k and not self.ia_red_stages:
            raise ValueError(
                f"{name}: ia_red_top_k={self.ia_red_top_k!r} needs ia_red_stages, got ()."
            )
        try:
            stages = check_stages(self.ia_red_stages, self.num_layers)
            rows, cols = self.token_grid
            check_top_k(self.ia_red_top_k, len(stages), rows * cols)
        except ValueError as error:
            raise ValueError(
                f"{name}: ia_red_stages={self.ia_red_stages!r} / ia_red_top_k="
                f"{self.ia_red_top_k!r} is invalid: {error}"
            ) from None
        if not stages:
            return
        if pruning or any(self.tome_schedule):
            raise ValueError(
                f"{name}: IA-RED² (ia_red_stages) cannot be combined with token merging "
                f"(tome_r) or pruning (zero_tprune_*), got ia_red_stages={stages}, "
                f"tome_r={self.tome_r!r}, zero_tprune_importance={self.zero_tprune_importance!r}, "
                f"zero_tprune_similarity={self.zero_tprune_similarity!r}."
            )
        if self.mixer != "attention":
            raise ValueError(
                f"{name}: IA-RED² (ia_red_stages) masks dropped tokens out of softmax attention, "
                f"so it needs mixer='attention', got {self.mixer!r}."
            )
        heads = self.num_heads if self.ia_red_heads is None else self.ia_red_heads
        if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
            raise ValueError(f"{name}: ia_red_heads must be None or an int >= 1, got {heads!r}.")
        if self.embed_dim % heads:
            raise ValueError(
                f"{name}: ia_red_heads must divide embed_dim={self.embed_dim}, got {heads}."
            )

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, columns) of image tokens the tokenizer makes from one image."""
        if self.tokenizer == "patch":
            side = self.image_size // self.patch_size
        else:
            side = conv_tokenizer_grid(self.image_size, self.conv_kernel_size, self.conv_layers)
        return side, side

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the image tokens (the class token)."""
        return 1 if self.pooling == "class_token" else 0

    @property
    def sequence_length(self) -> int:
        """Tokens the encoder sees: image tokens plus the class token if any."""
        rows, cols = self.token_grid
        return rows * cols + self.num_prefix_tokens

    @property
    def tome_schedule(self) -> tuple[int, ...]:
        """Tokens merged in each block (all 0 without merging); see ``merge_schedule``."""
        return merge_schedule(
            self.sequence_length, self.num_layers, self.tome_r, self.num_prefix_tokens
        )

    @property
    def zero_tprune_schedule(self) -> tuple[tuple[int, int], ...]:
        """(I-stage, S-stage) tokens pruned in each block; see ``prune_schedule``."""
        return prune_schedule(
            self.sequence_length,
            self.num_layers,
            self.zero_tprune_importance,
            self.zero_tprune_similarity,
            self.num_prefix_tokens,
        )

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        shape = (batch_size, self.image_size, self.image_size, self.num_channels)
        return {"inputs": jnp.zeros(shape, jnp.float32)}

    # ------------------------------------------------------------------ forward

    def _check_inputs(self, inputs: Array) -> None:
        expected = (self.image_size, self.image_size, self.num_channels)
        if inputs.ndim != 4 or tuple(inputs.shape[1:]) != expected:
            hint = ""
            if inputs.ndim == 4 and inputs.shape[-1] == self.num_channels:
                hint = (
                    " Build the model for that size (create(..., image_size=...)); "
                    "interpolate_position_embedding carries learned weights across sizes."
                )
            raise ValueError(
                f"{type(self).__name__}: inputs must be [B, {expected[0]}, {expected[1]}, "
                f"{expected[2]}] (image_size={self.image_size}, num_channels="
                f"{self.num_channels}), got shape {tuple(inputs.shape)}.{hint}"
            )

    def _tokenize(self, inputs: Array) -> Array:
        if self.tokenizer == "patch":
            inits = {}
            if self.patch_init == "kaiming_normal":
                fan_in = self.patch_size**2 * self.num_channels
                inits = dict(
                    kernel_init=kaiming_normal_relu, bias_init=torch_default_bias_init(fan_in)
                )
            tokens, _ = PatchEmbed(
                self.patch_size,
                self.embed_dim,
                use_bias=True,
                dtype=self.dtype,
                name="tokenizer",
                **inits,
            )(inputs)
        else:
            tokens, _ = ConvTokenizer(
                self.embed_dim,
                kernel_size=self.conv_kernel_size,
                num_conv_layers=self.conv_layers,
                in_planes=self.conv_planes,
                dtype=self.dtype,
                name="tokenizer",
            )(inputs)
        return tokens

    def _embed_positions(self, x: Array) -> Array:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        if self.position_embedding == "learned":
            encoding = LearnedPositionEmbedding(
                max_length=self.sequence_length,
                init_std=self.position_init_std,
                name="position_embedding",
            )
            return encoding.embed(x, positions)
        if self.position_embedding == "sinusoidal":
            # CCT's `sine` table: channel 2i holds sin, 2i+1 cos, of p / 10000^(2i/D).
            return SinusoidalPositionEncoding(interleaved=True).embed(x, positions)
        return x

    @property
    def ffn_hidden_dim(self) -> int:
        """Every block's FFN width, ``int(embed_dim * mlp_ratio)``."""
        return int(self.embed_dim * self.mlp_ratio)

    def _mixer_kwargs(self) -> dict[str, Any]:
        shared = dict(num_heads=self.num_heads, qkv_bias=self.qkv_bias, out_bias=True)
        if self.mixer == "attention":
            shared.update(
                attention_dropout_rate=self.attention_dropout_rate,
                implementation=self.attention_implementation,
                dtype=self.dtype,
            )
        else:
            fields = {field.name for field in dataclasses.fields(MIXERS[self.mixer])}
            shared.update(d_model=self.embed_dim, dtype=self.dtype, causal=False)
            shared = {key: value for key, value in shared.items() if key in fields}
        return {**shared, **dict(self.mixer_kwargs or {})}

    def _block(self, index: int) -> ResidualBlock:
        return ResidualBlock(
            mixer=self.mixer,
            mixer_kwargs=self._mixer_kwargs(),
            ffn="gelu",
            ffn_hidden_dim=self.ffn_hidden_dim,
            ffn_kwargs=dict(dropout_rate=self.dropout_rate, dtype=self.dtype),
            norm_epsilon=self.norm_epsilon,
            ordering=self.block_ordering,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            name=f"block_{index}",
        )

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        *,
        train: bool = False,
        drop_path_rate: float | Array | None = None,
        ffn_widths: FfnWidths = None,
        ffn_granularities: Sequence[FfnWidths] | None = None,
        return_ia_red_policy: bool = False,
    ) -> Array | tuple[Array, dict[str, Array]]:
        """inputs [B, H, W, C] -> logits [B, num_classes] (float32 unless ``dtype`` says otherwise).

        ``drop_path_rate`` (a trainer schedule) replaces the attribute as the
        last block's stochastic-depth rate.

        MatFormer (see the module docstring): ``ffn_widths`` is every block's
        FFN hidden width, one number or one per block (None: full width, the
        same program as without the argument). ``ffn_granularities``: G
        ``ffn_widths`` values; the encoder, norm, pooling and head run once at
        each on the same tokens (the tokenizer, position embedding and its
        dropout run once) and the logits come stacked, [G, B, num_classes].

        ``return_ia_red_policy`` (IA-RED² with its decisions, not ``ia_red_top_k``):
        returns ``(logits, policy)``, ``policy`` holding ``[B]`` arrays: ``log_prob``
        (log-likelihood of all the decisions), ``kept_fraction`` (mean over the
        blocks of the fraction of patch tokens each processes) and
        ``final_kept_fraction`` (patch tokens kept after the last stage).
        """
        self.check_config()
        self._check_inputs(inputs)
        runs = granularity_runs(
            type(self).__name__,
            ffn_widths,
            ffn_granularities,
            self.num_layers,
            self.ffn_hidden_dim,
        )
        deterministic = not train
        x = self._tokenize(inputs)
        if self.pooling == "class_token":
            x = ClassToken(name="class_token")(x)
        x = self._embed_positions(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)

        blocks = [self._block(i) for i in range(self.num_layers)]
        final_norm = LayerNorm(self.norm_epsilon, dtype=self.dtype, name="final_norm")
        head = nn.Dense(
            self.num_classes, kernel_init=truncated_normal_002, dtype=self.dtype, name="head"
        )
        if self.pooling == "seq_pool":
            merging = any(self.tome_schedule)
            seq_pool = (SizeWeightedSeqPool if merging else SeqPool)(
                dtype=self.dtype, name="seq_pool"
            )
        else:
            seq_pool = None
        max_rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        if self.ia_red_stages or return_ia_red_policy:
            features, policy = self._encode_ia_red(
                x,
                blocks,
                final_norm,
                seq_pool,
                resolve_ffn_widths(runs[0], self.num_layers, self.ffn_hidden_dim),
                deterministic,
                max_rate,
                ffn_granularities is not None,
                return_ia_red_policy,
            )
            logits = head(features)
            return (logits, policy) if return_ia_red_policy else logits
        outputs = [
            head(
                self._encode(
                    x,
                    blocks,
                    final_norm,
                    seq_pool,
                    resolve_ffn_widths(widths, self.num_layers, self.ffn_hidden_dim),
                    deterministic,
                    max_rate,
                )
            )
            for widths in runs
        ]
        return outputs[0] if ffn_granularities is None else jnp.stack(outputs)

    def _encode(
        self,
        x: Array,
        blocks: list[ResidualBlock],
        final_norm: LayerNorm,
        seq_pool: nn.Module | None,
        widths: tuple[int | None, ...],
        deterministic: bool,
        max_rate: float | Array,
    ) -> Array:
        """Embedded tokens [B, N, D] -> pooled features [B, D] with block i's FFN at widths[i]."""
        schedule = self.tome_schedule
        merging = any(schedule)
        if merging:
            # Sizes: how many original tokens each token stands for (float: log, weights).
            sizes = jnp.ones(x.shape[:2], jnp.promote_types(x.dtype, jnp.float32))
            token_map = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
            merged_before = False
        pruning_schedule = self.zero_tprune_schedule
        pruning = any(i or s for i, s in pruning_schedule)
        if pruning:
            kept = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])

        for i, block in enumerate(blocks):
            # torch.linspace(0, rate, L): block i drops with rate * i / (L - 1).
            fraction = i / (self.num_layers - 1) if self.num_layers > 1 else 0.0
            block_rate = max_rate * fraction
            # A Python 0.0 rate skips DropPath entirely (block 0, or no stochastic depth).
            if pruning and any(pruning_schedule[i]):
                iterations = self.zero_tprune_iterations or wpr_iterations(i, self.num_layers)
                x, keep = block(
                    x,
                    deterministic=deterministic,
                    drop_path_rate=block_rate,
                    prune_importance=pruning_schedule[i][0],
                    prune_similarity=pruning_schedule[i][1],
                    wpr_iterations=iterations,
                    num_protected=self.num_prefix_tokens,
                    ffn_width=widths[i],
                )
                kept = gather_tokens(kept, keep)
                continue
            if not merging:
                x = block(
                    x, deterministic=deterministic, drop_path_rate=block_rate, ffn_width=widths[i]
                )
                continue
            x, sizes, destination = block(
                x,
                deterministic=deterministic,
                drop_path_rate=block_rate,
                token_sizes=sizes,
                merge_r=schedule[i],
                num_protected=self.num_prefix_tokens,
                # Before the first merge every size is 1 and log(1) = 0: no bias needed.
                proportional_attention=self.tome_proportional_attention and merged_before,
                ffn_width=widths[i],
            )
            token_map = compose_token_map(token_map, destination)
            merged_before = merged_before or schedule[i] > 0
        x = final_norm(x)
        # With several granularities each run sows its own entry, in order.
        if pruning:
            self.sow("intermediates", "zero_tprune_kept", kept)
        if merging:
            self.sow("intermediates", "tome_token_sizes", sizes)
            self.sow("intermediates", "tome_token_map", token_map)

        # Pooling over merged tokens weighs each by its size; the class token is never merged.
        if self.pooling == "class_token":
            return x[:, 0]
        if self.pooling == "seq_pool":
            return seq_pool(x, sizes) if merging else seq_pool(x)
        return size_weighted_mean(x, sizes) if merging else mean_pool(x)

    def _encode_ia_red(
        self,
        x: Array,
        blocks: list[ResidualBlock],
        final_norm: LayerNorm,
        seq_pool: nn.Module | None,
        widths: tuple[int | None, ...],
        deterministic: bool,
        max_rate: float | Array,
        granularities: bool,
        return_policy: bool,
    ) -> tuple[Array, dict[str, Array]]:
        """IA-RED²'s encoder (module docstring): [B, N, D] -> (pooled [B, D], policy)."""
        name = type(self).__name__
        if not self.ia_red_stages:
            raise ValueError(f"{name}: return_ia_red_policy=True needs ia_red_stages, got ().")
        if granularities:
            raise ValueError(f"{name}: IA-RED² (ia_red_stages) does not take ffn_granularities.")
        top_k = self.ia_red_top_k
        if return_policy and top_k:
            raise ValueError(
                f"{name}: return_ia_red_policy needs the paper's decisions, which top-k mode "
                f"replaces; got ia_red_top_k={top_k!r}."
            )
        protected = self.num_prefix_tokens
        batch, num_tokens = x.shape[:2]
        num_patches = num_tokens - protected
        heads = self.ia_red_heads or self.num_heads
        stage_of = {block: s for s, block in enumerate(self.ia_red_stages)}
        alive = jnp.ones((batch, num_tokens), bool)  # masking: the live tokens
        origin = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        log_prob = jnp.zeros((batch,), dtype)
        work = jnp.zeros((batch,), dtype)  # sum over blocks of the live patch fraction
        rows = jnp.arange(batch)[:, None]
        for i, block in enumerate(blocks):
            if i in stage_of:
                interpreter = MultiHeadInterpreter(heads, name=f"ia_red_interpreter_{stage_of[i]}")
                probs = interpreter(x, alive, num_protected=protected)
                patch_alive, patch_origin = alive[:, protected:], origin[:, protected:] - protected
                if top_k:
                    keep = top_k_keep(probs, top_k[stage_of[i]], num_protected=protected)
                    x, origin = gather_tokens(x, keep), gather_tokens(origin, keep)
                    alive = jnp.ones(origin.shape, bool)
                    kept = jnp.zeros((batch, num_patches), bool)
                    kept = kept.at[rows, origin[:, protected:] - protected].set(True)
                else:
                    if deterministic:
                        decisions = threshold_decisions(probs, patch_alive)
                    else:
                        key = self.make_rng("dropout")
                        decisions = sample_decisions(key, probs, patch_alive)
                    log_prob = log_prob + decision_log_prob(probs, decisions, patch_alive)
                    alive = jnp.concatenate([alive[:, :protected], decisions], axis=1)
                    kept = decisions
                heat = jnp.zeros((batch, num_patches), probs.dtype)
                self.sow(
                    "intermediates", "ia_red_keep_probs", heat.at[rows, patch_origin].set(probs)
                )
                self.sow("intermediates", "ia_red_kept", kept)
            work = work + jnp.sum(alive[:, protected:], axis=-1) / num_patches
            # Masking: a dropped token (segment id 0) sees nothing and is seen by nothing.
            ids = alive.astype(jnp.int32)
            mask = None if top_k else AttentionMask(q_segment_ids=ids, kv_segment_ids=ids)
            fraction = i / (self.num_layers - 1) if self.num_layers > 1 else 0.0
            x = block(
                x,
                mask=mask,
                deterministic=deterministic,
                drop_path_rate=max_rate * fraction,
                ffn_width=widths[i],
            )
        x = final_norm(x)
        policy = {
            "log_prob": log_prob,
            "kept_fraction": work / self.num_layers,
            "final_kept_fraction": jnp.sum(alive[:, protected:], axis=-1) / num_patches,
        }
        if self.pooling == "class_token":
            return x[:, 0], policy
        if self.pooling == "seq_pool":
            return seq_pool(x, alive), policy
        return mean_pool(x, alive), policy


def interpolate_position_embedding(
    params: dict, source: VisionTransformer, target: VisionTransformer
) -> dict:
    """Carry ``source``'s parameters to ``target``, a model for another input size.

    The learned position table's image-token rows are resized bilinearly on
    their grid (half-pixel centres, no antialiasing: ``F.interpolate(...,
    mode='bilinear')`` as in Compact-Transformers' ``resize_pos_embed`` from
    timm); the class token's row is kept. Every other parameter must have the
    same shape in both models and is returned unchanged.

    params: ``source``'s ``params`` collection -> ``target``'s.
    """
    for model, role in ((source, "source"), (target, "target")):
        if model.position_embedding != "learned":
            raise ValueError(
                f"interpolate_position_embedding: {role} must use position_embedding='learned', "
                f"got {model.position_embedding!r}."
            )
    if source.num_prefix_tokens != target.num_prefix_tokens:
        raise ValueError(
            "interpolate_position_embedding: source and target must both have a class token "
            f"or both not; got {source.num_prefix_tokens} and {target.num_prefix_tokens} prefix "
            "tokens."
        )
    table = params["position_embedding"]["embedding"]
    if table.shape[0] != source.sequence_length:
        raise ValueError(
            f"interpolate_position_embedding: the table has {table.shape[0]} rows but source "
            f"makes {source.sequence_length} tokens."
        )
    prefix = source.num_prefix_tokens
    grid = table[prefix:].reshape(*source.token_grid, table.shape[-1])
    resized = jax.image.resize(
        grid.astype(jnp.float32),
        (*target.token_grid, table.shape[-1]),
        method="bilinear",
        antialias=False,
    ).astype(table.dtype)
    new_table = jnp.concatenate([table[:prefix], resized.reshape(-1, table.shape[-1])], axis=0)
    new_params = {**params, "position_embedding": {"embedding": new_table}}
    expected = jax.eval_shape(
        lambda: target.init(jax.random.PRNGKey(0), **target.dummy_inputs(1))["params"]
    )
    got_shapes = jax.tree_util.tree_flatten_with_path(new_params)[0]
    want_shapes = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    for path, value in got_shapes:
        want = want_shapes.pop(path, None)
        if want is None or tuple(want.shape) != tuple(value.shape):
            raise ValueError(
                f"interpolate_position_embedding: parameter {jax.tree_util.keystr(path)} has "
                f"shape {tuple(value.shape)} in source, but target expects "
                f"{None if want is None else tuple(want.shape)}."
            )
    if want_shapes:
        missing = [jax.tree_util.keystr(path) for path in want_shapes]
        raise ValueError(
            f"interpolate_position_embedding: source lacks target parameters {missing}."
        )
    return new_params
