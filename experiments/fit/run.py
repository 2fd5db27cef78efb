"""FIT vs ViT on digits, several seeds at the same budget; prints a Markdown table.

    nice -n 10 .venv/bin/python experiments/fit/run.py --arms fit vit --seeds 0 1 2 \
        [--workdir /tmp/fit_digits_runs] [--epochs 10]

Each arm is an argument of ``experiments/fit/digits.py:get_config`` (the two
models, the data and the optimiser are set there; only ``seed`` and, if given,
``num_epochs`` change here). Every run goes through ``train_and_evaluate``.
Columns: parameters, test accuracy (mean ± sample std over seeds, and each
seed), training examples/s (median over seeds, measured from the 6th step on
so that compilation is excluded) and wall time of the whole run (median).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax

from effformer import models
from effformer.train import train_and_evaluate

DIGITS_CONFIG = Path(__file__).with_name("digits.py")


def load_config(arm: str):
    """``experiments/fit/digits.py:get_config(arm)`` (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location("fit_digits_config", DIGITS_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arm)


def count_params(config) -> int:
    model = models.create(
        config.model.name, num_classes=10, image_size=8, num_channels=1, **config.model.kwargs
    )
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs(1)))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def run_one(arm: str, seed: int, workdir: Path, epochs: float | None) -> dict:
    config = load_config(arm)
    config.seed = seed
    if epochs is not None:
        config.num_epochs = epochs
    stamps: list[tuple[int, float]] = []
    start = time.perf_counter()
    result = train_and_evaluate(
        config, workdir, on_step=lambda step, _: stamps.append((step, time.perf_counter()))
    )
    wall = time.perf_counter() - start
    (first_step, first), (last_step, last) = stamps[min(5, len(stamps) - 1)], stamps[-1]
    rate = (last_step - first_step) * config.global_batch_size / max(last - first, 1e-9)
    return {
        "accuracy": 100 * result["eval"]["accuracy"],
        "examples_per_s": rate,
        "steps": result["step"],
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=["fit", "vit"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="fit_digits_"))
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rows = []
    for arm in args.arms:
        runs = [run_one(arm, seed, root / f"{arm}_s{seed}", args.epochs) for seed in args.seeds]
        accuracies = [r["accuracy"] for r in runs]
        print(f"{arm}: accuracies {accuracies}", flush=True)
        rows.append((arm, load_config(arm), runs, accuracies))
    print(f"load average at end: {os.getloadavg()}\n")
    print(
        "| arm | model | params | steps | test accuracy % (mean ± std) | per seed "
        "| train examples/s | run wall (s) |"
    )
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for arm, config, runs, accuracies in rows:
        std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        per_seed = ", ".join(f"{a:.1f}" for a in accuracies)
        rate = statistics.median(r["examples_per_s"] for r in runs)
        wall = statistics.median(r["wall_s"] for r in runs)
        print(
            f"| {arm} | {config.model.name} | {count_params(config):,} | {runs[0]['steps']} | "
            f"{statistics.mean(accuracies):.1f} ± {std:.1f} | {per_seed} | {rate:.0f} | "
            f"{wall:.0f} |"
        )


if __name__ == "__main__":
    main()
