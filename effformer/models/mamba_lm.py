"""The Mamba language model (Gu & Dao, 2023), its published sizes, and generation.

Transcribes ``MambaLMHeadModel`` of the original (state-spaces/mamba,
``mamba_ssm/models/mixer_seq_simple.py``) with the configuration of the
released checkpoints (``rms_norm=True``, ``residual_in_fp32=True``,
``pad_vocab_size_multiple=8``, ``norm_epsilon=1e-5``):

    residual = embedding(tokens)                        N(0, 0.02) init
    for each layer:                                     "Add -> RMSNorm -> Mixer"
        residual = residual + mixer(rms_norm(residual)) residual kept in float32
    logits   = rms_norm_f(residual) @ embedding.T       tied head, no bias

The original fuses the add into the next norm; the sums are the same.

Initialisation (the original's ``_init_weights``): embedding N(0, 0.02);
Linear biases zero (there are none: in_proj and out_proj have no bias, and
dt_proj's bias keeps its inverse-softplus init, which the original marks
``_no_reinit``); every ``out_proj`` kernel is PyTorch's default
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) divided by sqrt(num_layers) (GPT-2's
rescaling of the layers that write into the residual stream).

Vocabulary: the embedding has ``padded_vocab_size`` rows (``vocab_size``
rounded up to a multiple of ``pad_vocab_size_multiple``), as the original, so
parameter counts match. The logits are returned for the ``vocab_size`` real
tokens only: the padded rows name no token, and slicing them off keeps
sampling from ever choosing one (the original returns all padded logits).

Padding: ``segment_ids`` [B, L] mark padding with 0 (the mixer passes its
state through a padded token and outputs zero there). Mamba does NOT reset its
state between packed sequences: several non-zero segments in one row are not
separated, so give one sequence per row. ``positions`` is accepted for the
``causal_lm`` task's signature and unused (the original's ``position_ids`` too).

Decoding (``decode=True``, ``mutable=["cache"]``): one token [B, 1] per call,
each mixer advancing its conv and SSM state in the ``cache`` collection.
:func:`generate_mamba` prefills a prompt with the parallel scan and then
decodes recurrently, with the sampling loop of ``effformer.models.generate``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effformer.mixers.mamba import MambaMixer
from effformer.models.generate import (
    DecodeFamily,
    DecodeSettings,
    GenerateOutput,
    check_prompts,
    check_sampling,
    run_decode_loop,
    zeros_like_shapes,
)
from effformer.models.registry import register
from effformer.nn.norms import RMSNorm
from effformer.ops.masks import AttentionMask
from effformer.ops.selective_scan import DEFAULT_CHUNK_SIZE

Array = jax.Array
Dtype = Any


def pad_vocab_size(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple`` (the original's padding)."""
    return -(-vocab_size // multiple) * multiple


def _scale_out_proj(scale: float):
    """A transform of a mixer's variables multiplying its out_proj kernel by ``scale``."""

    def transform(variables: dict) -> dict:
        params = dict(variables["params"])
        params["out_proj"] = {"kernel": params["out_proj"]["kernel"] * scale}
        return {**variables, "params": params}

    return transform


class MambaResidualBlock(nn.Module):
    """``residual + mixer(rms_norm(residual))`` with the residual in the caller's dtype.

    ``out_proj_scale`` multiplies the mixer's out_proj kernel at initialisation
    only. MambaMixer builds its projections itself and offers no init hook, so
    the scaling is done with ``nn.map_variables`` (Flax's way to transform a
    submodule's variables from outside), applied only while initialising: the
    parameter tree is exactly MambaMixer's and training sees plain parameters.
    """

    embed_dim: int
    mixer_kwargs: dict[str, Any]
    out_proj_scale: float = 1.0
    norm_epsilon: float = 1e-5
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(
        self,
        residual: Array,
        *,
        compute_dtype: Dtype,
        mask: AttentionMask | None,
        deterministic: bool,
        decode: bool,
    ) -> Array:
        """residual [B, L, D] -> residual [B, L, D] (same dtype)."""
        hidden = RMSNorm(epsilon=self.norm_epsilon, dtype=compute_dtype, name="norm")(residual)
        mixer_cls = MambaMixer
        if self.out_proj_scale != 1.0 and self.is_initializing():
            # With init=True, map_variables creates the variables, maps them out, maps them
            # back in for the forward and out again: the in-map must undo the out-map, or
            # the scale would be applied twice.
            mixer_cls = nn.map_variables(
                MambaMixer,
                "params",
                trans_in_fn=_scale_out_proj(1 / self.out_proj_scale),
                trans_out_fn=_scale_out_proj(self.out_proj_scale),
                init=True,
            )
        hidden = mixer_cls(d_model=self.embed_dim, name="mixer", **self.mixer_kwargs)(
            hidden, mask=mask, deterministic=deterministic, decode=decode
        )
        if self.dropout_rate > 0:
            hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
        return residual + hidden.astype(residual.dtype)


class MambaStack(nn.Module):
    """``num_layers`` Mamba residual blocks and the final RMSNorm: [B, L, D] -> [B, L, D].

    Shared by :class:`MambaLM` and the sequence classifier. Parameter names
    follow the original's (``layers_{i}/norm``, ``layers_{i}/mixer``, ``norm_f``).

    Attributes:
      num_layers, embed_dim: depth and width D (the original's n_layer, d_model).
      d_state, d_conv, expand, dt_rank: the mixer's (defaults 16, 4, 2, ceil(D / 16)).
      norm_epsilon: of every RMSNorm (original 1e-5).
      residual_in_fp32: keep the residual stream in float32 whatever the compute dtype.
      rescale_out_proj: divide every out_proj init by sqrt(num_layers).
      dropout_rate: dropout on each mixer output (0 in the original).
      implementation, chunk_size: of the selective scan.
    """

    num_layers: int
    embed_dim: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    rescale_out_proj: bool = True
    dropout_rate: float = 0.0
    implementation: str | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        token_mask: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """x [B, L, D] (compute dtype), token_mask [B, L] bool (True = real) -> [B, L, D]."""
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"MambaStack: x must have shape [B, L, embed_dim={self.embed_dim}], got "
                f"{tuple(x.shape)}."
            )
        compute_dtype = x.dtype
        mask = None
        if token_mask is not None:
            segment_ids = token_mask.astype(jnp.int32)
            mask = AttentionMask(q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
        mixer_kwargs = dict(
            d_state=self.d_state, d_conv=self.d_conv, expand=self.expand, dt_rank=self.dt_rank,
            implementation=self.implementation, chunk_size=self.chunk_size,
        )  # fmt: skip
        scale = 1 / math.sqrt(self.num_layers) if self.rescale_out_proj else 1.0
        residual = x.astype(jnp.float32) if self.residual_in_fp32 else x
        for index in range(self.num_layers):
            residual = MambaResidualBlock(
                self.embed_dim,
                mixer_kwargs,
                out_proj_scale=scale,
                norm_epsilon=self.norm_epsilon,
                dropout_rate=self.dropout_rate,
                name=f"layers_{index}",
            )(
                residual,
                compute_dtype=compute_dtype,
                mask=mask,
                deterministic=deterministic,
                decode=decode,
            )
        return RMSNorm(epsilon=self.norm_epsilon, dtype=compute_dtype, name="norm_f")(residual)


class MambaLM(nn.Module):
    """Mamba language model: tokens [B, L] -> logits [B, L, vocab_size] (see the module doc).

    Attributes:
      vocab_size: real vocabulary V (original checkpoints: 50,277).
      pad_vocab_size_multiple: the embedding has V rounded up to this many rows.
      embed_dim, num_layers: width D and depth (the original's d_model, n_layer).
      d_state, d_conv, expand, dt_rank, norm_epsilon, residual_in_fp32,
        rescale_out_proj, implementation, chunk_size: see :class:`MambaStack`.
      dtype: compute dtype of the embedding output and the mixers (None: float32);
        parameters are float32, norms and the residual stream float32.
    """

    vocab_size: int = 50277
    pad_vocab_size_multiple: int = 8
    embed_dim: int = 768
    num_layers: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    rescale_out_proj: bool = True
    implementation: str | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    dtype: Dtype | None = None

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab_size(self.vocab_size, self.pad_vocab_size_multiple)

    # Segment ids are a padding mask only (the state runs across packed sequences): one
    # sequence per row. The trainer refuses packed data for a model saying False here.
    supports_packing = False

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        return {"inputs": jnp.ones((batch_size, 8), jnp.int32)}

    def _validate(self, inputs: Array, segment_ids: Array | None, decode: bool) -> None:
        if inputs.ndim != 2 or not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(
                f"MambaLM: inputs must be integer token ids [B, L], got shape "
                f"{tuple(inputs.shape)} and dtype {inputs.dtype}."
            )
        if segment_ids is not None and tuple(segment_ids.shape) != tuple(inputs.shape):
            raise ValueError(
                f"MambaLM: segment_ids must have the shape of inputs {tuple(inputs.shape)}, got "
                f"{tuple(segment_ids.shape)}."
            )
        if decode and inputs.shape[1] != 1:
            raise ValueError(
                f"MambaLM: decode=True advances one token per call; inputs must have shape "
                f"[B, 1], got {tuple(inputs.shape)}."
            )

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        train: bool = False,
        decode: bool = False,
    ) -> Array:
        """inputs [B, L] int -> logits [B, L, vocab_size].

        segment_ids [B, L]: 0 marks padding (one sequence per row, see the module
        doc); positions: unused (Mamba is causal by construction).
        """
        del positions
        self._validate(inputs, segment_ids, decode)
        embedding = nn.Embed(
            self.padded_vocab_size,
            self.embed_dim,
            embedding_init=nn.initializers.normal(stddev=0.02),
            dtype=self.dtype,
            name="embedding",
        )
        hidden = MambaStack(
            num_layers=self.num_layers, embed_dim=self.embed_dim, d_state=self.d_state,
            d_conv=self.d_conv, expand=self.expand, dt_rank=self.dt_rank,
            norm_epsilon=self.norm_epsilon, residual_in_fp32=self.residual_in_fp32,
            rescale_out_proj=self.rescale_out_proj, implementation=self.implementation,
            chunk_size=self.chunk_size, name="backbone",
        )(
            embedding(inputs),
            token_mask=None if segment_ids is None else segment_ids != 0,
            deterministic=not train,
            decode=decode,
        )  # fmt: skip
        return embedding.attend(hidden)[..., : self.vocab_size]


