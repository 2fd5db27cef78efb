"""Train the teacher, then every student arm of ``config.py``; prints a Markdown table.

    nice -n 10 .venv/bin/python experiments/return_of_the_encoder/run.py --seeds 0 1 \
        --steps 1000 --teacher_steps 2000 [--workdir /tmp/roe_runs] [--out results.json]

The teacher (seed 0) is trained first, to ``--teacher_steps``; the distilled
arms read it from its workdir (``config.task.teacher_workdir``). Every run goes
through ``train_and_evaluate`` (a finished workdir is not trained again, so an
interrupted sweep resumes). Each run is then restored and scored on the
held-out ``test`` split (512 examples, sizes 1-8, 64 each):

* exact match: the answer and its ``<eos>`` all right, computed teacher-forced
  in one pass (``effformer.train.sequence_eval``; equal to greedy decoding's
  exact match, as that module shows), overall and per input length;
* token accuracy and loss: the trainer's eval metrics (cross-entropy for every
  arm: the distillation tasks report the student's CE at evaluation).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import jax

from effformer.train import restore, train_and_evaluate
from effformer.train.sequence_eval import evaluate_sequence_task

CONFIG = Path(__file__).with_name("config.py")
STUDENTS = ("decoder", "encoder_decoder", "encoder_decoder_kd", "decoder_kd")


def load_config(arm: str):
    """``config.py:get_config(arm)`` (the experiments folder is not a package)."""
    spec = importlib.util.spec_from_file_location("return_of_the_encoder_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arm)


def train_and_score(arm: str, seed: int, steps: int, workdir: Path, teacher: Path | None) -> dict:
    config = load_config(arm)
    config.seed = seed
    config.num_train_steps = steps
    config.optimizer.warmup_steps = steps // 10
    if "_kd" in arm:
        config.task.teacher_workdir = str(teacher)
    start = time.perf_counter()
    result = train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    run = restore(workdir)
    buckets = evaluate_sequence_task(run.experiment, run.params, "test", batch_size=256)
    right, count = sum(r for r, _ in buckets.values()), sum(c for _, c in buckets.values())
    return dict(
        arm=arm,
        seed=seed,
        steps=run.step,
        params=sum(x.size for x in jax.tree.leaves(run.params)),
        exact_match=right / count,
        exact_match_by_length={str(k): r / c for k, (r, c) in buckets.items()},
        token_accuracy=result["eval"]["accuracy"],
        eval_loss=result["eval"]["loss"],
        train_wall_s=wall,
    )


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def table(results: list[dict]) -> str:
    lengths = sorted({int(k) for r in results for k in r["exact_match_by_length"]})
    lines = [
        "| arm | params | steps | exact match | token accuracy | eval CE | "
        + " | ".join(f"n={n}" for n in lengths)
        + " |",
        "|---" * (6 + len(lengths)) + "|",
    ]
    for arm in dict.fromkeys(r["arm"] for r in results):
        rows = [r for r in results if r["arm"] == arm]
        cells = [
            f"{arm} ({len(rows)} seed{'s' if len(rows) > 1 else ''})",
            f"{rows[0]['params']:,}",
            str(rows[0]["steps"]),
            _cell([r["exact_match"] for r in rows]),
            _cell([r["token_accuracy"] for r in rows]),
            _cell([r["eval_loss"] for r in rows]),
        ]
        cells += [
            f"{statistics.mean(r['exact_match_by_length'][str(n)] for r in rows):.2f}"
            for n in lengths
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(STUDENTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--teacher_steps", type=int, default=2000)
    parser.add_argument("--workdir", default="/tmp/return_of_the_encoder_runs")
    parser.add_argument(
        "--teacher_workdir", default=None, help="a finished teacher run to use (not retrained)"
    )
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args()
    root = Path(args.workdir)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else []
    done = {(r["arm"], r["seed"], r["steps"]) for r in results}
    print(f"load average at start: {os.getloadavg()}; workdirs under {root}", flush=True)
    teacher = Path(args.teacher_workdir or root / f"teacher_{args.teacher_steps}")
    jobs = [] if args.teacher_workdir else [("teacher", 0, args.teacher_steps)]
    jobs += [(arm, seed, args.steps) for arm in args.arms for seed in args.seeds]
    for arm, seed, steps in jobs:
        if (arm, seed, steps) in done:
            continue
        workdir = teacher if arm == "teacher" else root / f"{arm}_seed{seed}_{steps}"
        result = train_and_score(arm, seed, steps, workdir, teacher)
        result["load_average"] = os.getloadavg()
        results.append(result)
        out.write_text(json.dumps(results, indent=1))
        print(json.dumps(result), flush=True)
    print(f"\nload average at end: {os.getloadavg()}\n")
    print(table([r for r in results if r["arm"] == "teacher" or r["steps"] == args.steps]))


if __name__ == "__main__":
    main()
