"""Run the iLLaMA digits ablation (experiments/illama/digits.py): every arm, several seeds.

    .venv/bin/python experiments/illama/ablation.py --arms a b c d a_strict --seeds 0 1 2

Prints one row per run as it finishes, then a Markdown table of test accuracy
(mean, sample standard deviation, min-max over seeds) per arm.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from effformer.train import train_and_evaluate
from effformer.train.config import load_config_file

CONFIG = Path(__file__).with_name("digits.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=["a", "b", "c", "d", "a_strict"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num_epochs", type=float, default=None, help="override the config")
    args = parser.parse_args()

    results: dict[str, list[float]] = {}
    for arm in args.arms:
        for seed in args.seeds:
            config = load_config_file(f"{CONFIG}:{arm}")
            config.seed = seed
            config.mesh.num_devices = 1
            if args.num_epochs:
                config.num_epochs = args.num_epochs
            start = time.time()
            with tempfile.TemporaryDirectory() as workdir:
                result = train_and_evaluate(config, workdir)
            accuracy = float(result["eval"]["accuracy"])
            results.setdefault(arm, []).append(accuracy)
            print(
                f"arm={arm} seed={seed} accuracy={accuracy:.4f} seconds={time.time() - start:.0f}",
                flush=True,
            )

    print("\n| arm | test accuracy, mean ± std | min - max | seeds |")
    print("| --- | --- | --- | --- |")
    for arm, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(
            f"| {arm} | {100 * statistics.mean(values):.1f} ± {100 * spread:.1f} "
            f"| {100 * min(values):.1f} - {100 * max(values):.1f} | {len(values)} |"
        )


if __name__ == "__main__":
    main()
