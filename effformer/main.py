"""Command line: ``effformer train``, ``eval``, ``generate`` and ``save-teacher-logits``.

    effformer train --config experiments/digits/vit.py[:ARG] --workdir DIR [--config.FIELD=VALUE ...]
    effformer eval  --workdir DIR [--step N] [--split NAME]
    effformer generate --workdir DIR [--step N] [--split NAME] [--num_examples 8]
        [--max_new_tokens N] [--temperature 0] [--sample_top_k K] [--seed 0]
    effformer save-teacher-logits --config STUDENT.py[:ARG] --teacher_workdir DIR --out STORE
        [--top_k K] [--epochs E] [--step N] [--values_dtype float16|float32]

This module only parses flags; the work is done by
``effformer.train.train_and_evaluate``, ``effformer.train.evaluate``,
``effformer.train.sample.sample_continuations`` (a language model run on a
generated sequence task continues the split's prompts; one line per example,
then a JSON summary) and ``effformer.train.teacher_logits.save_teacher_logits`` (TinyViT's sparse
teacher store for the student run of ``--config``; train the student with
``--config.data.teacher_store=STORE``).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("train", "eval", "generate", "save-teacher-logits")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, FILE.py[:ARG].")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for the config, checkpoints and metrics."
)
_STEP = flags.DEFINE_integer(
    "step", None, "eval, generate, save-teacher-logits: the checkpoint step (default: latest)."
)
_SPLIT = flags.DEFINE_string(
    "split", None, "eval, generate: the dataset split (default: the config's eval split)."
)
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 8, "generate: the split's first N examples.")
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", None, "generate: tokens per continuation (default: the longest answer)."
)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "generate: 0 is greedy.")
_SAMPLE_TOP_K = flags.DEFINE_integer(
    "sample_top_k", None, "generate: sample among the K most likely tokens."
)
_SEED = flags.DEFINE_integer("seed", 0, "generate: the sampling key.")

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


# The flags each command reads. Any other of this module's flags given on the command line
# is refused rather than silently ignored (``generate --top_k 5`` is not ``--sample_top_k``;
# ``eval --config ...`` does not override the workdir's saved config).
_COMMAND_FLAGS = {
    "train": (_CONFIG, _WORKDIR),
    "eval": (_WORKDIR, _STEP, _SPLIT),
    "generate": (
        _WORKDIR,
        _STEP,
        _SPLIT,
        _NUM_EXAMPLES,
        _MAX_NEW_TOKENS,
        _TEMPERATURE,
        _SAMPLE_TOP_K,
        _SEED,
    ),
    "save-teacher-logits": (_CONFIG, _TEACHER_WORKDIR, _OUT, _TOP_K, _EPOCHS, _STEP, _VALUES_DTYPE),
}


def _check_flags_used(command: str) -> None:
    """Raise a UsageError naming each flag given that ``command`` does not read."""
    used = {holder.name for holder in _COMMAND_FLAGS[command]}
    every = {holder.name for holders in _COMMAND_FLAGS.values() for holder in holders}
    ignored = sorted(name for name in every - used if flags.FLAGS[name].present)
    if ignored:
        raise app.UsageError(
            f"{command} does not read {', '.join('--' + name for name in ignored)}; its flags "
            f"are {', '.join('--' + name for name in sorted(used))}."
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


def _generate() -> None:
    from effformer.train import restore
    from effformer.train.sample import sample_continuations

    run = restore(_WORKDIR.value, step=_STEP.value)
    samples = sample_continuations(
        run.experiment,
        run.variables,
        split=_SPLIT.value or run.experiment.info.eval_split,
        num_examples=_NUM_EXAMPLES.value,
        max_new_tokens=_MAX_NEW_TOKENS.value,
        temperature=_TEMPERATURE.value,
        top_k=_SAMPLE_TOP_K.value,
        seed=_SEED.value,
    )
    for sample in samples:
        print(
            f"[{sample.index}] size {sample.size} | prompt: {' '.join(sample.prompt)} | "
            f"answer: {' '.join(sample.answer)} | generated: {' '.join(sample.generated)}"
            f"{' | exact' if sample.exact else ''}"
        )
    exact = sum(sample.exact for sample in samples)
    print(json.dumps({"step": run.step, "examples": len(samples), "exact": exact}))


def main(argv: list[str]) -> None:
    commands = argv[1:]
    if len(commands) != 1 or commands[0] not in COMMANDS:
        raise app.UsageError(f"Give one command, one of {COMMANDS}; got {commands}.")
    _check_flags_used(commands[0])
    logging.set_verbosity(logging.WARNING)
    if commands[0] == "save-teacher-logits":
        _save_teacher_logits()
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required.")
    from effformer import train

    if commands[0] == "generate":
        _generate()
        return
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
