"""IA-RED²'s policy training: the task ``ia_red_policy`` (REINFORCE for the interpreters).

The model is a vision Transformer with ``ia_red_stages`` (see
:mod:`effformer.reducers.ia_red`); the task asks it for its decisions'
log-likelihood and kept fraction (``return_ia_red_policy=True``). With
``train=True`` the model samples the decisions; the loss is REINFORCE's
surrogate ``-sum_i (R_i - b_i) log pi(u_i | x_i)`` with the reward
``R = 1 - c^2`` for a correct prediction and ``-tau`` for a wrong one (``c``:
the kept fraction of the patch-token work) and ``b_i`` the leave-one-out mean
reward of the batch (or 0). Evaluation uses the model's thresholded decisions
(``p > 0.5``), so its metrics are those of the deployed policy.

The backbone is frozen as in the paper: the interpreters read the tokens
through ``stop_gradient`` (the policy loss gives the backbone a zero gradient)
and the optimizer updates only them with
``config.optimizer.trainable_modules = "ia_red_*"`` (otherwise weight decay
would still move the backbone).

Config fields (``config.task``; read with defaults, so older configs need none):

* ``ia_red_error_penalty`` (tau, default 1.0): a wrong prediction's reward is ``-tau``;
* ``ia_red_baseline`` (``"leave_one_out"``, the default, or ``"none"``);
* ``mixup_alpha``, ``cutmix_alpha`` and ``label_smoothing`` must be 0: the reward
  needs each image's own label and the loss is no cross-entropy, so the task never
  mixes images nor smooths targets (a non-zero value is refused, not ignored).

Metrics: ``loss`` (the surrogate), ``reward``, ``accuracy``, ``kept_fraction``
(the ``c`` of the reward), ``final_kept_fraction`` (patch tokens kept after the
last interpreter) and ``cross_entropy`` (of the logits with the labels).

Importing this module registers the task; ``effformer.train.tasks`` imports it,
so every run finds it by name.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from effformer.reducers.ia_red import (
    BASELINES,
    DEFAULT_ERROR_PENALTY,
    leave_one_out_baseline,
    policy_reward,
    reinforce_loss,
)
from effformer.train.tasks import Batch, ClassificationTask, Metrics, register_task

Array = jax.Array


@register_task
class IaRedPolicyTask(ClassificationTask):
    """REINFORCE for IA-RED²'s multi-head interpreters (module docstring)."""

    name = "ia_red_policy"

    def __init__(self, config: ml_collections.ConfigDict, dataset_info: Any):
        super().__init__(config, dataset_info)
        if self.granularities:
            raise ValueError(
                f"Task {self.name!r} trains a policy at full width: config.task.matformer_widths "
                f"must be (), got {self.granularities!r}."
            )
        get = (lambda key, default: default) if config is None else config.get
        self.error_penalty = get("ia_red_error_penalty", DEFAULT_ERROR_PENALTY)
        if isinstance(self.error_penalty, bool) or not isinstance(self.error_penalty, int | float):
            raise ValueError(
                f"config.task.ia_red_error_penalty must be a number >= 0, got "
                f"{self.error_penalty!r}."
            )
        if self.error_penalty < 0:
            raise ValueError(
                f"config.task.ia_red_error_penalty (tau; a wrong prediction's reward is -tau) "
                f"must be >= 0, got {self.error_penalty}."
            )
        # The reward needs each image's own label and its loss is REINFORCE's, not a
        # cross-entropy: Mixup, CutMix and label smoothing would be ignored without a word.
        for field in ("mixup_alpha", "cutmix_alpha", "label_smoothing"):
            value = get(field, 0.0)
            if value != 0:
                raise ValueError(
                    f"Task {self.name!r} rewards each image's own prediction (no mixed images, "
                    f"no smoothed targets): config.task.{field} must be 0, got {value!r}."
                )
        self.baseline = get("ia_red_baseline", BASELINES[0])
        if self.baseline not in BASELINES:
            raise ValueError(
                f"config.task.ia_red_baseline must be one of {BASELINES}, got {self.baseline!r}."
            )

    def _mixing(self) -> bool:
        return False  # The reward needs each image's own label.

    def base_inputs(self, batch: Batch) -> dict[str, Any]:
        return {"inputs": batch["inputs"], "return_ia_red_policy": True}

    def output_loss(self, outputs: Any, batch: Batch) -> tuple[Array, Array, Metrics]:
        if not (isinstance(outputs, tuple) and len(outputs) == 2 and isinstance(outputs[1], dict)):
            raise ValueError(
                f"Task {self.name!r} needs a model with IA-RED² interpreters (a vision "
                "Transformer with ia_red_stages, which returns (logits, policy) when called "
                f"with return_ia_red_policy=True), got outputs of type {type(outputs).__name__}."
            )
        logits, policy = outputs
        logits = logits.astype(jnp.float32)
        weights = jnp.ones((logits.shape[0],), jnp.float32)
        if "mask" in batch:
            weights = batch["mask"].astype(jnp.float32)
        correct = jnp.argmax(logits, -1) == batch["label"]
        rewards = policy_reward(correct, policy["kept_fraction"], self.error_penalty)
        if self.baseline == "leave_one_out":
            baseline = leave_one_out_baseline(rewards, weights)
        else:
            baseline = jnp.zeros_like(rewards)
        loss_sum = reinforce_loss(policy["log_prob"], rewards, baseline, weights)
        count = jnp.sum(weights)
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

        def mean(values: Array) -> tuple[Array, Array]:
            return jnp.sum(values.astype(jnp.float32) * weights), count

        metrics = {
            "loss": (loss_sum.astype(jnp.float32), count),
            "reward": mean(rewards),
            "accuracy": mean(correct),
            "kept_fraction": mean(policy["kept_fraction"]),
            "final_kept_fraction": mean(policy["final_kept_fraction"]),
            "cross_entropy": mean(cross_entropy),
        }
        return loss_sum, count, metrics
