"""One short training run on a generated task, scored by exact match per size.

Shared by the three sequence-task experiments (length_generalization,
inverse_permutation, chain_of_thought). A lean loop rather than
``train_and_evaluate``: the grids have dozens of runs of a few seconds each on
a 2-core CPU, where the trainer's checkpointing and its per-token eval would
cost more than the training. Data comes from the same input pipeline, the
loss is the causal_lm / seq2seq task's (``effformer.train.tasks``), and the
score is ``effformer.train.sequence_eval``.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
import optax

from effformer import models
from effformer.data import create_input_pipeline, default_data_config, get_dataset_info
from effformer.train.sequence_eval import exact_match_by_length
from effformer.train.tasks import create_task


def run(
    dataset: str,
    model_name: str,
    model_kwargs: dict[str, Any],
    *,
    seed: int,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    eval_splits: tuple[str, ...] = ("test", "test_long"),
    eval_batch_size: int = 256,
) -> dict[str, Any]:
    """Trains ``model_name`` on ``dataset``; returns ``{split: {size: (right, count)}}`` and timings."""
    start = time.time()
    data_config = default_data_config(dataset)
    info = get_dataset_info(data_config)
    task = create_task(ml_collections.ConfigDict({"name": info.task}), info)
    model = models.create(model_name, **{**model_kwargs, **task.model_overrides()})
    params = model.init(jax.random.PRNGKey(seed), **model.dummy_inputs(1))["params"]
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, steps // 10), steps, learning_rate * 0.05
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        def loss_fn(params):
            outputs = model.apply({"params": params}, **task.model_inputs(batch), train=True)
            loss_sum, weight, _ = task.loss_and_metrics(outputs, batch)
            return loss_sum / weight

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def logits_fn(params, batch):
        return model.apply({"params": params}, **task.model_inputs(batch), train=False)

    pipeline = create_input_pipeline(
        data_config, split="train", global_batch_size=batch_size, train=True, seed=seed,
        process_index=0, process_count=1,
    )  # fmt: skip
    loss = float("nan")
    with pipeline:
        for _ in range(steps):
            params, opt_state, loss = train_step(params, opt_state, next(pipeline))
    loss = float(loss)
    train_seconds = time.time() - start
    scores = {}
    for split in eval_splits:
        with create_input_pipeline(
            data_config, split=split, global_batch_size=eval_batch_size, train=False, seed=0,
            process_index=0, process_count=1,
        ) as batches:  # fmt: skip
            scores[split] = exact_match_by_length(lambda b: logits_fn(params, b), batches)
    return {
        "final_loss": loss,
        "scores": scores,
        "train_seconds": train_seconds,
        "total_seconds": time.time() - start,
    }
