"""Inverse permutation: decoder-only vs encoder-decoder vs decoder-only with scratch tokens.

Input: a permutation pi of 0..n-1 and the permuted string y (y[i] = x[pi[i]]);
target: the original string x (``effformer/data/tasks/permutation.py``).
Exact match per permutation size n (2-8) on the ``test`` split (the training
sizes: the question is learnability, not extrapolation).

    .venv/bin/python experiments/inverse_permutation/run.py --seeds 0,1,2 --steps 300
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "length_generalization"))

from sequence_runs import run_seeds  # noqa: E402

SIZE = dict(embed_dim=64, num_heads=4, ffn_hidden_dim=128, max_length=128)
# name -> (dataset, model, model kwargs). The encoder-decoder has 1 + 1 layers, the decoders 2:
# the same depth (and about the same parameters: cross-attention adds one attention).
VARIANTS = {
    "decoder": ("inverse_permutation", "lm_decoder", dict(num_layers=2, **SIZE)),
    "decoder + 8 scratch": (
        "inverse_permutation_scratch8",
        "lm_decoder",
        dict(num_layers=2, **SIZE),
    ),
    "encoder-decoder": (
        "inverse_permutation_seq2seq",
        "lm_encoder_decoder",
        dict(num_encoder_layers=1, num_decoder_layers=1, **SIZE),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--position_encoding", default="rope")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["variant"], r["seed"], r["steps"], r.get("batch_size")) for r in results}
    for variant in args.variants.split(","):
        dataset, model, kwargs = VARIANTS[variant]
        seeds = tuple(
            seed
            for seed in map(int, args.seeds.split(","))
            if (variant, seed, args.steps, args.batch_size) not in done
        )
        if not seeds:
            continue
        # The seeds train side by side in one vmapped step (sequence_runs.run_seeds).
        group = run_seeds(dataset, model, {**kwargs, "position_encoding": args.position_encoding},
                          seeds=seeds, steps=args.steps, batch_size=args.batch_size,
                          eval_splits=("test",))  # fmt: skip
        for seed, result in zip(seeds, group, strict=True):
            scores = {str(k): v for k, v in result.pop("scores")["test"].items()}
            results.append(dict(variant=variant, seed=seed, steps=args.steps,
                                batch_size=args.batch_size, test=scores, **result))  # fmt: skip
        results_path.write_text(json.dumps(results, indent=1))
        print(variant, seeds, f"{group[0]['total_seconds']:.0f}s", flush=True)
    table = write_table(
        [r for r in results if (r["steps"], r.get("batch_size")) == (args.steps, args.batch_size)]
    )
    (out / "table.md").write_text(table)
    print(table)


def write_table(results: list[dict]) -> str:
    """Exact match per size, mean +- std over seeds (ddof=1), and the final training loss."""
    sizes = sorted({int(s) for r in results for s in r["test"]})
    lines = [
        "| model | final loss | " + " | ".join(f"n={s}" for s in sizes) + " | all |",
        "|---" * (len(sizes) + 3) + "|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        cells = [f"{np.mean([r['final_loss'] for r in runs]):.3f}"]
        for keys in [[str(s)] for s in sizes] + [[str(s) for s in sizes]]:
            values = [
                sum(r["test"][k][0] for k in keys) / sum(r["test"][k][1] for k in keys)
                for r in runs
            ]
            std = np.std(values, ddof=1) if len(values) > 1 else float("nan")
            cells.append(f"{np.mean(values):.2f} +- {std:.2f}")
        lines.append(f"| {variant} ({len(runs)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
