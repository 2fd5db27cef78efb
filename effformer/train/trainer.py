"""The one training loop: ``train_and_evaluate(config, workdir)``.

Running it again on the same workdir resumes from the latest checkpoint, with
the data iterator where it was: a run stopped at step N and resumed ends with
the same parameters, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from effformer.data import create_input_pipeline
from effformer.train import sharding
from effformer.train.checkpoint import (
    Checkpointer,
    all_finite,
    check_workdir_matches,
    has_checkpoint,
    save_config,
)
from effformer.train.config import validate_config
from effformer.train.evaluate import eval_metric_names, eval_params, run_evaluation
from effformer.train.experiment import build_experiment
from effformer.train.init_from import (
    check_init_from_source,
    init_from_workdir,
    load_source_state,
)
from effformer.train.metric_writers import MetricWriter, ProgressBar
from effformer.train.model_state import make_model_state_update
from effformer.train.steps import make_train_step
from effformer.train.teacher_logits import check_teacher_store


class NonFiniteLossError(FloatingPointError):
    """The loss or the train state became NaN or infinite; the run stopped without saving."""


class _StopSignal:
    """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag the loop checks after each step.

    The loop then saves a checkpoint and returns, so stopping a run by hand (a terminal's
    Ctrl-C, a notebook's interrupt) keeps its progress; with the default
    ``checkpoint.every_steps = 0`` nothing would have been saved before. A second Ctrl-C
    raises KeyboardInterrupt at once, without saving (a step or an evaluation may be long).
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = False
        self._previous: dict[int, object] = {}

    def __enter__(self):
        for signum in self._SIGNALS:
            # Not the main thread (e.g. some notebook runners): signal.signal raises; no handler.
            with contextlib.suppress(ValueError):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received:
            self._restore()
            raise KeyboardInterrupt
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
        again = "; Ctrl-C again stops at once without saving" if signum == signal.SIGINT else ""
        logging.warning(
            "%s received: saving a checkpoint after this step, then stopping%s.", name, again
        )
        self.received = True

    def _restore(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    stop_after_steps: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming if it holds a checkpoint), then evaluate.

    Args:
      config: a full config (see effformer.train.config.default_config).
      workdir: where the config, checkpoints and metrics go.
      stop_after_steps: stop (after saving) once this many steps ran in THIS call,
        as a preemption would; None runs to ``num_train_steps``.
      on_step: called with (step, train metrics) after every step (notebooks, tests).
    Returns:
      {"step": last step, "train": last train metrics, "eval": final eval metrics
      (empty if the run stopped early)}.
    """
    if config.multihost:
        jax.distributed.initialize()
    validate_config(config)
    workdir = Path(workdir)
    check_workdir_matches(config, workdir)
    if init_from_workdir(config) and not has_checkpoint(workdir):
        # Checked here, not in validate_config: only a run's first state reads the source,
        # so resuming or evaluating a fine-tuned run must not need it to still exist.
        check_init_from_source(config)
    exp = build_experiment(config)
    check_teacher_store(config, exp.num_train_steps)
    _check_best_metric(exp)

    checkpointer = Checkpointer(workdir, config.checkpoint)
    writer = None  # opened once the step training starts from is known
    pipeline = create_input_pipeline(
        config.data,
        split=exp.info.train_split,
        global_batch_size=config.global_batch_size,
        train=True,
        seed=config.seed,
    )
    try:
        restored = checkpointer.restore(exp.abstract_state, move_corrupt=True)
        if restored is None:
            state, step = exp.init_state(), 0
            if init_from_workdir(config):
                state = load_source_state(config, exp.model, state)
        else:
            step, state, data_state = restored
            pipeline.set_state(data_state)
            logging.info("Resumed from step %d in %s.", step, workdir)
        # Only now: a config its checkpoints refuse must not replace the one they were saved
        # with; nor one that trains no step (a finished run), which would then describe it.
        if step < exp.num_train_steps:
            save_config(config, workdir)
        writer = MetricWriter(workdir, resume_step=step)
        result = _train_loop(
            exp, state, step, pipeline, checkpointer, writer, stop_after_steps, on_step
        )
    finally:
        checkpointer.close()
        if writer is not None:
            writer.close()
    return result


def _check_best_metric(exp) -> None:
    """An unknown config.checkpoint.best_metric would fail only at the first evaluation's save."""
    best = exp.config.checkpoint.best_metric
    if best:
        names = eval_metric_names(exp)
        if best not in names:
            raise ValueError(
                f"config.checkpoint.best_metric must be one of the eval metrics {names} of "
                f"config.task.name={exp.config.task.name!r}, got {best!r}."
            )


def _train_loop(exp, state, step, pipeline, checkpointer, writer, stop_after_steps, on_step):
    config = exp.config
    total = exp.num_train_steps
    train_step = make_train_step(exp)
    update_model_state = make_model_state_update(exp)
    batch_sharding = sharding.batch_sharding(exp.mesh)
    progress = ProgressBar(total, step, config.global_batch_size, enabled=config.progress_bar)
    first_step = step
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    last_saved = step if step > 0 else None

    if step >= total:  # Already finished: report the final evaluation again.
        eval_metrics = run_evaluation(exp, eval_params(exp, state), model_state=state.model_state)
        return {"step": step, "train": train_metrics, "eval": eval_metrics}
    with _StopSignal() as stop:
        while step < total:
            batch = sharding.global_batch(next(pipeline), batch_sharding)
            if update_model_state is not None:
                state, update_metrics = update_model_state(state, batch, step)
                if update_metrics:
                    writer.write(step, "model_state", jax.device_get(update_metrics))
            state, metrics = train_step(state, batch)
            step += 1
            train_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(train_metrics["loss"]):
                raise NonFiniteLossError(
                    f"Loss is {train_metrics['loss']} at step {step}. Stopped without saving; "
                    f"{_last_checkpoint(last_saved, checkpointer.directory)}. Try a lower "
                    "config.optimizer.learning_rate, warm-up or config.optimizer.grad_clip_norm."
                )
            if on_step is not None:
                on_step(step, train_metrics)
            is_last = step == total
            if step % config.log_every_steps == 0 or is_last or step == first_step + 1:
                writer.write(step, "train", train_metrics)
                progress.update(step, train_metrics["loss"], force_newline=is_last)
            eval_now = is_last or (config.eval_every_steps and step % config.eval_every_steps == 0)
            if eval_now:
                eval_metrics = run_evaluation(
                    exp, eval_params(exp, state), model_state=state.model_state
                )
                writer.write(step, "eval", eval_metrics)
                if jax.process_index() == 0:
                    print(f"eval at step {step}: " + _format(eval_metrics), flush=True)
            stopping = stop.received or (
                stop_after_steps is not None and step - first_step >= stop_after_steps
            )
            save_now = (
                is_last
                or stopping
                or (config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0)
                # The best checkpoint is chosen among those saved with eval metrics: with a
                # best_metric every evaluation is a candidate, whatever every_steps says.
                or (eval_now and bool(config.checkpoint.best_metric))
            )
            # A finite loss does not make the updated state finite: NaN gradients (a sqrt at
            # 0, a bfloat16 overflow in the backward pass) or a step that overflows the
            # parameters leave the loss of THIS step finite, and only the next step's loss
            # would show it, after this step's checkpoint had replaced a good one.
            if save_now and not all_finite(state):
                raise NonFiniteLossError(
                    f"The train state after step {step} holds NaN or infinite values although "
                    f"its loss was finite. Stopped without saving; "
                    f"{_last_checkpoint(last_saved, checkpointer.directory)}. Look for NaN "
                    "gradients (train metric grad_norm) or try a lower "
                    "config.optimizer.learning_rate or config.optimizer.grad_clip_norm."
                )
            if save_now:
                checkpointer.save(
                    step, state, pipeline.get_state(), metrics=eval_metrics if eval_now else None
                )
                last_saved = step
            if stopping and not is_last:
                logging.warning("Stopping at step %d (checkpoint saved).", step)
                checkpointer.wait()
                return {"step": step, "train": train_metrics, "eval": {}}
    progress.close()
    checkpointer.wait()
    return {"step": step, "train": train_metrics, "eval": eval_metrics}


def _last_checkpoint(step: int | None, directory: Path) -> str:
    """What a stopped run left: its last checkpoint, or none (it stopped before the first)."""
    if step is None:
        return f"no checkpoint was saved in {directory}"
    return f"the last good checkpoint (step {step}) in {directory} is intact"


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{name}={value:.4f}" for name, value in sorted(metrics.items()))
