"""CarelessWhisper (2025): a Whisper-style encoder-decoder made causal for streaming.

"CarelessWhisper: Turning Whisper into a Causal Streaming Model" (arXiv 2508.12301). The official
code (``tomer9080/CarelessWhisper-Streaming``: ``streaming_model.py``,
``streaming_decoding.py``, ``training_code/whisper_module.py``) turns a trained,
non-causal Whisper into a streaming model in three steps, all built here at
this library's scale, on frames instead of log-mel spectrograms:

* **the model** (Whisper's layout): a convolutional stem over the input frames
  (``Conv1d(k=3) GELU Conv1d(k=3, stride=stem_stride) GELU``, Whisper's
  stride 2 halving the frame rate), sinusoidal positions, an encoder
  :class:`~effformer.models.lm_layers.LayerStack`, and a decoder stack with
  learned positions and cross-attention to the encoder output in every layer;
  the output layer is the transposed token embedding;
* **the block-causal encoder** (``StreamingAudioEncoder.mask``): with
  ``chunk_size = C`` (the official ``gran``, in encoder frames) encoder frame
  ``j`` sees exactly the frames of chunks ``0 .. j // C``: its own chunk and
  every earlier one. ``chunk_size=None`` is the offline, bidirectional
  encoder; both are one ``LayerStack(causal=True, prefix_lm=True)`` whose
  causal order is the "mask position" of each frame (its chunk index, or 0
  for every frame when bidirectional), the prefix LM's mechanism, so the same
  parameters serve both and a chunk encoded against the KV cache
  (:meth:`CarelessWhisper.encode_chunk`) computes only its own rows. Padding
  frames get a mask position after every chunk, and the stem reads them as
  its zero padding: no real frame sees them, so a row's encoding does not
  depend on the batch's padding.
  ``extra_first_chunks = e`` (the official ``extra_gran_blocks``) merges the
  first ``1 + e`` chunks into one larger first chunk, bidirectional inside
  (mask position ``max(j // C - e, 0)``), as the official streaming encoder
  does; here it is an inference option (the task trains with ``e = 0``);
* **LoRA** (``LoraLayer`` / ``LoRAMultiHeadAttention``): adapters on the query,
  key, value and output projections of the encoder's self-attention, the
  decoder's self-attention and the decoder's cross-attention, every layer (the
  projections the official code wraps). ``y = x W + (alpha / rank) (x A) B``
  with ``A [in, rank]`` uniform in ``+-1/sqrt(rank)`` (PyTorch's
  ``kaiming_uniform_(a=sqrt(5))`` on the official ``[in, rank]`` tensor) and
  ``B`` zero, so training starts at the base model. The official layer never
  passes an alpha, so ``alpha = rank`` (scale 1) is the default here (the
  README's training example uses rank 32 on Whisper base). The
  factors are the top-level module ``lora`` (``lora_rank=0``: none), so
  ``config.optimizer.trainable_modules = "lora"`` freezes the base weights and
  ``config.init_from`` with ``reinit = "lora"`` starts them from an offline run.
  The adapter is added to the library's ``DenseGeneral`` projections by a Flax
  method interceptor (the attention mixers stay unchanged);
  :func:`merge_lora` folds ``W + (alpha / rank) A B`` into the kernels, which
  a ``lora_rank=0`` model then runs (the same function, tested).

The stem looks ahead: a centred convolution of kernel 3 at each of its two
layers means encoder frame ``j`` reads input frames up to ``s * j + 2``
(``s = stem_stride``). A chunk's rows are therefore final once the input
frames up to ``s * (k + 1) * C - s + 2`` have arrived, ``3 - s`` frames past
the chunk (one for Whisper's stride 2, its 10 ms); beyond the stem everything
is block-causal. :meth:`CarelessWhisper.stem_rows` computes the rows of one
chunk from that window only.

The official training (``LoRAStreamedWhisper._forward_step_stream``) encodes
prefixes of the audio, chunk by chunk, and trains the decoder, teacher-forced,
on the tokens whose audio has ended by the chunk's end (``_calc_labels``:
the weakly aligned targets). Because the encoder is block-causal, the prefix's
encoder states are the first rows of the full pass, so ``__call__`` with
``cut_fractions`` runs the encoder once and the decoder once per cut, its
cross-attention limited to the frames before the cut; the ``careless_whisper``
task (``effformer/train/careless_whisper_task.py``) builds the targets.
Streaming inference (:func:`stream_transcribe`) follows the official greedy
``StreamingDecoder`` (:func:`stream_decode_step`, the default) or its
``BeamStreamingDecoder`` (:func:`stream_beam_step`, ``beam_size``), with the
official larger first chunk (``extra_first_chunks``), and stamps each token
with the chunk after which it was emitted (:class:`StreamResult`: the "simple
method" of word timestamps the paper credits to the weakly aligned training,
here per token; the official greedy decoder's ``timestamps_map`` records the
chunk that first filled each slot, returned too). With ``kv_cache=True`` the greedy decoder caches its
self-attention keys and values within each chunk (:meth:`CarelessWhisper.decode_cached`;
the same transcripts, tested); the beam decoder recomputes its prefixes at
every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from effformer.models.lm_layers import LayerStack
from effformer.models.registry import register

Array = jax.Array
Dtype = Any

PROJECTIONS = ("query", "key", "value", "out")
# Mask position of padding frames: after every chunk, so no real frame attends to them.
PADDING_MASK_POSITION = 1 << 20


def _check_frames(inputs: Array, input_dim: int) -> None:
    if inputs.ndim != 3 or inputs.shape[-1] != input_dim:
        raise ValueError(
            f"CarelessWhisper: inputs must be frames [B, T, input_dim={input_dim}], got shape "
            f"{tuple(inputs.shape)}."
        )
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
        raise ValueError(f"CarelessWhisper: inputs must be float frames, got dtype {inputs.dtype}.")


def check_extra_first_chunks(extra_first_chunks: Any, chunk_size: int | None) -> int:
    """``extra_first_chunks`` validated: an int >= 0, and 0 for the bidirectional encoder."""
    value = extra_first_chunks
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"CarelessWhisper: extra_first_chunks must be an int >= 0, got {value!r}.")
    if value and chunk_size is None:
        raise ValueError(
            f"CarelessWhisper: extra_first_chunks={value} needs the block-causal encoder "
            "(chunk_size an int), got chunk_size=None."
        )
    return int(value)


def check_max_tokens(owner: str, max_tokens: Any, max_target_length: int) -> None:
    """Refuse a ``max_tokens`` that is not an int in [1, max_target_length - 1] (the start
    token takes one position of the decoder's learned table)."""
    if (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int | np.integer)
        or not 1 <= max_tokens < max_target_length
    ):
        raise ValueError(
            f"{owner}: max_tokens must be an int in [1, max_target_length - 1 = "
            f"{max_target_length - 1}], got {max_tokens!r}."
        )


