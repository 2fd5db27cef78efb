"""Length generalisation of a decoder-only Transformer under five position encodings.

Kazemnejad et al. (2023), "The Impact of Positional Encoding on Length
Generalization in Transformers": train on short instances, test on longer ones.
Encodings: NoPE (``none``), sinusoidal APE, T5 relative bias, ALiBi, RoPE, and two
optional arms: a learned table and the sinusoidal table scaled to the tokens' RMS.

    .venv/bin/python experiments/length_generalization/run_grid.py \
        --tasks copy,reverse,sorting,parity --seeds 0,1,2 --steps 1500 --batch_size 32

Writes ``results.json`` (per run: exact match per size on ``test`` = training
sizes and ``test_long`` = longer sizes), ``table.md`` (mean +- std over seeds
per size bucket, and the mean per size) and ``accuracy_vs_length.png`` (mean
over seeds per size, shaded: +- one std). The seeds of one (task, encoding)
train side by side in one vmapped step (``sequence_runs.run_seeds``). Runs
already in ``results.json`` (same task, encoding, seed, steps and batch size)
are skipped, so an interrupted grid resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from sequence_runs import run_seeds  # noqa: E402

# The five of the paper, then two optional arms. The sinusoidal table adds values of
# size ~1 to token embeddings initialised at std 0.02, which swamps them:
# "sinusoidal_scaled" scales the table to the tokens' RMS (amplitude sqrt(2) * 0.02),
# and "learned" (a learned absolute table) starts at the tokens' scale.
ENCODINGS = ("none", "sinusoidal", "t5", "alibi", "rope", "learned", "sinusoidal_scaled")
ENCODING_SETTINGS = {
    name: {"position_encoding": name} for name in ENCODINGS if name != "sinusoidal_scaled"
}
ENCODING_SETTINGS["sinusoidal_scaled"] = {
    "position_encoding": "sinusoidal",
    "position_kwargs": {"scale": 2**0.5 * 0.02},
}
MODEL = dict(num_layers=2, embed_dim=64, num_heads=4, ffn_hidden_dim=128, max_length=128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="copy,reverse,sorting,summation")
    parser.add_argument("--encodings", default=",".join(ENCODINGS[:5]))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["task"], r["encoding"], r["seed"], r["steps"], r.get("batch_size")) for r in results}
    for task in args.tasks.split(","):
        for encoding in args.encodings.split(","):
            seeds = tuple(
                seed
                for seed in map(int, args.seeds.split(","))
                if (task, encoding, seed, args.steps, args.batch_size) not in done
            )
            if not seeds:
                continue
            group = run_seeds(task, "lm_decoder", {**MODEL, **ENCODING_SETTINGS[encoding]},
                              seeds=seeds, steps=args.steps, batch_size=args.batch_size)  # fmt: skip
            for seed, result in zip(seeds, group, strict=True):
                scores = {split: {str(k): v for k, v in buckets.items()}
                          for split, buckets in result.pop("scores").items()}  # fmt: skip
                results.append(dict(task=task, encoding=encoding, seed=seed, steps=args.steps,
                                    batch_size=args.batch_size, scores=scores, **result))  # fmt: skip
            results_path.write_text(json.dumps(results, indent=1))
            print(task, encoding, seeds, f"{group[0]['total_seconds']:.0f}s", "in-distribution:",
                  " ".join(f"{_in_distribution(r):.2f}" for r in results[-len(seeds):]),
                  flush=True)  # fmt: skip
    write_report(
        [r for r in results if (r["steps"], r.get("batch_size")) == (args.steps, args.batch_size)],
        out,
    )


def _in_distribution(result: dict) -> float:
    right, count = (sum(v[i] for v in result["scores"]["test"].values()) for i in (0, 1))
    return right / count


def _split_of(run: dict, size: int) -> str:
    return "test" if str(size) in run["scores"]["test"] else "test_long"


def _seed_accuracy(run: dict, sizes: list[int]) -> float:
    """One run's exact match over the examples of ``sizes`` (each size has the same count)."""
    cells = [run["scores"][_split_of(run, s)].get(str(s), (0, 0)) for s in sizes]
    count = sum(c for _, c in cells)
    return sum(r for r, _ in cells) / count if count else float("nan")


def _buckets(run: dict) -> list[tuple[str, list[int]]]:
    """The training sizes and the longer sizes, each cut into two halves."""
    out = []
    for split in ("test", "test_long"):
        sizes = sorted(int(s) for s in run["scores"][split])
        half = (len(sizes) + 1) // 2
        for part in (sizes[:half], sizes[half:]):
            if part:
                out.append((f"{part[0]}-{part[-1]}" if len(part) > 1 else str(part[0]), part))
    return out


def write_report(results: list[dict], out: Path) -> None:
    """Markdown tables (mean +- std over seeds) and a plot of accuracy vs size."""
    lines = []
    tasks = list(dict.fromkeys(r["task"] for r in results))
    for task in tasks:
        runs = [r for r in results if r["task"] == task]
        seeds = sorted({r["seed"] for r in runs})
        buckets = _buckets(runs[0])
        sizes = [s for _, part in buckets for s in part]
        train_sizes = sorted(int(s) for s in runs[0]["scores"]["test"])
        lines += [
            f"### {task} (seeds {seeds}, {runs[0]['steps']} steps of batch "
            f"{runs[0].get('batch_size')}; training sizes {train_sizes[0]}-{train_sizes[-1]})",
            "",
            "Exact match, mean +- std over seeds (std with ddof=1), by size bucket:",
            "",
            "| encoding | final loss | " + " | ".join(name for name, _ in buckets) + " |",
            "|---" * (len(buckets) + 2) + "|",
        ]
        for encoding in ENCODINGS:
            enc_runs = [r for r in runs if r["encoding"] == encoding]
            if not enc_runs:
                continue
            cells = [f"{np.mean([r['final_loss'] for r in enc_runs]):.3f}"]
            for _, part in buckets:
                values = [_seed_accuracy(r, part) for r in enc_runs]
                std = np.std(values, ddof=1) if len(values) > 1 else float("nan")
                cells.append(f"{np.mean(values):.2f} +- {std:.2f}")
            lines.append(f"| {encoding} | " + " | ".join(cells) + " |")
        lines += ["", "Mean over seeds, per size:", ""]
        lines.append("| encoding | " + " | ".join(map(str, sizes)) + " |")
        lines.append("|---" * (len(sizes) + 1) + "|")
        for encoding in ENCODINGS:
            enc_runs = [r for r in runs if r["encoding"] == encoding]
            if enc_runs:
                cells = [
                    f"{np.mean([_seed_accuracy(r, [s]) for r in enc_runs]):.2f}" for s in sizes
                ]
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
            sizes = sorted({int(s) for sp in enc_runs[0]["scores"].values() for s in sp})
            values = np.array([[_seed_accuracy(r, [s]) for s in sizes] for r in enc_runs])
            # ddof=1 like the table; a single seed has no spread to shade.
            mean = values.mean(0)
            std = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
            (line,) = ax.plot(sizes, mean, marker="o", markersize=3, label=encoding)
            ax.fill_between(sizes, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax.axvline(train_high + 0.5, color="gray", linestyle="--")
        ax.set(title=task, xlabel="instance size", ylabel="exact match", ylim=(-0.02, 1.02))
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_length.png", dpi=100)


if __name__ == "__main__":
    main()
