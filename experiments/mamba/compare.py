"""Train both arms of mnist1d_config.py / digits_config.py for several seeds; print one Markdown table.

    .venv/bin/python experiments/mamba/compare.py --dataset mnist1d --seeds 0 1 2 [--steps N]

Columns: parameters, test accuracy (mean ± sample std over seeds, and each
seed), median seconds per train step after the first 10 (this machine, at
the time of the run; see `uptime` load in the README), and for the spiking
LMUFormer the spike rate: the fraction of its LIF neuron-steps that fire over
the whole test split, with the trained model (mean over seeds).
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
from effformer.data import create_input_pipeline
from effformer.models.lmuformer import spike_counts, spike_rates
from effformer.train import train_and_evaluate
from effformer.train.evaluate import restore
from effformer.train.experiment import build_experiment


def _config_module(dataset: str):
    path = Path(__file__).with_name(f"{dataset}_config.py")
    spec = importlib.util.spec_from_file_location(f"mamba_experiments_{dataset}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spike_rates_on_test_split(workdir: Path) -> dict[str, float]:
    """Fraction of LIF neuron-steps that fire on the test split, per LIF layer and ``"all"``
    (the trained spiking LMUFormer of ``workdir``)."""
    run = restore(workdir)

    @jax.jit
    def counts(inputs):
        _, state = run.model.apply(run.variables, inputs, mutable=["intermediates"])
        return spike_counts(state["intermediates"])

    pipeline = create_input_pipeline(
        run.config.data,
        split=run.experiment.info.eval_split,
        global_batch_size=64,
        train=False,
        seed=run.config.seed,
        process_index=0,
        process_count=1,
    )
    totals = None
    with pipeline:
        for batch in pipeline:
            # Padded final batches: the model sees whole batches; count only real examples.
            real = batch["mask"].astype(bool) if "mask" in batch else None
            inputs = batch["inputs"] if real is None else batch["inputs"][real]
            batch_counts = jax.device_get(counts(inputs))
            totals = (
                batch_counts if totals is None else {k: totals[k] + batch_counts[k] for k in totals}
            )
    return spike_rates(totals)


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
    spiking = config.model.name == "spiking_lmuformer"
    return {
        "accuracy": result["eval"]["accuracy"],
        "step_s": statistics.median(step_times),
        "params": params,
        "model": config.model.name,
        "spike_rate": spike_rates_on_test_split(workdir)["all"] if spiking else None,
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
        f"| {args.dataset} arm | model | params | test accuracy (mean ± std) | per seed | s/step "
        "| spike rate % |"
    )
    print("| --- | --- | ---: | ---: | --- | ---: | ---: |")
    for arm in args.arms:
        runs = [
            run_one(args.dataset, arm, seed, root / f"{args.dataset}_{arm}_s{seed}", args.steps)
            for seed in args.seeds
        ]
        accuracies = [100 * r["accuracy"] for r in runs]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        step_s = statistics.median(r["step_s"] for r in runs)
        rates = [100 * r["spike_rate"] for r in runs if r["spike_rate"] is not None]
        rate = (
            f"{statistics.mean(rates):.1f} ({', '.join(f'{r:.1f}' for r in rates)})"
            if rates
            else "-"
        )
        print(
            f"| {arm} | {runs[0]['model']} | {runs[0]['params']:,} | "
            f"{statistics.mean(accuracies):.1f} ± {spread:.1f} | "
            f"{', '.join(f'{a:.1f}' for a in accuracies)} | {step_s:.3f} | {rate} |",
            flush=True,
        )


if __name__ == "__main__":
    models.list_models()  # import the registry before the configs register the baseline
    main()
