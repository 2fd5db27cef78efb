"""Train both arms of mnist1d_config.py / digits_config.py for several seeds; print one Markdown table.

    .venv/bin/python experiments/mamba/compare.py --dataset mnist1d --seeds 0 1 2 [--steps N]

Columns: parameters, test accuracy (mean ± sample std over seeds, and each
seed), median seconds per train step after the first 10 (this machine, at
the time of the run; see `uptime` load in the README).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import jax

from effformer import models
from effformer.train import train_and_evaluate
from effformer.train.experiment import build_experiment


def _config_module(dataset: str):
    path = Path(__file__).with_name(f"{dataset}_config.py")
    spec = importlib.util.spec_from_file_location(f"mamba_experiments_{dataset}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_one(dataset: str, arm: str, seed: int, workdir: Path, steps: int | None) -> dict:
    config = _config_module(dataset).get_config(arm)
    config.seed = seed
    config.progress_bar = False
    if steps is not None:
        config.num_train_steps = steps
    stamps: list[float] = []
    result = train_and_evaluate(
        config, workdir, on_step=lambda *_: stamps.append(time.perf_counter())
    )
    step_times = [b - a for a, b in zip(stamps[10:], stamps[11:], strict=False)]
    exp = build_experiment(config)
    params = sum(x.size for x in jax.tree.leaves(exp.abstract_state.params))
    return {
        "accuracy": result["eval"]["accuracy"],
        "step_s": statistics.median(step_times),
        "params": params,
        "model": config.model.name,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", choices=["mnist1d", "digits"], default="mnist1d")
    parser.add_argument("--arms", nargs="+", default=["mamba", "transformer"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="mamba_compare_"))
    print(
        f"| {args.dataset} arm | model | params | test accuracy (mean ± std) | per seed | s/step |"
    )
    print("| --- | --- | ---: | ---: | --- | ---: |")
    for arm in args.arms:
        runs = [
            run_one(args.dataset, arm, seed, root / f"{args.dataset}_{arm}_s{seed}", args.steps)
            for seed in args.seeds
        ]
        accuracies = [100 * r["accuracy"] for r in runs]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        step_s = statistics.median(r["step_s"] for r in runs)
        print(
            f"| {arm} | {runs[0]['model']} | {runs[0]['params']:,} | "
            f"{statistics.mean(accuracies):.1f} ± {spread:.1f} | "
            f"{', '.join(f'{a:.1f}' for a in accuracies)} | {step_s:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    models.list_models()  # import the registry before the configs register the baseline
    main()
