"""Evaluate a trained ViT-family run with token merging (ToMe) at several r, off the shelf.

    .venv/bin/python experiments/tome/evaluate.py --workdir /tmp/tome_digits --r 0 2 4 8 16 \
        [--batch-size 256] [--repeats 20] [--without-proportional-attention]

For each r the restored model is rebuilt with ``tome_r=r`` (the same
parameters: merging adds none) and measured three ways:

* test accuracy and loss over the whole eval split, with the trainer's own
  evaluation (``effformer.train.evaluate.run_evaluation``);
* images/s of the jitted forward pass (``train=False``) on the first
  ``--batch-size`` test images: one compile-and-warm-up call, then
  ``--repeats`` rounds in which every r is timed once (interleaved, so a
  change of machine load hits every r alike); the median per r;
* FLOPs per image from XLA's cost analysis of the compiled forward pass
  (independent of the machine's load).

``--without-proportional-attention`` adds, for each r > 0, a row with
proportional attention off (sizes still weigh the merges and the pooling).

Prints the machine, /proc/loadavg before and after, and one Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from pathlib import Path

import jax

from effformer.data import create_input_pipeline
from effformer.train.evaluate import restore, run_evaluation


def _loadavg() -> str:
    path = Path("/proc/loadavg")
    return path.read_text().strip() if path.exists() else "unavailable"


def _cpu_name() -> str:
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older JAX: one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def _first_batch(run, batch_size: int) -> dict:
    """The model inputs of the first ``batch_size`` examples of the eval split."""
    exp = run.experiment
    pipeline = create_input_pipeline(
        exp.config.data,
        split=exp.info.eval_split,
        global_batch_size=batch_size,
        train=False,
        seed=exp.config.seed,
    )
    batch = next(iter(pipeline))
    batch = exp.task.prepare_batch(batch, jax.random.PRNGKey(0), train=False)
    return dict(exp.task.model_inputs(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--r", type=int, nargs="+", default=[0, 2, 4, 8, 16])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--without-proportional-attention", action="store_true")
    args = parser.parse_args()

    load_before = _loadavg()
    run = restore(args.workdir)
    base = run.model
    # Rows: (r, proportional attention) -> the model.
    models = {(r, True): base.clone(tome_r=r) for r in args.r}
    if args.without_proportional_attention:
        for r in args.r:
            if r > 0:
                models[r, False] = base.clone(tome_r=r, tome_proportional_attention=False)
    inputs = _first_batch(run, args.batch_size)
    num_images = len(next(iter(inputs.values())))

    forwards, flops = {}, {}
    for row, model in models.items():
        forward = jax.jit(
            lambda params, inputs, model=model: model.apply({"params": params}, **inputs)
        )
        compiled = forward.lower(run.params, inputs).compile()
        flops[row] = _flops(compiled) / num_images
        jax.block_until_ready(compiled(run.params, inputs))  # warm-up
        forwards[row] = compiled

    seconds = {row: [] for row in models}
    for _ in range(args.repeats):
        for row, forward in forwards.items():
            start = time.perf_counter()
            jax.block_until_ready(forward(run.params, inputs))
            seconds[row].append(time.perf_counter() - start)

    metrics = {}
    for row, model in models.items():
        experiment = dataclasses.replace(run.experiment, model=model)
        metrics[row] = run_evaluation(experiment, run.params)
    load_after = _loadavg()

    print(
        f"workdir: {args.workdir} (step {run.step}); model: {run.config.model.name} "
        f"{dict(run.config.model.kwargs)}; {base.sequence_length} tokens, {base.num_layers} blocks"
    )
    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, {platform.system()}; "
        f"JAX {jax.__version__} on {jax.devices()[0].platform}"
    )
    print(f"load average before: {load_before}; after: {load_after}")
    print(
        f"images/s: batch {num_images}, median of {args.repeats} interleaved repeats; "
        f"speed-up and FLOPs ratio against r={args.r[0]}"
    )
    print()
    print(
        "| r per block | proportional attention | tokens after each block | test accuracy % | "
        "test loss | "
        "images/s | speed-up | GFLOPs/image | FLOPs ratio |"
    )
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    first = (args.r[0], True)
    base_speed = num_images / statistics.median(seconds[first])
    for (r, proportional), model in sorted(
        models.items(), key=lambda item: (item[0][0], not item[0][1])
    ):
        tokens, left = [], model.sequence_length
        for merged in model.tome_schedule:
            left -= merged
            tokens.append(str(left))
        row = (r, proportional)
        speed = num_images / statistics.median(seconds[row])
        print(
            f"| {r} | {'-' if r == 0 else 'yes' if proportional else 'no'} | {', '.join(tokens)} | "
            f"{100 * metrics[row]['accuracy']:.2f} | {metrics[row]['loss']:.4f} | {speed:.0f} | "
            f"{speed / base_speed:.2f}x | {flops[row] / 1e9:.4f} | "
            f"{flops[row] / flops[first]:.2f} |"
        )


if __name__ == "__main__":
    main()
