"""Exact-match evaluation of generated sequence tasks, bucketed by instance size.

An example counts as solved when every answer token (and the closing
``<eos>``) is right. It is computed with teacher forcing, in one forward pass:
the argmax at every answer position is compared with the target. For a
whole answer this is exactly greedy generation's exact match: greedy decoding
emits the argmax given the prompt and its own earlier tokens; while those
are right they are the teacher-forced inputs, so the first wrong token is the
same in both, and an answer is all right in one iff it is in the other. One
pass also handles prompts of different lengths in one batch without a decode
loop, for decoder and encoder-decoder models alike.

The per-token accuracy that the trainer's eval reports is not this metric:
an answer with one wrong token out of twenty scores 95% there and 0 here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Batch = dict[str, Any]


def answer_exact_match(predictions: Any, targets: Any, weights: Any) -> np.ndarray:
    """Whether each row's prediction is right at every scored position.

    Args:
      predictions, targets: int [B, L] token ids.
      weights: [B, L], > 0 at the answer positions.
    Returns:
      bool [B]; a row with no scored position is False (nothing was answered).
    """
    predictions, targets, weights = (np.asarray(a) for a in (predictions, targets, weights))
    if predictions.shape != targets.shape or weights.shape != targets.shape:
        raise ValueError(
            "answer_exact_match: predictions, targets and weights must have one shape [B, L], "
            f"got {predictions.shape}, {targets.shape} and {weights.shape}."
        )
    scored = weights > 0
    wrong = np.any((predictions != targets) & scored, axis=1)
    return ~wrong & np.any(scored, axis=1)


def bucket_by_length(
    correct: Any, lengths: Any, mask: Any | None = None
) -> dict[int, tuple[int, int]]:
    """``{length: (number correct, number of examples)}`` over rows where ``mask`` is True."""
    correct, lengths = np.asarray(correct, bool), np.asarray(lengths)
    mask = np.ones(correct.shape, bool) if mask is None else np.asarray(mask, bool)
    if not correct.shape == lengths.shape == mask.shape or correct.ndim != 1:
        raise ValueError(
            "bucket_by_length: correct, lengths and mask must be 1-D of one shape, got "
            f"{correct.shape}, {lengths.shape} and {mask.shape}."
        )
    buckets: dict[int, tuple[int, int]] = {}
    for length in np.unique(lengths[mask]):
        rows = mask & (lengths == length)
        buckets[int(length)] = (int(correct[rows].sum()), int(rows.sum()))
    return buckets


def merge_buckets(
    total: dict[int, tuple[int, int]], more: dict[int, tuple[int, int]]
) -> dict[int, tuple[int, int]]:
    merged = dict(total)
    for length, (right, count) in more.items():
        old_right, old_count = merged.get(length, (0, 0))
        merged[length] = (old_right + right, old_count + count)
    return dict(sorted(merged.items()))


def exact_match_by_length(
    logits_fn: Callable[[Batch], jax.Array], batches: Any
) -> dict[int, tuple[int, int]]:
    """Exact match of ``logits_fn`` (batch -> logits [B, L, V]) over ``batches``, by ``length``.

    Each batch holds ``targets``, ``weights``, ``length`` and ``mask`` (False
    for padding rows), as the eval pipelines of ``effformer.data.tasks`` give.
    """
    buckets: dict[int, tuple[int, int]] = {}
    for batch in batches:
        predictions = np.asarray(jnp.argmax(logits_fn(batch), axis=-1))
        correct = answer_exact_match(predictions, batch["targets"], batch["weights"])
        buckets = merge_buckets(
            buckets, bucket_by_length(correct, batch["length"], batch.get("mask"))
        )
    return buckets


def accuracies(buckets: dict[int, tuple[int, int]]) -> dict[int, float]:
    return {length: right / count for length, (right, count) in buckets.items()}


def evaluate_sequence_task(
    exp: Any, params: Any, split: str, *, batch_size: int = 64, model_state: Any = None
) -> dict[int, tuple[int, int]]:
    """Exact match by length of a trained experiment (``effformer.train.experiment``) on ``split``.

    The model runs as the trainer's evaluation runs it: on the inputs its task gives it
    (``exp.task.model_inputs``), with the evaluation values of ``config.model_schedules``
    (iLLaMA's soft-mask ratio at evaluation) and in ``config.compute_dtype``.
    ``params``: the parameters evaluation uses (``RestoredRun.params``: the EMA when the
    run kept one); ``model_state``: its variables besides ``params``, if it has some.
    """
    from effformer.data import create_input_pipeline
    from effformer.train.evaluate import checked_model_state
    from effformer.train.experiment import compute_dtype
    from effformer.train.model_state import variables
    from effformer.train.schedules import eval_kwargs
    from effformer.train.steps import cast_floats

    if split not in exp.info.splits:
        raise ValueError(f"split: expected one of {sorted(exp.info.splits)}, got {split!r}.")
    if getattr(exp.task, "granularities", None):
        raise ValueError(
            "evaluate_sequence_task: the run's task has config.task.matformer_widths="
            f"{tuple(exp.config.task.matformer_widths)!r}, so its model gives one output per "
            "width; evaluate one width at a time with matformer_widths=()."
        )
    model_state = checked_model_state("evaluate_sequence_task", exp, model_state)
    # As in the trainer's eval step (effformer.train.steps.make_eval_step).
    model_kwargs = eval_kwargs(exp.config.model_schedules, exp.steps_per_epoch, exp.num_train_steps)
    dtype = compute_dtype(exp.config)

    @jax.jit
    def logits_fn(params: Any, model_state: Any, batch: Batch) -> jax.Array:
        inputs = exp.task.model_inputs(batch)
        if dtype != jnp.float32:  # The parameters and the model's inputs, as the eval step.
            params, inputs = cast_floats(params, dtype), cast_floats(inputs, dtype)
        return exp.model.apply(
            variables(params, model_state), **inputs, train=False, **model_kwargs
        )

    pipeline = create_input_pipeline(
        exp.config.data,
        split=split,
        global_batch_size=batch_size,
        train=False,
        seed=exp.config.seed,
        process_index=0,
        process_count=1,
    )
    with pipeline:
        return exact_match_by_length(lambda batch: logits_fn(params, model_state, batch), pipeline)


def evaluate_workdir(
    workdir: str | Path, split: str, *, batch_size: int = 64, step: int | None = None
) -> dict[int, tuple[int, int]]:
    """Restores the checkpoint of ``workdir`` (latest, or ``step``) and evaluates it (see above).

    The run is read back as ``effformer eval`` reads it (``effformer.train.evaluate.restore``):
    on a data-parallel mesh of this machine's devices when its own mesh cannot be used here.
    """
    from effformer.train.evaluate import restore

    run = restore(workdir, step=step)
    return evaluate_sequence_task(
        run.experiment, run.params, split, batch_size=batch_size, model_state=run.model_state
    )
