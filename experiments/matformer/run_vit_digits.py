"""Run the MatViT digits comparison (experiments/matformer/vit_digits.py) and print tables.

    nice -n 10 .venv/bin/python experiments/matformer/run_vit_digits.py --seeds 0 1

For each seed: the ``joint`` MatViT (a CCT with MLP width 256 = 4d trained over
widths 32, 64, 128, 256) and the four ``alone_W`` models are trained with the
library's trainer (``effformer.train.train_and_evaluate``), each in a fresh
workdir under ``--workdir``. The joint run's final evaluation gives the test
accuracy and cross-entropy of each granularity; then the joint model is
restored from its workdir and evaluated at Mix'n'Match per-layer widths
(``evaluate_ffn_widths``): the increasing configurations ``mix_n_match_widths``
picks for budgets halfway between neighbouring granularities, and the same
widths in decreasing order, for comparison (as run_digits.py does for the MatLM).

Prints Markdown tables: per granularity, the sub-model's parameters and the test
accuracy (%) and cross-entropy (nats) of the joint model at that width and of
the model trained alone; per Mix'n'Match configuration, its parameters and the
joint model's test accuracy and cross-entropy. Values are means over seeds
(each seed's value after it).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import statistics
from pathlib import Path

from effformer.models.lm_layers import mix_n_match_widths
from effformer.train import restore
from effformer.train.tasks import evaluate_ffn_widths, granularity_label


def _sibling(name: str):
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"matformer_experiments_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(values: list[float], scale: float = 1.0, digits: int = 4) -> str:
    values = [value * scale for value in values]
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({', '.join(f'{value:.{digits}f}' for value in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument("--workdir", default="/tmp/matvit_digits")
    args = parser.parse_args()
    vit_digits = _sibling("vit_digits")
    # The MatLM script's helpers: training in a fresh workdir, parameter counts.
    lm_run = _sibling("run_digits")
    sizes = vit_digits.GRANULARITIES
    dim = vit_digits.EMBED_DIM
    num_layers = 2  # cct_2_3x2
    # Mix'n'Match: the heuristic's pick halfway between neighbouring granularities, and the
    # same widths in decreasing order.
    budgets = [num_layers * (small + large) // 2 for small, large in itertools.pairwise(sizes)]
    increasing = [mix_n_match_widths(sizes, num_layers, budget) for budget in budgets]
    mixes = [w for widths in increasing for w in (widths, tuple(reversed(widths)))]

    joint = {width: {"accuracy": [], "loss": []} for width in sizes}
    alone = {width: {"accuracy": [], "loss": []} for width in sizes}
    mixed = {widths: {"accuracy": [], "loss": []} for widths in mixes}
    seconds = {arm: [] for arm in vit_digits.ARMS}
    for seed in args.seeds:
        for arm in vit_digits.ARMS:
            config = vit_digits.get_config(arm)
            config.seed = seed
            if args.steps is not None:  # a smoke test: steps instead of epochs
                config.num_epochs = 0.0
            workdir = Path(args.workdir) / f"{arm}_seed{seed}"
            metrics, elapsed = lm_run.train(config, workdir, args.steps)
            seconds[arm].append(elapsed)
            for metric in ("accuracy", "loss"):
                if arm == "joint":
                    for width in sizes:
                        joint[width][metric].append(metrics[f"{granularity_label(width)}/{metric}"])
                else:
                    alone[int(arm.removeprefix("alone_"))][metric].append(metrics[metric])
            print(f"seed {seed} {arm}: {elapsed:.0f} s, eval {metrics}", flush=True)
        run = restore(Path(args.workdir) / f"joint_seed{seed}")
        results = evaluate_ffn_widths(run.experiment, run.params, mixes)
        for widths in mixes:
            for metric in ("accuracy", "loss"):
                mixed[widths][metric].append(results[granularity_label(widths)][metric])
        print(f"seed {seed} Mix'n'Match: {results}", flush=True)

    full_params = lm_run.count_params(vit_digits.get_config("joint"))
    print(
        f"\nseeds {args.seeds}; load average {os.getloadavg()[0]:.1f} at the end; "
        "train+eval seconds per run (mean): "
        + ", ".join(f"{arm} {statistics.mean(values):.0f}" for arm, values in seconds.items())
    )
    print(
        "\n| MLP width (every layer) | params | joint: test acc % | alone: test acc % "
        "| joint: test CE | alone: test CE |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for width in sizes:
        params = lm_run.sub_model_params(full_params, sizes[-1], (width,) * num_layers, dim)
        alone_params = lm_run.count_params(vit_digits.get_config(f"alone_{width}"))
        assert alone_params == params, (alone_params, params)  # the sub-model is the small model
        print(
            f"| {width} | {params:,} | {_row(joint[width]['accuracy'], 100, 2)} "
            f"| {_row(alone[width]['accuracy'], 100, 2)} | {_row(joint[width]['loss'])} "
            f"| {_row(alone[width]['loss'])} |"
        )
    print(
        "\n| Mix'n'Match widths (layer 0, 1) | order | params | joint: test acc % "
        "| joint: test CE |"
    )
    print("| --- | --- | ---: | ---: | ---: |")
    for widths in mixes:
        order = "increasing (heuristic)" if widths in increasing else "decreasing"
        params = lm_run.sub_model_params(full_params, sizes[-1], widths, dim)
        print(
            f"| {', '.join(map(str, widths))} | {order} | {params:,} "
            f"| {_row(mixed[widths]['accuracy'], 100, 2)} | {_row(mixed[widths]['loss'])} |"
        )


if __name__ == "__main__":
    main()
