"""A model's variables besides "params": which ones the trainer carries, and how it updates them.

Some methods keep variables that the optimizer does not train. The trainer
carries such collections in ``TrainState.model_state``, passes them to every
``model.apply`` (train, eval, restore), saves them in the checkpoints, and
updates each one in one of two ways:

* **by the forward pass in training** (:data:`FORWARD_UPDATED`): BatchNorm's
  running statistics (``"batch_stats"``). The train step applies the model with
  the collection mutable and keeps what it returns; with gradient accumulation
  the micro-batches update it one after the other. Under ``jit`` the batch axis
  is one global axis however the mesh splits it, so BatchNorm's batch
  statistics are over the whole (micro-)batch, on any number of devices.
  Evaluation runs with ``train=False``: the model uses the running averages.
* **between optimizer steps** by an updater (:data:`UPDATERS`): EcoFormer's hash
  functions (the ``"hashing"`` collection, :mod:`effformer.mixers.ecoformer`),
  fitted by kernelised supervised hashing (KSH) to the attention the model
  itself computes, on one batch, now and then.

A model with a collection that is in neither (for example ``"cache"``, which
only decoding creates) is refused when the experiment is built, before
anything compiles.

``"hashing"`` (config ``config.model_state.hashing``):

* ``at_start``: fit before the first optimizer step (the paper's protocol fits
  once, on a batch of the fine-tuning data).
* ``every_steps``: refit before every step that is a positive multiple of it
  (0: never after the start).
* ``examples``: the first this many examples of that step's batch are the
  fitting batch (the official fit sees one GPU's batch, 32 images).
* ``top_k``, ``learning_rate``, ``momentum``, ``iterations``: KSH's settings
  (:func:`effformer.mixers.ecoformer.fit_hash_functions`).

A refit before step ``s`` uses the batch of step ``s`` and a key folded from the
state's key and ``s``: a run resumed from a checkpoint refits exactly as the
uninterrupted run does. The agreement of the codes with the KSH labels, before
and after each fit, is logged as ``model_state/hashing_agreement_{before,after}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections

from effformer.mixers.ecoformer import HASHING, hashing_agreement, refit_hashing

Batch = dict[str, jax.Array]
# Folded into each step's key so the refit's randomness differs from the step's.
_REFIT_STREAM = 0x6861  # "ha"


def default_model_state_config() -> ml_collections.ConfigDict:
    """``config.model_state``: the settings of each collection's updater."""
    config = ml_collections.ConfigDict()
    config.hashing = ml_collections.ConfigDict(
        dict(
            at_start=True,
            every_steps=0,
            examples=32,
            top_k=10,
            learning_rate=5e-4,
            momentum=0.9,
            iterations=100,
        )
    )
    return config


