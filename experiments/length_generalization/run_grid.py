"""Length generalisation of a decoder-only Transformer under five position encodings.

Kazemnejad et al. (2023), "The Impact of Positional Encoding on Length
Generalization in Transformers": train on short instances, test on longer ones.
Encodings: NoPE (``none``), sinusoidal APE, T5 relative bias, ALiBi, RoPE.

    .venv/bin/python experiments/length_generalization/run_grid.py \
        --tasks sorting,summation --seeds 0 --steps 300 --out experiments/length_generalization/results

Writes ``results.json`` (per run: exact match per size on ``test`` = training
sizes and ``test_long`` = longer sizes), ``table.md`` and ``accuracy_vs_length.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sequence_runs import run  # noqa: E402

ENCODINGS = ("none", "sinusoidal", "t5", "alibi", "rope")
MODEL = dict(num_layers=2, embed_dim=64, num_heads=4, ffn_hidden_dim=128, max_length=128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="copy,reverse,sorting,summation")
    parser.add_argument("--encodings", default=",".join(ENCODINGS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["task"], r["encoding"], r["seed"], r["steps"]) for r in results}
    for task in args.tasks.split(","):
        for encoding in args.encodings.split(","):
            for seed in map(int, args.seeds.split(",")):
                if (task, encoding, seed, args.steps) in done:
                    continue
                result = run(task, "lm_decoder", {**MODEL, "position_encoding": encoding},
                             seed=seed, steps=args.steps, batch_size=args.batch_size)  # fmt: skip
                scores = {split: {str(k): v for k, v in buckets.items()}
                          for split, buckets in result.pop("scores").items()}  # fmt: skip
                results.append(dict(task=task, encoding=encoding, seed=seed, steps=args.steps,
                                    scores=scores, **result))  # fmt: skip
                results_path.write_text(json.dumps(results, indent=1))
                print(task, encoding, seed, f"{result['total_seconds']:.0f}s", flush=True)
    write_report(results, out)


def _accuracy(runs, split, size):
    right = sum(r["scores"][split].get(str(size), (0, 0))[0] for r in runs)
    count = sum(r["scores"][split].get(str(size), (0, 0))[1] for r in runs)
    return right / count if count else float("nan")


def write_report(results: list[dict], out: Path) -> None:
    """Markdown table (mean exact match over seeds) and a plot of accuracy vs size."""
    lines = []
    tasks = sorted({r["task"] for r in results})
    for task in tasks:
        runs = [r for r in results if r["task"] == task]
        sizes = sorted({int(s) for r in runs for split in r["scores"] for s in r["scores"][split]})
        seeds = sorted({r["seed"] for r in runs})
        lines += [f"### {task} (seeds {seeds}, {runs[0]['steps']} steps)", ""]
        lines.append("| encoding | " + " | ".join(map(str, sizes)) + " |")
        lines.append("|---" * (len(sizes) + 1) + "|")
        for encoding in ENCODINGS:
            enc_runs = [r for r in runs if r["encoding"] == encoding]
            if not enc_runs:
                continue
            cells = []
            for size in sizes:
                split = "test" if str(size) in enc_runs[0]["scores"]["test"] else "test_long"
                cells.append(f"{_accuracy(enc_runs, split, size):.2f}")
            lines.append(f"| {encoding} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / "table.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        runs = [r for r in results if r["task"] == task]
        train_high = max(int(s) for r in runs for s in r["scores"]["test"])
        for encoding in ENCODINGS:
            enc_runs = [r for r in runs if r["encoding"] == encoding]
            if not enc_runs:
                continue
            sizes = sorted(
                {int(s) for r in enc_runs for sp in r["scores"] for s in r["scores"][sp]}
            )
            values = [_accuracy(enc_runs, "test" if s <= train_high else "test_long", s)
                      for s in sizes]  # fmt: skip
            ax.plot(sizes, values, marker="o", label=encoding)
        ax.axvline(train_high + 0.5, color="gray", linestyle="--")
        ax.set(title=task, xlabel="instance size", ylabel="exact match", ylim=(-0.02, 1.02))
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_length.png", dpi=100)


if __name__ == "__main__":
    main()
