"""Language models: decoder, encoder, prefix LM and encoder-decoder, any mixer per layer.

All four share :class:`~effformer.models.lm_layers.LayerStack` (the per-layer
mixer pattern, position encoding, norms, FFN), so MASFormer's mixed spans,
Ettin's local/global alternation and Mamba/attention hybrids are configs:

* ``TransformerLM(kind="decoder")``: causal LM; logits ``[B, L, V]``.
* ``TransformerLM(kind="encoder")``: bidirectional; masked-LM logits
  ``[B, L, V]`` or, with ``num_classes``, classification logits ``[B, C]``.
* ``TransformerLM(kind="prefix_lm")``: bidirectional inside each row's prefix
  (``prefix_lengths [B]``), causal after it. The causal mask is ordered by
  "mask positions" ``max(position, prefix_length - 1)``: every prefix token
  then sits at the same place, so they all see each other and no later
  token, and a later token sees the whole prefix. Sliding windows in a
  prefix LM are measured on these mask positions (the prefix counts as one
  place).
* :class:`EncoderDecoderLM`: a bidirectional encoder over ``inputs`` (0 =
  padding, masked in attention and cross-attention) and a causal decoder with
  cross-attention in every layer over ``decoder_inputs``; logits ``[B, Lt, V]``.

Packed batches: ``segment_ids [B, L]`` (0 = padding) keep attention inside
each sequence and ``positions [B, L]`` restart at 0 in each (computed from the
segment ids when not given), so a packed row computes exactly what its
sequences would, padded, one per row (see ``effformer.data.packing``). Mamba,
LMU and Combiner layers treat segment ids as a padding mask only (Mamba and LMU
do not reset their state between packed sequences, Combiner's summaries span
them), so models with such layers need one sequence per row.

Decoding (``decode=True``, ``mutable=["cache"]``): attention layers keep a KV
cache, Mamba and LMU layers their recurrent states; see ``effformer.models.generate``.
A prefix LM decodes too: each call gives its ``prefix_lengths`` and the caches
record every key's mask position, so a prefix fed in one call is bidirectional
and every later token is causal, as in a full pass.

MatFormer (Devvrit et al., 2023, "MatFormer: Nested Transformer for Elastic
Inference"; MatLM): every FFN is nested, so one set of weights holds models
of every FFN width up to ``ffn_hidden_dim``. A call's ``ffn_widths`` runs each
layer's FFN on its first ``m`` hidden units, ``W2[:, :m] act(W1[:m] x)``: one
width for every layer, or one per layer (Mix'n'Match); an int is a number of
hidden units, a float a fraction of ``ffn_hidden_dim``
(``effformer.models.lm_layers.resolve_ffn_widths``). None, the default, is
the full model, computed exactly as without the argument. Training over
granularities passes ``ffn_granularities`` (several ``ffn_widths`` values):
the model runs once per granularity on the same inputs and stacks the
outputs, and the task sums their losses (``config.task.matformer_widths``,
``effformer.train.tasks``). Decoding (and so ``generate``, which passes no
width) uses the model's ``ffn_widths`` field: ``model.clone(ffn_widths=...)``
is the sub-model, its KV caches filled at its own widths. The parameters keep
the full width; extracting a smaller standalone model (slicing the weights) is
left to the user (tests/models/test_matformer.py does it for one width).

Ettin presets (``ettin_{encoder,decoder}_{17m,...,1b}``) use the sizes of the
Ettin README's "Model Architecture" table (jhu-clsp/ettin-encoder-vs-decoder):
layers 7/10/19/22/28/28, hidden 256/384/512/768/1024/1792, GLU intermediate
384/576/768/1152/2624/3840, heads 4/6/8/12/16/28, vocabulary 50,368; and the
ModernBERT recipe it shares: pre-LayerNorm without biases, GeGLU, RoPE,
global attention every third layer starting at layer 0 and local attention
between. ModernBERT's local window of 128 is 64 tokens on either side; the
decoder keeps the left half (Hugging Face's ``ModernBertDecoderConfig``:
"for the decoder to match ModernBERT this is actually half of the sliding
window size, so 128 => 64", a causal window of 64 keys), so the encoder
presets use ``local:128`` and the decoder presets ``local:64``. Not copied:
ModernBERT's LayerNorm after the token embedding (its layer 0 has no
attention norm instead: the same parameter count), the MLM head's bias, and
its RoPE bases (160,000 global, 10,000 local; 10,000 here); context length
is left at this library's default.

MASFormer presets (Zhang et al., 2023, "Efficient Long-Range Transformers: You
Need to Attend More, but Not Necessarily at Every Layer"): full attention in
a few layers, short-span attention with span ``masformer_span`` in the
others: a sliding window (``masformer_short_span="local"``) or fixed,
non-overlapping blocks (``"block"``), the paper's two short-span forms. The paper's ablations place the full-attention layers at the bottom;
``masformer_global_layers`` chooses them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.models.lm_layers import (
    FfnWidths,
    LayerStack,
    check_layer_gates,
    expand_layer_pattern,
    resolve_ffn_widths,
    segment_positions,
)
from effformer.models.registry import register
from effformer.nn.ffn_widths import granularity_runs
from effformer.nn.norms import make_norm

Array = jax.Array
Dtype = Any

KINDS = ("decoder", "encoder", "prefix_lm")
POOLINGS = ("mean", "first")

# Fields of LayerStack that the models pass through unchanged.
_STACK_FIELDS = (
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "qk_norm",
    "ffn",
    "ffn_hidden_dim",
    "ffn_dense_sparse",
    "use_bias",
    "norm",
    "norm_epsilon",
    "ordering",
    "position_encoding",
    "position_kwargs",
    "mixer_kwargs",
    "dropout_rate",
    "attention_dropout_rate",
    "drop_path_rate",
    "attention_implementation",
    "max_decode_length",
    "dtype",
)


def _check_tokens(owner: str, name: str, tokens: Array) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{owner}: {name} must be integer token ids [B, L], got shape {tuple(tokens.shape)} "
            f"and dtype {tokens.dtype}."
        )


def _check_like(owner: str, name: str, value: Array | None, shape: tuple[int, ...]) -> None:
    if value is not None and tuple(value.shape) != shape:
        raise ValueError(f"{owner}: {name} must have shape {shape}, got {tuple(value.shape)}.")


class _LMBase(nn.Module):
    """Fields every language model shares (documented on :class:`TransformerLM`)."""

    vocab_size: int = 256
    embed_dim: int = 256
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    qk_norm: bool = False
    ffn: str = "gelu"
    ffn_hidden_dim: int = 1024
    ffn_dense_sparse: tuple[int, int] | None = None
    use_bias: bool = True
    norm: str = "layer_norm"
    norm_epsilon: float = 1e-5
    ordering: str = "pre_norm"
    position_encoding: str = "rope"
    position_kwargs: Mapping[str, Any] | None = None
    mixer_kwargs: Mapping[str, Mapping[str, Any]] | None = None
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_implementation: str | None = None
    max_decode_length: int | None = None
    max_length: int = 2048
    ffn_widths: FfnWidths = None
    dtype: Dtype | None = None

    def _stack(self, name: str | None, **kwargs) -> LayerStack:
        shared = {field: getattr(self, field) for field in _STACK_FIELDS}
        if self.position_encoding == "learned":
            # The table must cover every position the model will see.
            shared["position_kwargs"] = {
                "max_length": self.max_length,
                **dict(self.position_kwargs or {}),
            }
        if name is not None:
            kwargs["name"] = name
        return LayerStack(**shared, **kwargs)

    def _embedding(self) -> nn.Embed:
        return nn.Embed(
            self.vocab_size,
            self.embed_dim,
            embedding_init=nn.initializers.normal(stddev=0.02),
            dtype=self.dtype,
            name="token_embedding",
        )

    def _granularities(
        self,
        ffn_widths: FfnWidths,
        ffn_granularities: Sequence[FfnWidths] | None,
        decode: bool,
        num_layers: int,
    ) -> list[FfnWidths]:
        """The ``ffn_widths`` of each run: [one] for a plain call, one per granularity.

        Each is checked here (against ``num_layers`` layers), so a bad width fails before
        anything runs, with the argument it came from in the message.
        """
        owner = type(self).__name__
        if ffn_granularities is None:  # one run, at the call's widths or the model's
            widths = self.ffn_widths if ffn_widths is None else ffn_widths
            return granularity_runs(owner, widths, None, num_layers, self.ffn_hidden_dim)
        if decode and ffn_widths is None:
            raise ValueError(
                f"{owner}: ffn_granularities is for training and evaluation; decode=True keeps "
                "one KV cache, which belongs to one width (use ffn_widths)."
            )
        return granularity_runs(
            owner, ffn_widths, ffn_granularities, num_layers, self.ffn_hidden_dim
        )

    def _lm_head(self, embedding: nn.Embed) -> Callable[[Array], Array]:
        """hidden states [..., D] -> logits [..., vocab]: the tied embedding or a Dense.

        Built once per call, so that runs at several granularities share it.
        """
        if self.tie_embeddings:
            return embedding.attend
        return nn.Dense(self.vocab_size, use_bias=self.use_bias, dtype=self.dtype, name="lm_head")


class TransformerLM(_LMBase):
    """Decoder, encoder or prefix LM over token ids (see the module docstring).

    Attributes:
      kind: ``"decoder"``, ``"encoder"`` or ``"prefix_lm"``.
      vocab_size, embed_dim: vocabulary and model width D.
      num_layers, layer_pattern, layer_overrides: the mixer of every layer
        (``effformer.models.lm_layers``).
      num_heads, num_kv_heads (GQA), head_dim, qk_norm: attention shape.
      ffn, ffn_hidden_dim: FFN kind (``make_ffn`` name: gelu, swiglu, geglu, ...) and width.
      ffn_dense_sparse: ``(rank, nonzeros_per_row)``: the FFN projections are DSFormer
        dense-sparse factorisations computed in factored form (``effformer.nn.ffn``;
        the parameters ``compress_lm_params`` gives a trained model); None: dense.
      use_bias: biases in attention, FFN, norms and the untied head.
      norm, norm_epsilon, ordering: ``layer_norm``/``rms_norm``, ``pre_norm``/``post_norm``.
      position_encoding, position_kwargs: any ``make_position_encoding`` name
        (rope, alibi, t5, learned, sinusoidal, none); ``max_length`` sizes the learned table.
      mixer_kwargs: ``{mixer name: kwargs}`` for non-attention layers (e.g. ``mamba``).
      tie_embeddings: the LM head is the transposed token embedding.
      num_classes, pooling, head_transform: encoder heads. ``num_classes`` set:
        classification logits [B, C] from the ``"mean"`` of real tokens or the
        ``"first"`` token; ``head_transform``: dense + GELU + norm before the
        MLM head (BERT / ModernBERT).
      dropout_rate, attention_dropout_rate, drop_path_rate: regularisation
        (active with ``train=True``, RNG stream ``dropout``).
      attention_implementation: for ``dot_product_attention``.
      max_decode_length: KV-cache length for decoding (set by the generation code).
      ffn_widths: the FFN widths of a call that gives none (MatFormer; see the
        module docstring); None: full width. A sub-model for ``generate``, which
        passes no width: ``model.clone(ffn_widths=...)``.
    """

    kind: str = "decoder"
    num_layers: int = 4
    layer_pattern: str | Sequence[str] = "global"
    layer_overrides: Mapping[int, str] | None = None
    num_classes: int | None = None
    pooling: str = "mean"
    head_transform: bool = False

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        inputs = {"inputs": jnp.ones((batch_size, 8), jnp.int32)}
        if self.kind == "prefix_lm":
            inputs["prefix_lengths"] = jnp.full((batch_size,), 3, jnp.int32)
        return inputs

    @property
    def causal(self) -> bool:
        return self.kind != "encoder"

    @property
    def supports_packing(self) -> bool:
        """Whether a packed row (sequences told apart by ``segment_ids``) computes what each
        sequence would alone: attention and EcoFormer layers keep sequences apart; Mamba,
        LMU and Combiner layers read segment ids as a padding mask only."""
        specs = expand_layer_pattern(self.layer_pattern, self.num_layers, self.layer_overrides)
        return all(spec.is_attention or spec.kind == "ecoformer" for spec in specs)

    @property
    def supports_chunked_decode(self) -> bool:
        """Whether a decode call may take several tokens (Mamba layers step one at a time)."""
        specs = expand_layer_pattern(self.layer_pattern, self.num_layers, self.layer_overrides)
        return all(spec.is_attention for spec in specs)

    def _validate(self, inputs, segment_ids, positions, prefix_lengths, decode) -> None:
        owner = f"TransformerLM(kind={self.kind!r})"
        if self.kind not in KINDS:
            raise ValueError(f"TransformerLM: kind must be one of {KINDS}, got {self.kind!r}.")
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"TransformerLM: pooling must be one of {POOLINGS}, got {self.pooling!r}."
            )
        _check_tokens(owner, "inputs", inputs)
        _check_like(owner, "segment_ids", segment_ids, tuple(inputs.shape))
        _check_like(owner, "positions", positions, tuple(inputs.shape))
        if prefix_lengths is not None:
            if self.kind != "prefix_lm":
                raise ValueError(f"{owner}: prefix_lengths is only for kind='prefix_lm'.")
            _check_like(owner, "prefix_lengths", prefix_lengths, (inputs.shape[0],))
            if segment_ids is not None:
                raise ValueError(
                    f"{owner}: prefix_lengths with segment_ids is not supported (one prefix per "
                    "row); give one sequence per row."
                )
        if decode:
            if self.kind not in ("decoder", "prefix_lm"):
                raise ValueError(f"{owner}: decode=True needs kind='decoder' or 'prefix_lm'.")
            if positions is None:
                raise ValueError(
                    f"{owner}: decode=True needs explicit positions [B, L] (the position of "
                    "each new token), got None."
                )

    def _output_head(
        self, embedding: nn.Embed, segment_ids: Array | None, batch: int, length: int
    ) -> Callable[[Array], Array]:
        """Final hidden states [B, L, D] -> logits: the classifier (with pooling) or LM head.

        Its modules are built here, once, so that runs at several granularities share them.
        """
        if self.num_classes is not None:
            classifier = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")

            def classify(x: Array) -> Array:
                if self.pooling == "first":
                    return classifier(x[:, 0])
                real = (
                    jnp.ones((batch, length), x.dtype)
                    if segment_ids is None
                    else (segment_ids != 0).astype(x.dtype)
                )
                pooled = jnp.sum(x * real[..., None], 1) / jnp.maximum(
                    real.sum(1, keepdims=True), 1
                )
                return classifier(pooled)

            return classify
        lm_head = self._lm_head(embedding)
        if not self.head_transform:
            return lm_head
        head_dense = nn.Dense(
            self.embed_dim, use_bias=self.use_bias, dtype=self.dtype, name="head_dense"
        )
        norm_kwargs = {"use_bias": self.use_bias} if self.norm == "layer_norm" else {}
        head_norm = make_norm(self.norm, epsilon=self.norm_epsilon, name="head_norm", **norm_kwargs)
        return lambda x: lm_head(head_norm(jax.nn.gelu(head_dense(x), approximate=False)))

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        prefix_lengths: Array | None = None,
        train: bool = False,
        decode: bool = False,
        ffn_widths: FfnWidths = None,
        ffn_granularities: Sequence[FfnWidths] | None = None,
        layer_gates: Array | None = None,
        input_embeddings: Array | None = None,
    ) -> Array:
        """inputs [B, L] int -> logits [B, L, vocab] ([B, num_classes] for a classifier).

        segment_ids [B, L]: packed sequences (0 = padding); positions [B, L]:
        per-sequence positions (default: from the segment ids, else 0..L-1);
        prefix_lengths [B]: the bidirectional prefix of a prefix LM.

        MatFormer (see the module docstring): ffn_widths: every layer's FFN
        hidden width, one number or one per layer (Mix'n'Match); None: the
        ``ffn_widths`` field (default: full width). ffn_granularities: G
        ``ffn_widths`` values; the model runs once at each on the same inputs
        (sharing the embedding lookup) and returns the outputs stacked,
        [G, B, L, vocab] ([G, B, num_classes]); not with ``decode``.

        layer_gates [num_layers] or [B, num_layers] (TinyFusion's depth pruning):
        every residual branch of layer i is multiplied by its gate, so 0 removes the
        layer and 1 runs it (``effformer.models.lm_layers``; pre-norm only); None: no
        gates, the code without them.

        input_embeddings [B, L, embed_dim]: added to the token embeddings before the
        layer stack (SOLO adds its image patches' embeddings this way,
        ``effformer.models.solo``); None: the code without them.
        """
        self._validate(inputs, segment_ids, positions, prefix_lengths, decode)
        owner = f"TransformerLM(kind={self.kind!r})"
        _check_like(owner, "input_embeddings", input_embeddings, (*inputs.shape, self.embed_dim))
        check_layer_gates(owner, layer_gates, self.num_layers, inputs.shape[0], self.ordering)
        runs = self._granularities(ffn_widths, ffn_granularities, decode, self.num_layers)
        batch, length = inputs.shape
        if positions is None:
            positions = (
                segment_positions(segment_ids)
                if segment_ids is not None
                else jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
            )
        mask_positions = None
        if prefix_lengths is not None:
            last_prefix = (prefix_lengths.astype(jnp.int32) - 1)[:, None]
            mask_positions = jnp.maximum(positions, last_prefix)

        embedding = self._embedding()
        stack = self._stack("decoder" if self.causal else "encoder",
                            num_layers=self.num_layers, layer_pattern=self.layer_pattern,
                            layer_overrides=self.layer_overrides, causal=self.causal,
                            prefix_lm=self.kind == "prefix_lm")  # fmt: skip
        head = self._output_head(embedding, segment_ids, batch, length)
        embedded = embedding(inputs)
        if input_embeddings is not None:
            embedded = embedded + input_embeddings.astype(embedded.dtype)
        outputs = [
            head(
                stack(
                    embedded,
                    positions=positions,
                    segment_ids=segment_ids,
                    mask_positions=mask_positions,
                    deterministic=not train,
                    decode=decode,
                    ffn_widths=widths,
                    layer_gates=layer_gates,
                )
            )
            for widths in runs
        ]
        return outputs[0] if ffn_granularities is None else jnp.stack(outputs)


class EncoderDecoderLM(_LMBase):
    """Encoder-decoder (sequence-to-sequence) model sharing one token embedding.

    Attributes (besides those of :class:`TransformerLM`):
      num_encoder_layers, encoder_pattern, encoder_overrides: the encoder's mixers.
      num_decoder_layers, decoder_pattern, decoder_overrides: the decoder's
        (self-attention) mixers; every decoder layer also cross-attends to the
        encoder output.
      pad_id: source token id treated as padding (masked in the encoder and in
        cross-attention); None: no source padding.
      max_length: size of a ``"learned"`` position table.

    Methods ``encode`` and ``decode`` (through ``apply(..., method=...)``) run
    the halves separately, for generation.

    FFN widths (MatFormer): ``ffn_widths`` is one width for every layer or one
    per layer, the encoder's ``num_encoder_layers`` first, then the decoder's;
    ``encode`` and ``decode`` each use their part.
    """

    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    encoder_pattern: str | Sequence[str] = "global"
    encoder_overrides: Mapping[int, str] | None = None
    decoder_pattern: str | Sequence[str] = "global"
    decoder_overrides: Mapping[int, str] | None = None
    pad_id: int | None = 0

    def setup(self) -> None:
        self.token_embedding = self._embedding()
        self.encoder = self._stack(
            None,
            num_layers=self.num_encoder_layers,
            layer_pattern=self.encoder_pattern,
            layer_overrides=self.encoder_overrides,
            causal=False,
        )
        self.decoder = self._stack(
            None,
            num_layers=self.num_decoder_layers,
            layer_pattern=self.decoder_pattern,
            layer_overrides=self.decoder_overrides,
            causal=True,
            cross_attention=True,
        )
        if not self.tie_embeddings:
            self.lm_head = nn.Dense(self.vocab_size, use_bias=self.use_bias, dtype=self.dtype)

    def _embedding(self) -> nn.Embed:
        return nn.Embed(
            self.vocab_size,
            self.embed_dim,
            embedding_init=nn.initializers.normal(stddev=0.02),
            dtype=self.dtype,
        )

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        return {
            "inputs": jnp.ones((batch_size, 8), jnp.int32),
            "decoder_inputs": jnp.ones((batch_size, 6), jnp.int32),
        }

    @property
    def supports_chunked_decode(self) -> bool:
        specs = expand_layer_pattern(
            self.decoder_pattern, self.num_decoder_layers, self.decoder_overrides
        )
        return all(spec.is_attention for spec in specs)

    def _split_ffn_widths(self, ffn_widths: FfnWidths) -> tuple[FfnWidths, FfnWidths]:
        """(encoder widths, decoder widths) of a call's ``ffn_widths`` (None: the field)."""
        widths = self.ffn_widths if ffn_widths is None else ffn_widths
        num_layers = self.num_encoder_layers + self.num_decoder_layers
        resolve_ffn_widths(widths, num_layers, self.ffn_hidden_dim)
        if isinstance(widths, Sequence) and not isinstance(widths, str):
            widths = tuple(widths)
            return widths[: self.num_encoder_layers], widths[self.num_encoder_layers :]
        return widths, widths

    def encode(
        self, inputs: Array, *, train: bool = False, ffn_widths: FfnWidths = None
    ) -> tuple[Array, Array]:
        """inputs [B, Ls] int -> (encoded [B, Ls, D], source_mask [B, Ls] bool, True = real).

        ffn_widths: as in the class docstring (the encoder uses its layers' part).
        """
        _check_tokens("EncoderDecoderLM", "inputs", inputs)
        encoder_widths, _ = self._split_ffn_widths(ffn_widths)
        batch, length = inputs.shape
        if self.pad_id is None:
            source_mask = jnp.ones((batch, length), bool)
        else:
            source_mask = inputs != self.pad_id
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        encoded = self.encoder(
            self.token_embedding(inputs),
            positions=positions,
            segment_ids=None if self.pad_id is None else source_mask.astype(jnp.int32),
            deterministic=not train,
            ffn_widths=encoder_widths,
        )
        return encoded, source_mask

    def decode(
        self,
        decoder_inputs: Array,
        encoded: Array,
        source_mask: Array,
        *,
        positions: Array | None = None,
        train: bool = False,
        decode: bool = False,
        ffn_widths: FfnWidths = None,
    ) -> Array:
        """decoder_inputs [B, Lt] int, encoded [B, Ls, D], source_mask [B, Ls] -> [B, Lt, V].

        positions [B, Lt] default 0..Lt-1; required with ``decode=True``.
        ffn_widths: as in the class docstring (the decoder uses its layers' part).
        """
        owner = "EncoderDecoderLM"
        _, decoder_widths = self._split_ffn_widths(ffn_widths)
        _check_tokens(owner, "decoder_inputs", decoder_inputs)
        batch, length = decoder_inputs.shape
        _check_like(owner, "encoded", encoded, (batch, source_mask.shape[1], self.embed_dim))
        _check_like(owner, "source_mask", source_mask, (batch, encoded.shape[1]))
        if positions is None:
            if decode:
                raise ValueError(
                    f"{owner}: decode=True needs explicit positions [B, Lt], got None."
                )
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        _check_like(owner, "positions", positions, (batch, length))
        x = self.decoder(
            self.token_embedding(decoder_inputs),
            positions=positions,
            deterministic=not train,
            decode=decode,
            context=encoded,
            context_mask=source_mask,
            ffn_widths=decoder_widths,
        )
        if self.tie_embeddings:
            return self.token_embedding.attend(x)
        return self.lm_head(x)

    def __call__(
        self,
        inputs: Array,
        decoder_inputs: Array,
        *,
        train: bool = False,
        ffn_widths: FfnWidths = None,
        ffn_granularities: Sequence[FfnWidths] | None = None,
    ) -> Array:
        """inputs [B, Ls], decoder_inputs [B, Lt] int -> logits [B, Lt, vocab].

        ffn_widths: as in the class docstring. ffn_granularities: G such values;
        encoder and decoder run once at each, outputs stacked [G, B, Lt, vocab].
        """
        _check_tokens("EncoderDecoderLM", "decoder_inputs", decoder_inputs)
        if decoder_inputs.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"EncoderDecoderLM: decoder_inputs batch must equal inputs batch "
                f"{inputs.shape[0]}, got {decoder_inputs.shape[0]}."
            )
        num_layers = self.num_encoder_layers + self.num_decoder_layers
        runs = self._granularities(ffn_widths, ffn_granularities, False, num_layers)
        outputs = []
        for widths in runs:
            encoded, source_mask = self.encode(inputs, train=train, ffn_widths=widths)
            outputs.append(
                self.decode(decoder_inputs, encoded, source_mask, train=train, ffn_widths=widths)
            )
        return outputs[0] if ffn_granularities is None else jnp.stack(outputs)


