"""CarelessWhisper's training: the task ``careless_whisper`` (weakly aligned chunk targets).

The model is :class:`effformer.models.careless_whisper.CarelessWhisper`; the
batch holds ``inputs`` [b, T, F] frames, ``frame_mask`` [b, T], ``targets``
[b, N] token ids (0 = padding) ending in ``<eos>`` and, for the weak
alignment, ``token_ends`` [b, N] (the frame after each target token's last
one, ``<eos>``'s the utterance's end): the ``speech_like_aligned`` dataset.

Weak alignment (``config.task.weak_alignment``, default True; the official
``LoRAStreamedWhisper._forward_step_stream`` with ``_calc_labels``): the
block-causal encoder runs once; for each of ``num_cuts`` cuts the decoder,
teacher-forced on the whole target, reads only the encoder rows of chunks
``0 .. c`` (exactly the encoding of that prefix of the audio), and is trained
to emit the tokens that have ended by the end of chunk ``c``
(``token_ends <= s * (c + 1) * C`` input frames) followed by ``<eos>`` at the
first token that has not: with part of the audio the model must stop where
the heard audio stops. Later positions are unscored. The cuts of an example
are drawn uniformly over its chunks (``num_cuts - 1`` random draws, the
official ``streaming_fraction``, plus its last chunk, whose target is the
whole transcript). The official loop takes one optimiser step per cut; here
the cuts' token losses are summed in one step. Without the weak alignment (or
in evaluation) the loss is plain teacher-forced cross-entropy on the whole
input, the official ``_forward_step`` (``mask=True``: the block-causal mask,
all targets).

Config fields (``config.task``; read with defaults): ``weak_alignment``
(True), ``num_cuts`` (4), ``eos_id`` (2), ``bos_id`` (0, the decoder's start
token), ``label_smoothing`` (0).

Metrics: ``loss`` and ``token_accuracy`` per scored token; in training with
the weak alignment also ``eos_accuracy`` (of the ``<eos>`` targets placed at
cuts). The streaming token error rate needs the chunk-by-chunk decoder
(:func:`effformer.models.careless_whisper.stream_transcribe`); the experiment
measures it (``experiments/careless_whisper``).

Importing this module registers the task; ``effformer.train.tasks`` imports it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from effformer.train.tasks import (
    Batch,
    Metrics,
    Task,
    config_flag,
    config_number,
    register_task,
    smoothed_one_hot,
)

Array = jax.Array

DEFAULT_NUM_CUTS = 4
DEFAULT_EOS_ID = 2


def weak_targets(
    targets: Array, token_ends: Array, cut_frames: Array, eos_id: int
) -> tuple[Array, Array]:
    """The weakly aligned targets of each cut: (labels [b, K, N], weights [b, K, N]).

    targets [b, N] (0 = padding), token_ends [b, N], cut_frames [b, K]. A token
    counts when it has ended by the cut (``token_ends <= cut_frames``); the first
    position that does not count (a token not yet heard, or ``<eos>``) gets
    ``eos_id`` with weight 1; every later position weight 0.
    """
    if targets.shape != token_ends.shape or cut_frames.shape[0] != targets.shape[0]:
        raise ValueError(
            f"weak_targets: targets and token_ends must be [b, N] alike and cut_frames [b, K], "
            f"got {tuple(targets.shape)}, {tuple(token_ends.shape)}, {tuple(cut_frames.shape)}."
        )
    real = (targets != 0) & (targets != eos_id)
    ended = real[:, None, :] & (token_ends[:, None, :] <= cut_frames[..., None])  # [b, K, N]
    # Targets are in time order, so the ended tokens are a prefix; its length:
    heard = jnp.sum(jnp.cumprod(ended, axis=-1), axis=-1)  # [b, K]
    positions = jnp.arange(targets.shape[1])
    keep = positions[None, None, :] < heard[..., None]
    at_eos = positions[None, None, :] == heard[..., None]
    labels = jnp.where(keep, targets[:, None, :], jnp.where(at_eos, eos_id, 0))
    return labels.astype(targets.dtype), (keep | at_eos).astype(jnp.float32)


@register_task
class CarelessWhisperTask(Task):
    """Teacher-forced cross-entropy on weakly aligned chunk targets (module docstring)."""

    name = "careless_whisper"

    def __init__(self, config: ml_collections.ConfigDict, dataset_info: Any):
        super().__init__(config, dataset_info)
        self.weak_alignment = config_flag(config, "weak_alignment", True)
        self.num_cuts = config_number(config, "num_cuts", DEFAULT_NUM_CUTS, low=1, integer=True)
        self.eos_id = config_number(config, "eos_id", DEFAULT_EOS_ID, low=1, integer=True)
        self.bos_id = config_number(config, "bos_id", 0, low=0, integer=True)
        self.label_smoothing = config_number(config, "label_smoothing", 0.0, low=0.0, high=1.0)
        if len(getattr(dataset_info, "input_shape", ())) != 2:
            raise ValueError(
                f"Task {self.name!r} needs a dataset of frames, input_shape (T, F), got "
                f"{getattr(dataset_info, 'input_shape', None)!r} (e.g. config.data.name = "
                "'speech_like_aligned')."
            )
        self.required_keys = ("inputs", "frame_mask", "targets") + (
            ("token_ends",) if self.weak_alignment else ()
        )

    def model_overrides(self) -> dict[str, Any]:
        return {"vocab_size": self.info.vocab_size, "input_dim": self.info.input_shape[-1]}

    def prepare_batch(self, batch: Batch, rng: Array, train: bool) -> Batch:
        if not (train and self.weak_alignment):
            return batch
        batch_size = batch["targets"].shape[0]
        draws = jax.random.uniform(rng, (batch_size, self.num_cuts - 1))
        last = jnp.ones((batch_size, 1), jnp.float32)
        return {**batch, "cut_fractions": jnp.concatenate([draws, last], axis=1)}

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        targets = batch["targets"]
        start = jnp.full((targets.shape[0], 1), self.bos_id, targets.dtype)
        inputs = {
            "inputs": batch["inputs"],
            "decoder_inputs": jnp.concatenate([start, targets[:, :-1]], axis=1),
            "frame_mask": batch["frame_mask"],
        }
        if "cut_fractions" in batch:
            inputs["cut_fractions"] = batch["cut_fractions"]
        return inputs

    def loss_and_metrics(self, outputs: Any, batch: Batch) -> tuple[Array, Array, Metrics]:
        targets = batch["targets"]
        examples = batch["mask"].astype(jnp.float32) if "mask" in batch else None
        if isinstance(outputs, dict):  # the cuts of the weak alignment: [b, K, N, V]
            if "cut_frames" not in outputs or "logits" not in outputs:
                raise ValueError(
                    f"Task {self.name!r}: a dict output needs 'logits' and 'cut_frames', got "
                    f"{sorted(outputs)}."
                )
            labels, weights = weak_targets(
                targets, batch["token_ends"], outputs["cut_frames"], self.eos_id
            )
            logits = outputs["logits"]
            if examples is not None:
                weights = weights * examples[:, None, None]
        else:
            labels, logits = targets, outputs
            weights = (targets != 0).astype(jnp.float32)
            if examples is not None:
                weights = weights * examples[:, None]
        if logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"Task {self.name!r}: logits must be [..., V] over the targets "
                f"{tuple(labels.shape)}, got {tuple(logits.shape)}."
            )
        logits = logits.astype(jnp.float32)
        one_hot = smoothed_one_hot(labels, logits.shape[-1], self.label_smoothing)
        loss_sum = jnp.sum(optax.softmax_cross_entropy(logits, one_hot) * weights)
        count = jnp.sum(weights)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * weights
        metrics: Metrics = {
            "loss": (loss_sum, count),
            "token_accuracy": (jnp.sum(correct), count),
        }
        if isinstance(outputs, dict):
            at_eos = (labels == self.eos_id).astype(jnp.float32) * weights
            metrics["eos_accuracy"] = (jnp.sum(correct * at_eos), jnp.sum(at_eos))
        return loss_sum, count, metrics
