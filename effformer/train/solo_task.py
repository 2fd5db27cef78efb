"""SOLO's visual question answering: the task ``solo_vqa``.

The model is a SOLO model (``effformer.models.solo``: a decoder LM whose
``<vpatch>`` tokens carry linearly embedded image patches). A batch holds, per
row (``effformer.data.digits_vqa`` makes them):

* ``inputs`` [b, L] int token ids (image tokens, question, answer), ``targets``
  [b, L] the next tokens, ``weights`` [b, L] 1 on the answer's targets (its
  tokens and ``<eos>``), 0 on the image and the question, as SOLO's labels
  (-100 there) score only the answer;
* ``patches`` [b, N, patch_dim] and ``patch_indices`` [b, L] (-1: no patch);
* optionally ``question_type`` [b] int, for exact match per question.

The model gets ``inputs``, ``patches``, ``patch_indices``; the loss is the
cross-entropy summed over the weighted targets. Metrics:

* ``loss``, ``accuracy``: per answer token;
* ``exact_match``: the fraction of examples whose every answer token (and
  ``<eos>``) is the argmax given the true tokens before it. That is exactly
  greedy decoding's exact match: if every step's argmax is right, greedy decoding
  feeds the true tokens and produces the answer, and the first wrong argmax
  makes greedy decoding wrong there (``effformer.models.solo.generate`` decodes
  greedily with the KV cache; tests/models/test_solo.py checks it against argmax
  decoding by full forward passes);
* ``exact_match/<question>`` per question type, when the data names them
  (``info.question_types``) and the batch has ``question_type``.

Config fields (``config.task``; read with defaults):

* ``zero_patches`` (default False): multiply the patches by 0 before the model,
  so every ``<vpatch>`` token carries nothing: the text-only control of
  ``experiments/solo`` (the model sees the layout and the question, not the image).

The data decides the model's ``vocab_size`` and, when the dataset info has them
(``patch_size``, ``num_channels``), the patch shape. MatFormer granularities are
not supported (SOLO runs one width).

Importing this module registers the task; ``effformer.train.tasks`` imports it,
so every run finds it by name.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from effformer.train.tasks import (
    Batch,
    LanguageModelTask,
    Metrics,
    _token_loss,
    register_task,
)

Array = jax.Array


@register_task
class SoloVqaTask(LanguageModelTask):
    """Answer-only next-token loss and exact match for SOLO (module docstring)."""

    name = "solo_vqa"
    required_keys = ("inputs", "targets", "weights", "patches", "patch_indices")

    def __init__(self, config: ml_collections.ConfigDict, dataset_info: Any):
        super().__init__(config, dataset_info)
        if self.granularities:
            raise ValueError(
                f"Task {self.name!r} runs SOLO at one width: config.task.matformer_widths must "
                f"be (), got {self.granularities!r}."
            )
        zero = False if config is None else config.get("zero_patches", False)
        if not isinstance(zero, bool):
            raise ValueError(f"config.task.zero_patches must be a bool, got {zero!r}.")
        self.zero_patches = zero
        self.question_types = tuple(getattr(dataset_info, "question_types", ()) or ())

    def model_overrides(self) -> dict[str, Any]:
        overrides = super().model_overrides()
        for field in ("patch_size", "num_channels"):
            value = getattr(self.info, field, 0)
            if value:
                overrides[field] = int(value)
        return overrides

    def base_inputs(self, batch: Batch) -> dict[str, Array]:
        patches = batch["patches"]
        if self.zero_patches:
            patches = jnp.zeros_like(patches)
        return {
            "inputs": batch["inputs"],
            "patches": patches,
            "patch_indices": batch["patch_indices"],
        }

    def output_loss(self, outputs: Array, batch: Batch) -> tuple[Array, Array, Metrics]:
        targets = batch["targets"]
        weights = batch["weights"].astype(jnp.float32)
        if "mask" in batch:
            weights = weights * batch["mask"][:, None]
        loss_sum, count, metrics = _token_loss(outputs, targets, weights)
        scored = weights > 0
        right = jnp.argmax(outputs, -1) == targets
        has_answer = jnp.any(scored, axis=1)
        exact = (jnp.all(right | ~scored, axis=1) & has_answer).astype(jnp.float32)
        examples = has_answer.astype(jnp.float32)
        metrics["exact_match"] = (jnp.sum(exact), jnp.sum(examples))
        if self.question_types and "question_type" in batch:
            for index, question in enumerate(self.question_types):
                chosen = (batch["question_type"] == index).astype(jnp.float32) * examples
                metrics[f"exact_match/{question}"] = (jnp.sum(exact * chosen), jnp.sum(chosen))
        return loss_sum, count, metrics