# ---------------------------------------------------------------------------- registry

_TINY = dict(
    vocab_size=64, embed_dim=32, num_heads=4, num_kv_heads=2, ffn_hidden_dim=64, max_length=64
)


@register("lm_decoder", tiny=dict(num_layers=2, **_TINY))
def lm_decoder(**overrides: Any) -> TransformerLM:
    """Decoder-only causal LM (defaults: 4 x 256, RoPE, pre-norm, GeLU MLP)."""
    return TransformerLM(kind="decoder", **overrides)


@register("lm_encoder", tiny=dict(num_layers=2, **_TINY))
def lm_encoder(**overrides: Any) -> TransformerLM:
    """Encoder-only masked LM (or classifier with num_classes)."""
    return TransformerLM(kind="encoder", **overrides)


@register("lm_prefix", tiny=dict(num_layers=2, **_TINY))
def lm_prefix(**overrides: Any) -> TransformerLM:
    """Prefix LM: bidirectional over each row's prefix, causal after it."""
    return TransformerLM(kind="prefix_lm", **overrides)


@register("lm_encoder_decoder", tiny=dict(num_encoder_layers=1, num_decoder_layers=1, **_TINY))
def lm_encoder_decoder(**overrides: Any) -> EncoderDecoderLM:
    """Encoder-decoder sequence-to-sequence model with a shared embedding."""
    return EncoderDecoderLM(**overrides)


