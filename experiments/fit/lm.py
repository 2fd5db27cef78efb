"""FIT LM vs a standard decoder of similar size on a generated sequence task, several seeds.

    nice -n 10 .venv/bin/python experiments/fit/lm.py --dataset copy --seeds 0 1 2 --steps 600

Task: any causal_lm dataset of ``effformer/data/tasks`` (default ``copy``:
prompt of 1-8 digits, ``<sep>``, the same digits, ``<eos>``; rows are padded
to 34 tokens, the longest ``test_long`` instance of 16 digits). The answer's
token ``j`` needs the prompt's token ``j``, ``size + 1`` positions back, so
for sizes >= ``group_size`` FIT must carry it between groups through the
latents (shifted right by one group before the WRITE).

Arms (width 64, 4 heads, MLP 128 everywhere; learned position tables in both):

* ``fit``: ``fit_lm``, groups of ``--group-size`` tokens (default 8: rows
  of 34 are padded to 5 groups), ``--num-latents`` latents per group
  (default 4), plan ``(1)1(1)``: a causal local layer, READ, one chunk-causal
  global layer over the latents, WRITE (from the shifted latents), a causal
  local layer;
* ``decoder``: ``lm_decoder`` with ``--decoder-layers`` (default 5) pre-norm
  causal layers over the whole row: 172,416 parameters against FIT's 171,136
  on ``copy`` (FIT's 3 self-attention layers, READ and WRITE are 5 layers'
  worth of weights).

Training and scoring: ``experiments/length_generalization/sequence_runs.py``
(the same input pipeline, the causal_lm task's loss on the answer tokens,
AdamW with warm-up and cosine decay, gradient clipping 1.0), so both arms see
the same batches for a seed. Score: exact match of the whole answer
(teacher-forced argmax = greedy decoding's exact match) on ``test`` (training
sizes) and ``test_long`` (longer sizes), averaged over sizes. ``final loss``
is the training loss of the last batch (answer tokens only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import jax

from effformer import models
from effformer.data import default_data_config, get_dataset_info

sys.path.insert(0, str(Path(__file__).parents[1] / "length_generalization"))

from sequence_runs import run  # noqa: E402

WIDTH = dict(embed_dim=64, num_heads=4, max_length=64)


def arms(args) -> dict[str, tuple[str, dict]]:
    return {
        "fit": (
            "fit_lm",
            dict(
                WIDTH,
                group_size=args.group_size,
                num_latents=args.num_latents,
                layer_plan=args.layer_plan,
                mlp_ratio=2.0,
            ),
        ),
        "decoder": (
            "lm_decoder",
            dict(
                WIDTH,
                num_layers=args.decoder_layers,
                ffn_hidden_dim=128,
                position_encoding="learned",
            ),
        ),
    }


def count_params(name: str, kwargs: dict, vocab_size: int) -> int:
    model = models.create(name, vocab_size=vocab_size, **kwargs)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs(1)))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def mean_exact_match(buckets: dict[int, tuple[int, int]]) -> float:
    """Exact match averaged over instance sizes (every size has the same weight)."""
    return statistics.mean(right / count for right, count in buckets.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="copy")
    parser.add_argument("--arms", nargs="+", default=["fit", "decoder"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--num-latents", type=int, default=4)
    parser.add_argument("--layer-plan", default="(1)1(1)")
    parser.add_argument("--decoder-layers", type=int, default=5)
    parser.add_argument("--out", default=None, help="a JSON file for every run's scores")
    args = parser.parse_args()
    info = get_dataset_info(default_data_config(args.dataset))
    vocab_size = info.vocab_size
    print(f"load average at start: {os.getloadavg()}", flush=True)
    print(f"dataset {args.dataset}: rows of {info.input_shape[0]} tokens, vocabulary {vocab_size}")
    results = []
    for arm in args.arms:
        name, kwargs = arms(args)[arm]
        for seed in args.seeds:
            result = run(args.dataset, name, kwargs, seed=seed, steps=args.steps,
                         batch_size=args.batch_size, learning_rate=args.learning_rate)  # fmt: skip
            result.update(arm=arm, seed=seed)
            results.append(result)
            print(
                f"{arm} seed {seed}: loss {result['final_loss']:.4f}, exact match test "
                f"{mean_exact_match(result['scores']['test']):.3f}, test_long "
                f"{mean_exact_match(result['scores']['test_long']):.3f}, "
                f"{result['train_seconds']:.0f} s",
                flush=True,
            )
    print(f"load average at end: {os.getloadavg()}\n")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(
        "| arm | model | params | final loss (mean) | exact match test % (mean ± std) | per seed "
        "| exact match test_long % (mean ± std) | per seed | train s (median) |"
    )
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | --- | ---: |")
    for arm in args.arms:
        name, kwargs = arms(args)[arm]
        runs = [r for r in results if r["arm"] == arm]
        cells = []
        for split in ("test", "test_long"):
            scores = [100 * mean_exact_match(r["scores"][split]) for r in runs]
            std = statistics.stdev(scores) if len(scores) > 1 else 0.0
            cells.append(f"{statistics.mean(scores):.1f} ± {std:.1f}")
            cells.append(", ".join(f"{s:.1f}" for s in scores))
        loss = statistics.mean(r["final_loss"] for r in runs)
        seconds = statistics.median(r["train_seconds"] for r in runs)
        print(
            f"| {arm} | {name} | {count_params(name, kwargs, vocab_size):,} | {loss:.3f} | "
            f"{' | '.join(cells)} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
