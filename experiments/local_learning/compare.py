"""Every arm of experiments/local_learning/digits.py for several seeds, one Markdown table.

    nice -n 10 .venv/bin/python experiments/local_learning/compare.py --seeds 0 1 \
        [--arms e2e k2_features ...] [--workdir DIR] [--epochs 20] [--schedule sequential]

Prints, per arm: parameters trained, test accuracy of the network's output (mean
and each seed) and of each auxiliary classifier, and the wall time per run. ``--schedule`` sets the local arms'
``config.task.local_schedule`` (``joint``: one ``jax.grad`` of the summed local
losses, the default; ``sequential``: module by module, less memory, the same
updates). Each
run's result is also appended to ``<workdir>/results.jsonl`` as it finishes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

from effformer.train import train_and_evaluate


def _config_module():
    path = Path(__file__).with_name("digits.py")
    spec = importlib.util.spec_from_file_location("local_learning_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_one(
    arm: str, seed: int, workdir: Path, epochs: float | None, schedule: str = "joint"
) -> dict:
    config = _config_module().get_config(arm)
    config.seed = seed
    if config.task.name == "local_learning":
        config.task.local_schedule = schedule
    if epochs is not None:
        config.num_epochs = epochs
    start = time.perf_counter()
    result = train_and_evaluate(config, workdir)
    metrics = result["eval"]
    return {
        "arm": arm,
        "seed": seed,
        "accuracy": metrics["accuracy"],
        "aux_accuracy": {
            name.split("/")[0]: value
            for name, value in sorted(metrics.items())
            if name.endswith("/accuracy")
        },
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arms", nargs="+", default=list(_config_module().ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--schedule", choices=("joint", "sequential"), default="joint")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="local_learning_"))
    root.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for arm in args.arms:
            run = run_one(arm, seed, root / f"{arm}_s{seed}", args.epochs, args.schedule)
            runs.setdefault(arm, []).append(run)
            with open(root / "results.jsonl", "a") as f:
                f.write(json.dumps(run) + "\n")
            print(json.dumps(run), flush=True)
    print()
    print("| arm | test accuracy % (mean) | per seed | auxiliary heads % (mean) | wall s/run |")
    print("| --- | ---: | --- | --- | ---: |")
    for arm, arm_runs in runs.items():
        accuracies = [100 * r["accuracy"] for r in arm_runs]
        heads = sorted(arm_runs[0]["aux_accuracy"])
        aux = ", ".join(
            f"{head}: {statistics.mean(100 * r['aux_accuracy'][head] for r in arm_runs):.1f}"
            for head in heads
        )
        print(
            f"| {arm} | {statistics.mean(accuracies):.1f} | "
            f"{', '.join(f'{a:.1f}' for a in accuracies)} | {aux or '-'} | "
            f"{statistics.median(r['wall_s'] for r in arm_runs):.0f} |"
        )


if __name__ == "__main__":
    main()
