"""IA-RED²'s trained interpreters on the digits CCT, beside ToMe and Zero-TPrune.

    .venv/bin/python experiments/ia_red/evaluate.py --workdir /tmp/ia_red_digits \\
        [--r 4 8 16] [--batch-size 256] [--repeats 20] [--heatmaps 4] [--png FILE]

The run is an ``experiments/ia_red/digits.py`` policy run: the frozen CCT of
experiments/tome/digits.py plus two interpreters (before blocks 0 and 2). Rows,
all with the run's parameters (the backbone is the teacher's, unchanged):

* none: the CCT without token reduction;
* IA-RED² p > 0.5: the paper's inference rule (each image keeps its own tokens),
  run by masking, so it costs the whole model plus the interpreters; its token
  counts are the test-split means;
* IA-RED² top-k: each interpreter keeps a fixed number of patch tokens, its highest
  scores, gathered (the blocks after it run on fewer tokens): at the p > 0.5 rule's
  mean counts, and at the counts that match ToMe's per-block token counts at each r
  (ToMe's block i runs its attention on n_i tokens and its MLP on n_i - r_i; a group
  of blocks after one interpreter gets the mean of those over its blocks, rounded);
* ToMe (``tome_r=r``, proportional attention) and Zero-TPrune I+S (each block's
  count split, the larger half to the I-stage), re-measured here at each r.

Measures as in experiments/tome and experiments/zero_tprune: accuracy and loss
(cross-entropy) over the whole test split; images/s of the jitted forward pass on
the first ``--batch-size`` test images, median of ``--repeats`` interleaved rounds;
FLOPs per image from XLA's cost analysis. ``--heatmaps N`` prints the first N test
digits with the interpreters' keep probabilities and decisions as ASCII, and
``--png`` saves the same as an image. Prints the machine, /proc/loadavg before and
after, and one Markdown table.
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
import numpy as np

import effformer.train.ia_red_task  # noqa: F401  (registers the task "ia_red_policy")
from effformer.train.evaluate import restore, run_evaluation
from effformer.train.tasks import ClassificationTask

# The machine / load / FLOPs / batch helpers of the ToMe experiment, reused as they are.
_spec = importlib.util.spec_from_file_location(
    "tome_evaluate", Path(__file__).resolve().parents[1] / "tome" / "evaluate.py"
)
tome_evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tome_evaluate)

SHADES = " .:-=+*#%@"


def _tome_block_tokens(model, r: int) -> list[float]:
    """Mean tokens of each block under ToMe at r: (attention's + MLP's) / 2."""
    tokens, left = [], model.sequence_length
    for merged in model.clone(tome_r=r).tome_schedule:
        tokens.append(left - merged / 2)
        left -= merged
    return tokens


def _groups(stages: tuple[int, ...], num_layers: int) -> list[range]:
    return [range(s, e) for s, e in zip(stages, (*stages[1:], num_layers), strict=True)]


def _matched_top_k(model, r: int) -> tuple[int, ...]:
    """Top-k counts whose blocks run ToMe's mean token count of their group at r."""
    tokens = _tome_block_tokens(model, r)
    return tuple(
        int(round(sum(tokens[i] for i in group) / len(group)))
        for group in _groups(model.ia_red_stages, model.num_layers)
    )


def _block_tokens(model, row_kind: str, counts) -> list[float]:
    """Tokens each block runs on (the mean of attention's and MLP's for ToMe/Zero-TPrune)."""
    if row_kind in ("ToMe", "Zero-TPrune I+S", "none"):
        left, tokens = model.sequence_length, []
        if any(model.tome_schedule):
            removed = model.tome_schedule
        else:
            removed = [i + s for i, s in model.zero_tprune_schedule]
        for n in removed:
            tokens.append(left - n / 2)
            left -= n
        return tokens
    tokens = [float(model.sequence_length)] * model.num_layers
    for count, group in zip(counts, _groups(model.ia_red_stages, model.num_layers), strict=True):
        for i in group:
            tokens[i] = count
    return tokens


