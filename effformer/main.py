"""Command line: ``effformer train``, ``effformer eval`` and ``effformer save-teacher-logits``.

    effformer train --config experiments/digits/vit.py[:ARG] --workdir DIR [--config.FIELD=VALUE ...]
    effformer eval  --workdir DIR [--step N] [--split NAME]
    effformer save-teacher-logits --config STUDENT.py[:ARG] --teacher_workdir DIR --out STORE
        [--top_k K] [--epochs E] [--step N] [--values_dtype float16|float32]

This module only parses flags; the work is done by
``effformer.train.train_and_evaluate``, ``effformer.train.evaluate`` and
``effformer.train.teacher_logits.save_teacher_logits`` (TinyViT's sparse
teacher store for the student run of ``--config``; train the student with
``--config.data.teacher_store=STORE``).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("train", "eval", "save-teacher-logits")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, FILE.py[:ARG].")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for the config, checkpoints and metrics."
)
_STEP = flags.DEFINE_integer(
    "step", None, "eval, save-teacher-logits: the checkpoint step (default: the latest)."
)
_SPLIT = flags.DEFINE_string(
    "split", None, "eval: the dataset split (default: the config's eval split)."
)

_TEACHER_WORKDIR = flags.DEFINE_string(
    "teacher_workdir", None, "save-teacher-logits: the trained teacher run's workdir."
)
_OUT = flags.DEFINE_string("out", None, "save-teacher-logits: the store directory to write.")
_TOP_K = flags.DEFINE_integer(
    "top_k", 100, "save-teacher-logits: probabilities kept per example (TinyViT: 100)."
)
_EPOCHS = flags.DEFINE_integer(
    "epochs", None, "save-teacher-logits: epochs to store (default: what --config's run reads)."
)
_VALUES_DTYPE = flags.DEFINE_enum(
    "values_dtype", "float16", ["float16", "float32"], "save-teacher-logits: stored dtype."
)


def _save_teacher_logits() -> None:
    if _CONFIG.value is None or not _TEACHER_WORKDIR.value or not _OUT.value:
        raise app.UsageError(
            "save-teacher-logits needs --config STUDENT.py[:ARG], --teacher_workdir and --out."
        )
    from effformer.train.teacher_logits import save_teacher_logits

    manifest = save_teacher_logits(
        _CONFIG.value,
        _TEACHER_WORKDIR.value,
        _OUT.value,
        top_k=_TOP_K.value,
        epochs=_EPOCHS.value,
        teacher_step=_STEP.value,
        values_dtype=_VALUES_DTYPE.value,
    )
    print(json.dumps({key: manifest[key] for key in ("epochs", "top_k", "stream")}, sort_keys=True))


def main(argv: list[str]) -> None:
    commands = argv[1:]
    if len(commands) != 1 or commands[0] not in COMMANDS:
        raise app.UsageError(f"Give one command, one of {COMMANDS}; got {commands}.")
    logging.set_verbosity(logging.WARNING)
    if commands[0] == "save-teacher-logits":
        _save_teacher_logits()
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required.")
    from effformer import train

    if commands[0] == "train":
        if _CONFIG.value is None:
            raise app.UsageError("train needs --config FILE.py[:ARG].")
        result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
        print(json.dumps({"step": result["step"], "eval": result["eval"]}, sort_keys=True))
    else:
        metrics = train.evaluate(_WORKDIR.value, step=_STEP.value, split=_SPLIT.value)
        print(json.dumps(metrics, sort_keys=True))


def run() -> None:
    """Console-script entry point."""
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
