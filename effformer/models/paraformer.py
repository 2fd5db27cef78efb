"""Paraformer (Gao et al., 2022): a CIF predictor and a parallel (non-autoregressive) decoder.

"Paraformer: Fast and Accurate Parallel Transformer for Non-autoregressive
End-to-End Speech Recognition". The model, as in FunASR's ``Paraformer``
(``modelscope/FunASR``, ``funasr/models/paraformer/``) with this library's parts:

* **encoder**: a frame projection ``F -> D`` and a bidirectional
  :class:`~effformer.models.lm_layers.LayerStack` over the frames (padding frames
  masked; FunASR's is a SAN-M encoder);
* **CIF predictor** (FunASR's ``CifPredictorV2``): ``alpha = sigmoid(Linear(relu(
  Conv1d(h))))`` over the encoder output ``h`` with a ``predictor_context = (l, r)``
  window (1, 1 in FunASR's config), zeroed on padding frames; continuous
  integrate-and-fire (:func:`effformer.ops.cif.cif`) turns ``(h, alpha)`` into one
  acoustic embedding per token. In training the weights are scaled to the target
  length, so the decoder gets exactly the target's number of embeddings; at
  inference the count is ``floor(sum(alpha) + tail_threshold)`` (0.45);
* **decoder**: a bidirectional LayerStack with cross-attention to the encoder
  output in every layer, over the acoustic embeddings (padded token slots
  masked), and an output layer to the vocabulary (FunASR's ``ParaformerSANMDecoder``
  uses FSMN memory blocks in place of self-attention).

**Glancing language-model sampler** (training, ``glancing_ratio > 0``; FunASR's
``Paraformer.sampler``): a first decoder pass over the acoustic embeddings gives
a greedy prediction (no gradient flows through it); with ``d`` the Hamming
distance between it and the target (positions that differ), ``floor(ratio * d)``
positions, drawn uniformly among the target's positions, get the target token's
embedding (a separate embedding table, FunASR's ``decoder.embed``) instead of
the acoustic one; the second pass over this mix gives the logits that are
trained, at every target position. FunASR truncates ``ratio * d`` to an
integer (``.long()``), so that is done here too; its configuration uses ratio
0.75. Randomness comes from the ``dropout`` RNG stream.

**Greedy parallel decoding** (:meth:`Paraformer.recognize`): one encoder pass,
the predictor's count and embeddings, one decoder pass, argmax per fired slot.

Outputs of ``__call__`` (a dict; every entry has the batch first):

* ``logits`` [B, N, V] over the target's N slots (given ``targets``; the second
  pass when glancing), ``first_pass_logits`` [B, N, V] (when glancing), and
  ``alpha_sum`` [B], ``sum(alpha)`` before scaling: the predicted token count
  that the quantity loss compares with the target length;
* with ``train=False`` also the greedy decode: ``predictions`` [B, max_tokens]
  (0 after the fired count) and ``num_tokens`` [B].

The training losses (cross-entropy, the quantity loss and the paper's
minimum word error rate loss over negative samples, ``mwer_weight``) are the
``paraformer`` task's (``effformer/train/paraformer_task.py``). Not built: the
CTC branch and the SAN-M/FSMN layers of FunASR.

:class:`FrameEncoderDecoder` is the autoregressive baseline: the library's
:class:`~effformer.models.transformer_lm.EncoderDecoderLM` with a frame
projection in place of the source token embedding (train it with the
``seq2seq`` task; decode it with ``effformer.models.generate.generate_seq2seq``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.models.lm_layers import LayerStack
from effformer.models.registry import register
from effformer.models.transformer_lm import EncoderDecoderLM
from effformer.ops.cif import cif, scale_to_length

Array = jax.Array
Dtype = Any


def _check_frames(owner: str, inputs: Array, input_dim: int) -> None:
    if inputs.ndim != 3 or inputs.shape[-1] != input_dim:
        raise ValueError(
            f"{owner}: inputs must be frames [B, T, input_dim={input_dim}], got shape "
            f"{tuple(inputs.shape)}."
        )
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
        raise ValueError(f"{owner}: inputs must be float frames, got dtype {inputs.dtype}.")


def nonzero_frames(inputs: Array) -> Array:
    """[B, T, F] -> [B, T] bool: True where a frame is not all zeros (zero frames are padding)."""
    return jnp.any(inputs != 0, axis=-1)


class CifPredictor(nn.Module):
    """FunASR's ``CifPredictorV2`` weights: [B, T, D] frames, [B, T] mask -> alphas [B, T] in (0, 1).

    ``context = (l, r)``: the convolution sees l frames before and r after (zero
    padded; padding frames are zeroed first, so they never reach a real frame).
    """

    context: tuple[int, int] = (1, 1)
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, frame_mask: Array) -> Array:
        left, right = self.context
        x = jnp.where(frame_mask[..., None], x, 0)
        hidden = nn.Conv(
            x.shape[-1],
            (left + right + 1,),
            padding=[(left, right)],
            dtype=self.dtype,
            name="conv",
        )(x)
        logit = nn.Dense(1, dtype=self.dtype, name="output")(nn.relu(hidden))[..., 0]
        return jnp.where(frame_mask, jax.nn.sigmoid(logit.astype(jnp.float32)), 0.0)


class Paraformer(nn.Module):
    """Encoder, CIF predictor and parallel decoder (module docstring).

    Attributes:
      vocab_size: output tokens (id 0 is padding and never predicted by the targets).
      input_dim: F, channels per input frame.
      embed_dim, num_heads, ffn_hidden_dim: the width of both stacks.
      num_encoder_layers, num_decoder_layers: depths.
      position_encoding: for both stacks (any ``make_position_encoding`` name).
      predictor_context: (l, r) frames the predictor's convolution sees.
      cif_threshold: beta, the weight of one token (1.0).
      tail_threshold: the inference count's tail weight (FunASR: 0.45).
      max_tokens: token slots of the greedy decode (counts above are capped).
      dropout_rate, attention_dropout_rate: regularisation (``train=True``).
      max_frames: frames of ``dummy_inputs``.
    """

    vocab_size: int = 64
    input_dim: int = 80
    embed_dim: int = 256
    num_heads: int = 4
    ffn_hidden_dim: int = 1024
    num_encoder_layers: int = 6
    num_decoder_layers: int = 3
    position_encoding: str = "rope"
    predictor_context: tuple[int, int] = (1, 1)
    cif_threshold: float = 1.0
    tail_threshold: float = 0.45
    max_tokens: int = 64
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    max_frames: int = 32
    dtype: Dtype | None = None

    def check_config(self) -> None:
        """Fail at once, naming the field, on a configuration that cannot run."""
        for field in ("vocab_size", "input_dim", "embed_dim", "max_tokens", "max_frames"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Paraformer: {field} must be an int >= 1, got {value!r}.")
        for field in ("num_encoder_layers", "num_decoder_layers"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Paraformer: {field} must be an int >= 1, got {value!r}.")
        context = tuple(self.predictor_context)
        if len(context) != 2 or not all(isinstance(c, int) and c >= 0 for c in context):
            raise ValueError(
                f"Paraformer: predictor_context must be (l, r) ints >= 0, got "
                f"{self.predictor_context!r}."
            )
        if not 0 <= self.tail_threshold < self.cif_threshold:
            raise ValueError(
                f"Paraformer: tail_threshold must be in [0, cif_threshold={self.cif_threshold}), "
                f"got {self.tail_threshold!r}."
            )

    def _stack(self, num_layers: int, cross_attention: bool, name: str) -> LayerStack:
        return LayerStack(
            num_layers=num_layers,
            causal=False,
            cross_attention=cross_attention,
            num_heads=self.num_heads,
            ffn_hidden_dim=self.ffn_hidden_dim,
            position_encoding=self.position_encoding,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            dtype=self.dtype,
            name=name,
        )

    def setup(self) -> None:
        self.check_config()
        self.frame_projection = nn.Dense(self.embed_dim, dtype=self.dtype)
        self.encoder = self._stack(self.num_encoder_layers, False, "encoder")
        self.predictor = CifPredictor(tuple(self.predictor_context), dtype=self.dtype)
        self.decoder = self._stack(self.num_decoder_layers, True, "decoder")
        self.output_layer = nn.Dense(self.vocab_size, dtype=self.dtype)
        # The glancing sampler's target embeddings (FunASR's decoder.embed).
        self.target_embedding = nn.Embed(
            self.vocab_size,
            self.embed_dim,
            embedding_init=nn.initializers.normal(stddev=0.02),
            dtype=self.dtype,
        )

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        frames = jnp.ones((batch_size, self.max_frames, self.input_dim), jnp.float32)
        targets = jnp.ones((batch_size, 4), jnp.int32)
        return {"inputs": frames, "targets": targets}

    # ------------------------------------------------------------------ the parts
    def encode(
        self, inputs: Array, frame_mask: Array | None = None, *, train: bool = False
    ) -> tuple[Array, Array, Array]:
        """frames [B, T, F] -> (encoded [B, T, D], frame_mask [B, T], alphas [B, T]).

        frame_mask: True on real frames; None: the frames that are not all zeros.
        """
        _check_frames("Paraformer", inputs, self.input_dim)
        if frame_mask is None:
            frame_mask = nonzero_frames(inputs)
        elif tuple(frame_mask.shape) != tuple(inputs.shape[:2]):
            raise ValueError(
                f"Paraformer: frame_mask must have shape [B, T] = {tuple(inputs.shape[:2])}, "
                f"got {tuple(frame_mask.shape)}."
            )
        frame_mask = frame_mask.astype(bool)
        batch, length = frame_mask.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        encoded = self.encoder(
            self.frame_projection(inputs),
            positions=positions,
            segment_ids=frame_mask.astype(jnp.int32),
            deterministic=not train,
        )
        return encoded, frame_mask, self.predictor(encoded, frame_mask)

    def decode(
        self,
        embeddings: Array,
        token_mask: Array,
        encoded: Array,
        frame_mask: Array,
        *,
        train: bool = False,
    ) -> Array:
        """Token slots [B, N, D] (mask [B, N]) reading encoded [B, T, D] -> logits [B, N, V]."""
        batch, length = token_mask.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        hidden = self.decoder(
            embeddings,
            positions=positions,
            segment_ids=token_mask.astype(jnp.int32),
            deterministic=not train,
            context=encoded,
            context_mask=frame_mask,
        )
        return self.output_layer(hidden)

    def recognize(self, inputs: Array, frame_mask: Array | None = None) -> tuple[Array, Array]:
        """Greedy parallel decoding: frames [B, T, F] -> (tokens [B, max_tokens], counts [B]).

        Tokens after a row's count are 0.
        """
        encoded, frame_mask, alphas = self.encode(inputs, frame_mask)
        fired = cif(
            encoded,
            alphas,
            max_tokens=self.max_tokens,
            frame_mask=frame_mask,
            threshold=self.cif_threshold,
            tail_threshold=self.tail_threshold,
        )
        logits = self.decode(fired.embeddings, fired.token_mask, encoded, frame_mask)
        tokens = jnp.where(fired.token_mask, jnp.argmax(logits, -1), 0)
        return tokens.astype(jnp.int32), fired.num_tokens

    def _glance(
        self,
        acoustic: Array,
        first_logits: Array,
        targets: Array,
        target_mask: Array,
        ratio: float,
    ) -> Array:
        """The glancing sampler's decoder input [B, N, D] (module docstring)."""
        predicted = jnp.argmax(jax.lax.stop_gradient(first_logits), -1)
        distance = jnp.sum((predicted != targets) & target_mask, axis=1)
        num_glanced = jnp.floor(ratio * distance.astype(jnp.float32)).astype(jnp.int32)
        # A uniform random subset of size num_glanced of each row's target positions:
        # the num_glanced target positions with the smallest uniform keys.
        keys = jax.random.uniform(self.make_rng("dropout"), targets.shape)
        keys = jnp.where(target_mask, keys, 2.0)
        ranks = jnp.argsort(jnp.argsort(keys, axis=1), axis=1)
        glanced = ranks < num_glanced[:, None]
        target_embeddings = self.target_embedding(targets)
        mixed = jnp.where(glanced[..., None], target_embeddings, acoustic)
        return jnp.where(target_mask[..., None], mixed, 0)

    # ------------------------------------------------------------------ the call
    def __call__(
        self,
        inputs: Array,
        *,
        frame_mask: Array | None = None,
        targets: Array | None = None,
        train: bool = False,
        glancing_ratio: float = 0.0,
    ) -> dict[str, Array]:
        """frames [B, T, F] (frame_mask [B, T]), targets [B, N] int (0 = padding) -> outputs.

        See the module docstring for the outputs. glancing_ratio: the sampler's ratio
        (used only with ``train=True`` and targets; 0 turns it off).
        """
        if targets is not None and (
            targets.ndim != 2
            or targets.shape[0] != inputs.shape[0]
            or not jnp.issubdtype(targets.dtype, jnp.integer)
        ):
            raise ValueError(
                f"Paraformer: targets must be int token ids [B={inputs.shape[0]}, N], got "
                f"shape {tuple(targets.shape)} and dtype {targets.dtype}."
            )
        if isinstance(glancing_ratio, bool) or not isinstance(glancing_ratio, int | float):
            raise ValueError(
                f"Paraformer: glancing_ratio must be a number in [0, 1], got {glancing_ratio!r}."
            )
        if not 0 <= glancing_ratio <= 1:
            raise ValueError(
                f"Paraformer: glancing_ratio must be a number in [0, 1], got {glancing_ratio!r}."
            )
        outputs: dict[str, Array] = {}
        encoded, frame_mask, alphas = self.encode(inputs, frame_mask, train=train)
        outputs["alpha_sum"] = jnp.sum(alphas, axis=1)
        if targets is not None:
            target_mask = targets != 0
            lengths = jnp.sum(target_mask, axis=1)
            fired = cif(
                encoded,
                scale_to_length(alphas, lengths),
                max_tokens=targets.shape[1],
                frame_mask=frame_mask,
                threshold=self.cif_threshold,
            )
            acoustic = jnp.where(target_mask[..., None], fired.embeddings, 0)
            if train and glancing_ratio > 0:
                first = self.decode(acoustic, target_mask, encoded, frame_mask, train=True)
                decoder_inputs = self._glance(
                    acoustic, first, targets, target_mask, float(glancing_ratio)
                )
                outputs["first_pass_logits"] = jax.lax.stop_gradient(first)
            else:
                decoder_inputs = acoustic
                if self.is_initializing():  # create the sampler's table
                    self.target_embedding(targets)
            outputs["logits"] = self.decode(
                decoder_inputs, target_mask, encoded, frame_mask, train=train
            )
        # (Initialising with targets creates every parameter without the greedy decode.)
        if not train and not (self.is_initializing() and targets is not None):
            outputs["predictions"], outputs["num_tokens"] = self.recognize(inputs, frame_mask)
        return outputs


