"""Zero-TPrune off the shelf beside ToMe, at matched tokens removed per block.

    .venv/bin/python experiments/zero_tprune/evaluate.py --workdir /tmp/tome_digits \
        --r 0 4 8 16 [--batch-size 256] [--repeats 20]

The run is the CCT of experiments/tome/digits.py (trained once, without any
token reduction). For each r, ToMe's schedule of that r (tokens merged per
block, ``tome_schedule``) fixes how many tokens every block removes; the same
trained parameters are then evaluated with

* ToMe: ``tome_r=r`` (proportional attention on);
* Zero-TPrune I-stage only: ``zero_tprune_importance`` = that schedule;
* Zero-TPrune S-stage only: ``zero_tprune_similarity`` = that schedule;
* Zero-TPrune I + S: each block's count split, the larger half to the I-stage.

WPR iterations: the paper's per-block counts (``wpr_iterations``). Accuracy and
loss over the whole test split; images/s of the jitted forward pass on the
first ``--batch-size`` test images, median of ``--repeats`` interleaved rounds
(every row timed once per round); FLOPs per image from XLA's cost analysis.
Prints the machine, /proc/loadavg before and after, and one Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import statistics
import time
from pathlib import Path

import jax

from effformer.train.evaluate import restore, run_evaluation

# The machine / load / FLOPs / batch helpers of the ToMe experiment, reused as they are.
_spec = importlib.util.spec_from_file_location(
    "tome_evaluate", Path(__file__).resolve().parents[1] / "tome" / "evaluate.py"
)
tome_evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tome_evaluate)


def _rows(base, r: int) -> dict:
    """(r, method) -> model, all removing ToMe's per-block counts for this r."""
    if r == 0:
        return {(0, "none"): base}
    schedule = base.clone(tome_r=r).tome_schedule
    halves_i = tuple(n - n // 2 for n in schedule)
    halves_s = tuple(n // 2 for n in schedule)
    zeros = (0,) * len(schedule)
    return {
        (r, "ToMe"): base.clone(tome_r=r),
        (r, "Zero-TPrune I"): base.clone(
            zero_tprune_importance=schedule, zero_tprune_similarity=zeros
        ),
        (r, "Zero-TPrune S"): base.clone(
            zero_tprune_importance=zeros, zero_tprune_similarity=schedule
        ),
        (r, "Zero-TPrune I+S"): base.clone(
            zero_tprune_importance=halves_i, zero_tprune_similarity=halves_s
        ),
    }


def _tokens_after(model) -> list[int]:
    tokens, left = [], model.sequence_length
    if any(model.tome_schedule):
        removed = model.tome_schedule
    else:
        removed = [i + s for i, s in model.zero_tprune_schedule]
    for n in removed:
        left -= n
        tokens.append(left)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--r", type=int, nargs="+", default=[0, 4, 8, 16])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.r[0] != 0:
        parser.error(f"--r must start with 0 (the baseline), got {args.r}")

    load_before = tome_evaluate._loadavg()
    run = restore(args.workdir)
    base = run.model
    models = {}
    for r in args.r:
        models.update(_rows(base, r))
    inputs = tome_evaluate._first_batch(run, args.batch_size)
    num_images = len(next(iter(inputs.values())))

    forwards, flops = {}, {}
    for row, model in models.items():
        forward = jax.jit(
            lambda params, inputs, model=model: model.apply({"params": params}, **inputs)
        )
        compiled = forward.lower(run.params, inputs).compile()
        flops[row] = tome_evaluate._flops(compiled) / num_images
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
    load_after = tome_evaluate._loadavg()

    print(
        f"workdir: {args.workdir} (step {run.step}); model: {run.config.model.name} "
        f"{dict(run.config.model.kwargs)}; {base.sequence_length} tokens, {base.num_layers} blocks"
    )
    print(
        f"machine: {tome_evaluate._cpu_name()}, {os.cpu_count()} CPUs, {platform.system()}; "
        f"JAX {jax.__version__} on {jax.devices()[0].platform}"
    )
    print(f"load average before: {load_before}; after: {load_after}")
    print(
        f"images/s: batch {num_images}, median of {args.repeats} interleaved repeats; "
        "speed-up and FLOPs ratio against r=0"
    )
    print()
    print(
        "| r per block | method | (I, S) per block | tokens after each block | test accuracy % | "
        "test loss | images/s | speed-up | GFLOPs/image | FLOPs ratio |"
    )
    print("| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    first = (0, "none")
    base_speed = num_images / statistics.median(seconds[first])
    for row, model in models.items():
        r, method = row
        stages = "-"
        if method.startswith("Zero-TPrune"):
            stages = " ".join(f"({i},{s})" for i, s in model.zero_tprune_schedule)
        speed = num_images / statistics.median(seconds[row])
        tokens = ", ".join(str(t) for t in _tokens_after(model))
        print(
            f"| {r} | {method} | {stages} | {tokens} | {100 * metrics[row]['accuracy']:.2f} | "
            f"{metrics[row]['loss']:.4f} | {speed:.0f} | {speed / base_speed:.2f}x | "
            f"{flops[row] / 1e9:.4f} | {flops[row] / flops[first]:.2f} |"
        )


if __name__ == "__main__":
    main()
