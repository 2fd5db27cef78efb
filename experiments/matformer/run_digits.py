"""Run the MatFormer digits comparison (experiments/matformer/digits.py) and print tables.

    nice -n 10 .venv/bin/python experiments/matformer/run_digits.py --seeds 0

For each seed: the ``joint`` MatLM (FFN 256 trained over widths 32, 64, 128,
256) and the four ``alone_W`` models are trained with the library's trainer
(``effformer.train.train_and_evaluate``), each in a fresh workdir under
``--workdir``. The joint run's final evaluation gives the test bits/dim of
each granularity; then the joint model is restored from its workdir and
evaluated at Mix'n'Match per-layer widths (``evaluate_ffn_widths``): the
increasing configurations ``mix_n_match_widths`` picks for budgets between the
granularities, and the same widths in decreasing order, for comparison.

Prints Markdown tables: per granularity, the sub-model's parameters and the
test bits/dim of the joint model at that width and of the model trained alone;
per Mix'n'Match configuration, its parameters and test bits/dim. Values are
means over seeds (each seed's value after it).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import jax

from effformer.models.lm_layers import mix_n_match_widths
from effformer.train import restore, train_and_evaluate
from effformer.train.experiment import build_experiment
from effformer.train.tasks import evaluate_ffn_widths, granularity_label


def _digits_config_module():
    path = Path(__file__).with_name("digits.py")
    spec = importlib.util.spec_from_file_location("matformer_experiments_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bits(nats: float) -> float:
    return nats / math.log(2)


def count_params(config) -> int:
    exp = build_experiment(config)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(exp.abstract_state.params))


def sub_model_params(full_params: int, full_width: int, widths: tuple[int, ...], dim: int) -> int:
    """Parameters of the sub-model at per-layer ``widths``: each layer drops ``full_width - w``
    hidden units, each with a column of W1, its bias and a row of W2."""
    return full_params - sum((2 * dim + 1) * (full_width - width) for width in widths)


def train(config, workdir: Path, steps: int | None) -> tuple[dict[str, float], float]:
    if workdir.exists():
        shutil.rmtree(workdir)
    if steps is not None:  # a shorter run (a smoke test) keeps a tenth of it for warm-up
        config.num_train_steps = steps
        config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
    start = time.perf_counter()
    result = train_and_evaluate(config, workdir)
    return result["eval"], time.perf_counter() - start


def _row(values: list[float]) -> str:
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    return f"{mean:.4f} ({', '.join(f'{value:.4f}' for value in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=None, help="override num_train_steps")
    parser.add_argument("--workdir", default="/tmp/matformer_digits")
    args = parser.parse_args()
    digits = _digits_config_module()
    sizes = digits.GRANULARITIES
    num_layers = digits.get_config("joint").model.kwargs.num_layers
    dim = digits.get_config("joint").model.kwargs.embed_dim
    # Mix'n'Match: the heuristic's pick halfway between neighbouring granularities, and the
    # same widths in decreasing order.
    budgets = [num_layers * (small + large) // 2 for small, large in itertools.pairwise(sizes)]
    increasing = [mix_n_match_widths(sizes, num_layers, budget) for budget in budgets]
    mixes = [w for widths in increasing for w in (widths, tuple(reversed(widths)))]

    joint_bits = {width: [] for width in sizes}
    alone_bits = {width: [] for width in sizes}
    mix_bits = {widths: [] for widths in mixes}
    seconds = {arm: [] for arm in digits.ARMS}
    for seed in args.seeds:
        for arm in digits.ARMS:
            config = digits.get_config(arm)
            config.seed = seed
            metrics, elapsed = train(config, Path(args.workdir) / f"{arm}_seed{seed}", args.steps)
            seconds[arm].append(elapsed)
            if arm == "joint":
                for width in sizes:
                    joint_bits[width].append(_bits(metrics[f"{granularity_label(width)}/loss"]))
            else:
                alone_bits[int(arm.removeprefix("alone_"))].append(_bits(metrics["loss"]))
            print(f"seed {seed} {arm}: {elapsed:.0f} s, eval {metrics}", flush=True)
        run = restore(Path(args.workdir) / f"joint_seed{seed}")
        results = evaluate_ffn_widths(run.experiment, run.params, mixes)
        for widths in mixes:
            mix_bits[widths].append(_bits(results[granularity_label(widths)]["loss"]))
        print(f"seed {seed} Mix'n'Match: {results}", flush=True)

    full_params = count_params(digits.get_config("joint"))
    steps = args.steps or digits.get_config("joint").num_train_steps
    print(
        f"\n{steps} steps, batch 32, seeds {args.seeds}; load average "
        f"{os.getloadavg()[0]:.1f} at the end; train+eval seconds per run (mean): "
        + ", ".join(f"{arm} {statistics.mean(values):.0f}" for arm, values in seconds.items())
    )
    print("\n| FFN width (every layer) | params | joint: test bits/dim | alone: test bits/dim |")
    print("| --- | ---: | ---: | ---: |")
    for width in sizes:
        params = sub_model_params(full_params, sizes[-1], (width,) * num_layers, dim)
        alone = count_params(digits.get_config(f"alone_{width}"))
        assert alone == params, (alone, params)  # the sub-model is the small model, exactly
        print(f"| {width} | {params:,} | {_row(joint_bits[width])} | {_row(alone_bits[width])} |")
    print("\n| Mix'n'Match widths (layer 0, 1, ...) | order | params | joint: test bits/dim |")
    print("| --- | --- | ---: | ---: |")
    for widths in mixes:
        order = "increasing (heuristic)" if widths in increasing else "decreasing"
        params = sub_model_params(full_params, sizes[-1], widths, dim)
        print(
            f"| {', '.join(map(str, widths))} | {order} | {params:,} | {_row(mix_bits[widths])} |"
        )


if __name__ == "__main__":
    main()
