"""CCT vs ViT-Lite on digits, several seeds: the CCT paper's central comparison at CPU scale.

    .venv/bin/python experiments/cct/compare.py --seeds 0 1 2 [--workdir DIR] [--epochs 40]

Trains both arms of experiments/cct/digits.py for each seed and prints one
Markdown table: parameters, test accuracy (mean ± std over seeds, and each
seed), training examples/s (median over seeds, after the first 5 steps).
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


def _config_module():
    path = Path(__file__).with_name("digits.py")
    spec = importlib.util.spec_from_file_location("cct_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_one(arm: str, seed: int, workdir: Path, epochs: float | None) -> dict:
    config = _config_module().get_config(arm)
    config.seed = seed
    if epochs is not None:
        config.num_epochs = epochs
    times: list[tuple[int, float]] = []
    result = train_and_evaluate(
        config, workdir, on_step=lambda step, _: times.append((step, time.perf_counter()))
    )
    (first_step, first), (last_step, last) = times[min(5, len(times) - 1)], times[-1]
    rate = (last_step - first_step) * config.global_batch_size / max(last - first, 1e-9)
    return {"accuracy": result["eval"]["accuracy"], "examples_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arms", nargs="+", default=["cct", "vit_lite"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="cct_compare_"))
    rows = []
    for arm in args.arms:
        runs = [run_one(arm, seed, root / f"{arm}_s{seed}", args.epochs) for seed in args.seeds]
        name, kwargs = _config_module().MODELS[arm]
        model = models.create(name, image_size=8, num_channels=1, num_classes=10, **kwargs)
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), **m.dummy_inputs(1)))
        accuracies = [100 * r["accuracy"] for r in runs]
        rows.append(
            (
                arm,
                sum(x.size for x in jax.tree.leaves(shapes["params"])),
                statistics.mean(accuracies),
                statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                accuracies,
                statistics.median(r["examples_per_s"] for r in runs),
            )
        )
        print(f"{arm}: {accuracies}", flush=True)
    print()
    print("| model | params | test accuracy % (mean ± std) | per seed | train examples/s |")
    print("| --- | ---: | ---: | --- | ---: |")
    for arm, params, mean, std, accs, rate in rows:
        per_seed = ", ".join(f"{a:.1f}" for a in accs)
        print(f"| {arm} | {params:,} | {mean:.1f} ± {std:.1f} | {per_seed} | {rate:.0f} |")


if __name__ == "__main__":
    main()