def _ascii(grid: np.ndarray, low: float = 0.0, high: float = 1.0) -> list[str]:
    scaled = np.clip((grid - low) / max(high - low, 1e-9), 0.0, 1.0)
    return ["".join(SHADES[int(v * (len(SHADES) - 1))] * 2 for v in row) for row in scaled]


def _heatmaps(run, inputs: dict, count: int, png: str | None) -> None:
    model = run.model
    _, state = model.apply({"params": run.params}, **inputs, mutable=["intermediates"])
    probs = [np.asarray(p) for p in state["intermediates"]["ia_red_keep_probs"]]
    kept = [np.asarray(k) for k in state["intermediates"]["ia_red_kept"]]
    rows, cols = model.token_grid
    images = np.asarray(inputs["inputs"])[..., 0]
    print(
        f"\nheat maps of the first {count} test digits: the image (16x16 shown at 8x8), then per "
        f"interpreter its keep probabilities on the {rows}x{cols} token grid (' ' = 0 ... "
        "'@' = 1) and the tokens it keeps ('#')\n"
    )
    for b in range(count):
        panels = [_ascii(images[b][::2, ::2], images[b].min(), images[b].max())]
        titles = ["image"]
        for s in range(len(probs)):
            panels.append(_ascii(probs[s][b].reshape(rows, cols)))
            panels.append(
                [
                    "".join("##" if v else "  " for v in row)
                    for row in kept[s][b].reshape(rows, cols)
                ]
            )
            titles += [f"p, stage {s}", f"kept {int(kept[s][b].sum())}, stage {s}"]
        width = 2 * cols
        print("   ".join(t[:width].ljust(width) for t in titles))
        for line in zip(*panels, strict=True):
            print("   ".join(f"|{part}|"[1:-1].ljust(width) for part in line))
        print()
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(
            count, 1 + 2 * len(probs), figsize=(2 * (1 + 2 * len(probs)), 2 * count)
        )
        for b in range(count):
            axes[b, 0].imshow(images[b], cmap="gray")
            for s in range(len(probs)):
                axes[b, 1 + 2 * s].imshow(probs[s][b].reshape(rows, cols), vmin=0, vmax=1)
                axes[b, 2 + 2 * s].imshow(
                    kept[s][b].reshape(rows, cols), vmin=0, vmax=1, cmap="gray"
                )
                if b == 0:
                    axes[b, 1 + 2 * s].set_title(f"stage {s}: p")
                    axes[b, 2 + 2 * s].set_title(f"stage {s}: kept")
        for axis in axes.flat:
            axis.set_xticks([])
            axis.set_yticks([])
        figure.tight_layout()
        figure.savefig(png, dpi=60)
        print(f"saved {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--r", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--heatmaps", type=int, default=4)
    parser.add_argument("--png", default=None)
    args = parser.parse_args()

    load_before = tome_evaluate._loadavg()
    run = restore(args.workdir)
    policy_model = run.model
    if not policy_model.ia_red_stages:
        parser.error(f"--workdir {args.workdir} is not an IA-RED² run (no ia_red_stages).")
    # The paper's rule over the whole test split: accuracy and the kept fractions.
    policy = run_evaluation(run.experiment, run.params)
    final, work = policy["final_kept_fraction"], policy["kept_fraction"]
    num_patches = policy_model.token_grid[0] * policy_model.token_grid[1]
    # Two stages over equal groups: work = (f0 + f1) / 2, so f0 = 2 work - f1.
    groups = _groups(policy_model.ia_red_stages, policy_model.num_layers)
    if len(groups) == 2 and len(groups[0]) == len(groups[1]):
        fractions = (2 * work - final, final)
    else:
        fractions = (final,) * len(groups)  # only the last stage's mean is known exactly
    threshold_counts = tuple(num_patches * f for f in fractions)

    plain = policy_model.clone(ia_red_stages=(), ia_red_top_k=())
    models = {("none", 0): (plain, "-")}
    models["IA-RED² p > 0.5", 0] = (policy_model, "masked")
    rounded = tuple(max(1, int(round(c))) for c in threshold_counts)
    models["IA-RED² top-k", 0] = (policy_model.clone(ia_red_top_k=rounded), "p>0.5 means")
    for r in args.r:
        schedule = plain.clone(tome_r=r).tome_schedule
        halves_i = tuple(n - n // 2 for n in schedule)
        halves_s = tuple(n // 2 for n in schedule)
        models["ToMe", r] = (plain.clone(tome_r=r), f"r={r}")
        models["Zero-TPrune I+S", r] = (
            plain.clone(zero_tprune_importance=halves_i, zero_tprune_similarity=halves_s),
            f"r={r}",
        )
        counts = _matched_top_k(policy_model, r)
        models["IA-RED² top-k", r] = (policy_model.clone(ia_red_top_k=counts), f"ToMe r={r}")

    # The images only: the policy task's model inputs also ask for the policy.
    inputs = {"inputs": tome_evaluate._first_batch(run, args.batch_size)["inputs"]}
    num_images = len(next(iter(inputs.values())))
    forwards, flops = {}, {}
    for row, (model, _) in models.items():
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

    classification = ClassificationTask(run.config.task, run.experiment.info)
    metrics = {}
    for row, (model, _) in models.items():
        experiment = dataclasses.replace(run.experiment, model=model, task=classification)
        metrics[row] = run_evaluation(experiment, run.params)
    load_after = tome_evaluate._loadavg()

    print(
        f"workdir: {args.workdir} (step {run.step}); model: {run.config.model.name} "
        f"{dict(run.config.model.kwargs)}; {plain.sequence_length} tokens, "
        f"{plain.num_layers} blocks; tau={run.config.task.ia_red_error_penalty}"
    )
    print(
        f"machine: {tome_evaluate._cpu_name()}, {os.cpu_count()} CPUs, {platform.system()}; "
        f"JAX {jax.__version__} on {jax.devices()[0].platform}"
    )
    print(f"load average before: {load_before}; after: {load_after}")
    print(
        f"p > 0.5 on the test split: kept_fraction (mean over blocks) {work:.4f}, after the "
        f"last interpreter {final:.4f}; reward {policy['reward']:.4f}"
    )
    print(
        f"images/s: batch {num_images}, median of {args.repeats} interleaved repeats; "
        "speed-up and FLOPs ratio against none"
    )
    print()
    print(
        "| method | counts | tokens per block | test accuracy % | test loss | images/s | "
        "speed-up | GFLOPs/image | FLOPs ratio |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    first = ("none", 0)
    base_speed = num_images / statistics.median(seconds[first])
    order = sorted(models, key=lambda row: (row[1], row != first))
    for row in order:
        model, note = models[row]
        kind = row[0]
        if kind == "IA-RED² p > 0.5":
            tokens = _block_tokens(model, kind, threshold_counts)
            counts = "mean " + ", ".join(f"{c:.1f}" for c in threshold_counts)
        elif kind == "IA-RED² top-k":
            tokens = _block_tokens(model, kind, model.ia_red_top_k)
            counts = f"{model.ia_red_top_k} ({note})"
        else:
            tokens = _block_tokens(model, kind, None)
            counts = note
        speed = num_images / statistics.median(seconds[row])
        print(
            f"| {kind} | {counts} | {', '.join(f'{t:.3g}' for t in tokens)} | "
            f"{100 * metrics[row]['accuracy']:.2f} | {metrics[row]['loss']:.4f} | {speed:.0f} | "
            f"{speed / base_speed:.2f}x | {flops[row] / 1e9:.4f} | {flops[row] / flops[first]:.2f} |"
        )
    if args.heatmaps:
        small = {key: value[: args.heatmaps] for key, value in inputs.items()}
        _heatmaps(run, small, args.heatmaps, args.png)


if __name__ == "__main__":
    main()
