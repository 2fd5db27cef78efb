"""Train ViT at several patch sizes and seeds on digits; print accuracy and examples/s.

    .venv/bin/python experiments/patch_scaling/run.py --patch-sizes 4 2 1 --seeds 0 1 2 \
        [--workdir /tmp/patch_scaling] [--epochs 40]

Prints one Markdown table: per patch size, tokens, parameters, test accuracy
(mean ± std over seeds, and each seed), and training examples/s (median over
seeds, measured after the first 5 steps so compilation is excluded).
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


def _load_config(patch_size: int):
    path = Path(__file__).with_name("digits.py")
    spec = importlib.util.spec_from_file_location("patch_scaling_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(str(patch_size))


def run_one(patch_size: int, seed: int, workdir: Path, epochs: float | None) -> dict:
    config = _load_config(patch_size)
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
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[4, 2, 1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="patch_scaling_"))
    rows = []
    for patch_size in args.patch_sizes:
        runs = [
            run_one(patch_size, seed, root / f"p{patch_size}_s{seed}", args.epochs)
            for seed in args.seeds
        ]
        model = models.create("vit_digits", patch_size=patch_size)
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), **m.dummy_inputs(1)))
        accuracies = [100 * r["accuracy"] for r in runs]
        rows.append(
            (
                patch_size,
                model.sequence_length,
                sum(x.size for x in jax.tree.leaves(shapes["params"])),
                statistics.mean(accuracies),
                statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                accuracies,
                statistics.median(r["examples_per_s"] for r in runs),
            )
        )
        print(f"patch {patch_size}: {accuracies}", flush=True)
    print()
    print(
        "| patch | tokens (incl. class) | params | test accuracy % (mean ± std) | per seed | train examples/s |"
    )
    print("| ---: | ---: | ---: | ---: | --- | ---: |")
    for patch, tokens, params, mean, std, accs, rate in rows:
        per_seed = ", ".join(f"{a:.1f}" for a in accs)
        print(
            f"| {patch} | {tokens} | {params:,} | {mean:.1f} ± {std:.1f} | {per_seed} | {rate:.0f} |"
        )


if __name__ == "__main__":
    main()