def check_chunk_size(chunk_size: Any) -> int | None:
    """``chunk_size`` validated: None (bidirectional encoder) or an int >= 1."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
        raise ValueError(
            f"CarelessWhisper: chunk_size must be None or an int >= 1, got {chunk_size!r}."
        )
    if chunk_size < 1:
        raise ValueError(f"CarelessWhisper: chunk_size must be >= 1, got {chunk_size}.")
    return int(chunk_size)


def lora_targets(
    num_encoder_layers: int, num_decoder_layers: int, embed_dim: int, inner_dim: int
) -> tuple[tuple[str, int, int], ...]:
    """(key, in features, out features) of every adapted projection.

    key ``"<stack>.<attention module>.<projection>"`` is the projection's module path
    in :class:`CarelessWhisper`; q/k/v map ``embed_dim -> inner_dim`` (heads x head
    width), the output projection ``inner_dim -> embed_dim``.
    """
    modules = [("encoder", f"layer_{i}_attention") for i in range(num_encoder_layers)]
    for i in range(num_decoder_layers):
        modules += [("decoder", f"layer_{i}_attention"), ("decoder", f"layer_{i}_cross_attention")]
    targets = []
    for stack, attention in modules:
        for projection in PROJECTIONS:
            sizes = (inner_dim, embed_dim) if projection == "out" else (embed_dim, inner_dim)
            targets.append((f"{stack}.{attention}.{projection}", *sizes))
    return tuple(targets)


class LoRAFactors(nn.Module):
    """The LoRA factors ``{key: (A [in, rank], B [rank, out])}`` of every target.

    ``A`` uniform in ``+-1/sqrt(rank)``, ``B`` zero (module docstring). Parameters
    ``<key>.a`` and ``<key>.b`` (the key's dots are kept in the name).
    """

    targets: tuple[tuple[str, int, int], ...]
    rank: int

    @nn.compact
    def __call__(self) -> dict[str, tuple[Array, Array]]:
        bound = 1.0 / np.sqrt(self.rank)

        def uniform(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        return {
            key: (
                self.param(f"{key}.a", uniform, (fan_in, self.rank)),
                self.param(f"{key}.b", nn.initializers.zeros, (self.rank, fan_out)),
            )
            for key, fan_in, fan_out in self.targets
        }


def _lora_interceptor(root_path: tuple[str, ...], factors: Mapping, scale: float):
    """A Flax method interceptor adding ``scale * (x A) B`` to each adapted projection."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.DenseGeneral):
            return out
        key = ".".join(module.path[len(root_path) :])
        if key not in factors:
            return out
        a, b = factors[key]
        x = args[0]
        flat = x.reshape(*x.shape[:-2], -1) if key.endswith(".out") else x
        delta = (flat @ a.astype(flat.dtype)) @ b.astype(flat.dtype)
        return out + (scale * delta).reshape(out.shape).astype(out.dtype)

    return interceptor


def merge_lora(params: Mapping, rank: int, alpha: float | None = None) -> dict:
    """Parameters of a ``lora_rank=0`` model: every adapted kernel ``W + (alpha/rank) A B``.

    params: a LoRA model's parameters (with the top-level ``lora``); alpha None: rank.
    """
    if "lora" not in params:
        raise ValueError(
            f"merge_lora: params must hold the top-level 'lora' factors, got {sorted(params)}."
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"merge_lora: rank must be an int >= 1, got {rank!r}.")
    scale = (rank if alpha is None else alpha) / rank
    flat = traverse_util.flatten_dict({k: v for k, v in params.items() if k != "lora"})
    lora = params["lora"]
    for name in lora:
        if not name.endswith(".a"):
            continue
        key = name[: -len(".a")]
        path = (*key.split("."), "kernel")
        if path not in flat:
            raise ValueError(f"merge_lora: no kernel {'/'.join(path)} for LoRA factors {key!r}.")
        if lora[name].shape[-1] != rank:
            # The scale alpha / rank would silently be that of another rank.
            raise ValueError(
                f"merge_lora: rank must be the factors' rank {lora[name].shape[-1]} (A of "
                f"{key!r} is {tuple(lora[name].shape)}), got rank={rank!r}."
            )
        kernel = flat[path]
        delta = (lora[name] @ lora[f"{key}.b"]).reshape(kernel.shape)
        flat[path] = kernel + scale * delta.astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


class CarelessWhisper(nn.Module):
    """Whisper-style encoder-decoder over frames with a block-causal encoder and LoRA.

    Attributes:
      vocab_size: output tokens (0 is padding and the decoder's start token, as in
        the ``seq2seq`` task).
      input_dim: F, channels per input frame.
      embed_dim, num_heads, ffn_hidden_dim: width of both stacks.
      num_encoder_layers, num_decoder_layers: depths.
      stem_stride: the second stem convolution's stride (Whisper: 2).
      chunk_size: encoder frames per chunk of the block-causal encoder; None: the
        bidirectional (offline) encoder. A call's ``chunk_size`` overrides it.
      lora_rank: LoRA rank; 0: no adapters (no ``lora`` parameters).
      lora_alpha: LoRA alpha (scale alpha / rank); None: rank (the official default).
      max_target_length: positions of the decoder's learned table.
      dropout_rate, attention_dropout_rate: regularisation (``train=True``).
      max_frames: frames of ``dummy_inputs``.
    """

    vocab_size: int = 64
    input_dim: int = 80
    embed_dim: int = 256
    num_heads: int = 4
    ffn_hidden_dim: int = 1024
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    stem_stride: int = 2
    chunk_size: int | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    max_target_length: int = 64
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    max_frames: int = 32
    dtype: Dtype | None = None

    def check_config(self) -> None:
        """Fail at once, naming the field, on a configuration that cannot run."""
        for field in ("vocab_size", "input_dim", "embed_dim", "num_heads", "ffn_hidden_dim",
                      "num_encoder_layers", "num_decoder_layers", "stem_stride",
                      "max_target_length", "max_frames"):  # fmt: skip
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CarelessWhisper: {field} must be an int >= 1, got {value!r}.")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"CarelessWhisper: num_heads must divide embed_dim={self.embed_dim}, got "
                f"{self.num_heads}."
            )
        check_chunk_size(self.chunk_size)
        rank = self.lora_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"CarelessWhisper: lora_rank must be an int >= 0, got {rank!r}.")

    @property
    def lora_scale(self) -> float:
        alpha = self.lora_rank if self.lora_alpha is None else float(self.lora_alpha)
        return alpha / self.lora_rank

    def _stack(self, *, cross_attention: bool, position_encoding: str, **kwargs) -> LayerStack:
        return LayerStack(
            num_layers=self.num_decoder_layers if cross_attention else self.num_encoder_layers,
            causal=True,
            cross_attention=cross_attention,
            num_heads=self.num_heads,
            ffn="gelu",
            ffn_hidden_dim=self.ffn_hidden_dim,
            position_encoding=position_encoding,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            dtype=self.dtype,
            **kwargs,
        )

    def setup(self) -> None:
        self.check_config()
        self.stem_conv1 = nn.Conv(self.embed_dim, (3,), padding="VALID", dtype=self.dtype)
        self.stem_conv2 = nn.Conv(
            self.embed_dim,
            (3,),
            strides=(self.stem_stride,),
            padding="VALID",
            dtype=self.dtype,
        )
        self.encoder = self._stack(
            cross_attention=False, position_encoding="sinusoidal", prefix_lm=True
        )
        # prefix_lm: with mask positions equal to the positions the decoder is plainly causal;
        # the KV cache then records each key's position, so that decode_cached can hide slots.
        self.decoder = self._stack(
            cross_attention=True,
            position_encoding="learned",
            position_kwargs={"max_length": self.max_target_length},
            prefix_lm=True,
        )
        self.token_embedding = nn.Embed(
            self.vocab_size,
            self.embed_dim,
            embedding_init=nn.initializers.normal(stddev=0.02),
            dtype=self.dtype,
        )
        if self.lora_rank:
            targets = lora_targets(
                self.num_encoder_layers, self.num_decoder_layers, self.embed_dim, self.embed_dim
            )
            self.lora = LoRAFactors(targets, self.lora_rank)

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        return {
            "inputs": jnp.ones((batch_size, self.max_frames, self.input_dim), jnp.float32),
            "decoder_inputs": jnp.ones((batch_size, 6), jnp.int32),
        }

    # ------------------------------------------------------------------ helpers
    def _adapted(self, use_lora: bool):
        """A context manager adding the LoRA adapters (a no-op without them or when off)."""
        if not (self.lora_rank and use_lora):
            return contextlib.nullcontext()
        return nn.intercept_methods(_lora_interceptor(self.path, self.lora(), self.lora_scale))

    def num_encoder_frames(self, num_frames: int) -> int:
        """Encoder frames of ``num_frames`` input frames: ``ceil(num_frames / stem_stride)``."""
        return -(-num_frames // self.stem_stride)

    def encoder_frame_mask(self, frame_mask: Array) -> Array:
        """[B, T] input frame mask (real frames first) -> [B, T'] encoder frame mask."""
        return frame_mask[:, :: self.stem_stride].astype(bool)

    def _frame_mask(self, inputs: Array, frame_mask: Array | None) -> Array:
        if frame_mask is None:
            return jnp.any(inputs != 0, axis=-1)
        if tuple(frame_mask.shape) != tuple(inputs.shape[:2]):
            raise ValueError(
                f"CarelessWhisper: frame_mask must have shape [B, T] = {tuple(inputs.shape[:2])}, "
                f"got {tuple(frame_mask.shape)}."
            )
        return frame_mask.astype(bool)

    def stem_rows(
        self,
        inputs: Array,
        start: Array | int,
        num_rows: int,
        frame_mask: Array | None = None,
    ) -> Array:
        """Stem output rows ``start .. start + num_rows - 1`` [B, num_rows, D] of frames [B, T, F].

        Reads only the input frames ``s * start - 2 .. s * (start + num_rows - 1) + 2``
        (zero outside ``0 .. T - 1``); ``start`` may be traced. The whole stem is
        ``stem_rows(inputs, 0, ceil(T / s))``: Whisper's two convolutions with padding 1.
        frame_mask [B, T] (True: real): padding frames and their first-layer rows are
        zeros, as outside the input, so a row computes what it computes unpadded
        whatever the padding holds; None: every frame is real.
        """
        s = self.stem_stride
        if frame_mask is None:
            frame_mask = jnp.ones(inputs.shape[:2], bool)
        inputs = jnp.where(frame_mask[..., None], inputs, jnp.zeros((), inputs.dtype))
        padded = jnp.pad(inputs, ((0, 0), (2, s + 3), (0, 0)))
        real = jnp.pad(frame_mask.astype(bool), ((0, 0), (2, s + 3)))  # False outside the input
        width = s * (num_rows - 1) + 5
        window = jax.lax.dynamic_slice_in_dim(padded, s * start, width, axis=1)
        hidden = nn.gelu(self.stem_conv1(window), approximate=False)
        # First-layer row k is centred on input frame s * start - 1 + k (window slot k + 1);
        # outside the input or on padding it is the second conv's zero padding.
        centred = jax.lax.dynamic_slice_in_dim(real, s * start + 1, width - 2, axis=1)
        hidden = jnp.where(centred[..., None], hidden, 0)
        return nn.gelu(self.stem_conv2(hidden), approximate=False)

    def _mask_positions(
        self, encoder_mask: Array, rows: Array, chunk_size: int | None, extra_first_chunks: int = 0
    ) -> Array:
        """Mask positions [B, R] of encoder rows ``rows`` [R]: chunk index (0 if offline), the
        first ``1 + extra_first_chunks`` chunks merged into chunk 0."""
        if chunk_size is None:
            order = jnp.zeros_like(rows)
        else:
            order = jnp.maximum(rows // chunk_size - extra_first_chunks, 0)
        return jnp.where(encoder_mask, order[None, :], PADDING_MASK_POSITION).astype(jnp.int32)

    # ------------------------------------------------------------------ the parts
    def encode(
        self,
        inputs: Array,
        frame_mask: Array | None = None,
        *,
        chunk_size: int | None = -1,
        extra_first_chunks: int = 0,
        use_lora: bool = True,
        train: bool = False,
    ) -> tuple[Array, Array]:
        """frames [B, T, F] -> (encoded [B, T', D], encoder_mask [B, T'] bool), T' = ceil(T/s).

        chunk_size: block-causal chunks of encoder frames; None: bidirectional;
        -1 (default): the model's ``chunk_size``. extra_first_chunks: the first
        chunk spans ``1 + extra_first_chunks`` chunks (module docstring).
        use_lora: add the adapters.
        """
        _check_frames(inputs, self.input_dim)
        chunk_size = check_chunk_size(self.chunk_size if chunk_size == -1 else chunk_size)
        extra_first_chunks = check_extra_first_chunks(extra_first_chunks, chunk_size)
        frame_mask = self._frame_mask(inputs, frame_mask)
        num_rows = self.num_encoder_frames(inputs.shape[1])
        encoder_mask = self.encoder_frame_mask(frame_mask)
        rows = jnp.arange(num_rows, dtype=jnp.int32)
        positions = jnp.broadcast_to(rows, (inputs.shape[0], num_rows))
        with self._adapted(use_lora):
            encoded = self.encoder(
                self.stem_rows(inputs, 0, num_rows, frame_mask),
                positions=positions,
                mask_positions=self._mask_positions(
                    encoder_mask, rows, chunk_size, extra_first_chunks
                ),
                deterministic=not train,
            )
        return encoded, encoder_mask

    def encode_chunk(
        self,
        inputs: Array,
        frame_mask: Array,
        chunk_index: Array | int,
        *,
        chunk_size: int,
        use_lora: bool = True,
    ) -> Array:
        """Encoder rows of chunk ``chunk_index`` [B, C, D] against the KV cache (``decode``).

        Call with ``mutable=["cache"]`` and a cache from :func:`init_encoder_cache`,
        chunks in order 0, 1, ...; inputs [B, T, F] are the whole (padded) frames, of
        which the chunk's stem reads its window only. The rows equal those of
        ``encode(inputs, frame_mask, chunk_size=chunk_size)`` (tested).
        """
        chunk_size = check_chunk_size(chunk_size)
        if chunk_size is None:
            raise ValueError("CarelessWhisper.encode_chunk: chunk_size must be an int >= 1.")
        num_rows = self.num_encoder_frames(inputs.shape[1])
        if num_rows % chunk_size:
            raise ValueError(
                f"CarelessWhisper.encode_chunk: the encoder frames ceil(T / {self.stem_stride}) = "
                f"{num_rows} must be a multiple of chunk_size={chunk_size} (pad the frames)."
            )
        return self.encode_rows(
            inputs, frame_mask, chunk_index * chunk_size, chunk_size, chunk_size=chunk_size,
            use_lora=use_lora,
        )  # fmt: skip

    def encode_rows(
        self,
        inputs: Array,
        frame_mask: Array,
        start: Array | int,
        num_rows: int,
        *,
        chunk_size: int,
        extra_first_chunks: int = 0,
        use_lora: bool = True,
    ) -> Array:
        """Encoder rows ``start .. start + num_rows - 1`` [B, num_rows, D] against the KV cache.

        As :meth:`encode_chunk`, for whole chunks of the block-causal mask in order
        (with ``extra_first_chunks = e``: rows ``0 .. (1 + e) C - 1`` first, then one
        chunk of ``C`` rows at a time); ``start`` may be traced, ``num_rows`` is
        static and ``start + num_rows`` must not pass ``ceil(T / s)``. The rows equal
        those of ``encode(inputs, frame_mask, chunk_size=C, extra_first_chunks=e)``
        (tested).
        """
        _check_frames(inputs, self.input_dim)
        chunk_size = check_chunk_size(chunk_size)
        if chunk_size is None:
            raise ValueError("CarelessWhisper.encode_rows: chunk_size must be an int >= 1.")
        extra_first_chunks = check_extra_first_chunks(extra_first_chunks, chunk_size)
        total = self.num_encoder_frames(inputs.shape[1])
        if (
            isinstance(num_rows, bool)
            or not isinstance(num_rows, int)
            or not 1 <= num_rows <= total
        ):
            raise ValueError(
                f"CarelessWhisper.encode_rows: num_rows must be an int in [1, ceil(T / "
                f"{self.stem_stride}) = {total}], got {num_rows!r}."
            )
        frame_mask = self._frame_mask(inputs, frame_mask)
        rows = start + jnp.arange(num_rows, dtype=jnp.int32)
        encoder_mask = jax.lax.dynamic_slice_in_dim(
            self.encoder_frame_mask(frame_mask), start, num_rows, axis=1
        )
        with self._adapted(use_lora):
            return self.encoder(
                self.stem_rows(inputs, start, num_rows, frame_mask),
                positions=jnp.broadcast_to(rows, (inputs.shape[0], num_rows)),
                mask_positions=self._mask_positions(
                    encoder_mask, rows, chunk_size, extra_first_chunks
                ),
                decode=True,
            )

    def decode(
        self,
        decoder_inputs: Array,
        encoded: Array,
        encoder_mask: Array,
        *,
        use_lora: bool = True,
        train: bool = False,
    ) -> Array:
        """decoder_inputs [B, L] int, encoded [B, T', D], encoder_mask [B, T'] -> logits [B, L, V].

        Cross-attention reads the encoder rows where ``encoder_mask`` is True.
        """
        if decoder_inputs.ndim != 2 or not jnp.issubdtype(decoder_inputs.dtype, jnp.integer):
            raise ValueError(
                f"CarelessWhisper: decoder_inputs must be int token ids [B, L], got shape "
                f"{tuple(decoder_inputs.shape)} and dtype {decoder_inputs.dtype}."
            )
        batch, length = decoder_inputs.shape
        if length > self.max_target_length:
            raise ValueError(
                f"CarelessWhisper: decoder_inputs length must be <= max_target_length="
                f"{self.max_target_length}, got {length}."
            )
        if encoded.shape[0] != batch or tuple(encoder_mask.shape) != tuple(encoded.shape[:2]):
            raise ValueError(
                f"CarelessWhisper: encoded [B={batch}, T', D] and encoder_mask [B, T'] must "
                f"match, got {tuple(encoded.shape)} and {tuple(encoder_mask.shape)}."
            )
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        with self._adapted(use_lora):
            hidden = self.decoder(
                self.token_embedding(decoder_inputs),
                positions=positions,
                deterministic=not train,
                context=encoded,
                context_mask=encoder_mask,
            )
        return self.token_embedding.attend(hidden)

    def decode_cached(
        self,
        decoder_inputs: Array,
        positions: Array,
        encoded: Array,
        encoder_mask: Array,
        *,
        use_lora: bool = True,
    ) -> Array:
        """:meth:`decode` against the decoder's self-attention KV cache -> logits [B, L, V].

        decoder_inputs [B, L] at positions [B, L] (each row its own); call with
        ``mutable=["cache"]``. Each call writes its L keys at the cache's next L
        slots (one write index for the batch); a key is seen by the queries at
        positions not before its own, so rows may sit at different positions,
        and a slot whose ``cached_mask_positions`` is set to 0 is hidden
        (:func:`stream_decode_step` hides the cropped tokens' slots so).
        """
        with self._adapted(use_lora):
            hidden = self.decoder(
                self.token_embedding(decoder_inputs),
                positions=positions,
                mask_positions=positions,
                decode=True,
                context=encoded,
                context_mask=encoder_mask,
            )
        return self.token_embedding.attend(hidden)

    def cut_frames(self, encoder_mask: Array, cut_fractions: Array, chunk_size: int) -> Array:
        """Input frames [B, K] heard by the end of each cut's chunk (see ``__call__``)."""
        num_chunks = -(-jnp.sum(encoder_mask, axis=1) // chunk_size)  # [B]
        chunk = jnp.floor(cut_fractions * num_chunks[:, None]).astype(jnp.int32)
        chunk = jnp.clip(chunk, 0, jnp.maximum(num_chunks[:, None] - 1, 0))
        return (chunk + 1) * chunk_size * self.stem_stride

    # ------------------------------------------------------------------ the call
    def __call__(
        self,
        inputs: Array,
        decoder_inputs: Array,
        *,
        frame_mask: Array | None = None,
        cut_fractions: Array | None = None,
        chunk_size: int | None = -1,
        use_lora: bool = True,
        train: bool = False,
    ) -> Array | dict[str, Array]:
        """frames [B, T, F], decoder_inputs [B, L] -> logits [B, L, V] (teacher forcing).

        cut_fractions [B, K] in [0, 1] (block-causal encoder only): the decoder runs
        once per cut over the encoder rows of chunks ``0 .. c``, ``c = floor(fraction
        * n)`` of the row's ``n`` chunks with a real frame (1.0: the last); returns
        ``{"logits": [B, K, L, V], "cut_frames": [B, K]}``, ``cut_frames`` the input
        frames ``s * (c + 1) * C`` up to the cut's end (what the weak targets compare
        token end frames with). chunk_size: as in :meth:`encode`.
        """
        chunk_size = check_chunk_size(self.chunk_size if chunk_size == -1 else chunk_size)
        if decoder_inputs.ndim != 2 or decoder_inputs.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"CarelessWhisper: decoder_inputs must be [B={inputs.shape[0]}, L], got shape "
                f"{tuple(decoder_inputs.shape)}."
            )
        batch = inputs.shape[0]
        if cut_fractions is not None:
            if chunk_size is None:
                raise ValueError(
                    "CarelessWhisper: cut_fractions needs the block-causal encoder (chunk_size "
                    "an int); the bidirectional encoder's states depend on the whole input."
                )
            if cut_fractions.ndim != 2 or cut_fractions.shape[0] != batch:
                raise ValueError(
                    f"CarelessWhisper: cut_fractions must be [B={batch}, K], got shape "
                    f"{tuple(cut_fractions.shape)}."
                )
        encoded, encoder_mask = self.encode(
            inputs, frame_mask, chunk_size=chunk_size, use_lora=use_lora, train=train
        )
        if cut_fractions is None:
            return self.decode(
                decoder_inputs, encoded, encoder_mask, use_lora=use_lora, train=train
            )
        cuts = cut_fractions.shape[1]
        cut_frames = self.cut_frames(encoder_mask, cut_fractions, chunk_size)
        rows = jnp.arange(encoded.shape[1]) * self.stem_stride
        visible = encoder_mask[:, None, :] & (rows[None, None, :] < cut_frames[..., None])
        repeat = lambda x: jnp.repeat(x, cuts, axis=0)  # noqa: E731
        logits = self.decode(
            repeat(decoder_inputs),
            repeat(encoded),
            visible.reshape(batch * cuts, -1),
            use_lora=use_lora,
            train=train,
        )
        return {"logits": logits.reshape(batch, cuts, *logits.shape[1:]), "cut_frames": cut_frames}


# ---------------------------------------------------------------------------- inference


def init_encoder_cache(model: CarelessWhisper, inputs: Array, frame_mask: Array) -> Any:
    """An empty encoder KV cache for streaming ``inputs`` [B, T, F] chunk by chunk."""

    def init(inputs, frame_mask):
        rows = model.num_encoder_frames(inputs.shape[1])
        return model.init(
            jax.random.PRNGKey(0), inputs, frame_mask, 0, chunk_size=rows, method="encode_chunk"
        )["cache"]

    shapes = jax.eval_shape(init, inputs, frame_mask)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@dataclasses.dataclass(frozen=True)
class StreamState:
    """The streaming decoder's state after a chunk (every array has the batch first).

    tokens [B, N] (0 after ``length``), length [B], committed [B] (the first
    ``committed`` tokens are final: no later chunk changes them), last_logits
    [B, N + 1, V] (the decoder's logits for ``tokens`` at the chunk's end;
    position p predicts token p).
    """

    tokens: Array
    length: Array
    committed: Array
    last_logits: Array


jax.tree_util.register_dataclass(StreamState)


def _decoder_logits(model, params, tokens, encoded, visible, bos_id, use_lora):
    start = jnp.full((tokens.shape[0], 1), bos_id, tokens.dtype)
    logits = model.apply(
        {"params": params},
        jnp.concatenate([start, tokens], axis=1),
        encoded,
        visible,
        use_lora=use_lora,
        method="decode",
    ).astype(jnp.float32)
    # The start token (also padding) is never emitted (the official SuppressTokens).
    return logits.at[..., bos_id].set(-1e9)


def _cached_decoder(model, params, batch, slots, encoded, visible, bos_id, use_lora):
    """(prefill, step) of the greedy decoder against a self-attention KV cache of 2N + 1 slots.

    prefill(tokens [B, N]) -> (logits [B, N + 1, V], cache): the start token and
    ``tokens`` at slots and positions 0 .. N. hide(cache, length [B]) hides the
    slots after each row's ``length`` tokens. step(cache, token [B], position [B])
    -> (logits [B, V], cache): one token a row, each at its own position.
    """

    def apply(cache, tokens, positions):
        logits, mutated = model.apply(
            {"params": params, "cache": cache}, tokens, positions, encoded, visible,
            use_lora=use_lora, method="decode_cached", mutable=["cache"],
        )  # fmt: skip
        return logits.astype(jnp.float32).at[..., bos_id].set(-1e9), mutated["cache"]

    def init():
        length = 2 * slots + 1
        zeros = jnp.zeros((batch, length), jnp.int32)
        return model.init(
            jax.random.PRNGKey(0), zeros, zeros, encoded, visible, use_lora=use_lora,
            method="decode_cached",
        )["cache"]  # fmt: skip

    empty = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init))

    def prefill(tokens):
        start = jnp.full((batch, 1), bos_id, tokens.dtype)
        positions = jnp.broadcast_to(jnp.arange(slots + 1, dtype=jnp.int32), (batch, slots + 1))
        return apply(empty, jnp.concatenate([start, tokens], axis=1), positions)

    def hide(cache, length):
        def reset(path, leaf):
            if getattr(path[-1], "key", None) != "cached_mask_positions":
                return leaf
            slot = jnp.arange(leaf.shape[1])
            cropped = (slot[None, :] > length[:, None]) & (slot[None, :] <= slots)
            return jnp.where(cropped, 0, leaf)

        return jax.tree_util.tree_map_with_path(reset, cache)

    def step(cache, token, position):
        logits, cache = apply(cache, token[:, None], position[:, None])
        return logits[:, 0], cache

    return prefill, hide, step


