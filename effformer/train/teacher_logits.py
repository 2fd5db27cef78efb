"""TinyViT's teacher pass: a trained run's top-K probabilities over a student's training stream.

``save_teacher_logits(config, teacher_workdir, out)`` restores the teacher (any
``effformer train`` workdir whose model classifies this dataset's inputs), builds
the training pipeline of the STUDENT's ``config`` (its dataset, augmentation and
seed: the images the student will see), runs the teacher on every example of
the first ``epochs`` epochs of that stream, and writes the top-K softmax
probabilities to a store (``effformer.data.teacher_store``). The student then
trains with ``config.data.teacher_store = out`` and ``config.task.name =
"distillation"``; its pipeline replays the same images and attaches the stored
labels. The teacher runs in inference mode (``train=False``: no dropout), on the
images before any on-device step (the distillation task does no Mixup).

Command line: ``effformer save-teacher-logits --config STUDENT.py --teacher_workdir
DIR --out STORE [--top_k K] [--epochs E]``.

Scope: one process (a multi-host save would gather every host's rows; not
built); the whole store is written in one call (no resuming an interrupted
pass, no saving epoch ranges in parallel as the official code allows).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from effformer.data import create_input_pipeline, get_dataset_info
from effformer.data.config import validate_data_config
from effformer.data.teacher_store import (
    TeacherStoreWriter,
    epochs_to_cover,
    fingerprint,
    open_teacher_store,
    stream_description,
)
from effformer.train import sharding
from effformer.train.config import validate_config
from effformer.train.evaluate import restore
from effformer.train.experiment import eval_batch_size
from effformer.train.schedules import eval_kwargs


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}.")


def train_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
    """The run's step count, as ``build_experiment`` computes it (without building the model)."""
    if config.num_train_steps:
        return int(config.num_train_steps)
    return max(1, math.ceil(config.num_epochs * (num_examples / config.global_batch_size)))


