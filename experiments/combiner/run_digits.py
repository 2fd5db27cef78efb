"""Run the digits density-modelling grid (experiments/combiner/digits.py) and print a table.

    nice -n 10 .venv/bin/python experiments/combiner/run_digits.py --seeds 0 1 2

Every arm (full attention and the four Combiner variants) is trained with the
library's trainer (``effformer.train.train_and_evaluate``) for each seed, in a
fresh workdir under ``--workdir``; the final evaluation on the 360 test images
gives the test NLL per pixel, reported in bits per dimension. Prints a
Markdown table: bits/dim mean ± sample std over seeds and per seed, the last
logged train loss in bits/dim (one batch; mean over seeds), parameters, and
training throughput (examples/s after the first step, which includes
compilation; median over seeds); then the bits/dim of a no-context reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from effformer.train import train_and_evaluate
from effformer.train.experiment import build_experiment


def _digits_config_module():
    path = Path(__file__).with_name("digits.py")
    spec = importlib.util.spec_from_file_location("combiner_experiments_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_one(config, workdir: Path) -> dict[str, float]:
    """Train and evaluate ``config`` in a fresh ``workdir``; bits/dim, params, examples/s."""
    if workdir.exists():
        shutil.rmtree(workdir)
    step_times: list[float] = []

    def on_step(step: int, metrics: dict[str, float]) -> None:
        del step, metrics
        step_times.append(time.perf_counter())

    result = train_and_evaluate(config, workdir, on_step=on_step)
    exp = build_experiment(config)
    params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(exp.abstract_state.params))
    timed_steps = len(step_times) - 1  # The first step includes compilation.
    examples_per_s = timed_steps * config.global_batch_size / (step_times[-1] - step_times[0])
    return {
        "test_bits": result["eval"]["loss"] / math.log(2),
        "train_bits": result["train"]["loss"] / math.log(2),
        "params": params,
        "examples_per_s": examples_per_s,
    }


def independent_pixels_bits() -> float:
    """Test bits/dim of a model with no context: each position's pixel histogram over the
    training images (add-one smoothing), the floor any useful model must beat."""
    from effformer.data.digits_pixels import DATASET, PIXEL_LEVELS, SEQUENCE_LENGTH

    def pixels(split: str) -> np.ndarray:
        count = DATASET.info.splits[split]
        return np.stack([DATASET.example(split, i)["targets"] for i in range(count)])

    train, test = pixels("train"), pixels("test")
    counts = np.ones((SEQUENCE_LENGTH, PIXEL_LEVELS))
    for position in range(SEQUENCE_LENGTH):
        counts[position] += np.bincount(train[:, position], minlength=PIXEL_LEVELS)
    probabilities = counts / counts.sum(axis=1, keepdims=True)
    return float(-np.log2(probabilities[np.arange(SEQUENCE_LENGTH), test]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    digits = _digits_config_module()
    parser.add_argument("--arms", nargs="+", default=list(digits.ARMS), choices=digits.ARMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="override num_train_steps")
    parser.add_argument("--workdir", default="/tmp/combiner_digits")
    args = parser.parse_args()

    rows = []
    for arm in args.arms:
        runs = []
        for seed in args.seeds:
            config = digits.get_config(arm)
            config.seed = seed
            if args.steps is not None:
                config.num_train_steps = args.steps
            start = time.perf_counter()
            run = run_one(config, Path(args.workdir) / f"{arm}_seed{seed}")
            print(
                f"{arm} seed {seed}: test {run['test_bits']:.4f} bits/dim, "
                f"{run['examples_per_s']:.0f} examples/s, {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            runs.append(run)
        bits = [run["test_bits"] for run in runs]
        spread = statistics.stdev(bits) if len(bits) > 1 else float("nan")
        rows.append(
            f"| {arm} | {runs[0]['params']:,} | {np.mean(bits):.4f} ± {spread:.4f} | "
            + ", ".join(f"{b:.4f}" for b in bits)
            + f" | {np.mean([run['train_bits'] for run in runs]):.3f}"
            + f" | {statistics.median(run['examples_per_s'] for run in runs):.0f} |"
        )
    config = digits.get_config(args.arms[0])
    steps = args.steps or config.num_train_steps
    print(
        f"\n{steps} steps, batch {config.global_batch_size}, seeds {args.seeds}, "
        f"load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    print(
        "| model | params | test bits/dim (mean ± std) | per seed | last train batch bits/dim "
        "| train examples/s |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    print("\n".join(rows))
    print(
        f"\nNo-context reference (per-position pixel histogram of the training images): "
        f"{independent_pixels_bits():.4f} bits/dim on the test images."
    )


if __name__ == "__main__":
    main()