@register(
    "lm_hybrid_mamba",
    tiny=dict(num_layers=3, mixer_kwargs={"mamba": {"d_state": 4}}, **_TINY),
)
def lm_hybrid_mamba(**overrides: Any) -> TransformerLM:
    """Mamba/attention hybrid decoder: two Mamba layers per global attention layer."""
    kwargs = dict(layer_pattern="mamba,mamba,global", position_encoding="rope")
    return TransformerLM(kind="decoder", **{**kwargs, **overrides})


# Ettin README, "Model Architecture": size -> (layers, hidden, GLU intermediate, heads).
ETTIN_SIZES = {
    "17m": (7, 256, 384, 4),
    "32m": (10, 384, 576, 6),
    "68m": (19, 512, 768, 8),
    "150m": (22, 768, 1152, 12),
    "400m": (28, 1024, 2624, 16),
    "1b": (28, 1792, 3840, 28),
}
ETTIN_VOCAB_SIZE = 50368
ETTIN_PATTERN = "global,local:128,local:128"
# ModernBERT's 128-token window is 64 keys on either side; a causal layer keeps the left
# 64 (the query and 63 before it, Hugging Face's ModernBertDecoder sliding_window = 128 // 2).
ETTIN_DECODER_PATTERN = "global,local:64,local:64"


