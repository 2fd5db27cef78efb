"""Optimisers and learning-rate schedules from the config.

``create_optimizer(config.optimizer, num_train_steps)`` returns an optax
transformation (clipping, the optimiser with decoupled weight decay under a
mask, and the schedule) and the schedule itself, for logging.

``config.trainable_modules`` (optional; "" or absent: everything trains) freezes
the rest of a model: a comma-separated list of top-level module names or
``fnmatch`` patterns (``"ia_red_*"``); only parameters under a matching
top-level module are updated, the others get a zero update (no step, no weight
decay) and gradient clipping sees only the trainable ones.
"""

from __future__ import annotations

import fnmatch
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("adamw", "sgd", "lamb")
LR_SCHEDULES = ("cosine", "linear", "constant")
_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)


def _checked_number(
    config: ml_collections.ConfigDict, field: str, high: float | None = None
) -> float:
    """``config.<field>`` as a float, refused unless a number in [0, high] (no bound: >= 0).

    A negative learning rate, decay or clipping norm would not fail: it would
    silently turn the update around. An infinite one (or one past float32's largest
    value, infinite once the step casts it) would turn the first update into NaN.
    """
    value = config[field]
    in_range = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and value >= 0
        and value <= _FLOAT32_MAX
        and (high is None or value <= high)
    )
    if not in_range:
        bounds = f"in [0, {high}]" if high is not None else ">= 0 and finite in float32"
        raise ValueError(f"config.optimizer.{field} must be a number {bounds}, got {value!r}.")
    return float(value)


def _checked_decay_rate(config: ml_collections.ConfigDict, field: str) -> float:
    """``config.<field>`` (b1, b2, momentum) as a float, refused unless a number in [0, 1).

    At 1 Adam's bias correction 1 - b**t is 0 (the first update is NaN), and a
    momentum of 1 never forgets; above 1 or below 0 the averages diverge or flip sign.
    """
    value = config[field]
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value < 1):
        raise ValueError(f"config.optimizer.{field} must be a number in [0, 1), got {value!r}.")
    return float(value)


def create_learning_rate_schedule(
    config: ml_collections.ConfigDict, num_train_steps: int
) -> optax.Schedule:
    """Linear warm-up from 0 to ``config.learning_rate``, then cosine / linear decay or constant.

    Decays reach ``learning_rate * min_lr_ratio`` at step ``num_train_steps``.
    """
    if config.schedule not in LR_SCHEDULES:
        raise ValueError(
            f"config.optimizer.schedule must be one of {LR_SCHEDULES}, got {config.schedule!r}."
        )
    warmup = int(config.warmup_steps)
    if not 0 <= warmup < max(num_train_steps, 1):
        raise ValueError(
            f"config.optimizer.warmup_steps must be in [0, num_train_steps={num_train_steps}), got {warmup}."
        )
    peak = _checked_number(config, "learning_rate")
    end = peak * _checked_number(config, "min_lr_ratio", high=1.0)
    decay_steps = max(num_train_steps - warmup, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(config.min_lr_ratio))
    elif config.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params: Any, no_decay_names: Sequence[str]) -> Any:
    """True where weight decay applies.

    Excluded: every parameter with fewer than 2 dimensions (norm scales and
    biases), every ``bias`` whatever its rank, and every parameter whose name is
    in ``no_decay_names`` (for example Mamba's ``A_log`` and ``D``, or position
    embeddings a model marks).
    """
    excluded = set(no_decay_names)

    def decays(path: tuple[Any, ...], leaf: Any) -> bool:
        name = getattr(path[-1], "key", getattr(path[-1], "name", str(path[-1])))
        # Attention's per-head projections (DenseGeneral) have biases [heads, head_dim]:
        # 2-D here, but the one bias vector of the papers' PyTorch code (timm excludes
        # `ndim <= 1 or name.endswith(".bias")`), so the rank alone would decay them.
        return jnp.ndim(leaf) >= 2 and name != "bias" and name not in excluded

    return jax.tree_util.tree_map_with_path(decays, params)


def trainable_labels(params: Any, patterns: Sequence[str]) -> Any:
    """``"trainable"`` or ``"frozen"`` for every parameter: trainable when its top-level
    module's name matches one of ``patterns`` (``fnmatch``). Raises ValueError naming
    the model's top-level modules when a pattern matches none of them."""
    modules = sorted(params)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(module, pattern) for module in modules):
            raise ValueError(
                f"config.optimizer.trainable_modules: {pattern!r} matches no top-level module "
                f"of the model; its modules are {modules}."
            )

    def label(path: tuple[Any, ...], _: Any) -> str:
        top = getattr(path[0], "key", str(path[0]))
        return "trainable" if any(fnmatch.fnmatchcase(top, p) for p in patterns) else "frozen"

    return jax.tree_util.tree_map_with_path(label, params)


def create_optimizer(
    config: ml_collections.ConfigDict, num_train_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation named by ``config.name`` and its learning-rate schedule."""
    if config.name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {config.name!r}.")
    schedule = create_learning_rate_schedule(config, num_train_steps)
    mask: Callable[[Any], Any] = lambda params: weight_decay_mask(
        params, tuple(config.no_decay_names)
    )
    wd = _checked_number(config, "weight_decay")
    clip = _checked_number(config, "grad_clip_norm")
    if config.name in ("adamw", "lamb"):
        b1, b2 = _checked_decay_rate(config, "b1"), _checked_decay_rate(config, "b2")
        eps = _checked_number(config, "eps")
        make = optax.adamw if config.name == "adamw" else optax.lamb
        tx = make(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=mask)
    else:
        momentum = _checked_decay_rate(config, "momentum")
        # Coupled L2 as in PyTorch's SGD(weight_decay=...): added to the gradient before momentum.
        tx = optax.chain(
            optax.add_decayed_weights(wd, mask=mask),
            optax.sgd(schedule, momentum=momentum or None, nesterov=bool(config.nesterov)),
        )
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    patterns = [p.strip() for p in config.get("trainable_modules", "").split(",") if p.strip()]
    if patterns:
        tx = optax.multi_transform(
            {"trainable": tx, "frozen": optax.set_to_zero()},
            lambda params: trainable_labels(params, patterns),
        )
    return tx, schedule
