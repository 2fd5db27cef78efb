"""Local learning (Pathak et al., 2022; InfoPro): the task ``local_learning`` and a sequential step.

The model is a :class:`~effformer.models.local_learning.LocalLearningViT`: K
modules of consecutive blocks, the input of module k + 1 the stopped output of
module k, every module but the last with an auxiliary classifier and a
decoder. The task's loss is the sum over modules of their local losses:

    L = sum_{k < K-1} [ w_c * CE(aux_k(h_k), y) + lambda * R_k ]  +  CE(head(h_{K-1}), y)

with ``R_k`` the decoder's mean squared reconstruction error (of module k's
input features, or of the image for InfoPro-Transformer), ``lambda =
config.task.local_reconstruction_weight`` (default 1.0) and ``w_c =
config.task.local_classification_weight`` (default 1.0). Because no gradient
crosses a module boundary, the gradient of this sum with respect to module j's
parameters is the gradient of module j's own local loss: one ``jax.grad`` of the
sum trains every module on its own loss, and the normal trainer trains the
model (``effformer train`` with ``config.task.name = "local_learning"``).
InfoPro interpolates its two weights linearly from the first local module to
the last; here they are one pair for all modules.

Targets, label smoothing and Mixup/CutMix are the image classification
task's. Metrics: ``loss`` (the sum), ``accuracy`` and ``cross_entropy`` of the
network's output (the last module), and per auxiliary module k
``module_k/accuracy``, ``module_k/cross_entropy`` and ``module_k/reconstruction``.

Memory. The point of local learning is that module k's backward pass needs
only module k's activations. With ``config.task.local_schedule = "joint"``
(the default) the train step takes one ``jax.grad`` of the sum: it runs all
forward passes and then all backward passes, and XLA:CPU keeps every module's
activations alive as end-to-end training does: its compiled step needs as
much memory as end-to-end training's (``experiments/local_learning``: 1.01x at
K = 2, 1.04x at K = 4). ``local_schedule = "sequential"`` makes the train
step compute the same loss and gradients module by module
(:func:`sequential_value_and_grad`, through the task's ``gradient_fn`` hook):
module k's forward and backward, then an ``optimization_barrier`` that
releases module k's output only together with its finished gradients, so
module k + 1 cannot start while module k's activations are still needed
(measured: 0.66x end-to-end training's memory at K = 2, 0.46x at K = 4). It
works with gradient accumulation, bfloat16 compute and model schedules; not
with collections the forward pass updates (BatchNorm), which it refuses.

Importing this module registers the task; ``effformer.train.tasks`` imports it,
so every run finds it by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from effformer.models.local_learning import LocalLearningViT
from effformer.train.tasks import (
    Batch,
    ClassificationTask,
    Metrics,
    config_number,
    register_task,
)

Array = jax.Array

# How the train step computes the gradients: one jax.grad of the summed local
# losses, or module by module (module docstring).
SCHEDULES = ("joint", "sequential")


@register_task
class LocalLearningTask(ClassificationTask):
    """Sum of every local module's loss (module docstring)."""

    name = "local_learning"

    def __init__(self, config: ml_collections.ConfigDict, dataset_info: Any):
        super().__init__(config, dataset_info)
        if self.granularities:
            raise ValueError(
                f"Task {self.name!r} does not train MatFormer granularities: "
                f"config.task.matformer_widths must be (), got {self.granularities!r}."
            )
        self.reconstruction_weight = config_number(
            config, "local_reconstruction_weight", 1.0, low=0
        )
        self.classification_weight = config_number(
            config, "local_classification_weight", 1.0, low=0
        )
        self.schedule = config.get("local_schedule", "joint")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"config.task.local_schedule must be one of {SCHEDULES}, got {self.schedule!r}."
            )

    def base_inputs(self, batch: Batch) -> dict[str, Array]:
        return {"inputs": batch["inputs"]}

    def gradient_fn(self, model: Any, micro_loss: Callable, dtype: Any) -> Callable:
        """``jax.grad`` of the summed loss ("joint") or module by module ("sequential")."""
        if self.schedule == "joint":
            return super().gradient_fn(model, micro_loss, dtype)

        def grad_fn(params, model_state, batch, rng, model_kwargs):
            if model_state:
                raise ValueError(
                    'config.task.local_schedule="sequential" cannot update the model\'s '
                    f"collections besides params (got {sorted(model_state)}); use "
                    '"joint", or a model without BatchNorm.'
                )
            (_, (weight, metrics)), grads = sequential_value_and_grad(
                model, self, params, batch, rng, model_kwargs, dtype=dtype
            )
            return grads, (weight, metrics, model_state)

        return grad_fn

    def module_losses(
        self, k: int, num_modules: int, logits: Array, reconstruction: Array, batch: Batch
    ) -> tuple[Array, Array, Array]:
        """Module k's local loss per example [B], with its cross-entropy [B] and correctness [B]."""
        logits = logits.astype(jnp.float32)
        cross_entropy = optax.softmax_cross_entropy(logits, batch["targets"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        if k == num_modules - 1:
            return cross_entropy, cross_entropy, correct
        local = (
            self.classification_weight * cross_entropy
            + self.reconstruction_weight * reconstruction.astype(jnp.float32)
        )
        return local, cross_entropy, correct

    def output_loss(self, outputs: Any, batch: Batch) -> tuple[Array, Array, Metrics]:
        logits, errors = _check_outputs(self.name, outputs)
        num_modules = logits.shape[0]
        weights = batch["mask"].astype(jnp.float32) if "mask" in batch else None
        if weights is None:
            weights = jnp.ones((logits.shape[1],), jnp.float32)
        count = jnp.sum(weights)
        total = jnp.zeros((), jnp.float32)
        metrics: Metrics = {}
        for k in range(num_modules):
            local, cross_entropy, correct = self.module_losses(
                k, num_modules, logits[k], errors[k], batch
            )
            total = total + jnp.sum(local * weights)
            if k == num_modules - 1:
                metrics["accuracy"] = (jnp.sum(correct * weights), count)
                metrics["cross_entropy"] = (jnp.sum(cross_entropy * weights), count)
            else:
                metrics[f"module_{k}/accuracy"] = (jnp.sum(correct * weights), count)
                metrics[f"module_{k}/cross_entropy"] = (jnp.sum(cross_entropy * weights), count)
                metrics[f"module_{k}/reconstruction"] = (jnp.sum(errors[k] * weights), count)
        metrics["loss"] = (total, count)
        return total, count, metrics


def _check_outputs(task_name: str, outputs: Any) -> tuple[Array, Array]:
    if not (isinstance(outputs, dict) and {"logits", "reconstruction"} <= set(outputs)):
        raise ValueError(
            f"Task {task_name!r} needs a local-learning model (LocalLearningViT, e.g. "
            "config.model.name = 'local_learning_vit'), whose outputs are a dict with 'logits' "
            f"[K, B, classes] and 'reconstruction' [K, B]; got {type(outputs).__name__}."
        )
    logits, errors = outputs["logits"], outputs["reconstruction"]
    if logits.ndim != 3 or errors.shape != logits.shape[:2]:
        raise ValueError(
            f"Task {task_name!r}: outputs must be logits [K, B, classes] and reconstruction "
            f"[K, B], got {tuple(logits.shape)} and {tuple(errors.shape)}."
        )
    return logits, errors


def sequential_value_and_grad(
    model: LocalLearningViT,
    task: LocalLearningTask,
    params: dict,
    batch: Batch,
    rng: Array,
    model_kwargs: dict[str, Any] | None = None,
    dtype: Any = jnp.float32,
) -> tuple[tuple[Array, tuple[Array, Metrics]], dict]:
    """The single step's loss sum and gradients, computed one module at a time.

    params: the model's ``params``; batch: a batch after ``task.prepare_batch``;
    rng: the ``dropout`` key (the same masks as the whole model's call with this key);
    dtype: the compute dtype: parameters and the model's float inputs are cast to it as
    the train step casts them (the loss's targets stay float32; the gradients stay in
    the parameters' dtype).
    Returns ``((loss_sum, (weight, metrics)), grads)``: equal to ``jax.grad`` of the
    task's loss sum over the whole model (tests/train/test_local_learning.py), with
    module k's backward pass finished before module k + 1's forward pass starts.
    """
    if not isinstance(model, LocalLearningViT):
        raise ValueError(
            "sequential_value_and_grad: model must be a LocalLearningViT, got "
            f"{type(model).__name__}."
        )
    if not isinstance(task, LocalLearningTask):
        raise ValueError(
            f"sequential_value_and_grad: task must be 'local_learning', got {task.name!r}."
        )
    model_kwargs = model_kwargs or {}
    num_modules = model.num_modules
    # Imported here: steps imports tasks, which imports this module to register its task.
    from effformer.train.steps import cast_floats

    weights = batch["mask"].astype(jnp.float32) if "mask" in batch else None
    # The model's inputs only, as the train step: the loss's targets stay float32.
    inputs = cast_floats(task.model_inputs(batch), dtype)
    grads: dict = {}
    features = None
    logits, errors = [], []
    for k in range(num_modules):
        own = {name: params[name] for name in model.module_param_names(k)}
        rest = {name: value for name, value in params.items() if name not in own}

        def module_loss(own: dict, features: Array | None, k: int = k, rest: dict = rest):
            outputs = model.apply(
                {"params": cast_floats({**rest, **own}, dtype)},
                **inputs,
                train=True,
                rngs={"dropout": rng},
                local_module=k,
                features=features,
                **model_kwargs,
            )
            local, _, _ = task.module_losses(
                k, num_modules, outputs["logits"], outputs["reconstruction"], batch
            )
            local = local if weights is None else local * weights
            return jnp.sum(local), outputs

        (_, outputs), module_grads = jax.value_and_grad(module_loss, has_aux=True)(own, features)
        # Module k + 1 starts only from this barrier's output, i.e. after module k's
        # gradients exist: module k's activations are dead before module k + 1 runs.
        module_grads, features = jax.lax.optimization_barrier((module_grads, outputs["features"]))
        grads.update(module_grads)
        logits.append(outputs["logits"])
        errors.append(outputs["reconstruction"])
    outputs = {"logits": jnp.stack(logits), "reconstruction": jnp.stack(errors)}
    loss_sum, weight, metrics = task.loss_and_metrics(outputs, batch)
    missing = sorted(set(params) - set(grads))
    if missing:
        raise ValueError(
            f"sequential_value_and_grad: parameters {missing} belong to no module "
            "(module_param_names)."
        )
    return (loss_sum, (weight, metrics)), {name: grads[name] for name in params}
