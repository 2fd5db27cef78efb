"""Start a run from another run's parameters (fine-tuning, resolution changes).

``config.init_from.workdir`` names a finished (or interrupted) run. When the new
run's own workdir holds no checkpoint yet, its fresh parameters are replaced by
that run's, leaf by leaf:

* the source's top-level modules named in ``config.init_from.rename``
  (comma-separated ``source:target`` pairs) take the target's names first: a
  language model's layer stack is ``decoder`` in a causal model and ``encoder``
  in a bidirectional one, so ``"decoder:encoder"`` starts an encoder from a
  decoder's layers (Ettin's cross-objective training, ``experiments/ettin``);
* a parameter whose top-level module is listed in ``config.init_from.reinit``
  (comma-separated, e.g. ``"head"`` for a new class count) keeps its fresh
  initialisation;
* a parameter with the same path and shape is copied;
* a vision Transformer's learned position table of another size is resized
  on its token grid (:func:`effformer.models.vit.interpolate_position_embedding`,
  e.g. CCT-14/7x2 trained at 224 and fine-tuned at 384);
* anything else (a missing parameter, another shape) is an error that names the
  parameter and the fix.

The model's variables besides its parameters (``TrainState.model_state``, e.g.
EcoFormer's hash functions) are copied when the source has them with the same
shapes, and start fresh otherwise. The optimizer state starts fresh, and so
does the step: this is a new run. The
source's EMA parameters are used when the source kept an EMA (they are what its
evaluation used). The source may have trained on another mesh and number of
devices: its checkpoint is read onto the new run's mesh. Once the new run has saved a
checkpoint, resuming it restores that checkpoint and never reads the source again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections

from effformer.data import get_dataset_info
from effformer.train.checkpoint import CONFIG_FILE, Checkpointer, load_config


def init_from_workdir(config: ml_collections.ConfigDict) -> str:
    """The source workdir, or "" (configs saved before ``init_from`` existed have none)."""
    init_from = config.get("init_from")
    return init_from.workdir if init_from is not None else ""


def reinit_modules(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The top-level module names of ``config.init_from.reinit``."""
    return tuple(name.strip() for name in config.init_from.reinit.split(",") if name.strip())


def rename_modules(config: ml_collections.ConfigDict) -> dict[str, str]:
    """``config.init_from.rename`` as {source top-level module: target top-level module}."""
    text = config.init_from.get("rename", "") or ""
    pairs = [item.strip() for item in text.split(",") if item.strip()]
    renames: dict[str, str] = {}
    for pair in pairs:
        source, sep, target = (part.strip() for part in pair.partition(":"))
        if not sep or not source or not target or source in renames:
            raise ValueError(
                "config.init_from.rename must be comma-separated source:target pairs of "
                f"top-level module names, each source once (e.g. 'decoder:encoder'), got {text!r}."
            )
        renames[source] = target
    return renames


def validate_init_from(config: ml_collections.ConfigDict) -> None:
    """Fail before any compilation when ``config.init_from``'s fields cannot work.

    That the source workdir exists is checked by :func:`check_init_from_source`, only
    when a run's first state is made: a run that saved a checkpoint never reads the
    source again, and its eval or resumption must not need it.
    """
    if not init_from_workdir(config):
        return
    rename_modules(config)
    if config.init_from.step < 0:
        raise ValueError(
            f"config.init_from.step must be >= 0 (0: the latest checkpoint), got "
            f"{config.init_from.step}."
        )