class FrameEncoderDecoder(EncoderDecoderLM):
    """The autoregressive baseline: :class:`EncoderDecoderLM` reading frames [B, T, F].

    The source token embedding is replaced by a Dense projection ``F -> D``;
    frames that are all zeros are padding (the ``pad_id`` of frames), masked in the
    encoder and in cross-attention. The target side is the encoder-decoder LM's,
    so the ``seq2seq`` task trains it and ``generate_seq2seq`` decodes it.
    """

    input_dim: int = 80
    max_frames: int = 32

    def setup(self) -> None:
        super().setup()
        self.frame_projection = nn.Dense(self.embed_dim, dtype=self.dtype)

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        return {
            "inputs": jnp.ones((batch_size, self.max_frames, self.input_dim), jnp.float32),
            "decoder_inputs": jnp.ones((batch_size, 6), jnp.int32),
        }

    def encode(self, inputs: Array, *, train: bool = False, ffn_widths: Any = None):
        """frames [B, T, F] -> (encoded [B, T, D], source_mask [B, T] bool)."""
        _check_frames("FrameEncoderDecoder", inputs, self.input_dim)
        encoder_widths, _ = self._split_ffn_widths(ffn_widths)
        source_mask = nonzero_frames(inputs)
        batch, length = source_mask.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        encoded = self.encoder(
            self.frame_projection(inputs),
            positions=positions,
            segment_ids=source_mask.astype(jnp.int32),
            deterministic=not train,
            ffn_widths=encoder_widths,
        )
        return encoded, source_mask


# ---------------------------------------------------------------------------- registry

_TINY: Mapping[str, Any] = dict(
    vocab_size=16, input_dim=8, embed_dim=16, num_heads=2, ffn_hidden_dim=32, max_frames=12
)


@register(
    "paraformer",
    tiny=dict(num_encoder_layers=1, num_decoder_layers=1, max_tokens=8, **_TINY),
)
def paraformer(**overrides: Any) -> Paraformer:
    """Paraformer: CIF predictor and parallel decoder (defaults: 6 + 3 layers x 256)."""
    return Paraformer(**overrides)


@register(
    "frame_encoder_decoder",
    tiny=dict(num_encoder_layers=1, num_decoder_layers=1, max_length=64, **_TINY),
)
def frame_encoder_decoder(**overrides: Any) -> FrameEncoderDecoder:
    """Autoregressive encoder-decoder over frames (Paraformer's baseline)."""
    return FrameEncoderDecoder(**overrides)