def validate_model_state_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError for ``config.model_state`` settings no updater can run."""
    hashing = config.model_state.hashing
    where = "config.model_state.hashing"
    for name in ("every_steps", "examples", "top_k", "iterations"):
        value = hashing[name]
        lowest = 0 if name in ("every_steps", "iterations") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            raise ValueError(f"{where}.{name} must be an int >= {lowest}, got {value!r}.")
    if not hashing.learning_rate > 0 or not 0 <= hashing.momentum < 1:
        raise ValueError(
            f"{where}: learning_rate must be > 0 and momentum in [0, 1), got "
            f"{hashing.learning_rate!r} and {hashing.momentum!r}."
        )


def check_model_collections(config: ml_collections.ConfigDict, collections: set[str]) -> None:
    """Refuse a model whose non-parameter collections the trainer cannot update."""
    known = set(UPDATERS) | set(FORWARD_UPDATED)
    unknown = sorted(collections - known)
    if unknown:
        raise ValueError(
            f"Model {config.model.name!r} creates variable collections {unknown} besides "
            f"'params'; the trainer can only carry {sorted(known)} "
            "(effformer.train.model_state.UPDATERS and FORWARD_UPDATED)."
        )
    if HASHING in collections and config.model_state.hashing.examples > config.global_batch_size:
        raise ValueError(
            f"config.model_state.hashing.examples={config.model_state.hashing.examples} must be "
            f"at most config.global_batch_size={config.global_batch_size}: the fitting batch is "
            "the first examples of a step's batch."
        )


def variables(params: Any, model_state: Mapping[str, Any]) -> dict[str, Any]:
    """The ``variables`` argument of ``model.apply``: parameters and model state."""
    return {"params": params, **model_state}


class HashRefit:
    """Refits the ``"hashing"`` collection by KSH at the steps ``config.model_state.hashing`` asks.

    Args:
      model, task: the experiment's.
      config: ``config.model_state.hashing``.
      model_kwargs: step -> the model's scheduled call arguments at that step.
      sharding: the shardings of the model state (the train state's), kept by the refit.
    """

    collection = HASHING

    def __init__(
        self,
        model: Any,
        task: Any,
        config: ml_collections.ConfigDict,
        model_kwargs: Callable[[jax.Array], dict[str, Any]],
        sharding: Any = None,
    ):
        self.at_start = bool(config.at_start)
        self.every_steps = int(config.every_steps)
        examples = int(config.examples)
        fit = dict(
            top_k=int(config.top_k),
            learning_rate=float(config.learning_rate),
            momentum=float(config.momentum),
            iterations=int(config.iterations),
        )

        def refit(params, model_state, batch, key, step):
            fitting = {name: value[:examples] for name, value in batch.items()}
            fitting = task.prepare_batch(fitting, key, train=False)
            _, sown = model.apply(
                variables(params, model_state),
                **task.model_inputs(fitting),
                train=False,
                mutable=["intermediates"],
                **model_kwargs(step),
            )
            intermediates = sown["intermediates"]
            hashing = model_state[HASHING]
            fitted = refit_hashing(key, hashing, intermediates, **fit)
            metrics = {
                "hashing_agreement_before": hashing_agreement(
                    hashing, intermediates, top_k=fit["top_k"]
                ),
                "hashing_agreement_after": hashing_agreement(
                    fitted, intermediates, top_k=fit["top_k"]
                ),
            }
            return {**model_state, HASHING: fitted}, metrics

        self._refit = jax.jit(refit, out_shardings=(sharding, None))

    def due(self, step: int) -> bool:
        """Whether to refit before optimizer step ``step`` (0-based)."""
        if step == 0:
            return self.at_start
        return self.every_steps > 0 and step % self.every_steps == 0

    def __call__(
        self, params: Any, model_state: Mapping[str, Any], batch: Batch, rng: jax.Array, step: int
    ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        """The new model state, and the fit's metrics."""
        key = jax.random.fold_in(jax.random.fold_in(rng, step), _REFIT_STREAM)
        return self._refit(params, model_state, batch, key, step)


UPDATERS: dict[str, type] = {HASHING: HashRefit}
# Collections the model's forward pass updates when applied with train=True.
FORWARD_UPDATED = ("batch_stats",)


def forward_updated(model_state: Mapping[str, Any]) -> list[str]:
    """The collections of ``model_state`` that the train step's forward pass updates."""
    return [name for name in FORWARD_UPDATED if name in model_state]


def make_model_state_update(
    exp: Any,
) -> Callable[[Any, Batch, int], tuple[Any, dict[str, jax.Array]]] | None:
    """(state, batch, step) -> (state, metrics): every collection whose updater is due at ``step``
    updated from ``batch`` (the batch of that step); None when the model has no collection
    with an updater."""
    from effformer.train.schedules import train_kwargs_fn

    collections = sorted(set(exp.abstract_state.model_state) & set(UPDATERS))
    if not collections:
        return None
    model_kwargs = train_kwargs_fn(exp.config.model_schedules, exp.steps_per_epoch)
    updaters = [
        UPDATERS[name](
            exp.model,
            exp.task,
            exp.config.model_state[name],
            model_kwargs,
            exp.state_shardings.model_state,
        )
        for name in collections
    ]

    def update(state: Any, batch: Batch, step: int) -> tuple[Any, dict[str, jax.Array]]:
        metrics: dict[str, jax.Array] = {}
        for updater in updaters:
            if updater.due(step):
                model_state, fit_metrics = updater(
                    state.params, state.model_state, batch, state.rng, step
                )
                state = state.replace(model_state=model_state)
                metrics.update(fit_metrics)
        return state, metrics

    return update
