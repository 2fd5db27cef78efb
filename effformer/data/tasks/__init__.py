"""Generated sequence tasks, registered as datasets of ``effformer.data``.

``config.data.name = "copy"`` (or any name of :data:`DATASETS`) trains on a
task with the trainer: ``config.task.name`` must be the dataset's format,
``causal_lm`` or ``seq2seq`` (``get_dataset_info(...).task``). Every dataset
has the splits ``train``, ``test`` (training sizes) and ``test_long`` (the
task's test sizes); see ``base.py`` for the record layout.

To add a task: one file with a :class:`SequenceTask` subclass decorated with
:func:`register_sequence_task`, imported here, and its entries in
:data:`DATASETS`.
"""

from __future__ import annotations

from typing import Any

from effformer.data.registry import DatasetSpec, register_dataset
from effformer.data.tasks import (  # noqa: F401
    arithmetic,
    chain_of_thought,
    chain_of_thought_dp,
    lego,
    permutation,
    scan,
    speech_like,
    strings,
)
from effformer.data.tasks.base import (
    TASKS,
    SequenceTask,
    TaskDataset,
    Vocabulary,
    make_task,
    register_sequence_task,
)

# Dataset name -> (task name, task kwargs). Each is registered in the causal_lm
# format under its name and in the seq2seq format under NAME_seq2seq.
DATASETS: dict[str, tuple[str, dict[str, Any]]] = {
    # Length generalisation (sizes: train 1-8, test 9-16; addition and
    # polynomial evaluation train 1-4, test 5-8).
    "copy": ("copy", {}),
    "reverse": ("reverse", {}),
    "addition": ("addition", {}),
    "summation": ("summation", {}),
    "parity": ("parity", {}),
    "sorting": ("sorting", {}),
    "sorting_multidigit": ("sorting", {"num_digits": 2}),
    "polynomial_evaluation": ("polynomial_evaluation", {}),
    # LEGO: clauses, train 1-6, test 7-12. SCAN: actions, train 1-22, test 24-48.
    "lego": ("lego", {}),
    "scan": ("scan", {}),
    # Inverse permutation (sizes 2-8, test = train sizes), with scratch tokens.
    "inverse_permutation": ("inverse_permutation", {}),
    "inverse_permutation_scratch8": ("inverse_permutation", {"num_scratch": 8}),
    "inverse_permutation_scratch16": ("inverse_permutation", {"num_scratch": 16}),
    # Chain of thought (test = train sizes).
    "arithmetic_mod11_direct": ("arithmetic_mod", {"modulus": 11}),
    "arithmetic_mod11_cot": ("arithmetic_mod", {"modulus": 11, "step_by_step": True}),
    "lis_direct": ("lis", {}),
    "lis_cot": ("lis", {"step_by_step": True}),
    "linear_equations_mod11_direct": ("linear_equations_mod", {"modulus": 11}),
    "linear_equations_mod11_cot": ("linear_equations_mod", {"modulus": 11, "step_by_step": True}),
    "edit_distance_direct": ("edit_distance", {}),
    "edit_distance_cot": ("edit_distance", {"step_by_step": True}),
}


def task_dataset_spec(dataset: TaskDataset) -> DatasetSpec:
    """The registry entry of a generated dataset (image fields at neutral values)."""
    return DatasetSpec(
        name=dataset.name,
        tfds_name=dataset.name,
        task=dataset.format,
        num_classes=len(dataset.vocabulary),
        input_key="inputs",
        label_key="targets",
        native_shape=dataset.info.input_shape,
        channels=1,
        max_value=None,
        mean=(0.0,),
        std=(1.0,),
        train_split=dataset.info.train_split,
        eval_split=dataset.info.eval_split,
        generated=dataset,
    )


def register_task_dataset(name: str, task: SequenceTask, **dataset_kwargs: Any) -> TaskDataset:
    """Registers ``task`` as dataset ``name`` (``dataset_kwargs`` go to :class:`TaskDataset`)."""
    dataset = TaskDataset(task, name=name, **dataset_kwargs)
    register_dataset(task_dataset_spec(dataset))
    return dataset


for _name, (_task, _kwargs) in DATASETS.items():
    register_task_dataset(_name, make_task(_task, **_kwargs), format="causal_lm")
    register_task_dataset(f"{_name}_seq2seq", make_task(_task, **_kwargs), format="seq2seq")

__all__ = [
    "DATASETS",
    "TASKS",
    "SequenceTask",
    "TaskDataset",
    "Vocabulary",
    "make_task",
    "register_sequence_task",
    "register_task_dataset",
    "task_dataset_spec",
]