def ettin_config(size: str) -> dict[str, Any]:
    """The shared Ettin / ModernBERT recipe at one of :data:`ETTIN_SIZES`."""
    layers, hidden, intermediate, heads = ETTIN_SIZES[size]
    return dict(
        vocab_size=ETTIN_VOCAB_SIZE,
        num_layers=layers,
        embed_dim=hidden,
        num_heads=heads,
        ffn="geglu",
        ffn_hidden_dim=intermediate,
        use_bias=False,
        norm="layer_norm",
        ordering="pre_norm",
        position_encoding="rope",
        layer_pattern=ETTIN_PATTERN,
        tie_embeddings=True,
        max_length=8192,
    )


_ETTIN_TINY = dict(
    vocab_size=64, num_layers=3, embed_dim=32, num_heads=4, ffn_hidden_dim=48,
    layer_pattern="global,local:4,local:4",
)  # fmt: skip


def _register_ettin(size: str) -> None:
    def encoder(**overrides: Any) -> TransformerLM:
        return TransformerLM(
            kind="encoder", head_transform=True, **{**ettin_config(size), **overrides}
        )

    def decoder(**overrides: Any) -> TransformerLM:
        config = dict(ettin_config(size), layer_pattern=ETTIN_DECODER_PATTERN)
        return TransformerLM(kind="decoder", **{**config, **overrides})

    layers, hidden, _, _ = ETTIN_SIZES[size]
    encoder.__doc__ = f"Ettin encoder {size} ({layers} x {hidden}, MLM head)."
    decoder.__doc__ = f"Ettin decoder {size} ({layers} x {hidden}, causal LM)."
    register(f"ettin_encoder_{size}", tiny=_ETTIN_TINY)(encoder)
    register(f"ettin_decoder_{size}", tiny=_ETTIN_TINY)(decoder)