def stream_decode_step(
    model: CarelessWhisper,
    params: Any,
    state: StreamState,
    encoded: Array,
    visible: Array,
    active: Array,
    *,
    first: Array,
    final: Array,
    look_back: int,
    eos_id: int,
    bos_id: int = 0,
    use_lora: bool = True,
    kv_cache: bool = False,
) -> StreamState:
    """One chunk of the official greedy ``StreamingDecoder``, for every row at once.

    encoded [B, T', D] with visible [B, T'] (the encoder rows heard so far);
    active [B]: rows with a new chunk (others are returned unchanged); first [B]:
    the row's first chunk; final [B]: its last (everything becomes committed).

    1. Re-examine the last ``look_back`` tokens (not before ``committed``): token
       ``t`` at slot ``j`` is stable when its logit did not drop since the last
       chunk (``last_logits[j, t] <= logits[j, t]``) or it is still the argmax;
       the first unstable token and all after it are dropped. (Skipped in the
       first chunk, as in the official code.) The official code compares raw
       logits, not probabilities; so does this.
    2. Greedy decoding from there: append the argmax until it is ``eos_id`` or
       the token slots are full.
    3. ``committed = max(committed, length - look_back)``: tokens before the next
       check's window. The official code re-examines the last ``look_back`` tokens
       of the current sequence, which after a crop can reach below the previous
       window; the monotone floor here is what makes committed tokens final.

    kv_cache: the decoder's self-attention keys and values are cached within
    the chunk: one pass over the transcript (the re-examination's), the
    cropped tokens' slots hidden, then one token a greedy step; the same
    transcripts as recomputing the prefix at every step (tested). The cache
    starts afresh each chunk: every token's states depend on the audio heard
    (through cross-attention), so keys from an earlier chunk would be stale
    (the official ``use_kv_cache`` keeps them, an approximation).
    """
    tokens, length, committed = state.tokens, state.length, state.committed
    batch, slots = tokens.shape
    decode = functools.partial(
        _decoder_logits, model, params, encoded=encoded, visible=visible, bos_id=bos_id,
        use_lora=use_lora,
    )  # fmt: skip
    if kv_cache:
        prefill, hide, step = _cached_decoder(
            model, params, batch, slots, encoded, visible, bos_id, use_lora
        )
        logits, cache = prefill(tokens)
    else:
        logits = decode(tokens)
    positions = jnp.arange(slots)[None, :]
    current = jnp.take_along_axis(logits[:, :slots], tokens[..., None], axis=-1)[..., 0]
    previous = jnp.take_along_axis(state.last_logits[:, :slots], tokens[..., None], -1)[..., 0]
    stable = (previous <= current) | (jnp.argmax(logits[:, :slots], -1) == tokens)
    window = (positions >= jnp.maximum(committed, length - look_back)[:, None]) & (
        positions < length[:, None]
    )
    unstable = window & ~stable & ~first[:, None]
    first_unstable = jnp.min(jnp.where(unstable, positions, slots), axis=1)
    length = jnp.where(active, jnp.minimum(length, first_unstable), length)
    tokens = jnp.where(positions < length[:, None], tokens, 0)

    def cond(carry):
        return ~jnp.all(carry[3])

    def body(carry):
        tokens, length, logits, done, cache = carry
        next_token = jnp.argmax(jnp.take_along_axis(logits, length[:, None, None], 1)[:, 0], -1)
        stop = done | (next_token == eos_id) | (length >= slots)
        write = (positions == length[:, None]) & ~stop[:, None]
        tokens = jnp.where(write, next_token[:, None].astype(tokens.dtype), tokens)
        new_length = length + (~stop).astype(length.dtype)
        # After a crop, the logits up to the new length are unchanged (causal decoder),
        # so the first greedy step reuses them; later steps see the appended tokens.
        if kv_cache:
            # The appended token sits at input position length + 1 (after the start token);
            # its logits predict the token at slot new_length.
            def advance():
                step_logits, new_cache = step(cache, next_token.astype(tokens.dtype), length + 1)
                at = (jnp.arange(slots + 1)[None, :] == new_length[:, None]) & ~stop[:, None]
                return jnp.where(at[..., None], step_logits[:, None], logits), new_cache

            logits, cache = jax.lax.cond(jnp.all(stop), lambda: (logits, cache), advance)
        else:
            logits = jax.lax.cond(jnp.all(stop), lambda: logits, lambda: decode(tokens))
        return tokens, new_length, logits, stop, cache

    cache = hide(cache, length) if kv_cache else None
    tokens, length, logits, _, _ = jax.lax.while_loop(
        cond, body, (tokens, length, logits, ~active, cache)
    )
    committed = jnp.where(
        active,
        jnp.where(final, length, jnp.maximum(committed, length - look_back)),
        committed,
    )
    last_logits = jnp.where(active[:, None, None], logits, state.last_logits)
    return StreamState(tokens, length, committed, last_logits)


