"""Schedules for values a model reads as call arguments.

Some papers change a model input during training: iLLaMA's soft-mask ratio
goes from 1 (bidirectional) to 0 (causal), a drop-path rate may grow. The
model never stores such a value; the trainer evaluates these schedules at
each step and passes the results as keyword arguments to ``model.apply``.

Config: ``config.model_schedules.<argument name> = ConfigDict(kind=..., ...)``
  kind "fixed":  ``value`` at every step.
  kind "constant": ``start`` until the cutoff, then ``end`` (iLLaMA's name for it).
  kind "linear": ``start`` to ``end`` linearly over [0, cutoff], then ``end``.
  The cutoff is ``cutoff_steps`` or ``cutoff_epochs`` (one of them).
  ``eval_value`` (optional) is passed at evaluation; default: the value at the
  last training step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import ml_collections

SCHEDULE_KINDS = ("fixed", "constant", "linear")
# Model arguments whose values must stay in a range; a schedule leaving it is refused.
VALUE_BOUNDS = {"soft_mask_ratio": (0.0, 1.0), "drop_path_rate": (0.0, 1.0)}


def validate_model_schedules(schedules: ml_collections.ConfigDict) -> None:
    for name, spec in schedules.items():
        where = f"config.model_schedules.{name}"
        kind = spec.get("kind")
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"{where}.kind must be one of {SCHEDULE_KINDS}, got {kind!r}.")
        needed = ("value",) if kind == "fixed" else ("start", "end")
        for field in needed:
            if field not in spec:
                raise ValueError(f"{where}.{field} is required for kind {kind!r}.")
        if kind != "fixed" and (("cutoff_steps" in spec) == ("cutoff_epochs" in spec)):
            raise ValueError(f"{where}: give exactly one of cutoff_steps and cutoff_epochs.")
        for field in ("cutoff_steps", "cutoff_epochs"):
            if field in spec and spec[field] < 0:
                raise ValueError(f"{where}.{field} must be >= 0, got {spec[field]}.")
        if name in VALUE_BOUNDS:
            low, high = VALUE_BOUNDS[name]
            for field in ("value", "start", "end", "eval_value"):
                value = spec.get(field)
                if value is not None and not low <= value <= high:
                    raise ValueError(f"{where}.{field} must be in [{low}, {high}], got {value}.")


def make_schedule(spec: ml_collections.ConfigDict, steps_per_epoch: float) -> Callable:
    """A function of the (traced) step giving the value at that step."""
    if spec.kind == "fixed":
        return lambda step: jnp.asarray(spec.value, jnp.float32)
    if "cutoff_steps" in spec:
        cutoff = float(spec.cutoff_steps)
    else:
        cutoff = float(spec.cutoff_epochs) * steps_per_epoch
    start, end = float(spec.start), float(spec.end)
    if spec.kind == "constant":
        return lambda step: jnp.where(step < cutoff, start, end).astype(jnp.float32)

    def linear(step):
        # At or past the cutoff the value is ``end``; a cutoff of 0 therefore gives
        # ``end`` from step 0, as the "constant" kind does (no division by zero).
        fraction = jnp.where(step >= cutoff, 1.0, jnp.clip(step / max(cutoff, 1.0), 0.0, 1.0))
        return (start + (end - start) * fraction).astype(jnp.float32)

    return linear


def train_kwargs_fn(schedules: ml_collections.ConfigDict, steps_per_epoch: float) -> Callable:
    """step -> dict of model call arguments for a training step."""
    fns = {name: make_schedule(spec, steps_per_epoch) for name, spec in schedules.items()}
    return lambda step: {name: fn(step) for name, fn in fns.items()}


def eval_kwargs(
    schedules: ml_collections.ConfigDict, steps_per_epoch: float, num_train_steps: int
) -> dict[str, float]:
    """Model call arguments for evaluation."""
    values = {}
    for name, spec in schedules.items():
        if spec.get("eval_value") is not None:
            values[name] = float(spec.eval_value)
        else:
            values[name] = float(make_schedule(spec, steps_per_epoch)(num_train_steps - 1))
    return values
