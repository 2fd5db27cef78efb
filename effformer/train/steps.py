"""The jitted train and eval steps.

One train step = one optimizer update over the global batch. With
``grad_accum_steps = k`` the batch is cut into k interleaved micro-batches
(example i goes to micro-batch i mod k, so each stays spread over all
devices) whose gradient SUMS are accumulated by ``lax.scan`` and divided once
by the total loss weight: the update equals the one of the whole batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from effformer.train.experiment import Experiment, compute_dtype
from effformer.train.model_state import forward_updated, variables
from effformer.train.schedules import train_kwargs_fn
from effformer.train.state import TrainState

Batch = dict[str, jax.Array]


def cast_floats(tree: Any, dtype: jnp.dtype) -> Any:
    """Float arrays of ``tree`` cast to ``dtype``; other leaves (Python numbers such as
    MatFormer's ``ffn_granularities``, integer arrays) unchanged."""

    def cast(x: Any) -> Any:
        is_float = hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
        return x.astype(dtype) if is_float else x

    return jax.tree.map(cast, tree)


def _split_micro(batch: Batch, k: int) -> Batch:
    def split(x):
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def with_mesh(mesh: Mesh, step: Callable) -> Callable:
    """``step`` traced with ``mesh`` as the abstract mesh of its trace.

    The ops read it to run their Pallas kernels on each device's own examples
    (effformer.ops.kernel_sharding): without it jit would gather a sharded batch
    to every device around a kernel's custom call. XLA paths do not read it.
    """

    @functools.wraps(step)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(*args)

    return traced


def make_train_step(exp: Experiment) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    config, task, model = exp.config, exp.task, exp.model
    accum = int(config.grad_accum_steps)
    dtype = compute_dtype(config)
    schedule_kwargs = train_kwargs_fn(config.model_schedules, exp.steps_per_epoch)
    ema_decay = float(config.ema_decay)

    # Collections the forward pass updates in training (BatchNorm's running statistics).
    mutable = forward_updated(exp.abstract_state.model_state)

    def micro_loss(params, model_state, batch, rng, model_kwargs):
        inputs = task.model_inputs(batch)
        if dtype != jnp.float32:
            # Only what the model reads: the loss's float targets (label-smoothed or mixed
            # labels, a teacher's logits) and weights stay float32, as the loss does.
            params, inputs = cast_floats(params, dtype), cast_floats(inputs, dtype)
        outputs = model.apply(
            variables(params, model_state),
            **inputs,
            train=True,
            rngs={"dropout": rng},
            mutable=mutable or False,  # flax returns (outputs, {}) for an empty list
            **model_kwargs,
        )
        if mutable:
            outputs, updated = outputs
            # Keep the stored dtypes (a bfloat16 forward must not change the carried state's).
            updated = jax.tree.map(
                lambda new, old: new.astype(old.dtype),
                dict(updated),
                {name: model_state[name] for name in updated},
            )
            model_state = {**model_state, **updated}
        loss_sum, weight, metrics = task.loss_and_metrics(outputs, batch)
        return loss_sum, (weight, metrics, model_state)

    grad_fn = task.gradient_fn(model, micro_loss, dtype)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        step_rng = jax.random.fold_in(state.rng, state.step)
        prepare_rng, dropout_rng = jax.random.split(step_rng)
        model_kwargs = schedule_kwargs(state.step)
        batch = task.prepare_batch(batch, prepare_rng, train=True)
        micro_batches = _split_micro(batch, accum)

        def accumulate(carry, inputs):
            grads_sum, weight_sum, metric_sums, model_state = carry
            index, micro = inputs
            # Micro-batches update forward-updated collections one after the other.
            grads, (weight, metrics, model_state) = grad_fn(
                state.params,
                model_state,
                micro,
                jax.random.fold_in(dropout_rng, index),
                model_kwargs,
            )
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            metric_sums = jax.tree.map(jnp.add, metric_sums, metrics)
            return (grads_sum, weight_sum + weight, metric_sums, model_state), None

        zero_grads = jax.tree.map(jnp.zeros_like, state.params)
        metric_shapes = jax.eval_shape(
            lambda: micro_loss(
                state.params,
                state.model_state,
                jax.tree.map(lambda x: x[0], micro_batches),
                dropout_rng,
                model_kwargs,
            )
        )[1][1]
        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
        (grads, weight, metric_sums, model_state), _ = jax.lax.scan(
            accumulate,
            (zero_grads, jnp.zeros((), jnp.float32), zero_metrics, state.model_state),
            (jnp.arange(accum), micro_batches),
        )
        grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0), grads)
        updates, opt_state = exp.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema_decay > 0:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        metrics = {
            name: total / jnp.maximum(count, 1.0) for name, (total, count) in metric_sums.items()
        }
        metrics["learning_rate"] = exp.lr_schedule(state.step)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics.update({f"schedule/{name}": value for name, value in model_kwargs.items()})
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema,
            model_state=model_state,
        )
        return new_state, metrics

    return jax.jit(
        with_mesh(exp.mesh, train_step),
        in_shardings=(exp.state_shardings, exp.batch_sharding),
        out_shardings=(exp.state_shardings, None),
        donate_argnums=0,
    )


def make_eval_step(
    exp: Experiment, model_kwargs: dict[str, float]
) -> Callable[[Any, Any, Batch], dict]:
    """(params, model_state, batch) -> metric sums and weights, for exact accumulation."""
    config, task, model = exp.config, exp.task, exp.model
    dtype = compute_dtype(config)
    shardings = exp.state_shardings

    def eval_step(params: Any, model_state: Any, batch: Batch) -> dict:
        batch = task.prepare_batch(batch, jax.random.PRNGKey(0), train=False)
        inputs = task.model_inputs(batch)
        if dtype != jnp.float32:  # As in the train step: the model's inputs only.
            params, inputs = cast_floats(params, dtype), cast_floats(inputs, dtype)
        outputs = model.apply(
            variables(params, model_state),
            **inputs,
            train=False,
            **model_kwargs,
        )
        _, _, metrics = task.loss_and_metrics(outputs, batch)
        return metrics

    return jax.jit(
        with_mesh(exp.mesh, eval_step),
        in_shardings=(shardings.params, shardings.model_state, exp.batch_sharding),
    )