for _size in ETTIN_SIZES:
    _register_ettin(_size)


MASFORMER_SHORT_SPANS = ("local", "block")


def masformer_config(
    num_layers: int = 24,
    masformer_span: int = 1024,
    masformer_global_layers: Sequence[int] = (0, 1, 2, 3),
    masformer_short_span: str = "local",
) -> dict[str, Any]:
    """Short-span attention (span ``masformer_span``) everywhere but ``masformer_global_layers``.

    ``masformer_short_span``: ``"local"`` (sliding window) or ``"block"`` (block-local).
    """
    if masformer_short_span not in MASFORMER_SHORT_SPANS:
        raise ValueError(
            f"masformer_short_span must be one of {MASFORMER_SHORT_SPANS}, got "
            f"{masformer_short_span!r}."
        )
    return dict(
        num_layers=num_layers,
        layer_pattern=f"{masformer_short_span}:{masformer_span}",
        layer_overrides={int(layer): "global" for layer in masformer_global_layers},
    )


@register(
    "masformer_decoder",
    tiny=dict(num_layers=3, masformer_span=4, masformer_global_layers=(0,), **_TINY),
)
def masformer_decoder(
    num_layers: int = 24,
    masformer_span: int = 1024,
    masformer_global_layers: Sequence[int] = (0, 1, 2, 3),
    masformer_short_span: str = "local",
    **overrides: Any,
) -> TransformerLM:
    """MASFormer decoder: full attention at a few (bottom) layers, local span elsewhere.

    Default shape is the paper's 1.3B GPT-style decoder (24 x 2048, 16 heads,
    4 x MLP) with 4 of 24 layers global and span 1024 (our choice of the
    paper's ablated settings).
    """
    kwargs = dict(embed_dim=2048, num_heads=16, ffn_hidden_dim=8192, vocab_size=50257)
    kwargs.update(
        masformer_config(num_layers, masformer_span, masformer_global_layers, masformer_short_span)
    )
    return TransformerLM(kind="decoder", **{**kwargs, **overrides})