@dataclasses.dataclass(frozen=True)
class BeamState:
    """The streaming beam decoder's state after a chunk (every array has the batch first).

    tokens [B, K, N] (beam k's tokens, 0 after ``length[:, k]``), length [B, K],
    committed [B, K] (beam k never re-examines its first ``committed`` tokens, and
    the beams made from it inherit the floor), best [B] (the beam transcribed
    after the chunk), output_committed [B] (the first ``output_committed`` tokens
    of the best beam are final: every beam holds them, under its floor).
    """

    tokens: Array
    length: Array
    committed: Array
    best: Array
    output_committed: Array


jax.tree_util.register_dataclass(BeamState)


def stream_beam_step(
    model: CarelessWhisper,
    params: Any,
    state: BeamState,
    encoded: Array,
    visible: Array,
    active: Array,
    *,
    first: Array,
    final: Array,
    look_back: int,
    eos_id: int,
    bos_id: int = 0,
    use_lora: bool = True,
) -> BeamState:
    """One chunk of the official ``BeamStreamingDecoder`` (K = ``state.tokens.shape[1]`` beams).

    Arguments as in :func:`stream_decode_step`. Every beam is scored afresh
    against the audio heard so far: a hypothesis' score is the sum of its
    tokens' log-probabilities under the decoder's current pass (the official
    code rescores the prefix each step from the current logits; its sum omits
    the prefix's last token, an off-by-one not copied here).

    1. Re-examine (not in the first chunk): in each beam, of its last
       ``look_back`` tokens (not before its ``committed`` floor) the first that
       is not among the K most likely tokens at its slot, and all after it,
       are dropped. The beam's ``<eos>`` of the last chunk is dropped too.
    2. Beam search from there: each distinct beam proposes its K + 1 most
       likely next tokens (identical beams propose once, the official
       dictionary of sequences); the K best-scored candidates become the beams
       (a candidate ending in ``eos_id`` stays a beam, ended); this repeats
       until some beam has ended or is full (the official ``wait_for_all =
       False``: "believe any beam that says enough").
    3. The transcript is the beam with the best score / length (length its
       tokens without ``<eos>``, at least 1: the official
       ``MaximumLikelihoodRanker`` without a length penalty). Each beam's floor
       becomes ``max(committed, length - look_back)``; ``output_committed`` is
       the longest prefix that every beam holds under its floor (all of the
       best beam in the last chunk).

    With K = 1 this is the greedy rule of :func:`stream_decode_step` with the
    stability check reduced to "still the argmax" (the official beam check
    has no "logit did not drop" clause; tested).
    """
    tokens, length, committed = state.tokens, state.length, state.committed
    batch, beams, slots = tokens.shape
    encoded_beams = jnp.repeat(encoded, beams, axis=0)
    visible_beams = jnp.repeat(visible, beams, axis=0)
    positions = jnp.arange(slots)

    def log_probs(tokens):
        logits = _decoder_logits(
            model, params, tokens.reshape(batch * beams, slots), encoded_beams, visible_beams,
            bos_id, use_lora,
        )  # fmt: skip
        return jax.nn.log_softmax(logits, axis=-1).reshape(batch, beams, slots + 1, -1)

    def prefix_scores(log_prob, tokens, length):
        token_lp = jnp.take_along_axis(log_prob[:, :, :slots], tokens[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(positions < length[..., None], token_lp, 0.0), axis=-1)

    log_prob = log_probs(tokens)
    top = jax.lax.top_k(log_prob[:, :, :slots], beams)[1]  # [B, K, N, K]
    stable = jnp.any(top == tokens[..., None], axis=-1)
    window = (positions >= jnp.maximum(committed, length - look_back)[..., None]) & (
        positions < length[..., None]
    )
    unstable = window & ~stable & ~first[:, None, None]
    first_unstable = jnp.min(jnp.where(unstable, positions, slots), axis=-1)
    length = jnp.where(active[:, None], jnp.minimum(length, first_unstable), length)
    tokens = jnp.where(positions < length[..., None], tokens, 0)
    # After a crop the log-probabilities up to the new length are unchanged (causal decoder).
    earlier = jnp.tril(jnp.ones((beams, beams), bool), -1)  # [k, k']: k' < k

    def gather(x, source):
        return jnp.take_along_axis(x, source.reshape(batch, beams, *([1] * (x.ndim - 2))), 1)

    def cond(carry):
        return ~jnp.all(carry[-1])

    def body(carry):
        tokens, length, committed, log_prob, score, done = carry
        same = jnp.all(tokens[:, :, None] == tokens[:, None], -1) & (
            length[:, :, None] == length[:, None]
        )
        duplicate = jnp.any(same & earlier, axis=-1)  # [B, K]
        next_lp = jnp.take_along_axis(log_prob, length[..., None, None], 2)[:, :, 0]  # [B, K, V]
        candidate_lp, candidate = jax.lax.top_k(next_lp, beams + 1)  # [B, K, K + 1]
        total = prefix_scores(log_prob, tokens, length)[..., None] + candidate_lp
        total = jnp.where(duplicate[..., None], -jnp.inf, total).reshape(batch, -1)
        new_score, index = jax.lax.top_k(total, beams)  # [B, K]
        source = index // (beams + 1)
        new_token = jnp.take_along_axis(candidate.reshape(batch, -1), index, 1)
        ended = new_token == eos_id
        new_tokens, new_length = gather(tokens, source), gather(length, source)
        write = (positions == new_length[..., None]) & ~ended[..., None]
        new_tokens = jnp.where(write, new_token[..., None].astype(tokens.dtype), new_tokens)
        new_length = new_length + (~ended).astype(length.dtype)
        stop = done | jnp.any(ended, 1) | jnp.any(new_length >= slots, 1)

        def keep(new, old):
            return jnp.where(done.reshape(-1, *([1] * (new.ndim - 1))), old, new)

        tokens = keep(new_tokens, tokens)
        length = keep(new_length, length)
        committed = keep(gather(committed, source), committed)
        score = keep(new_score, score)
        log_prob = jax.lax.cond(jnp.all(stop), lambda: log_prob, lambda: log_probs(tokens))
        return tokens, length, committed, log_prob, score, stop

    score = prefix_scores(log_prob, tokens, length)
    done = ~active | jnp.any(length >= slots, axis=1)
    tokens, length, committed, _, score, _ = jax.lax.while_loop(
        cond, body, (tokens, length, committed, log_prob, score, done)
    )
    best = jnp.argmax(score / jnp.maximum(length, 1), axis=1).astype(state.best.dtype)
    best = jnp.where(active, best, state.best)
    committed = jnp.where(
        active[:, None],
        jnp.where(final[:, None], length, jnp.maximum(committed, length - look_back)),
        committed,
    )
    best_tokens = gather(tokens, jnp.broadcast_to(best[:, None], (batch, beams)))[:, 0]
    best_length = jnp.take_along_axis(length, best[:, None], 1)[:, 0]
    agree = jnp.all(tokens == best_tokens[:, None], axis=1)  # [B, N]
    common = jnp.minimum(jnp.sum(jnp.cumprod(agree, axis=-1), -1), jnp.min(committed, 1))
    output_committed = jnp.where(
        active, jnp.where(final, best_length, common), state.output_committed
    ).astype(state.output_committed.dtype)
    return BeamState(tokens, length, committed, best, output_committed)


@dataclasses.dataclass(frozen=True)
class StreamResult:
    """What :func:`stream_transcribe` returns (NumPy arrays).

    tokens [B, N] and length [B]: the final transcripts (0 after ``length``);
    history_tokens [K, B, N], history_length [K, B], history_committed [K, B]:
    the transcript after each of the K steps (with beams: the best beam's);
    num_chunks [B]: the steps of each row (its chunks holding a real frame, the
    first ``1 + extra_first_chunks`` counted once); chunk_frames [K]: the input
    frames heard after each step (``s * (k + 1 + extra_first_chunks) * C``, the
    stem's lookahead frame not counted).

    Token timestamps (the token's end, in input frames; -1 after ``length``):
    emit_chunk [B, N]: the step after which the token now in each slot was
    emitted (the prefix up to it never changed again); first_emit_chunk [B, N]:
    the first step after which the slot held a token (the official greedy
    ``timestamps_map``, which stamps a slot when a token is first appended to
    it); timestamps [B, N] = ``chunk_frames[emit_chunk]`` and first_timestamps
    [B, N] = ``chunk_frames[first_emit_chunk]``.
    """

    tokens: np.ndarray
    length: np.ndarray
    history_tokens: np.ndarray
    history_length: np.ndarray
    history_committed: np.ndarray
    num_chunks: np.ndarray
    chunk_frames: np.ndarray
    emit_chunk: np.ndarray
    first_emit_chunk: np.ndarray
    timestamps: np.ndarray
    first_timestamps: np.ndarray


def token_emit_chunks(
    history_tokens: np.ndarray, history_length: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(emit_chunk [B, N], first_emit_chunk [B, N]) of the final transcripts (StreamResult).

    history_tokens [K, B, N], history_length [K, B]: the transcripts after each step.
    """
    steps, batch, slots = history_tokens.shape
    final_tokens, final_length = history_tokens[-1], history_length[-1]
    emit = np.full((batch, slots), -1, np.int32)
    first_emit = np.full((batch, slots), -1, np.int32)
    for b in range(batch):
        for slot in range(int(final_length[b])):
            held = history_length[:, b] > slot
            first_emit[b, slot] = int(np.argmax(held))
            prefix = final_tokens[b, : slot + 1]
            same = held & np.all(history_tokens[:, b, : slot + 1] == prefix, axis=1)
            changed = np.flatnonzero(~same)  # the last step whose prefix differs
            emit[b, slot] = int(changed[-1]) + 1 if changed.size else 0
    return emit, first_emit


def _pad_frames(inputs, frame_mask, frames: int, minimum: int):
    extra = max(-inputs.shape[1] % frames, minimum - inputs.shape[1])
    inputs = np.pad(np.asarray(inputs), ((0, 0), (0, extra), (0, 0)))
    frame_mask = np.pad(np.asarray(frame_mask, bool), ((0, 0), (0, extra)))
    return inputs, frame_mask


@functools.partial(jax.jit, static_argnames=("model", "num_rows", "chunk_size",
                                             "extra_first_chunks", "use_lora"))  # fmt: skip
def _stream_encode(model, params, cache, encoded, inputs, frame_mask, start, *, num_rows,
                   chunk_size, extra_first_chunks, use_lora):  # fmt: skip
    """The step's encoder rows against the cache, written into ``encoded``; and what is heard."""
    rows, mutated = model.apply(
        {"params": params, "cache": cache},
        inputs,
        frame_mask,
        start,
        num_rows,
        chunk_size=chunk_size,
        extra_first_chunks=extra_first_chunks,
        use_lora=use_lora,
        method="encode_rows",
        mutable=["cache"],
    )
    encoded = jax.lax.dynamic_update_slice_in_dim(encoded, rows.astype(encoded.dtype), start, 1)
    row_index = jnp.arange(encoded.shape[1])
    visible = model.encoder_frame_mask(frame_mask) & (row_index < start + num_rows)[None, :]
    return mutated["cache"], encoded, visible


@functools.partial(jax.jit, static_argnames=("model", "look_back", "eos_id", "bos_id",
                                             "use_lora", "kv_cache"))  # fmt: skip
def _stream_decode(model, params, state, encoded, visible, step, num_steps, *, look_back, eos_id,
                   bos_id, use_lora, kv_cache):  # fmt: skip
    """The decoder's step (greedy or beams, by the state's type); compiled apart from the
    encoder's, so a larger first chunk does not compile it twice."""
    if isinstance(state, BeamState):
        step_fn = stream_beam_step
    else:
        step_fn = functools.partial(stream_decode_step, kv_cache=kv_cache)
    return step_fn(
        model, params, state, encoded, visible, step < num_steps,
        first=jnp.broadcast_to(step == 0, num_steps.shape),
        final=step == num_steps - 1, look_back=look_back, eos_id=eos_id,
        bos_id=bos_id, use_lora=use_lora,
    )  # fmt: skip


def stream_transcribe(
    model: CarelessWhisper,
    params: Any,
    inputs: Array,
    frame_mask: Array,
    *,
    chunk_size: int,
    max_tokens: int,
    eos_id: int,
    look_back: int = 2,
    beam_size: int | None = None,
    extra_first_chunks: int = 0,
    kv_cache: bool = False,
    bos_id: int = 0,
    use_lora: bool = True,
) -> StreamResult:
    """Streaming transcription: frames arrive chunk by chunk (module docstring).

    inputs [B, T, F] with frame_mask [B, T] (real frames first); each row streams
    its own chunks (a row whose frames have ended is left unchanged). Per step
    ``k``: the encoder computes the step's rows only, against its KV cache (step
    0: the first ``(1 + extra_first_chunks) * chunk_size`` encoder frames, the
    official ``extra_gran_blocks``, with the merged first chunk's mask; then one
    chunk each); then the decoder updates the transcript over the rows heard so
    far: :func:`stream_decode_step` (``beam_size`` None, the default: the
    official greedy ``StreamingDecoder``) or :func:`stream_beam_step` with
    ``beam_size`` beams (the official ``BeamStreamingDecoder``). ``look_back``:
    the official ``n_tokens_look_back`` (2). kv_cache: the greedy decoder caches
    its self-attention keys within each chunk (:func:`stream_decode_step`; the
    same transcripts); the beam decoder always recomputes. Frames are
    zero-padded to a whole number of chunks. Returns the transcripts, their history and token
    timestamps (:class:`StreamResult`). One compiled step per shape.
    """
    chunk_size = check_chunk_size(chunk_size)
    if chunk_size is None:
        raise ValueError("stream_transcribe: chunk_size must be an int >= 1, got None.")
    extra_first_chunks = check_extra_first_chunks(extra_first_chunks, chunk_size)
    if isinstance(look_back, bool) or not isinstance(look_back, int) or look_back < 0:
        raise ValueError(f"stream_transcribe: look_back must be an int >= 0, got {look_back!r}.")
    check_max_tokens("stream_transcribe", max_tokens, model.max_target_length)
    if beam_size is not None and (
        isinstance(beam_size, bool)
        or not isinstance(beam_size, int)
        or not 1 <= beam_size <= model.vocab_size - 2
    ):
        raise ValueError(
            f"stream_transcribe: beam_size must be None (greedy) or an int in [1, vocab_size - 2 "
            f"= {model.vocab_size - 2}], got {beam_size!r}."
        )
    if not isinstance(kv_cache, bool) or (kv_cache and beam_size is not None):
        raise ValueError(
            f"stream_transcribe: kv_cache must be True or False, and False with beam_size, got "
            f"kv_cache={kv_cache!r}, beam_size={beam_size!r}."
        )
    stride = model.stem_stride
    first_rows = (1 + extra_first_chunks) * chunk_size
    inputs, frame_mask = _pad_frames(inputs, frame_mask, stride * chunk_size, stride * first_rows)
    inputs = jnp.asarray(inputs, jnp.float32)
    frame_mask = jnp.asarray(frame_mask)
    batch = inputs.shape[0]
    rows = model.num_encoder_frames(inputs.shape[1])
    real_rows = np.asarray(model.encoder_frame_mask(frame_mask)).sum(1)
    num_steps = np.where(
        real_rows > 0, np.maximum(-(-real_rows // chunk_size) - extra_first_chunks, 1), 0
    )
    cache = init_encoder_cache(model, inputs, frame_mask)
    encoded = jnp.zeros((batch, rows, model.embed_dim), jnp.float32)
    if beam_size is None:
        state = StreamState(
            tokens=jnp.zeros((batch, max_tokens), jnp.int32),
            length=jnp.zeros((batch,), jnp.int32),
            committed=jnp.zeros((batch,), jnp.int32),
            last_logits=jnp.zeros((batch, max_tokens + 1, model.vocab_size), jnp.float32),
        )
    else:
        state = BeamState(
            tokens=jnp.zeros((batch, beam_size, max_tokens), jnp.int32),
            length=jnp.zeros((batch, beam_size), jnp.int32),
            committed=jnp.zeros((batch, beam_size), jnp.int32),
            best=jnp.zeros((batch,), jnp.int32),
            output_committed=jnp.zeros((batch,), jnp.int32),
        )
    history = []
    for step in range(int(num_steps.max(initial=0))):
        start = 0 if step == 0 else (step + extra_first_chunks) * chunk_size
        cache, encoded, visible = _stream_encode(
            model, params, cache, encoded, inputs, frame_mask, jnp.int32(start),
            num_rows=first_rows if step == 0 else chunk_size, chunk_size=chunk_size,
            extra_first_chunks=extra_first_chunks, use_lora=use_lora,
        )  # fmt: skip
        state = _stream_decode(
            model, params, state, encoded, visible, jnp.int32(step),
            jnp.asarray(num_steps, jnp.int32), look_back=look_back, eos_id=eos_id,
            bos_id=bos_id, use_lora=use_lora, kv_cache=kv_cache,
        )  # fmt: skip
        if beam_size is None:
            history.append((state.tokens, state.length, state.committed))
        else:
            best = state.best[:, None, None]
            history.append((
                jnp.take_along_axis(state.tokens, best, 1)[:, 0],
                jnp.take_along_axis(state.length, best[:, 0], 1)[:, 0],
                state.output_committed,
            ))  # fmt: skip
    if not history:
        raise ValueError("stream_transcribe: frame_mask must hold a real frame, got none.")
    stack = lambda i: np.stack([np.asarray(h[i]) for h in history])  # noqa: E731
    history_tokens, history_length = stack(0), stack(1)
    chunk_frames = stride * chunk_size * (np.arange(len(history)) + 1 + extra_first_chunks)
    emit, first_emit = token_emit_chunks(history_tokens, history_length)
    stamp = lambda chunks: np.where(chunks >= 0, chunk_frames[np.maximum(chunks, 0)], -1)  # noqa: E731
    return StreamResult(
        tokens=history_tokens[-1],
        length=history_length[-1],
        history_tokens=history_tokens,
        history_length=history_length,
        history_committed=stack(2),
        num_chunks=num_steps,
        chunk_frames=chunk_frames,
        emit_chunk=emit,
        first_emit_chunk=first_emit,
        timestamps=stamp(emit),
        first_timestamps=stamp(first_emit),
    )


def greedy_transcribe(
    model: CarelessWhisper,
    params: Any,
    inputs: Array,
    frame_mask: Array,
    *,
    max_tokens: int,
    eos_id: int,
    chunk_size: int | None = -1,
    bos_id: int = 0,
    use_lora: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Offline greedy decoding over the whole input: (tokens [B, N], length [B]).

    The encoder sees every frame (bidirectional, or block-causal with
    ``chunk_size``; -1: the model's); the decoder appends the argmax until
    ``eos_id`` or ``max_tokens`` tokens.
    """
    check_max_tokens("greedy_transcribe", max_tokens, model.max_target_length)
    return _greedy(model, params, jnp.asarray(inputs, jnp.float32), jnp.asarray(frame_mask, bool),
                   max_tokens=max_tokens, eos_id=eos_id, chunk_size=chunk_size, bos_id=bos_id,
                   use_lora=use_lora)  # fmt: skip


@functools.partial(jax.jit, static_argnames=("model", "max_tokens", "eos_id", "chunk_size",
                                             "bos_id", "use_lora"))  # fmt: skip
def _greedy(model, params, inputs, frame_mask, *, max_tokens, eos_id, chunk_size, bos_id,
            use_lora):  # fmt: skip
    encoded, encoder_mask = model.apply(
        {"params": params}, inputs, frame_mask, chunk_size=chunk_size, use_lora=use_lora,
        method="encode",
    )  # fmt: skip
    batch = inputs.shape[0]
    state = StreamState(
        tokens=jnp.zeros((batch, max_tokens), jnp.int32),
        length=jnp.zeros((batch,), jnp.int32),
        committed=jnp.zeros((batch,), jnp.int32),
        last_logits=jnp.zeros((batch, max_tokens + 1, model.vocab_size), jnp.float32),
    )
    everything = jnp.ones((batch,), bool)
    state = stream_decode_step(
        model, params, state, encoded, encoder_mask, everything, first=everything,
        final=everything, look_back=0, eos_id=eos_id, bos_id=bos_id, use_lora=use_lora,
    )  # fmt: skip
    return state.tokens, state.length


# ---------------------------------------------------------------------------- registry

_TINY: Mapping[str, Any] = dict(
    vocab_size=16, input_dim=8, embed_dim=16, num_heads=2, ffn_hidden_dim=32, max_frames=12,
    num_encoder_layers=1, num_decoder_layers=1, max_target_length=16,
)  # fmt: skip


@register("careless_whisper", tiny=dict(chunk_size=2, lora_rank=2, **_TINY))
def careless_whisper(**overrides: Any) -> CarelessWhisper:
    """CarelessWhisper: Whisper-style frames encoder-decoder, block-causal encoder, LoRA."""
    return CarelessWhisper(**overrides)
