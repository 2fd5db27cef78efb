"""Command line: ``effformer train`` and ``effformer eval``.

    effformer train --config experiments/digits/vit.py[:ARG] --workdir DIR [--config.FIELD=VALUE ...]
    effformer eval  --workdir DIR [--step N] [--split NAME]

This module only parses flags; the work is done by
``effformer.train.train_and_evaluate`` and ``effformer.train.evaluate``.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("train", "eval")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, FILE.py[:ARG].")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for the config, checkpoints and metrics."
)
_STEP = flags.DEFINE_integer("step", None, "eval: the checkpoint step (default: the latest).")
_SPLIT = flags.DEFINE_string(
    "split", None, "eval: the dataset split (default: the config's eval split)."
)


def main(argv: list[str]) -> None:
    commands = argv[1:]
    if len(commands) != 1 or commands[0] not in COMMANDS:
        raise app.UsageError(f"Give one command, one of {COMMANDS}; got {commands}.")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required.")
    logging.set_verbosity(logging.WARNING)
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