def save_teacher_logits(
    config: ml_collections.ConfigDict,
    teacher_workdir: str | Path,
    out: str | Path,
    *,
    top_k: int,
    epochs: int | None = None,
    teacher_step: int | None = None,
    batch_size: int | None = None,
    values_dtype: str = "float16",
) -> dict[str, Any]:
    """Write the teacher's top-``top_k`` probabilities for ``config``'s training stream to ``out``.

    Args:
      config: the student's full run config (its data config and seed define the
        stream; ``data.teacher_store`` is ignored here).
      teacher_workdir: a trained run's workdir (its latest checkpoint, or ``teacher_step``).
      out: the store directory (created; must not already hold a store).
      top_k: K, at most the class count (K = C stores the dense softmax).
      epochs: epochs of the stream to store; None: as many as the student's run reads
        (``num_train_steps * global_batch_size`` examples).
      batch_size: teacher batch size, a multiple of its mesh's devices; None: the
        teacher run's eval batch size.
      values_dtype: "float16" (the official code's) or "float32".
    Returns:
      The store's manifest.
    """
    _positive("top_k", top_k)
    if jax.process_count() != 1:
        raise ValueError(
            f"save_teacher_logits runs in one process; this job has {jax.process_count()}."
        )
    validate_config(config)
    info = get_dataset_info(config.data)
    data_config = ml_collections.ConfigDict(config.data.to_dict())
    data_config.teacher_store = ""  # The stream the store is saved FOR, read plainly.
    split = info.train_split
    num_examples = info.splits[split]
    if epochs is None:
        epochs = epochs_to_cover(
            train_steps(config, num_examples) * config.global_batch_size, num_examples
        )
    _positive("epochs", epochs)

    teacher = restore(teacher_workdir, step=teacher_step)
    teacher_info = teacher.experiment.info
    if tuple(teacher_info.input_shape) != tuple(info.input_shape):
        raise ValueError(
            f"teacher_workdir={str(teacher_workdir)!r}: the teacher takes inputs of shape "
            f"{tuple(teacher_info.input_shape)}, but the student's stream has "
            f"{tuple(info.input_shape)} (set config.data.image_size to the teacher's)."
        )
    if teacher_info.num_classes != info.num_classes:
        raise ValueError(
            f"teacher_workdir={str(teacher_workdir)!r}: the teacher has "
            f"{teacher_info.num_classes} classes, the student's dataset {info.name!r} has "
            f"{info.num_classes}."
        )
    exp = teacher.experiment
    batch_size = batch_size or eval_batch_size(exp.config)
    _positive("batch_size", batch_size)
    if batch_size % exp.mesh.size:
        raise ValueError(
            f"batch_size: expected a multiple of the teacher's {exp.mesh.size} devices, got "
            f"{batch_size}."
        )
    stream = stream_description(
        validate_data_config(data_config),
        split=split,
        num_examples=num_examples,
        num_classes=info.num_classes,
        seed=config.seed,
    )
    writer = TeacherStoreWriter(
        out,
        stream,
        top_k=top_k,
        epochs=epochs,
        values_dtype=values_dtype,
        teacher={
            "workdir": str(Path(teacher_workdir).absolute()),
            "step": teacher.step,
            "model": exp.config.model.name,
        },
    )
    model_kwargs = eval_kwargs(exp.config.model_schedules, exp.steps_per_epoch, exp.num_train_steps)

    def top_probs(
        params: Any, model_state: Any, batch: dict[str, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        logits = exp.model.apply(
            {"params": params, **model_state},
            **exp.task.model_inputs(batch),
            train=False,
            **model_kwargs,
        )
        if logits.ndim != 2:
            raise ValueError(
                f"teacher_workdir={str(teacher_workdir)!r}: the teacher must return logits "
                f"[b, classes], got shape {logits.shape} (MatFormer widths? train it without)."
            )
        return jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), top_k)

    forward = jax.jit(
        top_probs,
        in_shardings=(
            exp.state_shardings.params,
            exp.state_shardings.model_state,
            exp.batch_sharding,
        ),
    )
    pipeline = create_input_pipeline(
        data_config,
        split=split,
        global_batch_size=batch_size,
        train=True,
        seed=config.seed,
        process_index=0,
        process_count=1,
    )
    num_batches = math.ceil(writer.num_positions / batch_size)
    logging.info(
        "Saving the top-%d of %s over %d epochs (%d batches of %d) to %s.",
        top_k,
        teacher_workdir,
        epochs,
        num_batches,
        batch_size,
        out,
    )
    try:
        for _ in range(num_batches):
            batch = next(pipeline)
            inputs = {"inputs": batch["inputs"]}
            values, indices = jax.device_get(
                forward(
                    teacher.params,
                    teacher.model_state,
                    sharding.global_batch(inputs, exp.batch_sharding),
                )
            )
            prints = np.asarray(
                [fingerprint(x, y) for x, y in zip(batch["inputs"], batch["label"], strict=True)],
                np.uint32,
            )
            writer.add(prints, values, indices)
    finally:
        pipeline.close()
    return writer.finish()


def check_teacher_store(config: ml_collections.ConfigDict, num_train_steps: int) -> None:
    """Before a run's first step: its ``config.data.teacher_store`` can label every step.

    Nothing to check without a store. Otherwise the task must be ``distillation``
    (another task would ignore the stored labels) and the store must match the
    run's training stream and hold every example it reads:
    ``num_train_steps * global_batch_size`` stream positions.
    """
    directory = config.data.get("teacher_store")
    if not directory:
        return
    if config.task.name != "distillation":
        raise ValueError(
            f"config.data.teacher_store is set but config.task.name={config.task.name!r} "
            "would ignore the stored teacher labels; use task 'distillation' or unset the store."
        )
    info = get_dataset_info(config.data)
    store = open_teacher_store(directory)
    store.check_stream(
        stream_description(
            validate_data_config(config.data),
            split=info.train_split,
            num_examples=info.splits[info.train_split],
            num_classes=info.num_classes,
            seed=config.seed,
        )
    )
    needed = int(num_train_steps) * int(config.global_batch_size)
    if needed > store.num_positions:
        epochs = epochs_to_cover(needed, store.num_examples)
        raise ValueError(
            f"config.data.teacher_store={directory!r} holds {store.epochs} epochs of the training "
            f"stream ({store.num_positions} examples), but this run reads {num_train_steps} steps "
            f"x {config.global_batch_size} = {needed} examples ({epochs} epochs): save a store "
            f"with --epochs {epochs} (or none: the run's own length) or train fewer steps."
        )
