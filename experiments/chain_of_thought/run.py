"""Direct answer vs step-by-step (chain of thought) on generated tasks.

Feng et al. (2023), "Towards Revealing the Mystery behind Chain of Thought":
a bounded-depth Transformer can produce the step-by-step solution of
arithmetic modulo a prime or of a dynamic programme (LIS), but not the direct
answer for growing sizes. Exact match of the whole answer per size on
``test`` (training sizes); for step-by-step, the whole chain must be right.

    .venv/bin/python experiments/chain_of_thought/run.py --tasks lis,arithmetic_mod11 --seeds 0 --steps 300
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "length_generalization"))

from sequence_runs import run  # noqa: E402

MODEL = dict(num_layers=2, embed_dim=64, num_heads=4, ffn_hidden_dim=128, max_length=128,
             position_encoding="rope")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default="lis,arithmetic_mod11")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for task in args.tasks.split(","):
        for answer_format in ("direct", "cot"):
            for seed in map(int, args.seeds.split(",")):
                result = run(f"{task}_{answer_format}", "lm_decoder", MODEL, seed=seed,
                             steps=args.steps, batch_size=args.batch_size, eval_splits=("test",))  # fmt: skip
                scores = {str(k): v for k, v in result.pop("scores")["test"].items()}
                results.append(dict(task=task, format=answer_format, seed=seed, steps=args.steps,
                                    test=scores, **result))  # fmt: skip
                (out / "results.json").write_text(json.dumps(results, indent=1))
                print(task, answer_format, seed, f"{result['total_seconds']:.0f}s", flush=True)
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        runs = [r for r in results if r["task"] == task]
        sizes = sorted({int(s) for r in runs for s in r["test"]})
        lines += [f"### {task}", "", "| format | " + " | ".join(f"n={s}" for s in sizes) + " |",
                  "|---" * (len(sizes) + 1) + "|"]  # fmt: skip
        for answer_format in ("direct", "cot"):
            chosen = [r for r in runs if r["format"] == answer_format]
            cells = []
            for s in sizes:
                right = sum(r["test"][str(s)][0] for r in chosen)
                count = sum(r["test"][str(s)][1] for r in chosen)
                cells.append(f"{right / count:.2f}")
            lines.append(f"| {answer_format} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / "table.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
