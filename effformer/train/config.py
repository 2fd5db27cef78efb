"""The trainer's configuration: defaults, validation, loading from a file.

An experiment file under ``experiments/`` defines ``get_config(arg=None)``
that starts from :func:`default_config` and sets what differs. Every field is
validated by :func:`validate_config` before any data is read or any function
compiled, so a bad config never starts a long job.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any

import ml_collections

REQUIRED_FIELDS = ("model.name", "data.name", "task.name", "global_batch_size")


def default_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with its default."""
    from effformer.data import default_data_config
    from effformer.train.model_state import default_model_state_config

    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = ""  # A registry name, see effformer.models.list_models().
    config.model.tiny = False  # Use the model's test-sized preset.
    config.model.kwargs = ml_collections.ConfigDict()  # Overrides passed to create().

    # Every data field with its default; an experiment replaces this with
    # default_data_config(name), whose defaults suit that dataset.
    config.data = default_data_config("digits")
    config.data.name = ""

    config.task = ml_collections.ConfigDict()
    config.task.name = ""  # See effformer.train.tasks.TASKS.
    config.task.label_smoothing = 0.0
    config.task.mixup_alpha = 0.0
    config.task.cutmix_alpha = 0.0
    config.task.mix_switch_prob = 0.5
    config.task.distill_temperature = 1.0
    config.task.distill_weight = 1.0
    # MatFormer: train a language model over these FFN granularities (the loss sums them),
    # e.g. (0.125, 0.25, 0.5, 1.0) of the FFN width; () trains the model as it is.
    # See effformer.train.tasks.matformer_granularities.
    config.task.matformer_widths = ()

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 0
    config.optimizer.min_lr_ratio = 0.0
    config.optimizer.weight_decay = 0.0
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.optimizer.grad_clip_norm = 0.0  # 0 disables clipping.
    # Parameters with these names get no weight decay (besides every 0-D/1-D parameter).
    config.optimizer.no_decay_names = ("A_log", "D")
    # Comma-separated fnmatch patterns of the top-level modules that train; "" trains all.
    config.optimizer.trainable_modules = ""

    config.global_batch_size = 0
    config.grad_accum_steps = 1  # Micro-batches per step, accumulated inside the jitted step.
    config.num_train_steps = 0  # Either this or num_epochs.
    config.num_epochs = 0.0
    config.compute_dtype = "float32"  # "bfloat16" computes in bf16; parameters stay float32.
    config.ema_decay = 0.0  # > 0 keeps an EMA of the parameters, used for evaluation.

    # Values a model reads as call arguments, computed from the step by the trainer.
    # Each entry: name -> ConfigDict(kind=..., ...), see effformer.train.schedules.
    config.model_schedules = ml_collections.ConfigDict()

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: all devices not used by the other axis.
    config.mesh.fsdp = 1
    config.mesh.num_devices = 0  # 0: every device; n: the first n (tests).
    config.multihost = False  # Call jax.distributed.initialize() first.

    config.log_every_steps = 50
    config.eval_every_steps = 0  # 0: only at the end.
    config.eval_batch_size = 0  # 0: global_batch_size.
    config.progress_bar = True

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 0  # 0: only at the end (and on SIGTERM or Ctrl-C).
    config.checkpoint.keep = 2  # The latest ones kept ...
    # ... plus the best by this eval metric, e.g. "accuracy" (every evaluation is then saved).
    config.checkpoint.best_metric = ""
    config.checkpoint.best_mode = "max"
    config.checkpoint.async_save = True

    # The updaters of the model's variables besides "params" (EcoFormer's hash functions),
    # see effformer.train.model_state.
    config.model_state = default_model_state_config()

    # Start from another run's parameters (fine-tuning), see effformer.train.init_from.
    config.init_from = ml_collections.ConfigDict()
    config.init_from.workdir = ""  # The source run's workdir; "" starts from scratch.
    config.init_from.step = 0  # Its checkpoint step; 0: the latest.
    config.init_from.reinit = ""  # Comma-separated top-level modules to keep fresh, e.g. "head".
    config.init_from.rename = ""  # Source:target top-level module names, e.g. "decoder:encoder".
    return config


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if part not in value:
            return None
        value = value[part]
    return value


# Sections whose fields are all listed in default_config(): a name not there is a typo
# (``config.optimizer.warmup_step``) that would otherwise leave the default in force without
# a word. The other sections are open: config.task (tasks read their own fields),
# config.model.kwargs, config.model_schedules, config.data (checked by the data package),
# and the top level (experiment scripts keep their own fields there).
CLOSED_SECTIONS = ("model", "optimizer", "checkpoint", "mesh", "init_from")


