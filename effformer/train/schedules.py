"""Schedules for values a model reads as call arguments.

Some papers change a model input during training: iLLaMA's soft-mask ratio
goes from 1 (bidirectional) to 0 (causal), a drop-path rate may grow. The
model never stores such a value; the trainer evaluates these schedules at
each step and passes the results as keyword arguments to ``model.apply``.

Config: ``config.model_schedules.<argument name> = ConfigDict(kind=..., ...)``
  kind "fixed":  ``value`` at every step.
  kind "step":   ``start`` until the cutoff, then ``end`` (iLLaMA's "constant").
  kind "linear": ``start`` to ``end`` linearly over [0, cutoff], then ``end``.
  The cutoff is ``cutoff_steps`` or ``cutoff_epochs`` (one of them).
  ``eval_value`` (optional) is passed at evaluation; default: the value at the
  last training step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import ml_collections

SCHEDULE_KINDS = ("fixed", "step", "linear")


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


def make_schedule(spec: ml_collections.ConfigDict, steps_per_epoch: float) -> Callable:
    """A function of the (traced) step giving the value at that step."""
    if spec.kind == "fixed":
        return lambda step: jnp.asarray(spec.value, jnp.float32)
    if "cutoff_steps" in spec:
        cutoff = float(spec.cutoff_steps)
    else:
        cutoff = float(spec.cutoff_epochs) * steps_per_epoch
    start, end = float(spec.start), float(spec.end)
    if spec.kind == "step":
        return lambda step: jnp.where(step < cutoff, start, end).astype(jnp.float32)
    cutoff = max(cutoff, 1.0)

    def linear(step):
        fraction = jnp.clip(step / cutoff, 0.0, 1.0)
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
