"""Test accuracy of trained LMUFormers against the part of the sequence seen (streaming inference).

    nice -n 10 .venv/bin/python experiments/mamba/compare.py --dataset digits --arms lmuformer \\
        --seeds 0 1 --workdir /tmp/lmu_stream
    nice -n 10 .venv/bin/python experiments/mamba/lmuformer_prefix.py \\
        /tmp/lmu_stream/digits_lmuformer_s0 /tmp/lmu_stream/digits_lmuformer_s1

Restores each workdir (an ``lmuformer`` or ``spiking_lmuformer`` run of compare.py) and
streams its whole test split through :mod:`effformer.models.lmuformer_stream`, one input
step at a time. For every n (inputs seen, 1 .. L) three accuracies:

* ``stream``: the prediction after n inputs, without waiting: the running mean of the
  per-position logits of the tokens 0 .. n - 1 - delay (delay = 5, the patch embedding's
  look-ahead); before the first token the head's bias.
* ``stopped``: the stream ended after n inputs and flushed (``delay`` ticks of the
  convolutions' right padding, no further input): the parallel model run on the first n
  inputs as a whole sequence.
* ``all_seq``: the official code's sequential evaluation (``test_mode='all_seq'``): the
  running mean of the first n per-position logits of the parallel model on the *whole*
  sequence. Its n counts tokens; token n - 1 has read inputs up to n - 1 + delay, so this
  column sees up to 5 inputs more than n (it equals ``stream`` at n + 5 for n <= L - 5).

Then the smallest n from which on every accuracy is within 1 point of the full-sequence
accuracy (the parallel model on all L inputs), and the sequence length it saves, 1 - n / L
(the paper's "32.03% reduction in sequence length" on Speech Commands, counted as
``all_seq`` counts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from effformer import models
from effformer.data import create_input_pipeline
from effformer.models.lmuformer_stream import stream_delay, stream_predictions
from effformer.train.evaluate import restore

MODES = ("stream", "stopped", "all_seq")


def prefix_accuracies(workdir: Path, batch_size: int = 128) -> dict:
    """Per mode, the test accuracy after n = 1 .. L inputs (or tokens); the full accuracy."""
    run = restore(workdir)
    model, variables = run.model, run.variables
    if not model.__class__.__name__ == "LMUFormer":
        raise ValueError(f"lmuformer_prefix.py: {workdir} holds a {model.__class__.__name__}.")

    @jax.jit
    def predict(inputs):
        stream, stopped = stream_predictions(model, variables, inputs, flush_each_step=True)
        per_position = model.apply(variables, inputs, per_position=True)
        counts = jnp.arange(1, per_position.shape[1] + 1, dtype=per_position.dtype)
        all_seq = jnp.cumsum(per_position, axis=1) / counts[:, None]
        full = model.apply(variables, inputs)
        return {"stream": stream, "stopped": stopped, "all_seq": all_seq}, full

    pipeline = create_input_pipeline(
        run.config.data,
        split=run.experiment.info.eval_split,
        global_batch_size=batch_size,
        train=False,
        seed=run.config.seed,
        process_index=0,
        process_count=1,
    )
    correct, full_correct, total, gap = None, 0.0, 0.0, 0.0
    with pipeline:
        for batch in pipeline:
            labels = np.asarray(batch["label"])
            real = (
                np.asarray(batch["mask"], bool) if "mask" in batch else np.ones(len(labels), bool)
            )
            outputs, full = jax.device_get(predict(batch["inputs"]))
            hits = {
                mode: ((logits.argmax(-1) == labels[:, None]) & real[:, None]).sum(0)
                for mode, logits in outputs.items()
            }
            correct = hits if correct is None else {m: correct[m] + hits[m] for m in MODES}
            full_correct += ((full.argmax(-1) == labels) & real).sum()
            total += real.sum()
            gap = max(gap, float(np.abs(outputs["stopped"][real, -1] - full[real]).max()))
    return {
        "accuracy": {mode: 100 * correct[mode] / total for mode in MODES},
        "full": 100 * full_correct / total,
        "length": len(correct["stream"]),
        "delay": stream_delay(model),
        "examples": int(total),
        "stopped_vs_parallel": gap,  # max |logit difference| of the flushed stream, all inputs
    }


def shortest_within(accuracy: np.ndarray, full: float, points: float = 1.0) -> int | None:
    """The smallest n (1-based) from which on every accuracy is >= full - points (None:
    not even at n = L)."""
    below = np.flatnonzero(accuracy < full - points)
    if below.size and below[-1] == len(accuracy) - 1:
        return None
    return 1 if below.size == 0 else int(below[-1]) + 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdirs", nargs="+", type=Path)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    results = {workdir: prefix_accuracies(workdir, args.batch_size) for workdir in args.workdirs}

    for workdir, r in results.items():
        length = r["length"]
        print(
            f"\n{workdir}: L = {length}, delay = {r['delay']}, {r['examples']} test examples, "
            f"full-sequence accuracy {r['full']:.1f}% (flushed stream vs parallel logits: "
            f"max |difference| {r['stopped_vs_parallel']:.1e})\n"
        )
        print("| n seen | fraction | stream % | stopped % | all_seq (n tokens) % |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        steps = sorted({max(1, round(f * length)) for f in np.arange(1, 11) / 10} | {r["delay"]})
        for n in steps:
            cells = " | ".join(f"{r['accuracy'][mode][n - 1]:.1f}" for mode in MODES)
            print(f"| {n} | {n / length:.0%} | {cells} |")

    print(
        "\nSmallest n from which on the accuracy stays within 1 point of the full-sequence one:\n"
    )
    print("| workdir | L | full % | " + " | ".join(f"{m}: n (saved)" for m in MODES) + " |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in MODES) + " |")
    for workdir, r in results.items():
        cells = []
        for mode in MODES:
            n = shortest_within(r["accuracy"][mode], r["full"])
            cells.append("none" if n is None else f"{n} ({1 - n / r['length']:.1%})")
        print(f"| {workdir.name} | {r['length']} | {r['full']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    models.list_models()  # import the registry before restoring
    main()