# ---------------------------------------------------------------------------- generation


def _cache_from_intermediates(intermediates: Any, cache_shapes: Any) -> Any:
    """The decode cache a parallel forward leaves (each mixer sows its final states)."""
    states = jax.tree.map(
        lambda sown: sown[0], intermediates, is_leaf=lambda x: isinstance(x, tuple)
    )
    if jax.tree.structure(states) != jax.tree.structure(cache_shapes):
        raise ValueError(
            "generate_mamba: the states sown by the parallel forward do not match the decode "
            f"cache: {jax.tree.structure(states)} vs {jax.tree.structure(cache_shapes)}."
        )
    return jax.tree.map(lambda value, shape: value.astype(shape.dtype), states, cache_shapes)


def generate_mamba(
    model: MambaLM,
    params: Any,
    prompts: Array,
    prompt_lengths: Any = None,
    *,
    max_new_tokens: int,
    rng: Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    return_logits: bool = False,
) -> GenerateOutput:
    """Continue right-padded ``prompts [B, P]`` of ``prompt_lengths [B]`` with a :class:`MambaLM`.

    The first ``min(prompt_lengths)`` tokens of every row are run in parallel
    (the selective scan), whose final conv and SSM states become the decode
    cache; then one recurrent step per position, every row fed its own prompt
    token while inside its prompt and the sampled token after it (the loop of
    ``effformer.models.generate``, whose :class:`GenerateOutput` this returns).
    The state has a fixed size, so there is no length limit.

    Args:
      model, params: the LM and its ``variables["params"]``.
      prompts: [B, P] int, right-padded; prompt_lengths: [B] host ints in [1, P]
        (default: all P).
      max_new_tokens: N >= 1 tokens generated after each row's prompt.
      rng: key for sampling (unused when greedy).
      temperature: 0 is greedy (argmax), else sample ``softmax(logits / temperature)``;
      top_k: restrict sampling to the k most likely tokens.
      eos_id: after a row generates it, its later generated tokens are ``pad_id``.
      return_logits: also return the logits of every position.
    """
    if not isinstance(model, MambaLM):
        raise ValueError(f"generate_mamba: model must be a MambaLM, got {type(model).__name__}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(
            f"generate_mamba: max_new_tokens must be a positive int, got {max_new_tokens!r}."
        )
    check_sampling(temperature, top_k, model.vocab_size)
    lengths = check_prompts(prompts, prompt_lengths)
    loop = DecodeSettings(max_new_tokens, float(temperature), top_k, eos_id, pad_id, return_logits)
    # The parallel scan prefills the first min(prompt_lengths) tokens of every row (from
    # the zero state); one compiled loop per model, settings, shapes and prefill length.
    return run_decode_loop(
        _MAMBA, model, params, prompts, np.asarray(lengths), None, rng, loop, int(lengths.min())
    )


