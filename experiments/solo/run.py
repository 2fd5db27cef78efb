"""Train the SOLO digits_vqa arms (experiments/solo/digits_vqa.py) and a CCT, print a table.

    nice -n 10 .venv/bin/python experiments/solo/run.py --seeds 0 1

For each seed and arm, one run of the library's trainer
(``effformer.train.train_and_evaluate``) in ``--workdir/<arm>_seed<seed>``; a
workdir whose run already finished (its metrics.jsonl has the final eval) is
read, not trained again, so arms can be trained by separate processes and the
table printed by a last call. Arms: ``solo`` and ``text_only`` (the config's
ARGs) and ``cct``: the README demo's CCT-2/3x1 digits classifier
(experiments/digits/vit.py, 20 epochs), whose test accuracy is the "what digit"
question's answer from a classifier of similar size.

Prints a Markdown table: per arm, parameters, exact match per question and
overall on the test split (mean over seeds, each seed's value after it),
and the training time per run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import time
from pathlib import Path

import jax

from effformer.data.digits_vqa import QUESTION_TYPES
from effformer.train import train_and_evaluate
from effformer.train.experiment import build_experiment

HERE = Path(__file__).resolve().parent
ARMS = ("solo", "text_only", "cct")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"solo_run_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arm_config(arm: str, seed: int):
    if arm == "cct":
        config = _load(HERE.parent / "digits" / "vit.py").get_config()
        config.progress_bar = False
    else:
        config = _load(HERE / "digits_vqa.py").get_config(arm)
    config.seed = seed
    return config


def final_eval(workdir: Path) -> dict[str, float] | None:
    """The last eval line of a finished run's metrics.jsonl, or None."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    evals = [json.loads(line) for line in path.read_text().splitlines() if '"eval"' in line]
    return evals[-1] if evals else None


def count_params(config) -> int:
    exp = build_experiment(config)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(exp.abstract_state.params))


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ({', '.join(f'{100 * v:.1f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--workdir", default="/tmp/solo_digits_vqa")
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {arm: [] for arm in args.arms}
    for seed in args.seeds:
        for arm in args.arms:
            workdir = Path(args.workdir) / f"{arm}_seed{seed}"
            if final_eval(workdir) is not None:
                continue
            start = time.perf_counter()
            result = train_and_evaluate(arm_config(arm, seed), workdir)
            seconds[arm].append(time.perf_counter() - start)
            (workdir / "seconds.txt").write_text(f"{seconds[arm][-1]:.0f}\n")
            print(f"seed {seed} {arm}: {seconds[arm][-1]:.0f} s, eval {result['eval']}", flush=True)

    print(f"\nseeds {args.seeds}; load average {os.getloadavg()[0]:.1f} at the end")
    columns = [f"exact_match/{q}" for q in QUESTION_TYPES] + ["exact_match"]
    print("\n| arm | params | " + " | ".join(QUESTION_TYPES) + " | all | seconds/run |")
    print("| --- | ---: | " + " | ".join("---:" for _ in columns) + " | ---: |")
    for arm in args.arms:
        evals, times = [], []
        for seed in args.seeds:
            workdir = Path(args.workdir) / f"{arm}_seed{seed}"
            metrics = final_eval(workdir)
            if metrics is not None:
                evals.append(metrics)
                if (workdir / "seconds.txt").exists():
                    times.append(float((workdir / "seconds.txt").read_text()))
        if arm == "cct":  # a classifier: its accuracy answers "what digit" only
            cells = [_cell([m["accuracy"] for m in evals])] + ["-"] * (len(columns) - 1)
        else:
            cells = [_cell([m[c] for m in evals]) for c in columns]
        params = count_params(arm_config(arm, 0))
        wall = f"{statistics.mean(times):.0f}" if times else "-"
        print(f"| {arm} | {params:,} | " + " | ".join(cells) + f" | {wall} |")


if __name__ == "__main__":
    main()