def check_init_from_source(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError unless ``config.init_from.workdir`` is the workdir of a training run."""
    source = init_from_workdir(config)
    if not (Path(source) / CONFIG_FILE).is_file():
        raise ValueError(
            f"config.init_from.workdir={source!r} holds no {CONFIG_FILE}: it must be the workdir "
            "of an earlier `effformer train` run."
        )


def load_source_state(
    config: ml_collections.ConfigDict, target_model: Any, target_state: Any
) -> Any:
    """The new run's first state: ``target_state`` with the source checkpoint's parameters.

    Args:
      config: the new run's config (reads ``init_from``, ``mesh``, ``ema_decay`` and its
        batch sizes, which the source is built with: see :func:`_source_config_on_this_mesh`).
      target_model: the new run's model.
      target_state: the new run's freshly initialised ``TrainState`` (values are used for
        the reinitialised modules, shapes and shardings for everything).
    Returns:
      ``target_state`` with the parameters (and the EMA, if kept) adapted from the source,
      and each collection of its ``model_state`` (e.g. EcoFormer's ``"hashing"``) copied
      from the source where the source has it with the same shapes, fresh otherwise.
    """
    params, source_model_state = _load_source(config, target_model, target_state.params)
    model_state = dict(target_state.model_state)
    for name, fresh in model_state.items():
        source = source_model_state.get(name)
        same = source is not None and jax.tree.structure(source) == jax.tree.structure(fresh)
        same = same and all(
            a.shape == b.shape
            for a, b in zip(jax.tree.leaves(source), jax.tree.leaves(fresh), strict=True)
        )
        if same:
            model_state[name] = jax.device_put(
                jax.tree.map(lambda a, b: a.astype(b.dtype), source, fresh),
                jax.tree.map(lambda x: x.sharding, fresh),
            )
        else:
            logging.warning(
                "config.init_from: the source has no model-state collection %r of the target's "
                "shapes; it starts fresh.",
                name,
            )
    return target_state.replace(
        params=params,
        ema_params=params if config.ema_decay > 0 else None,
        model_state=model_state,
    )


def _load_source(config: ml_collections.ConfigDict, target_model: Any, target_params: Any):
    """(the source's parameters adapted to ``target_params``, the source's model state)."""
    # Imported here: experiment.py imports this module's caller.
    from effformer.train.experiment import build_experiment

    check_init_from_source(config)
    source_dir = Path(config.init_from.workdir)
    source = build_experiment(_source_config_on_this_mesh(load_config(source_dir), config))
    checkpointer = Checkpointer(source_dir)
    try:
        restored = checkpointer.restore(source.abstract_state, step=config.init_from.step or None)
    finally:
        checkpointer.close()
    if restored is None:
        raise ValueError(
            f"config.init_from.workdir={str(source_dir)!r} has no checkpoint to start from."
        )
    step, state, _ = restored
    params = state.ema_params if source.config.ema_decay > 0 else state.params
    logging.info("Initialising from %s, step %d.", source_dir, step)
    adapted = adapt_params(
        params,
        source.model,
        target_model,
        target_params,
        reinit_modules(config),
        rename_modules(config),
    )
    shardings = jax.tree.map(lambda x: x.sharding, target_params)
    return jax.device_put(adapted, shardings), dict(state.model_state)


def _source_config_on_this_mesh(
    source_config: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """``source_config`` changed so that its experiment builds on the new run's mesh.

    The source's state is restored onto this run's mesh. Only its parameters and model
    state are read, so its batch sizes, which ``build_experiment`` checks against the
    mesh, do not matter here: a source trained on 8 devices with a batch of 8 must start
    a run on 16 (or on 3). They become the new run's, which fit this mesh; the source's
    number of steps is kept (its learning-rate schedule is checked against it).
    """
    if not source_config.num_train_steps:
        # As build_experiment counts the steps of a run given in epochs.
        info = get_dataset_info(source_config.data)
        steps_per_epoch = info.splits[info.train_split] / source_config.global_batch_size
        source_config.num_train_steps = max(
            1, math.ceil(source_config.num_epochs * steps_per_epoch)
        )
        source_config.num_epochs = 0.0
    source_config.mesh = config.mesh
    source_config.global_batch_size = config.global_batch_size
    source_config.grad_accum_steps = config.grad_accum_steps
    source_config.eval_batch_size = config.eval_batch_size
    return source_config


def adapt_params(
    source_params: Any,
    source_model: Any,
    target_model: Any,
    target_params: Any,
    reinit: tuple[str, ...] = (),
    rename: Mapping[str, str] | None = None,
) -> Any:
    """Map ``source_params`` onto the structure and shapes of ``target_params``.

    ``rename``: {source top-level module: target name}, applied first. See the
    module docstring for the rules. Pure: no checkpoint I/O.
    """
    from effformer.models.vit import VisionTransformer, interpolate_position_embedding

    unknown = [name for name in reinit if name not in target_params]
    if unknown:
        raise ValueError(
            f"config.init_from.reinit names {unknown}, which are not top-level modules of the "
            f"target model; its modules are {sorted(target_params)}."
        )
    rename = dict(rename or {})
    missing = [name for name in rename if name not in source_params]
    if missing:
        raise ValueError(
            f"config.init_from.rename names {missing}, which are not top-level modules of the "
            f"source checkpoint; its modules are {sorted(source_params)}."
        )
    renamed = [rename.get(name, name) for name in source_params]
    if len(set(renamed)) != len(renamed):
        raise ValueError(
            f"config.init_from.rename={rename} gives two source modules the same name: "
            f"{sorted(renamed)}."
        )
    source_params = {rename.get(name, name): value for name, value in source_params.items()}
    if (
        isinstance(source_model, VisionTransformer)
        and isinstance(target_model, VisionTransformer)
        and "position_embedding" in source_params
        and "position_embedding" in target_params
        and source_model.sequence_length != target_model.sequence_length
    ):
        # interpolate_position_embedding also checks every other parameter's shape,
        # which a reinitialised head would fail: resize the table on its own.
        resized = interpolate_position_embedding(
            {
                **{k: v for k, v in target_params.items() if k != "position_embedding"},
                "position_embedding": source_params["position_embedding"],
            },
            source_model,
            target_model,
        )
        source_params["position_embedding"] = resized["position_embedding"]

    flat_source = dict(jax.tree_util.tree_flatten_with_path(source_params)[0])
    flat_target, treedef = jax.tree_util.tree_flatten_with_path(target_params)
    leaves = []
    for path, fresh in flat_target:
        top = getattr(path[0], "key", None)
        if top in reinit:
            leaves.append(fresh)
            continue
        name = jax.tree_util.keystr(path)
        if path not in flat_source:
            raise ValueError(
                f"config.init_from: the source checkpoint has no parameter {name}. Add its "
                f"top-level module {top!r} to config.init_from.reinit to initialise it fresh."
            )
        value = flat_source.pop(path)
        if tuple(value.shape) != tuple(fresh.shape):
            raise ValueError(
                f"config.init_from: parameter {name} has shape {tuple(value.shape)} in the source "
                f"checkpoint but the target model expects {tuple(fresh.shape)}. Add its "
                f"top-level module {top!r} to config.init_from.reinit to initialise it fresh."
            )
        leaves.append(value.astype(fresh.dtype))
    unused = sorted(
        jax.tree_util.keystr(path)
        for path in flat_source
        if getattr(path[0], "key", None) not in reinit
    )
    if unused:
        logging.warning("config.init_from: source parameters not used by the target: %s", unused)
    return jax.tree_util.tree_unflatten(treedef, leaves)
