"""Paraformer's training: the task ``paraformer`` (cross-entropy, quantity loss, glancing).

The model is :class:`effformer.models.paraformer.Paraformer`; the batch holds
``inputs`` [b, T, F] frames, ``frame_mask`` [b, T] and ``targets`` [b, N] token
ids (0 = padding) ending in ``<eos>``, as the ``speech_like`` dataset makes
them. The task asks the model for the glancing sampler's two passes
(``glancing_ratio``; the sampler itself is in the model, because its first
pass must run inside the model's ``apply``: the trainer's step calls the model
once), and scores the second pass.

Loss (FunASR's Paraformer with ``length_normalized_loss: true``,
``predictor_weight: 1.0``, ``ctc_weight: 0``): the sum over target tokens of
the cross-entropy (label smoothing ``config.task.label_smoothing``, spread
uniformly over the vocabulary) plus ``quantity_weight`` times the sum over
examples of ``|sum(alpha) - L|`` (the quantity or MAE loss), divided by the
number of target tokens.

**Minimum word error rate training** (``mwer_weight > 0``; the paper's last
loss, with its negative sampling strategy): from the trained pass's logits
(the second pass when glancing, which is what the paper samples), ``n =
mwer_hypotheses`` candidate sequences are drawn over the target's slots, each
slot independently the greedy token or, with probability 1/2, the runner-up
(the greedy token "masked" and the argmax taken again). With ``P(y_i)`` the
product of the candidate's token probabilities, renormalised over the n
candidates, and ``W(y_i)`` its number of wrong tokens against the target (the
slots are the target's, so a token error is a mismatch), the loss of an
utterance is ``sum_i P_hat(y_i) * (W(y_i) - mean_j W(y_j))`` (Prabhavalkar et
al., 2018, as the paper uses it). Its gradient flows through ``log P(y_i)``
only; the candidates themselves are drawn in ``prepare_batch`` from the
step's key (``mwer_flips`` [b, n, N]). The trained loss adds ``mwer_weight``
times the sum of the utterances' losses (before the division by the number of
target tokens). The paper's weighting of the three losses was not available
here; this library's default is 0 (off) and the experiment uses 1.

Config fields (``config.task``; read with defaults):

* ``glancing_ratio`` (default 0.75, FunASR's ``sampling_ratio``): the
  sampler's lambda; 0 trains without the sampler;
* ``quantity_weight`` (default 1.0);
* ``mwer_weight`` (default 0.0: off) and ``mwer_hypotheses`` (default 4, an
  int >= 2): the MWER loss above;
* ``eos_id`` (default 2, the id of ``<eos>`` in the generated datasets): removed
  from hypotheses and references before the token error rate, as FunASR removes
  it from its hypotheses.

Metrics: ``loss``, ``cross_entropy`` and ``token_accuracy`` (per target token,
of the trained pass), ``quantity_loss`` (per example), ``first_pass_accuracy``
(glancing only); in evaluation also the greedy parallel decode's
``token_error_rate`` (Levenshtein distance to the reference over the number of
reference tokens, without ``<eos>``), ``sequence_accuracy`` and
``length_accuracy`` (the fired count equals the target length); with MWER in
training also ``mwer_loss`` and ``mwer_candidate_errors`` (the candidates'
mean number of wrong tokens), per utterance.

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
    config_number,
    register_task,
    smoothed_one_hot,
)

Array = jax.Array

DEFAULT_GLANCING_RATIO = 0.75
DEFAULT_QUANTITY_WEIGHT = 1.0
DEFAULT_EOS_ID = 2


def edit_distance(
    hypothesis: Array, hypothesis_mask: Array, reference: Array, reference_length: Array
) -> Array:
    """Levenshtein distances [b] between token rows, on device.

    hypothesis [b, H] with hypothesis_mask [b, H] (False: the token is skipped,
    wherever it is); reference [b, R] of which the first ``reference_length`` [b]
    tokens count. Row by row over the hypothesis (``lax.scan``); within a row the
    insertion chain ``D[i, j] = min_k (E[k] + j - k)`` is a cumulative minimum.
    """
    for name, value, rank in (
        ("hypothesis", hypothesis, 2),
        ("hypothesis_mask", hypothesis_mask, 2),
        ("reference", reference, 2),
        ("reference_length", reference_length, 1),
    ):
        if value.ndim != rank or value.shape[0] != hypothesis.shape[0]:
            raise ValueError(
                f"edit_distance: {name} must have rank {rank} and batch {hypothesis.shape[0]}, "
                f"got shape {tuple(value.shape)}."
            )
    if hypothesis_mask.shape != hypothesis.shape:
        raise ValueError(
            f"edit_distance: hypothesis_mask must have shape {tuple(hypothesis.shape)}, got "
            f"{tuple(hypothesis_mask.shape)}."
        )
    batch, width = reference.shape
    columns = jnp.arange(width + 1, dtype=jnp.int32)

    def row(previous, inputs):
        token, valid = inputs  # [b], [b]
        cost = (reference != token[:, None]).astype(jnp.int32)
        substitute_or_delete = jnp.minimum(previous[:, 1:] + 1, previous[:, :-1] + cost)
        best = jnp.concatenate([previous[:, :1] + 1, substitute_or_delete], axis=1)
        current = columns + jax.lax.cummin(best - columns, axis=1)
        return jnp.where(valid[:, None], current, previous), None

    first_row = jnp.broadcast_to(columns, (batch, width + 1))
    last_row, _ = jax.lax.scan(row, first_row, (hypothesis.T, hypothesis_mask.T))
    return jnp.take_along_axis(last_row, reference_length[:, None].astype(jnp.int32), 1)[:, 0]


def negative_sampling_candidates(logits: Array, flips: Array) -> Array:
    """The paper's MWER candidates [b, n, N]: per slot the greedy token, or the runner-up.

    logits [b, N, V]; flips bool [b, n, N]: True where candidate i takes the
    slot's second most likely token (the greedy one masked out) instead of the
    greedy one.
    """
    if logits.ndim != 3 or flips.ndim != 3 or flips.shape[::2] != logits.shape[:2]:
        raise ValueError(
            "negative_sampling_candidates: logits must be [b, N, V] and flips [b, n, N] "
            f"with the same b and N, got {tuple(logits.shape)} and {tuple(flips.shape)}."
        )
    _, top_two = jax.lax.top_k(logits, 2)  # [b, N, 2]
    return jnp.where(flips, top_two[:, None, :, 1], top_two[:, None, :, 0])


def mwer_loss(logits: Array, candidates: Array, targets: Array, slot_mask: Array) -> Array:
    """Minimum word error rate loss per utterance [b] over given candidates.

    logits [b, N, V]; candidates [b, n, N] token ids over the same N slots;
    targets [b, N]; slot_mask [b, N] (True: the slot is scored). Returns
    ``sum_i P_hat_i * (W_i - mean_j W_j)`` with ``P_hat`` the candidates'
    sequence probabilities renormalised over the n candidates and ``W_i`` the
    number of scored slots where candidate i differs from the target. The
    gradient flows through the probabilities only.
    """
    if candidates.ndim != 3 or candidates.shape[::2] != logits.shape[:2]:
        raise ValueError(
            f"mwer_loss: candidates must be [b, n, N] for logits {tuple(logits.shape)}, got "
            f"{tuple(candidates.shape)}."
        )
    for name, value in (("targets", targets), ("slot_mask", slot_mask)):
        if value.shape != logits.shape[:2]:
            raise ValueError(
                f"mwer_loss: {name} must have shape {tuple(logits.shape[:2])}, got "
                f"{tuple(value.shape)}."
            )
    scored = slot_mask.astype(jnp.float32)[:, None, :]  # [b, 1, N]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_log_probs = jnp.take_along_axis(
        log_probs[:, None], candidates[..., None].astype(jnp.int32), axis=-1
    )[..., 0]  # [b, n, N]
    posterior = jax.nn.softmax(jnp.sum(token_log_probs * scored, axis=-1), axis=1)  # [b, n]
    errors = jnp.sum((candidates != targets[:, None, :]) * scored, axis=-1)  # [b, n]
    return jnp.sum(posterior * (errors - jnp.mean(errors, axis=1, keepdims=True)), axis=1)


@register_task
class ParaformerTask(Task):
    """Cross-entropy and quantity loss with the glancing sampler (module docstring)."""

    name = "paraformer"
    required_keys = ("inputs", "frame_mask", "targets")

    def __init__(self, config: ml_collections.ConfigDict, dataset_info: Any):
        super().__init__(config, dataset_info)
        self.glancing_ratio = config_number(
            config, "glancing_ratio", DEFAULT_GLANCING_RATIO, low=0.0, high=1.0
        )
        self.quantity_weight = config_number(
            config, "quantity_weight", DEFAULT_QUANTITY_WEIGHT, low=0
        )
        self.label_smoothing = config_number(config, "label_smoothing", 0.0, low=0.0, high=1.0)
        self.mwer_weight = config_number(config, "mwer_weight", 0.0, low=0.0)
        self.mwer_hypotheses = config_number(
            config, "mwer_hypotheses", 4, low=2, integer=True, what="candidates per utterance"
        )
        self.eos_id = config_number(
            config, "eos_id", DEFAULT_EOS_ID, low=1, integer=True, what="a token id"
        )
        if len(getattr(dataset_info, "input_shape", ())) != 2:
            raise ValueError(
                f"Task {self.name!r} needs a dataset of frames, input_shape (T, F), got "
                f"{getattr(dataset_info, 'input_shape', None)!r} (e.g. config.data.name = "
                "'speech_like')."
            )

    def model_overrides(self) -> dict[str, Any]:
        return {"vocab_size": self.info.vocab_size, "input_dim": self.info.input_shape[-1]}

    def prepare_batch(self, batch: Batch, rng: Array, train: bool) -> Batch:
        """In training with MWER, draws the candidates' flips ``mwer_flips`` [b, n, N]."""
        if not (train and self.mwer_weight > 0):
            return batch
        b, n = batch["targets"].shape
        flips = jax.random.bernoulli(rng, 0.5, (b, self.mwer_hypotheses, n))
        return {**batch, "mwer_flips": flips}

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        return {
            "inputs": batch["inputs"],
            "frame_mask": batch["frame_mask"],
            "targets": batch["targets"],
            "glancing_ratio": self.glancing_ratio,
        }

    def loss_and_metrics(self, outputs: Any, batch: Batch) -> tuple[Array, Array, Metrics]:
        if not (isinstance(outputs, dict) and "logits" in outputs and "alpha_sum" in outputs):
            raise ValueError(
                f"Task {self.name!r} needs a Paraformer model (outputs a dict with 'logits' and "
                f"'alpha_sum'), got outputs of type {type(outputs).__name__}."
            )
        targets = batch["targets"]
        examples = jnp.ones((targets.shape[0],), jnp.float32)
        if "mask" in batch:
            examples = batch["mask"].astype(jnp.float32)
        weights = (targets != 0).astype(jnp.float32) * examples[:, None]
        lengths = jnp.sum(targets != 0, axis=1)
        logits = outputs["logits"].astype(jnp.float32)
        vocab = logits.shape[-1]
        labels = smoothed_one_hot(targets, vocab, self.label_smoothing)
        cross_entropy = jnp.sum(optax.softmax_cross_entropy(logits, labels) * weights)
        quantity = jnp.abs(outputs["alpha_sum"].astype(jnp.float32) - lengths) * examples
        quantity_sum = jnp.sum(quantity)
        tokens, count = jnp.sum(weights), jnp.sum(examples)
        loss_sum = cross_entropy + self.quantity_weight * quantity_sum

        def accuracy(values: Array) -> tuple[Array, Array]:
            correct = (jnp.argmax(values, -1) == targets).astype(jnp.float32)
            return jnp.sum(correct * weights), tokens

        metrics: Metrics = {
            "loss": (loss_sum, tokens),
            "cross_entropy": (cross_entropy, tokens),
            "quantity_loss": (quantity_sum, count),
            "token_accuracy": accuracy(logits),
        }
        if self.mwer_weight > 0 and "mwer_flips" in batch:
            candidates = negative_sampling_candidates(logits, batch["mwer_flips"])
            slots = targets != 0
            per_utterance = mwer_loss(logits, candidates, targets, slots) * examples
            mwer_sum = jnp.sum(per_utterance)
            loss_sum = loss_sum + self.mwer_weight * mwer_sum
            metrics["loss"] = (loss_sum, tokens)
            metrics["mwer_loss"] = (mwer_sum, count)
            errors = jnp.sum((candidates != targets[:, None]) * slots[:, None], axis=-1)
            metrics["mwer_candidate_errors"] = (jnp.sum(jnp.mean(errors, 1) * examples), count)
        if "first_pass_logits" in outputs:
            metrics["first_pass_accuracy"] = accuracy(outputs["first_pass_logits"])
        if "predictions" in outputs:
            predictions, fired = outputs["predictions"], outputs["num_tokens"]
            slots = jnp.arange(predictions.shape[1])[None, :] < fired[:, None]
            hypothesis_mask = slots & (predictions != self.eos_id)
            reference_length = jnp.sum((targets != 0) & (targets != self.eos_id), axis=1)
            distance = edit_distance(predictions, hypothesis_mask, targets, reference_length)
            metrics["token_error_rate"] = (
                jnp.sum(distance * examples),
                jnp.sum(reference_length * examples),
            )
            metrics["sequence_accuracy"] = (jnp.sum((distance == 0) * examples), count)
            metrics["length_accuracy"] = (jnp.sum((fired == lengths) * examples), count)
        return loss_sum, tokens, metrics
