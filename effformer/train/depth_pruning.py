"""Depth pruning of the language models: the shallower model's parameters, runs and losses.

TinyFusion (Fang et al., 2024) learns which layers to keep with the search
model :class:`~effformer.models.tinyfusion.TinyFusionLM` (trained by the normal
trainer: model ``tinyfusion_lm``, task ``causal_lm``, see
``experiments/tinyfusion``); this module turns a choice of layers into a
shallower model that the normal trainer fine-tunes and evaluates:

* :func:`select_layers`: the kept layers of a search (each N:M group's most
  probable candidate), from its ``params["tinyfusion"]["gate_logits"]``;
* :func:`prune_lm_params`: a :class:`TransformerLM`'s parameters with only the
  kept layers, renumbered: the parameters of the same model with
  ``num_layers=len(keep)`` (:func:`pruned_model_kwargs`), whose output equals
  the original's with the dropped layers gated off (``layer_gates``);
* :func:`export_pruned_run`: a workdir holding the pruned model as a step-0
  checkpoint of a run, so ``effformer eval --workdir`` scores it before any
  fine-tuning and ``--config.init_from.workdir=`` fine-tunes it;
* :func:`layer_gate_losses`: a trained run's loss with given layer gates, for
  the loss-based baselines (which layer removals raise the loss least).

As in TinyFusion's script, the pruned model takes its weights from the dense
run, not from the search: the search's weight update (LoRA or full) only
estimates how well each choice recovers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from effformer.data import create_input_pipeline
from effformer.models.lm_layers import expand_layer_pattern
from effformer.models.tinyfusion import SEARCH_KEY, candidate_masks, select_layers
from effformer.models.transformer_lm import TransformerLM
from effformer.train import sharding
from effformer.train.checkpoint import Checkpointer, save_config
from effformer.train.evaluate import restore
from effformer.train.experiment import Experiment, build_experiment, eval_batch_size

__all__ = [
    "candidate_masks",
    "export_pruned_run",
    "layer_gate_losses",
    "prune_lm_params",
    "pruned_model_kwargs",
    "select_layers",
]

# A stack's per-layer entries: layer_3 (the norms), layer_3_attention, layer_3_ffn, ...
_LAYER_ENTRY = re.compile(r"layer_(\d+)(_.+)?")


def _check_keep(keep: Sequence[int], num_layers: int) -> tuple[int, ...]:
    keep = tuple(keep)
    valid = bool(keep) and all(
        isinstance(k, int | np.integer) and not isinstance(k, bool) for k in keep
    )
    if not valid or list(keep) != sorted(set(keep)) or not 0 <= keep[0] <= keep[-1] < num_layers:
        raise ValueError(
            f"keep must be strictly increasing layer indices in [0, {num_layers}), at least one, "
            f"got {keep!r}."
        )
    return tuple(int(k) for k in keep)


def prune_lm_params(params: Mapping[str, Any], keep: Sequence[int]) -> dict[str, Any]:
    """The parameters of the shallower :class:`TransformerLM` that runs only layers ``keep``.

    params: a TransformerLM's parameters (one ``decoder`` or ``encoder`` stack);
    keep: increasing layer indices. Layer ``keep[j]``'s entries (``layer_k``,
    ``layer_k_attention``, ``layer_k_ffn``, ...) become layer ``j``'s; the
    embedding, final norm and heads are kept as they are. The result is the
    parameter tree of the model with :func:`pruned_model_kwargs`.
    """
    if SEARCH_KEY in params:
        raise ValueError(
            f"prune_lm_params: params hold a TinyFusion search ({SEARCH_KEY!r}); prune the dense "
            "run's parameters (the search's weight update only estimates recoverability)."
        )
    stacks = [name for name in ("decoder", "encoder") if name in params]
    if len(stacks) != 1:
        raise ValueError(
            "prune_lm_params: params must be a TransformerLM's, with one 'decoder' or 'encoder' "
            f"stack, got top-level entries {sorted(params)}."
        )
    stack_name = stacks[0]
    layers: dict[int, dict[str, Any]] = {}
    others: dict[str, Any] = {}
    for name, value in params[stack_name].items():
        match = _LAYER_ENTRY.fullmatch(name)
        if match:
            layers.setdefault(int(match[1]), {})[match[2] or ""] = value
        else:
            others[name] = value
    num_layers = len(layers)
    if set(layers) != set(range(num_layers)):
        raise ValueError(
            f"prune_lm_params: the {stack_name!r} stack's layers are not numbered 0.."
            f"{num_layers - 1}: {sorted(layers)}."
        )
    keep = _check_keep(keep, num_layers)
    pruned = dict(others)
    for new_index, old_index in enumerate(keep):
        for suffix, value in layers[old_index].items():
            pruned[f"layer_{new_index}{suffix}"] = value
    return {**params, stack_name: pruned}


def pruned_model_kwargs(model: TransformerLM, keep: Sequence[int]) -> dict[str, Any]:
    """``num_layers`` and ``layer_pattern`` of ``model`` with only layers ``keep``.

    The pattern is one spec string when the kept layers share it, else one spec
    per layer; apply them with ``model.clone(**kwargs, layer_overrides=None)`` or
    put them in ``config.model.kwargs``.
    """
    if not isinstance(model, TransformerLM):
        raise ValueError(f"pruned_model_kwargs: model must be a TransformerLM, got {type(model)}.")
    keep = _check_keep(keep, model.num_layers)
    specs = expand_layer_pattern(model.layer_pattern, model.num_layers, model.layer_overrides)
    kept = [str(specs[k]) for k in keep]
    pattern: str | list[str] = kept[0] if len(set(kept)) == 1 else kept
    return {"num_layers": len(keep), "layer_pattern": pattern}


def layer_gate_losses(
    exp: Experiment,
    params: Any,
    gate_sets: np.ndarray | Sequence[Sequence[float]],
    split: str,
    max_batches: int | None = None,
) -> np.ndarray:
    """[K]: the run's mean loss on ``split`` with each row of ``gate_sets`` [K, num_layers] as gates.

    exp: the run's ``Experiment`` (a :class:`TransformerLM` with a task without
    MatFormer granularities, e.g. ``causal_lm``); params: its parameters. Gate 0
    removes a layer, 1 keeps it (``layer_gates``). The loss is the task's, summed
    over the split (its first ``max_batches`` eval batches, in the split's order,
    when given: a calibration subset) and divided by its weight, as the trainer's
    evaluation does.
    """
    model, task = exp.model, exp.task
    if not isinstance(model, TransformerLM):
        raise ValueError(
            f"layer_gate_losses: the run's model must be a TransformerLM, got {type(model)}."
        )
    if getattr(task, "granularities", ()):
        # The model would run once per granularity and the loss be their SUM.
        raise ValueError(
            "layer_gate_losses: the run's task must train one width (config.task."
            f"matformer_widths=()), got matformer_widths={task.granularities!r}."
        )
    gate_sets = np.asarray(gate_sets, np.float32)
    if gate_sets.ndim != 2 or gate_sets.shape[1] != model.num_layers:
        raise ValueError(
            f"layer_gate_losses: gate_sets must be [K, num_layers={model.num_layers}], got shape "
            f"{gate_sets.shape}."
        )
    if split not in exp.info.splits:
        raise ValueError(f"split must be one of {sorted(exp.info.splits)}, got {split!r}.")
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}.")

    @jax.jit
    def batch_losses(params, batch, gates):
        batch = task.prepare_batch(batch, jax.random.PRNGKey(0), train=False)

        def one(layer_gates):
            outputs = model.apply(
                {"params": params}, **task.model_inputs(batch), layer_gates=layer_gates
            )
            loss_sum, weight, _ = task.loss_and_metrics(outputs, batch)
            return jnp.stack([loss_sum, weight])

        return jax.lax.map(one, gates)

    pipeline = create_input_pipeline(
        exp.config.data,
        split=split,
        global_batch_size=eval_batch_size(exp.config),
        train=False,
        seed=exp.config.seed,
    )
    totals = np.zeros((len(gate_sets), 2), np.float64)
    batch_sharding = sharding.batch_sharding(exp.mesh)
    gates = jnp.asarray(gate_sets)
    for index, local_batch in enumerate(pipeline):
        if max_batches is not None and index >= max_batches:
            break
        batch = sharding.global_batch(local_batch, batch_sharding)
        totals += np.asarray(jax.device_get(batch_losses(params, batch, gates)), np.float64)
    return totals[:, 0] / np.maximum(totals[:, 1], 1.0)


def export_pruned_run(
    source_workdir: str | Path, keep: Sequence[int], workdir: str | Path
) -> ml_collections.ConfigDict:
    """Write the dense run ``source_workdir`` pruned to layers ``keep`` as a run in ``workdir``.

    ``workdir`` gets the source's config with :func:`pruned_model_kwargs` (and no
    ``init_from``) and a step-0 checkpoint whose parameters are
    :func:`prune_lm_params` of the source's (its EMA when it kept one), with a
    fresh optimizer state and data iterator. ``effformer eval --workdir`` then
    scores the pruned model as it is; a fine-tuning run starts from it with
    ``--config.init_from.workdir=WORKDIR`` (a config whose model has the same
    ``num_layers`` and ``layer_pattern``). Returns the written config.
    """
    workdir = Path(workdir)
    if (workdir / "checkpoints").exists():
        raise ValueError(
            f"export_pruned_run: workdir {str(workdir)!r} already holds checkpoints; give a new one."
        )
    source = restore(source_workdir)
    if not isinstance(source.model, TransformerLM):
        raise ValueError(
            f"export_pruned_run: {str(source_workdir)!r} must be a dense TransformerLM run, got a "
            f"{type(source.model).__name__} (prune the run a TinyFusion search started from)."
        )
    config = ml_collections.ConfigDict(source.config.to_dict())
    kwargs = config.model.kwargs.to_dict()
    kwargs.pop("layer_overrides", None)
    kwargs.update(pruned_model_kwargs(source.model, keep))
    config.model.kwargs = ml_collections.ConfigDict(kwargs)
    config.init_from.workdir = ""
    exp = build_experiment(config)
    state = exp.init_state()
    params = prune_lm_params(jax.device_get(source.params), keep)
    if jax.tree.structure(params) != jax.tree.structure(state.params):
        raise ValueError(
            "export_pruned_run: the pruned parameters do not fit the pruned model's: "
            f"{jax.tree.structure(params)} vs {jax.tree.structure(state.params)}."
        )
    params = jax.device_put(params, jax.tree.map(lambda x: x.sharding, state.params))
    state = state.replace(params=params, ema_params=params if config.ema_decay > 0 else None)
    pipeline = create_input_pipeline(
        config.data,
        split=exp.info.train_split,
        global_batch_size=config.global_batch_size,
        train=True,
        seed=config.seed,
    )
    save_config(config, workdir)
    checkpointer = Checkpointer(workdir)
    try:
        checkpointer.save(0, state, pipeline.get_state())
    finally:
        checkpointer.close()
    return config
