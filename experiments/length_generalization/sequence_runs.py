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

import contextlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from effformer import models
from effformer.data import create_input_pipeline, default_data_config, get_dataset_info
from effformer.data.pipeline import shuffle_seed
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


# (model name, model kwargs, task format, steps, learning rate) -> (model, jitted train step,
# jitted logits): runs of one model on datasets of one format share their compilations.
_COMPILED: dict[tuple, tuple[Any, Any, Any]] = {}


def _compiled(model_name, model_kwargs, task, steps, learning_rate):
    # repr: model kwargs may hold dicts (position_kwargs), which do not hash.
    key = (model_name, repr(sorted(model_kwargs.items())), task.name, steps, learning_rate)
    if key in _COMPILED:
        return _COMPILED[key]
    model = models.create(model_name, **model_kwargs)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, steps // 10), steps, learning_rate * 0.05
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))

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

    _COMPILED[key] = (model, tx, jax.jit(jax.vmap(train_step), donate_argnums=(0, 1)), logits_fn)
    return _COMPILED[key]


def _train_row_length(dataset: str, task_format: str) -> int | None:
    """Longest causal_lm row at the training sizes, or None (not a generated causal_lm set).

    Rows are zero-padded to the longest instance of any split (``test_long``'s,
    up to twice the training size). A causal decoder's outputs at a position do
    not depend on later positions, so training on rows cut to the longest
    training instance computes the same loss and gradients at half the cost;
    ``run_seeds`` checks on every batch that only padding is cut.
    """
    from effformer.data.registry import get_dataset_spec

    generated = get_dataset_spec(dataset).generated
    if generated is None or task_format != "causal_lm":
        return None
    sizes = generated.split_sizes["train"]
    return max(sum(generated.task.max_lengths(n)) for n in sizes) + 2


# dataset name -> its train split as stacked arrays (records generated once per process).
_TRAIN_RECORDS: dict[str, dict[str, np.ndarray]] = {}


class _TrainBatches:
    """The batches of ``create_input_pipeline(split="train", train=True)``, from memory.

    Generated datasets make each record in Python on every read, and grain
    adds its own per-record overhead; three seeds of a 2 x 64 model spent
    about a third of each step there. The records are the same for every seed
    (a seed only changes their order), so the train split is generated once
    per dataset and the batches gathered with numpy, in exactly the pipeline's
    order: the same grain ``shuffle(shuffle_seed(seed)).repeat()`` over indices. The first
    batch is checked against the pipeline's.
    """

    def __init__(self, dataset: str, data_config: Any, *, seed: int, batch_size: int):
        import grain

        from effformer.data.registry import get_dataset_spec

        generated = get_dataset_spec(dataset).generated
        if dataset not in _TRAIN_RECORDS:
            source = generated.as_data_source("train")
            records = [source[i] for i in range(len(source))]
            _TRAIN_RECORDS[dataset] = {
                key: np.stack([r[key] for r in records]) for key in records[0]
            }
        self.records = _TRAIN_RECORDS[dataset]
        self.order = (
            grain.MapDataset.range(len(self.records["inputs"]))
            .shuffle(seed=shuffle_seed(seed))
            .repeat()
        )
        self.batch_size = batch_size
        self.step = 0
        with create_input_pipeline(
            data_config, split="train", global_batch_size=batch_size, train=True, seed=seed,
            process_index=0, process_count=1,
        ) as pipeline:  # fmt: skip
            expected, first = next(pipeline), next(self)
            self.step = 0
        for key, value in expected.items():
            if not np.array_equal(value, first[key]):
                raise AssertionError(
                    f"{dataset}: in-memory batch differs from the pipeline's {key}"
                )

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        start = self.step * self.batch_size
        indices = np.array([self.order[i] for i in range(start, start + self.batch_size)])
        self.step += 1
        batch = {key: value[indices] for key, value in self.records.items()}
        batch["mask"] = np.ones(self.batch_size, bool)
        return batch


def run_seeds(
    dataset: str,
    model_name: str,
    model_kwargs: dict[str, Any],
    *,
    seeds: tuple[int, ...],
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    eval_splits: tuple[str, ...] = ("test", "test_long"),
    eval_batch_size: int = 256,
    in_memory: bool = True,
) -> list[dict[str, Any]]:
    """:func:`run` for several seeds at once: one result per seed, in the order of ``seeds``.

    The seeds train side by side in one ``jax.vmap``-ed step (parameters,
    optimiser state and batches stacked on a leading seed axis), and the
    jitted functions are kept per (model, format, steps, learning rate), so a
    grid compiles once per model and row shape instead of once per run. Each
    seed still has its own initialisation (``PRNGKey(seed)``) and its own data
    order (the pipeline's ``seed``), as separate :func:`run` calls would.
    Training rows are cut to the longest training instance (see
    :func:`_train_row_length`). ``in_memory``: the same batches from memory
    (:class:`_TrainBatches`) instead of the grain pipeline. Timings are those
    of the whole group.
    """
    if not seeds:
        raise ValueError("seeds: expected at least one seed, got ().")
    start = time.time()
    data_config = default_data_config(dataset)
    info = get_dataset_info(data_config)
    task = create_task(ml_collections.ConfigDict({"name": info.task}), info)
    model, tx, batched_step, logits_fn = _compiled(
        model_name, {**model_kwargs, **task.model_overrides()}, task, steps, learning_rate
    )
    dummy = model.dummy_inputs(1)
    params = jax.vmap(lambda key: model.init(key, **dummy)["params"])(
        jax.numpy.stack([jax.random.PRNGKey(seed) for seed in seeds])
    )
    opt_state = jax.vmap(tx.init)(params)
    cut = _train_row_length(dataset, info.task)
    row_keys = ("inputs", "targets", "weights")

    losses = np.full(len(seeds), np.nan)
    with contextlib.ExitStack() as stack:
        if in_memory:
            pipelines = [
                _TrainBatches(dataset, data_config, seed=seed, batch_size=batch_size)
                for seed in seeds
            ]
        else:
            pipelines = [
                stack.enter_context(create_input_pipeline(
                    data_config, split="train", global_batch_size=batch_size, train=True,
                    seed=seed, process_index=0, process_count=1,
                ))
                for seed in seeds
            ]  # fmt: skip
        for _ in range(steps):
            per_seed = [next(pipeline) for pipeline in pipelines]
            batch = {key: np.stack([b[key] for b in per_seed]) for key in per_seed[0]}
            if cut is not None:
                if any(batch[key][..., cut:].any() for key in row_keys):
                    raise AssertionError(f"{dataset}: a training row is longer than {cut}.")
                batch.update({key: batch[key][..., :cut] for key in row_keys})
            params, opt_state, losses = batched_step(params, opt_state, batch)
    losses = np.asarray(losses)
    train_seconds = time.time() - start
    results = []
    for index, _ in enumerate(seeds):
        seed_params = jax.tree.map(lambda leaf, i=index: leaf[i], params)
        scores = {}
        for split in eval_splits:
            with create_input_pipeline(
                data_config, split=split, global_batch_size=eval_batch_size, train=False,
                seed=0, process_index=0, process_count=1,
            ) as batches:  # fmt: skip
                scores[split] = exact_match_by_length(
                    lambda b, p=seed_params: logits_fn(p, b), batches
                )
        results.append({"final_loss": float(losses[index]), "scores": scores})
    total_seconds = time.time() - start
    for result in results:
        result.update(train_seconds=train_seconds, total_seconds=total_seconds)
    return results
