"""Distillation from a decoder-only teacher into an encoder-decoder student (Return of the Encoder).

"Return of the Encoder: Maximizing Parameter Efficiency for SLMs" (Elfeki et al.,
2025) trains a small encoder-decoder student with knowledge from a larger
decoder-only teacher. The teacher reads the source and the target as one causal
sequence; the student's encoder reads the source and its decoder the target.
Task ``seq2seq_distillation`` scores the student on the target positions with

    loss_t = (1 - w) * CE(student_t, target_t) + w * T^2 * KL(p_T || q_T)

where ``p_T = softmax(teacher_t / T)``, ``q_T = softmax(student_t / T)``,
``w = config.distill_weight`` and ``T = config.distill_temperature`` (the
T^2 keeps the soft term's gradient scale independent of T, as in the
classification ``distillation`` task), summed over the scored target tokens.

Alignment. For a row with source ``x_1..x_n`` (right-padded to Ls) and target
``y_1..y_m`` (right-padded to Lt) the teacher reads, without gaps,

    x_1 .. x_n  <sep>  y_1 .. y_m  (padding up to Ls + 1 + Lt)

which is exactly the ``causal_lm`` row of the generated tasks
(``effformer.data.tasks``: ``prompt <sep> answer <eos>``) that the teacher was
trained on. The teacher's logits at index ``n + t`` (0-based; index n holds
``<sep>``) have seen ``x, <sep>, y_1..y_t`` and predict ``y_{t+1}``: the same
token the student's decoder predicts at its position t from ``<bos>,
y_1..y_t``. :func:`teacher_sequence` builds the row and
:func:`aligned_teacher_logits` takes those logits;
tests/train/test_seq2seq_distillation.py checks them against the teacher run
on every prefix by itself.

The teacher comes from a trained run, as in TinyViT's distillation
(``effformer.train.teacher_logits``): ``config.teacher_workdir`` is an
``effformer train`` workdir of a decoder-only ``TransformerLM`` (e.g. trained
with ``causal_lm`` on the causal_lm format of the same generated task); its
latest checkpoint (or ``config.teacher_step``) is restored when the task is
built, and the teacher runs inside the student's jitted train step, in
inference mode, with its parameters as constants of the step (no gradient
reaches them). There is no stored top-K here: the teacher is small at this
scale, and its logits depend on the whole target row. Alternatively a batch may
carry ``teacher_logits`` [b, Lt, V], already aligned (then no workdir is
needed). Evaluation batches get no teacher: the eval ``loss`` is the
student's cross-entropy, the ``seq2seq`` task's, so arms compare on one number.

Config fields (``config.task``, read with defaults): ``teacher_workdir`` (""),
``teacher_step`` (None: the latest), ``sep_id`` (1, ``<sep>`` of the generated
tasks), ``bos_id`` and ``pad_id`` (0, as ``seq2seq``), ``distill_weight``,
``distill_temperature``. The teacher's vocabulary must equal the student's.
MatFormer granularities are not supported.

Task ``causal_lm_distillation`` is the control: a decoder-only student reading
the teacher's own rows (the causal_lm format), with the same loss at the
weighted positions; both logits are at the same index, so no realignment.

Where the official code (microsoft/encoder-decoder-slm, ``train_text2text_by_kd.py``)
differs: its KL term is on targets the STUDENT samples (temperature 0.9, top-k
128) from the source, re-read by the teacher, beside the CE on the data's
targets, with w = 0.9 and no temperature in the KL (T = 1) and the teacher's
source left-padded to a fixed length without a separator. Here both terms are on
the data's targets (what the brief of this task specifies; sampling in the train
step would need a decode loop per step), and the teacher reads the contiguous
row it was trained on.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from effformer.train.tasks import (
    Batch,
    CausalLMTask,
    Metrics,
    Seq2SeqTask,
    register_task,
)

Array = jax.Array


def teacher_sequence(
    inputs: Array, targets: Array, *, sep_id: int, pad_id: int = 0
) -> tuple[Array, Array]:
    """The decoder-only teacher's row ``source <sep> target`` (module docstring).

    Args:
      inputs: [B, Ls] int source tokens, right-padded with ``pad_id`` (no padding
        inside a row's source).
      targets: [B, Lt] int target tokens, right-padded.
      sep_id: the separator between source and target.
    Returns:
      tokens [B, Ls + 1 + Lt] int (source, separator, target, then ``pad_id``) and
      source_lengths [B] int32 (n: the separator's index in each row).
    """
    if inputs.ndim != 2 or targets.ndim != 2 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            "teacher_sequence: inputs must be [B, Ls] and targets [B, Lt] with one B, got "
            f"shapes {tuple(inputs.shape)} and {tuple(targets.shape)}."
        )
    source_length, target_length = inputs.shape[1], targets.shape[1]
    lengths = jnp.sum(inputs != pad_id, axis=1).astype(jnp.int32)
    index = jnp.arange(source_length + 1 + target_length, dtype=jnp.int32)[None, :]
    source = jnp.take_along_axis(
        inputs,
        jnp.broadcast_to(jnp.minimum(index, source_length - 1), (inputs.shape[0], index.shape[1])),
        1,
    )
    target_index = index - lengths[:, None] - 1
    target = jnp.take_along_axis(targets, jnp.clip(target_index, 0, target_length - 1), 1)
    tokens = jnp.where(
        index < lengths[:, None],
        source,
        jnp.where(
            index == lengths[:, None],
            sep_id,
            jnp.where(target_index < target_length, target, pad_id),
        ),
    )
    return tokens.astype(inputs.dtype), lengths


def aligned_teacher_logits(
    teacher_logits: Array, source_lengths: Array, target_length: int
) -> Array:
    """The teacher's logits that predict each target token: [B, Lt, V].

    teacher_logits [B, Ls + 1 + Lt, V] over :func:`teacher_sequence`'s row;
    source_lengths [B] (n); row i's output t is ``teacher_logits[i, n_i + t]``
    (index n_i is the separator, which predicts the first target token).
    """
    batch, length, _ = teacher_logits.shape
    if source_lengths.shape != (batch,) or not 1 <= target_length <= length:
        raise ValueError(
            f"aligned_teacher_logits: source_lengths must be [B={batch}] and target_length in "
            f"[1, {length}], got shape {tuple(source_lengths.shape)} and {target_length}."
        )
    index = source_lengths[:, None] + jnp.arange(target_length, dtype=jnp.int32)[None, :]
    return jnp.take_along_axis(teacher_logits, index[..., None], axis=1)


def distillation_token_loss(
    logits: Array,
    targets: Array,
    weights: Array,
    teacher_logits: Array | None,
    *,
    temperature: float,
    distill_weight: float,
) -> tuple[Array, Array, Metrics]:
    """(loss sum, weight, metrics) of (1 - w) CE + w T^2 KL(p_T || q_T) over weighted tokens.

    logits, teacher_logits: [B, L, V] (teacher None: the CE alone, w ignored);
    targets [B, L] int; weights [B, L] (0: unscored). Metrics: ``loss``,
    ``accuracy``, ``cross_entropy`` and, with a teacher, ``distill_kl`` (the
    KL at temperature T, per scored token).
    """
    if teacher_logits is not None and teacher_logits.shape != logits.shape:
        raise ValueError(
            f"distillation_token_loss: teacher_logits must have the student's logits' shape "
            f"{tuple(logits.shape)} (aligned to the targets, one vocabulary), got "
            f"{tuple(teacher_logits.shape)}."
        )
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    hard = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    count = jnp.sum(weights)
    metrics: Metrics = {
        "accuracy": (jnp.sum(correct * weights), count),
        "cross_entropy": (jnp.sum(hard * weights), count),
    }
    if teacher_logits is None:
        metrics["loss"] = metrics["cross_entropy"]
        return metrics["loss"][0], count, metrics
    teacher_log = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
    student_log = jax.nn.log_softmax(logits / temperature)
    kl = jnp.sum(jnp.exp(teacher_log) * (teacher_log - student_log), axis=-1)
    losses = (1.0 - distill_weight) * hard + distill_weight * temperature**2 * kl
    metrics["distill_kl"] = (jnp.sum(kl * weights), count)
    metrics["loss"] = (jnp.sum(losses * weights), count)
    return metrics["loss"][0], count, metrics


def load_teacher(
    workdir: str | Path, *, step: int | None, vocab_size: int | None
) -> tuple[Any, Any]:
    """(model, variables) of a trained decoder-only run, checked against the student's vocabulary."""
    from effformer.models.transformer_lm import TransformerLM
    from effformer.train.evaluate import restore

    run = restore(workdir, step=step)
    model = run.model
    if not isinstance(model, TransformerLM) or model.kind != "decoder" or model.num_classes:
        raise ValueError(
            f"config.task.teacher_workdir={str(workdir)!r}: the teacher must be a decoder-only "
            f"TransformerLM (kind='decoder', an LM head), got {type(model).__name__}"
            f"{f' kind={model.kind!r}' if isinstance(model, TransformerLM) else ''}."
        )
    if vocab_size is not None and model.vocab_size != vocab_size:
        raise ValueError(
            f"config.task.teacher_workdir={str(workdir)!r}: the teacher's vocabulary has "
            f"{model.vocab_size} tokens, the student's {vocab_size}; they must be equal (set "
            "config.task.vocab_size of one run to the other's)."
        )
    return model, run.variables


class _TeacherMixin:
    """Config checks and the restored teacher, shared by the two distillation tasks."""

    name = ""
    vocab_size: int | None
    granularities: tuple[Any, ...]

    def _setup_teacher(self, config: ml_collections.ConfigDict | None) -> None:
        get = (lambda key, default: default) if config is None else config.get
        if self.granularities:
            raise ValueError(
                f"Task {self.name!r} trains one width: config.task.matformer_widths must be (), "
                f"got {self.granularities!r}."
            )
        weight = get("distill_weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight <= 1:
            raise ValueError(f"config.task.distill_weight must be in [0, 1], got {weight!r}.")
        temperature = get("distill_temperature", 1.0)
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, numbers.Real)
            or not temperature > 0
        ):
            raise ValueError(
                f"config.task.distill_temperature must be a number > 0, got {temperature!r}."
            )
        self.distill_weight, self.temperature = float(weight), float(temperature)
        workdir = get("teacher_workdir", "") or ""
        if not isinstance(workdir, str | Path):
            raise ValueError(
                f"config.task.teacher_workdir must be a workdir path or '' (the batch carries "
                f"teacher_logits), got {workdir!r}."
            )
        self.teacher_model, self.teacher_variables = None, None
        if workdir:
            if not (Path(workdir) / "config.json").is_file():
                raise ValueError(
                    f"config.task.teacher_workdir={str(workdir)!r} is not a training workdir (no "
                    "config.json): train the decoder-only teacher there first."
                )
            self.teacher_model, self.teacher_variables = load_teacher(
                workdir, step=get("teacher_step", None), vocab_size=self.vocab_size
            )

    def _teacher_forward(self, tokens: Array) -> Array:
        logits = self.teacher_model.apply(self.teacher_variables, tokens, train=False)
        return jax.lax.stop_gradient(logits.astype(jnp.float32))

    def _check_teacher(self, batch: Batch, train: bool) -> None:
        if train and "teacher_logits" not in batch and self.teacher_model is None:
            raise ValueError(
                f"Task {self.name!r} needs a teacher in training: set config.task.teacher_workdir "
                f"or give 'teacher_logits' in the batch; batch has {sorted(batch)}."
            )


@register_task
class Seq2SeqDistillationTask(_TeacherMixin, Seq2SeqTask):
    """Encoder-decoder student, decoder-only teacher (module docstring).

    Batch: as ``seq2seq`` (``inputs`` [b, Ls], ``targets`` [b, Lt], optional
    ``weights``); in training, the teacher's aligned ``teacher_logits`` [b, Lt, V]
    are added on device from the restored teacher unless the batch has them.
    """

    name = "seq2seq_distillation"
    required_keys = ("inputs", "targets")

    def __init__(self, config: ml_collections.ConfigDict, dataset_info: Any):
        super().__init__(config, dataset_info)
        sep = 1 if config is None else config.get("sep_id", 1)
        if isinstance(sep, bool) or not isinstance(sep, numbers.Integral) or sep < 0:
            raise ValueError(f"config.task.sep_id must be a token id >= 0, got {sep!r}.")
        if self.vocab_size and sep >= self.vocab_size:
            raise ValueError(
                f"config.task.sep_id must be in [0, {self.vocab_size}) (the vocabulary), got {sep}."
            )
        self.sep_id = int(sep)
        self.pad_id = 0 if config is None else int(config.get("pad_id", 0))
        self._setup_teacher(config)

    def prepare_batch(self, batch: Batch, rng: Array, train: bool) -> Batch:
        self._check_teacher(batch, train)
        if train and "teacher_logits" not in batch:
            tokens, lengths = teacher_sequence(
                batch["inputs"], batch["targets"], sep_id=self.sep_id, pad_id=self.pad_id
            )
            logits = self._teacher_forward(tokens)
            batch = dict(
                batch,
                teacher_logits=aligned_teacher_logits(logits, lengths, batch["targets"].shape[1]),
            )
        return batch

    def output_loss(self, outputs: Array, batch: Batch) -> tuple[Array, Array, Metrics]:
        targets = batch["targets"]
        weights = batch.get("weights", targets != self.pad_id).astype(jnp.float32)
        if "mask" in batch:
            weights = weights * batch["mask"][:, None]
        return distillation_token_loss(
            outputs,
            targets,
            weights,
            batch.get("teacher_logits"),
            temperature=self.temperature,
            distill_weight=self.distill_weight,
        )


@register_task
class CausalLMDistillationTask(_TeacherMixin, CausalLMTask):
    """Decoder-only student on the teacher's own rows: the control arm (module docstring).

    Batch: as ``causal_lm`` with explicit ``targets`` and ``weights`` (the
    generated tasks' causal_lm format); no packing or prefix LM. The teacher's
    logits at each position predict the same target as the student's.
    """

    name = "causal_lm_distillation"
    required_keys = ("inputs", "targets", "weights")

    def __init__(self, config: ml_collections.ConfigDict, dataset_info: Any):
        super().__init__(config, dataset_info)
        self._setup_teacher(config)

    def base_inputs(self, batch: Batch) -> dict[str, Array]:
        return {"inputs": batch["inputs"]}

    def prepare_batch(self, batch: Batch, rng: Array, train: bool) -> Batch:
        self._check_teacher(batch, train)
        if train and "teacher_logits" not in batch:
            batch = dict(batch, teacher_logits=self._teacher_forward(batch["inputs"]))
        return batch

    def output_loss(self, outputs: Array, batch: Batch) -> tuple[Array, Array, Metrics]:
        weights = batch["weights"].astype(jnp.float32)
        if "mask" in batch:
            weights = weights * batch["mask"][:, None]
        return distillation_token_loss(
            outputs,
            batch["targets"],
            weights,
            batch.get("teacher_logits"),
            temperature=self.temperature,
            distill_weight=self.distill_weight,
        )
