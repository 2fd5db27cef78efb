"""Run the TinyFusion digits comparison (experiments/tinyfusion/digits.py) and print tables.

    nice -n 10 .venv/bin/python experiments/tinyfusion/run_digits.py --seeds 0 1

For each seed, with the library's trainer, each run in a fresh workdir under
``--workdir``:

1. ``dense``: the 8-layer pixel LM;
2. ``search`` (and, with ``--ablate``, ``search_full`` and ``search_frozen``):
   TinyFusion's 2:4 search started from it; its kept layers are each group's
   most probable candidate (``TinyFusionLM.selected_layers``);
3. the baselines' choices of 4 layers, from the dense model's loss on the
   training images (the calibration data) with layers gated off
   (``effformer.train.depth_pruning.layer_gate_losses``; the first
   ``CALIBRATION_BATCHES`` x 32 = 256 training images, in the split's order):
   * ``first half``: layers 0-3;
   * ``importance``: remove the 4 layers whose removal alone raises the
     calibration loss least (sensitivity analysis, as ShortGPT-style scores);
   * ``min loss 2:4``: the 2:4 mask (one of 36) of least calibration loss, the
     paper's "minimise the loss right after pruning" principle in the same
     search space as TinyFusion;
   * ``random 2:4``: a uniformly random 2:4 mask (numpy seed = the seed);
4. every choice is exported as a pruned 4-layer run (``export_pruned_run``),
   scored on the test images as it is (checked equal to the dense model with the
   other layers gated off), then fine-tuned with the same budgets (``finetune``,
   30 steps, and ``finetune_long``, 150 steps, each from the pruned model) and
   scored again. Choices that pick the same layers share their fine-tuning runs.

Prints Markdown tables: per seed and arm, the kept layers, the calibration
bits/dim right after pruning, and the test bits/dim before and after each
fine-tuning; then the means over seeds.
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
import numpy as np

from effformer.train import evaluate, restore, train_and_evaluate
from effformer.train.depth_pruning import (
    candidate_masks,
    export_pruned_run,
    layer_gate_losses,
)


def _digits_config_module():
    path = Path(__file__).with_name("digits.py")
    spec = importlib.util.spec_from_file_location("tinyfusion_experiments_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DIGITS = _digits_config_module()
CALIBRATION_BATCHES = 8  # x the eval batch size (32): 256 of the 1,437 training images
FINETUNES = ("finetune", "finetune_long")  # the fine-tuning budgets (digits.py ARGs)
SEARCHES = {
    "search": "TinyFusion (LoRA)",
    "search_full": "TinyFusion (full)",
    "search_frozen": "TinyFusion (frozen)",
}


def _bits(nats: float) -> float:
    return nats / math.log(2)


def _config(arg: str, seed: int, steps: int | None, init_from: Path | None = None):
    config = DIGITS.get_config(arg)
    config.seed = seed
    if steps is not None:  # a shorter run (a smoke test)
        config.num_train_steps = steps
        config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
        if "gumbel_temperature" in config.model_schedules:
            config.model_schedules.gumbel_temperature.cutoff_steps = steps
    if init_from is not None:
        config.init_from.workdir = str(init_from)
    return config


KEEP_EXISTING = False  # --keep-existing: resume runs already in --workdir instead of redoing them


def _train(config, workdir: Path) -> tuple[dict[str, float], float]:
    if workdir.exists() and not KEEP_EXISTING:
        shutil.rmtree(workdir)
    start = time.perf_counter()
    result = train_and_evaluate(config, workdir)
    return result["eval"], time.perf_counter() - start


def _gates(keep: tuple[int, ...], num_layers: int) -> np.ndarray:
    gates = np.zeros(num_layers, np.float32)
    gates[list(keep)] = 1.0
    return gates


def all_group_masks() -> list[tuple[int, ...]]:
    """Every 2:4 choice of kept layers of the 8-layer model (36)."""
    candidates = candidate_masks(DIGITS.KEEP, DIGITS.GROUP_SIZE)
    groups = DIGITS.NUM_LAYERS // DIGITS.GROUP_SIZE
    choices = []
    for rows in itertools.product(range(len(candidates)), repeat=groups):
        choices.append(
            tuple(
                group * DIGITS.GROUP_SIZE + int(i)
                for group, row in enumerate(rows)
                for i in np.flatnonzero(candidates[row])
            )
        )
    return choices


def run_seed(seed: int, root: Path, steps: dict[str, int | None], searches: list[str]) -> dict:
    """All arms of one seed: {arm: {keep, calibration, before, after}}, plus timings."""
    layers = DIGITS.NUM_LAYERS
    kept = layers * DIGITS.KEEP // DIGITS.GROUP_SIZE
    dense_dir = root / f"seed{seed}" / "dense"
    dense_eval, seconds = _train(_config("dense", seed, steps["dense"]), dense_dir)
    timings = {"dense": seconds}
    print(f"seed {seed} dense: {seconds:.0f} s, test bits/dim {_bits(dense_eval['loss']):.4f}")

    choices: dict[str, tuple[int, ...]] = {}
    probabilities = {}
    for search in searches:
        config = _config(search, seed, steps["search"], init_from=dense_dir)
        metrics, seconds = _train(config, root / f"seed{seed}" / search)
        timings[search] = seconds
        run = restore(root / f"seed{seed}" / search)
        choices[SEARCHES[search]] = run.model.selected_layers(run.params)
        probabilities[SEARCHES[search]] = np.asarray(run.model.probabilities(run.params))
        print(
            f"seed {seed} {search}: {seconds:.0f} s, keeps {choices[SEARCHES[search]]}, "
            f"candidate probabilities {np.round(probabilities[SEARCHES[search]], 3).tolist()}, "
            f"eval (selected mask, weight update on) bits/dim {_bits(metrics['loss']):.4f}",
            flush=True,
        )

    # Calibration losses of the dense model on the training images.
    dense = restore(dense_dir)
    train_split = dense.experiment.info.train_split
    test_split = dense.experiment.info.eval_split
    start = time.perf_counter()
    singles = [tuple(i for i in range(layers) if i != drop) for drop in range(layers)]
    group_masks = all_group_masks()
    gate_sets = [_gates(keep, layers) for keep in [tuple(range(layers)), *singles, *group_masks]]
    losses = layer_gate_losses(
        dense.experiment, dense.params, gate_sets, train_split, CALIBRATION_BATCHES
    )
    full_loss, single_losses = losses[0], losses[1 : 1 + layers]
    mask_losses = dict(zip(group_masks, losses[1 + layers :], strict=True))
    # Remove the layers whose removal alone raises the loss least.
    removed = np.argsort(single_losses)[: layers - kept]
    choices["importance"] = tuple(sorted(set(range(layers)) - {int(i) for i in removed}))
    choices["first half"] = tuple(range(kept))
    choices["min loss 2:4"] = min(mask_losses, key=mask_losses.get)
    rng = np.random.default_rng(seed)
    choices["random 2:4"] = group_masks[int(rng.integers(len(group_masks)))]
    extra = sorted({keep for keep in choices.values() if keep not in mask_losses})
    if extra:
        extra_sets = [_gates(keep, layers) for keep in extra]
        extra_losses = layer_gate_losses(
            dense.experiment, dense.params, extra_sets, train_split, CALIBRATION_BATCHES
        )
        mask_losses.update(zip(extra, extra_losses, strict=True))
    timings["calibration"] = time.perf_counter() - start
    print(
        f"seed {seed} calibration ({timings['calibration']:.0f} s): full model "
        f"{_bits(full_loss):.4f} bits/dim; without layer i: "
        f"{np.round(np.asarray(single_losses) / math.log(2), 4).tolist()}",
        flush=True,
    )

    results = {}
    finetuned: dict[tuple[int, ...], dict[str, float]] = {}
    for arm, keep in choices.items():
        if keep not in finetuned:
            name = "keep_" + "".join(map(str, keep))
            pruned_dir = root / f"seed{seed}" / name / "pruned"
            if pruned_dir.parent.exists() and not KEEP_EXISTING:
                shutil.rmtree(pruned_dir.parent)
            if not (pruned_dir / "checkpoints").exists():
                export_pruned_run(dense_dir, keep, pruned_dir)
            scores = {"before": _bits(evaluate(pruned_dir)["loss"])}
            # The exported run is the dense model with the other layers gated off.
            (gated,) = layer_gate_losses(
                dense.experiment, dense.params, [_gates(keep, layers)], test_split
            )
            if not np.isclose(scores["before"], _bits(gated), rtol=1e-5):
                raise AssertionError(f"pruned run {scores['before']} != gated dense {gated}")
            for budget in FINETUNES:
                config = _config(budget, seed, steps[budget], init_from=pruned_dir)
                metrics, seconds = _train(config, root / f"seed{seed}" / name / budget)
                timings[f"{budget} {name}"] = seconds
                scores[budget] = _bits(metrics["loss"])
            finetuned[keep] = scores
        results[arm] = dict(keep=keep, calibration=_bits(mask_losses[keep]), **finetuned[keep])
        print(f"seed {seed} {arm}: {results[arm]}", flush=True)
    return dict(
        dense=_bits(dense_eval["loss"]), arms=results, timings=timings, probabilities=probabilities
    )


def _row(values: list[float]) -> str:
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    return f"{mean:.4f} ({', '.join(f'{value:.4f}' for value in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--workdir", default="/tmp/tinyfusion_digits")
    parser.add_argument("--ablate", action="store_true", help="also search_full, search_frozen")
    parser.add_argument(
        "--keep-existing",
        action="store_true",
        help="resume (or just re-evaluate) runs already in --workdir instead of redoing them",
    )
    parser.add_argument("--dense-steps", type=int, default=None, help="override (smoke test)")
    parser.add_argument("--search-steps", type=int, default=None, help="override (smoke test)")
    parser.add_argument("--finetune-steps", type=int, default=None, help="override (smoke test)")
    parser.add_argument("--finetune-long-steps", type=int, default=None, help="override (smoke)")
    args = parser.parse_args()
    global KEEP_EXISTING
    KEEP_EXISTING = args.keep_existing
    steps = {
        "dense": args.dense_steps,
        "search": args.search_steps,
        "finetune": args.finetune_steps,
        "finetune_long": args.finetune_long_steps,
    }
    searches = ["search", "search_full", "search_frozen"] if args.ablate else ["search"]
    start = time.perf_counter()
    per_seed = {seed: run_seed(seed, Path(args.workdir), steps, searches) for seed in args.seeds}
    elapsed = time.perf_counter() - start

    print(
        f"\nseeds {args.seeds}; {elapsed / 60:.1f} min wall; load average "
        f"{os.getloadavg()[0]:.1f} at the end; {jax.device_count()} devices"
    )
    for seed, result in per_seed.items():
        timings = ", ".join(f"{name} {value:.0f}" for name, value in result["timings"].items())
        print(f"seed {seed} seconds: {timings}")
    print(f"\ndense 8 layers: test bits/dim {_row([r['dense'] for r in per_seed.values()])}")
    arms = list(next(iter(per_seed.values()))["arms"])
    print(
        "\n| seed | method | kept layers | calibration bits/dim | test: pruned | after 30 steps "
        "| after 150 steps |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for seed, result in per_seed.items():
        for arm in arms:
            r = result["arms"][arm]
            print(
                f"| {seed} | {arm} | {', '.join(map(str, r['keep']))} | {r['calibration']:.4f} "
                f"| {r['before']:.4f} | {r['finetune']:.4f} | {r['finetune_long']:.4f} |"
            )
    print("\n| method | test: pruned | after 30 steps | after 150 steps |")
    print("| --- | ---: | ---: | ---: |")
    for arm in arms:
        values = [
            _row([result["arms"][arm][column] for result in per_seed.values()])
            for column in ("before", "finetune", "finetune_long")
        ]
        print(f"| {arm} | {' | '.join(values)} |")


if __name__ == "__main__":
    main()
