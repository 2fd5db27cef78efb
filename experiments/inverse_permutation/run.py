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

sys.path.insert(0, str(Path(__file__).parents[1] / "length_generalization"))

from sequence_runs import run  # noqa: E402

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
    results = []
    for variant in args.variants.split(","):
        dataset, model, kwargs = VARIANTS[variant]
        for seed in map(int, args.seeds.split(",")):
            result = run(dataset, model, {**kwargs, "position_encoding": args.position_encoding},
                         seed=seed, steps=args.steps, batch_size=args.batch_size,
                         eval_splits=("test",))  # fmt: skip
            scores = {str(k): v for k, v in result.pop("scores")["test"].items()}
            results.append(
                dict(variant=variant, seed=seed, steps=args.steps, test=scores, **result)
            )
            (out / "results.json").write_text(json.dumps(results, indent=1))
            print(variant, seed, f"{result['total_seconds']:.0f}s", flush=True)
    sizes = sorted({int(s) for r in results for s in r["test"]})
    lines = [
        "| model | " + " | ".join(f"n={s}" for s in sizes) + " |",
        "|---" * (len(sizes) + 1) + "|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        cells = []
        for s in sizes:
            right = sum(r["test"][str(s)][0] for r in runs)
            count = sum(r["test"][str(s)][1] for r in runs)
            cells.append(f"{right / count:.2f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