def _check_closed_sections(config: ml_collections.ConfigDict) -> None:
    reference = default_config()
    for section in CLOSED_SECTIONS:
        if section not in config or not hasattr(config[section], "keys"):
            continue
        known = sorted(reference[section].keys())
        for name in sorted(set(config[section].keys()) - set(known)):
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise ValueError(
                f"config.{section}.{name} is not a field the trainer reads (config.{section} "
                f"has {known}){hint}"
            )


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the field and the fix for any config that cannot run."""
    from effformer.data import list_datasets
    from effformer.models import list_models
    from effformer.train.init_from import validate_init_from
    from effformer.train.model_state import validate_model_state_config
    from effformer.train.optim import LR_SCHEDULES, OPTIMIZERS
    from effformer.train.schedules import validate_model_schedules
    from effformer.train.tasks import TASKS, matformer_granularities

    _check_closed_sections(config)
    for field in REQUIRED_FIELDS:
        value = _get(config, field)
        if value in (None, "", 0):
            raise ValueError(f"config.{field} is required and was not set (got {value!r}).")
    if config.model.name not in list_models():
        from effformer.models import get_spec

        try:
            get_spec(config.model.name)
        except KeyError as error:
            raise ValueError(f"config.model.name: {error.args[0]}") from None
    datasets = list_datasets()
    if config.data.name not in datasets:
        raise ValueError(
            f"config.data.name must be one of {sorted(datasets)}, got {config.data.name!r}."
        )
    if config.task.name not in TASKS:
        raise ValueError(
            f"config.task.name must be one of {sorted(TASKS)}, got {config.task.name!r}."
        )
    # Checks the widths' form; that the model takes them is checked when it is built.
    matformer_granularities(config.task)
    if config.optimizer.name not in OPTIMIZERS:
        raise ValueError(
            f"config.optimizer.name must be one of {OPTIMIZERS}, got {config.optimizer.name!r}."
        )
    if config.optimizer.schedule not in LR_SCHEDULES:
        raise ValueError(
            f"config.optimizer.schedule must be one of {LR_SCHEDULES}, got {config.optimizer.schedule!r}."
        )
    # Step counts the loop divides by or compares with: a negative one would be ignored
    # (num_train_steps beside num_epochs) or change meaning (step % -n), a zero
    # log_every_steps would fail only after the first step; a negative batch size gives
    # a negative epoch length and a misleading error about warmup_steps.
    for field, lowest in (
        ("global_batch_size", 1),
        ("num_train_steps", 0),
        ("num_epochs", 0),
        ("log_every_steps", 1),
        ("eval_every_steps", 0),
        ("eval_batch_size", 0),
        ("checkpoint.every_steps", 0),
    ):
        value = _get(config, field)
        if value is not None and not value >= lowest:
            raise ValueError(f"config.{field} must be >= {lowest}, got {value!r}.")
    # The input pipeline's shuffle takes a uint32 seed; checked here to name the field.
    seed = config.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"config.seed must be an int in [0, 2**32), got {seed!r}.")
    if (config.num_train_steps > 0) == (config.num_epochs > 0):
        raise ValueError(
            "Set exactly one of config.num_train_steps and config.num_epochs to a positive value, "
            f"got num_train_steps={config.num_train_steps}, num_epochs={config.num_epochs}."
        )
    if config.grad_accum_steps < 1 or config.global_batch_size % config.grad_accum_steps:
        raise ValueError(
            f"config.grad_accum_steps must be >= 1 and divide global_batch_size="
            f"{config.global_batch_size}, got {config.grad_accum_steps}."
        )
    if config.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(
            f"config.compute_dtype must be 'float32' or 'bfloat16', got {config.compute_dtype!r}."
        )
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}.")
    if config.checkpoint.best_mode not in ("min", "max"):
        raise ValueError(
            f"config.checkpoint.best_mode must be 'min' or 'max', got {config.checkpoint.best_mode!r}."
        )
    if config.checkpoint.keep < 1:
        raise ValueError(f"config.checkpoint.keep must be >= 1, got {config.checkpoint.keep}.")
    validate_model_schedules(config.model_schedules)
    if "model_state" in config:  # Configs saved before it existed have none.
        validate_model_state_config(config)
    validate_init_from(config)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Load ``FILE[:ARG]``: the file's ``get_config(ARG)`` (or ``get_config()``)."""
    path_str, _, arg = spec.partition(":")
    path = Path(path_str)
    if not path.is_file():
        raise FileNotFoundError(
            f"--config: no config file at {path_str!r} (expected FILE.py[:ARG])."
        )
    module_spec = importlib.util.spec_from_file_location(f"effformer_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config: {path_str} defines no get_config(arg=None) function.")
    return module.get_config(arg) if arg else module.get_config()
