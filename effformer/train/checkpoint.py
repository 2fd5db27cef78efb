"""Checkpoints: train state and data-iterator state, saved together by orbax.

Layout of a workdir::

    config.json            the resolved config (eval needs nothing else)
    checkpoints/<step>/    state/ (TrainState arrays)  data/ (iterator state, JSON)
    metrics.jsonl, tb/     metric logs

Saves are asynchronous and atomic (orbax writes to a temporary directory and
renames it when complete), so an interrupted save never replaces the last
good checkpoint. A checkpoint that fails to restore is reported by name and
the previous one is used; a resuming training run also moves it aside to
``checkpoints/<step>.corrupt`` (readers such as ``effformer eval`` leave the
workdir as it is: a training run may be writing there). A train state that
restores with NaN or infinite values has failed too: the trainer never saves
one (``all_finite``), so its files were damaged after the save (a flipped bit
in an array file reads back without an error).
A checkpoint whose arrays (names and shapes, read from its metadata) differ
from what the config builds is not corrupt: the config changed (e.g.
``config.optimizer.name`` or ``config.ema_decay``), and every checkpoint would
fail alike. That is an error naming the difference; the checkpoint stays.

The train state is stored as a dict of its fields; ``model_state`` (the
model's variables besides its parameters) only when the model has some, so
checkpoints of parameter-only models keep the layout they had before that
field existed and still restore.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from effformer.train.state import TrainState

CONFIG_FILE = "config.json"
# Config fields that define what the checkpointed parameters are; a workdir
# refuses a config that changes them.
IDENTITY_FIELDS = ("model.name", "model.tiny", "model.kwargs", "data.name", "task.name")


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    checks = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def all_finite(tree: Any) -> bool:
    """Whether every floating-point value of ``tree`` (a train state) is finite."""
    return bool(jax.device_get(_all_finite(tree)))


def save_config(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    path = Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed over: a run killed while writing must not leave a
    # truncated config.json, which every later train, eval and resume reads first. One
    # temporary file per process: every process of a multi-host run writes the config.
    partial = path.with_name(f"{CONFIG_FILE}.tmp{jax.process_index()}")
    partial.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    partial.replace(path)


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in workdir {str(workdir)!r}: it is not a training workdir "
            "(run `effformer train --config ... --workdir DIR` first)."
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def has_checkpoint(workdir: str | Path) -> bool:
    """Whether ``workdir`` holds a finished checkpoint (orbax's temporary ones don't count)."""
    directory = Path(workdir) / "checkpoints"
    return directory.is_dir() and any(path.name.isdigit() for path in directory.iterdir())


def _field(config: Any, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value.get(part) if hasattr(value, "get") else None
    if isinstance(value, ml_collections.ConfigDict):
        return json.loads(value.to_json_best_effort(sort_keys=True))
    if isinstance(value, tuple):
        return list(value)
    return value


def check_workdir_matches(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """Raise if ``workdir`` already holds a run of a different model, dataset or task."""
    if not (Path(workdir) / CONFIG_FILE).is_file():
        return
    saved = load_config(workdir)
    for field in IDENTITY_FIELDS:
        old, new = _field(saved, field), _field(config, field)
        if old != new:
            raise ValueError(
                f"Workdir {str(workdir)!r} holds a run with config.{field}={old!r}, but this config has "
                f"{new!r}. Use a new --workdir, or restore the original config.{field} to resume."
            )


def _to_item(state: Any) -> Any:
    """What is written for ``state``: a TrainState as a dict of its fields (module docstring)."""
    if not isinstance(state, TrainState):
        return state
    item = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}
    if not item["model_state"]:
        del item["model_state"]
    return item


def _from_item(item: Any, like: Any) -> Any:
    if not isinstance(like, TrainState):
        return item
    return TrainState(**{"model_state": {}, **item})


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{path: shape} of ``tree``'s arrays; dict keys, attributes and indices all read as names,
    so a state and the metadata orbax stores for it (dicts and lists) compare equal."""

    def name(key: Any) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    return {
        "/".join(name(key) for key in path): tuple(getattr(leaf, "shape", ()))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _describe_mismatch(saved: dict, expected: dict) -> str | None:
    """What differs between two ``_leaf_shapes``, or None when they agree."""
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    reshaped = sorted(p for p in set(saved) & set(expected) if saved[p] != expected[p])
    parts = []
    if missing:
        parts.append(f"the config expects {len(missing)} arrays it lacks (e.g. {missing[:3]})")
    if extra:
        parts.append(f"it holds {len(extra)} arrays the config does not (e.g. {extra[:3]})")
    if reshaped:
        path = reshaped[0]
        parts.append(
            f"{len(reshaped)} arrays differ in shape (e.g. {path}: expected {expected[path]}, "
            f"got {saved[path]})"
        )
    return "; ".join(parts) or None


class Checkpointer:
    """Thin wrapper around ``ocp.CheckpointManager`` for (train state, data state)."""

    def __init__(self, workdir: str | Path, config: ml_collections.ConfigDict | None = None):
        config = config or ml_collections.ConfigDict(
            dict(keep=2, best_metric="", best_mode="max", async_save=False)
        )
        self.directory = Path(workdir).absolute() / "checkpoints"
        policies: list[Any] = [checkpoint_managers.LatestN(n=int(config.keep))]
        if config.best_metric:
            metric, sign = config.best_metric, (1.0 if config.best_mode == "max" else -1.0)
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=lambda m: sign * float(m[metric]),
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            create=True,
            enable_async_checkpointing=bool(config.async_save),
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, metrics: dict | None = None) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_to_item(state)), data=ocp.args.JsonSave(data_state)
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def restore(
        self, abstract_state: Any, step: int | None = None, *, move_corrupt: bool = False
    ) -> tuple[int, Any, dict] | None:
        """Restore ``step`` (default: the latest that restores cleanly).

        Returns (step, state, data_state), or None when there is no checkpoint.
        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings.

        ``move_corrupt``: move a checkpoint that fails to restore aside to
        ``<step>.corrupt``. Only the training run that owns the workdir does (when it
        resumes); readers (``effformer eval``, ``generate``, a fine-tuning run reading its
        source) leave the directory alone and fall back to the previous checkpoint: a
        training run may be writing there, and its retention policy deletes old steps,
        so a step can vanish while it is read. Such a step is skipped, not reported, and
        the steps are listed again, so a newer one saved meanwhile is found.
        """
        if step is not None:
            steps = self.all_steps()
            if step not in steps:
                raise ValueError(
                    f"No checkpoint for step {step} in {self.directory}; available: {steps}."
                )
            self._check_structure(step, abstract_state)
            return step, *self._restore_step(step, abstract_state)
        failures = []
        tried: set[int] = set()
        while True:
            self.manager.reload()
            remaining = [s for s in self.all_steps() if s not in tried]
            if not remaining:
                break
            candidate = max(remaining)
            tried.add(candidate)
            self._check_structure(candidate, abstract_state)
            try:
                return candidate, *self._restore_step(candidate, abstract_state)
            except Exception as error:  # noqa: BLE001 - any failure means this checkpoint is unusable.
                path = self.directory / str(candidate)
                if not path.exists():
                    logging.warning(
                        "Checkpoint %s was deleted while it was read (the run's retention "
                        "policy); trying the next one.",
                        path,
                    )
                    continue
                if move_corrupt:
                    corrupt = self._corrupt_path(candidate)
                    path.rename(corrupt)
                    where = f"moved it to {corrupt}"
                else:
                    where = "left it in place"
                logging.error(
                    "Checkpoint %s failed to restore (%s: %s); %s and trying the previous one.",
                    path,
                    type(error).__name__,
                    error,
                    where,
                )
                failures.append(f"step {candidate} ({type(error).__name__}: {error})")
        if failures:
            # Every checkpoint failed: returning None would restart training from step 0
            # without a word beyond the log (e.g. on a transient filesystem error).
            moved = (
                "They were moved aside as <step>.corrupt*; rerun to start again from step 0, "
                "or move them back if the failure was transient."
                if move_corrupt
                else "They were left in place."
            )
            raise RuntimeError(
                f"Every checkpoint in {self.directory} failed to restore: "
                f"{'; '.join(failures)}. {moved}"
            )
        return None

    def _corrupt_path(self, step: int) -> Path:
        """Where a failed checkpoint is moved: ``<step>.corrupt``, numbered if that exists."""
        path = self.directory / f"{step}.corrupt"
        number = 1
        while path.exists():  # the same step failed before (e.g. saved again, then broken)
            path = self.directory / f"{step}.corrupt.{number}"
            number += 1
        return path

    def _check_structure(self, step: int, abstract_state: Any) -> None:
        """Raise ValueError when checkpoint ``step`` holds other arrays than ``abstract_state``.

        Only a readable metadata file is compared; one that cannot be read marks a
        corrupt checkpoint, which ``restore`` reports and moves aside.
        """
        path = self.directory / str(step) / "state"
        try:
            saved = ocp.StandardCheckpointHandler().metadata(path).tree
        except Exception:  # noqa: BLE001 - unreadable metadata: left to restore's fallback.
            return
        mismatch = _describe_mismatch(_leaf_shapes(saved), _leaf_shapes(_to_item(abstract_state)))
        if mismatch:
            raise ValueError(
                f"Checkpoint {path.parent} does not hold the train state this config builds: "
                f"{mismatch}. A config field that shapes the state changed since it was saved "
                "(e.g. config.optimizer.name, config.optimizer.grad_clip_norm, config.ema_decay, "
                "config.data.image_size); restore the config it was trained with, or use a new "
                "--workdir. The checkpoint was left as it is."
            )

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_to_item(abstract_state)),
                data=ocp.args.JsonRestore(),
            ),
        )
        state = _from_item(restored["state"], abstract_state)
        jax.block_until_ready(state)
        if isinstance(state, TrainState) and not all_finite(state):
            raise ValueError(
                f"checkpoint {self.directory / str(step)} restored NaN or infinite values; the "
                "trainer saves only finite states, so its array files are damaged."
            )
        return state, restored["data"]