def _mamba_cache_shapes(model: MambaLM, batch: int) -> Any:
    one = jnp.zeros((batch, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), one, decode=True)["cache"])


def _mamba_step(model: MambaLM, params, cache, tokens, positions, prefix_lengths):
    del positions, prefix_lengths  # a Mamba LM has neither
    if tokens.shape[1] == 1:
        logits, mutated = model.apply(
            {"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"]
        )
        return logits, mutated["cache"]
    # Prefill (always from position 0, so from the zero state): the parallel scan.
    logits, sown = model.apply({"params": params}, tokens, mutable=["intermediates"])
    cache_shapes = _mamba_cache_shapes(model, tokens.shape[0])
    return logits, _cache_from_intermediates(sown["intermediates"], cache_shapes)


_MAMBA = DecodeFamily(
    "mamba",
    lambda model, params: params,
    lambda model, params, batch: zeros_like_shapes(_mamba_cache_shapes(model, batch)),
    _mamba_step,
)


# ---------------------------------------------------------------------------- registry

# The released checkpoints (state-spaces/mamba README, "Pretrained Models"):
# name -> (n_layer, d_model); all with vocabulary 50,277 padded to 50,280.
MAMBA_SIZES = {
    "130m": (24, 768),
    "370m": (48, 1024),
    "790m": (48, 1536),
    "1_4b": (48, 2048),
    "2_8b": (64, 2560),
}
MAMBA_VOCAB_SIZE = 50277

# Vocabulary 61 pads to 64, so the tiny preset exercises the padding.
_TINY = dict(vocab_size=61, embed_dim=16, num_layers=2, d_state=4)


def _register_size(size: str) -> None:
    num_layers, embed_dim = MAMBA_SIZES[size]

    def builder(**overrides: Any) -> MambaLM:
        kwargs = dict(vocab_size=MAMBA_VOCAB_SIZE, num_layers=num_layers, embed_dim=embed_dim)
        return MambaLM(**{**kwargs, **overrides})

    builder.__doc__ = f"Mamba LM {size.replace('_', '.')} ({num_layers} x {embed_dim}, tied head)."
    register(f"mamba_{size}", tiny=_TINY)(builder)


for _size in MAMBA_SIZES:
    _register_size(_size)
