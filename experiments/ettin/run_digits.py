"""Run Ettin's encoder / decoder comparison on digits pixels (experiments/ettin/digits.py).

    nice -n 10 .venv/bin/python experiments/ettin/run_digits.py --seeds 0 1

For each seed, with the library's trainer, each run in a fresh workdir under
``--workdir``, the same model shape, data and recipe, N pre-training steps in
every arm:

* ``encoder``: MLM for N steps (``mlm``);
* ``decoder``: CLM for N steps (``clm``);
* ``decoder -> encoder``: CLM for N/2 (``clm_half``), then MLM for N/2 with
  bidirectional attention (``mlm_from_clm``);
* ``encoder -> decoder``: MLM for N/2 (``mlm_half``), then CLM for N/2 with
  causal attention (``clm_from_mlm``);

then every pre-trained model is fine-tuned as a digit classifier
(``classify_encoder`` for the bidirectional ones, ``classify_decoder`` for the
causal ones, the same budget), beside both classifiers trained from scratch.
Scores on the 360 test images: the classifier's accuracy; for the causal-LM
models the test bits/dim (generation: the decoder's own objective); for the
masked-LM models the test MLM loss at 30% masking (nats per masked pixel, the
same fixed corruption for every model). The half-budget first phases are
reported too (``CLM N/2``, ``MLM N/2``): what the second phase adds.

Prints Markdown tables: per seed, then the mean over seeds with each seed's
value in brackets.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import jax

from effformer.train import train_and_evaluate


def _digits_config_module():
    path = Path(__file__).with_name("digits.py")
    spec = importlib.util.spec_from_file_location("ettin_experiments_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DIGITS = _digits_config_module()
KEEP_EXISTING = False  # --keep-existing: reuse runs already in --workdir instead of redoing them

# arm -> (pre-training runs in order: (workdir name, config ARG)), classifier ARG.
ARMS = {
    "encoder (MLM N)": ([("enc", "mlm")], "classify_encoder"),
    "decoder (CLM N)": ([("dec", "clm")], "classify_decoder"),
    "decoder -> encoder (CLM N/2, MLM N/2)": (
        [("dec_half", "clm_half"), ("dec_enc", "mlm_from_clm")],
        "classify_encoder",
    ),
    "encoder -> decoder (MLM N/2, CLM N/2)": (
        [("enc_half", "mlm_half"), ("enc_dec", "clm_from_mlm")],
        "classify_decoder",
    ),
    "encoder, no pre-training": ([], "classify_encoder"),
    "decoder, no pre-training": ([], "classify_decoder"),
}
COLUMNS = ("mlm_loss", "bits_per_dim", "accuracy")


def _bits(nats: float) -> float:
    return nats / math.log(2)


def _config(arg: str, seed: int, steps: dict[str, int | None], init_from: Path | None):
    config = DIGITS.get_config(arg)
    config.seed = seed
    override = steps["classify"] if arg.startswith("classify") else steps["pretrain"]
    if override is not None:  # a shorter run (a smoke test)
        full = arg in ("mlm", "clm") or arg.startswith("classify")
        config.num_train_steps = override if full else max(override // 2, 1)
        config.optimizer.warmup_steps = config.num_train_steps // 10
    if init_from is not None:
        config.init_from.workdir = str(init_from)
    return config


def _train(config, workdir: Path) -> tuple[dict[str, float], float]:
    if workdir.exists() and not KEEP_EXISTING:
        shutil.rmtree(workdir)
    start = time.perf_counter()
    result = train_and_evaluate(config, workdir)
    return result["eval"], time.perf_counter() - start


def _score(arg: str, metrics: dict[str, float]) -> dict[str, float]:
    if arg.startswith("mlm"):
        return {"mlm_loss": metrics["loss"]}
    if arg.startswith("clm"):
        return {"bits_per_dim": _bits(metrics["loss"])}
    return {"accuracy": metrics["accuracy"]}


def run_seed(seed: int, root: Path, steps: dict[str, int | None]) -> dict:
    """{arm: scores}, {reference: scores} and the seconds of every run, for one seed."""
    root = root / f"seed{seed}"
    timings: dict[str, float] = {}
    pretrained: dict[str, dict[str, float]] = {}  # workdir name -> its scores
    results: dict[str, dict[str, float]] = {}
    for arm, (phases, classify) in ARMS.items():
        scores: dict[str, float] = {}
        source = None
        for name, arg in phases:
            if name not in pretrained:
                metrics, timings[name] = _train(_config(arg, seed, steps, source), root / name)
                pretrained[name] = _score(arg, metrics)
                print(f"seed {seed} {name} ({arg}): {timings[name]:.0f} s, {pretrained[name]}")
            scores = dict(pretrained[name])  # the final phase's objective score
            source = root / name
        name = f"{phases[-1][0]}_cls" if phases else f"scratch_{classify}"
        metrics, timings[name] = _train(_config(classify, seed, steps, source), root / name)
        scores.update(_score(classify, metrics))
        print(f"seed {seed} {arm}: {timings[name]:.0f} s fine-tuning, {scores}", flush=True)
        results[arm] = scores
    references = {
        "CLM N/2 only": pretrained["dec_half"],
        "MLM N/2 only": pretrained["enc_half"],
    }
    return dict(arms=results, references=references, timings=timings)


def _cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({', '.join(f'{value:.{digits}f}' for value in values)})"


def _table(rows: dict[str, list[dict[str, float]]]) -> None:
    print("\n| arm | test MLM loss (nats/masked pixel) | test bits/dim | test accuracy (%) |")
    print("| --- | ---: | ---: | ---: |")
    for arm, per_seed in rows.items():
        cells = []
        for column in COLUMNS:
            values = [scores[column] for scores in per_seed if column in scores]
            if column == "accuracy":
                values = [100 * value for value in values]
            cells.append(_cell(values, 1 if column == "accuracy" else 4))
        print(f"| {arm} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--workdir", default="/tmp/ettin_digits")
    parser.add_argument(
        "--keep-existing",
        action="store_true",
        help="resume (or just re-evaluate) runs already in --workdir instead of redoing them",
    )
    parser.add_argument("--pretrain-steps", type=int, default=None, help="N (smoke test)")
    parser.add_argument("--classify-steps", type=int, default=None, help="override (smoke test)")
    args = parser.parse_args()
    global KEEP_EXISTING
    KEEP_EXISTING = args.keep_existing
    steps = {"pretrain": args.pretrain_steps, "classify": args.classify_steps}
    # The seeds (and arms of one shape and budget) compile the same programs: cache them.
    jax.config.update("jax_compilation_cache_dir", str(Path(args.workdir) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    start = time.perf_counter()
    per_seed = {seed: run_seed(seed, Path(args.workdir), steps) for seed in args.seeds}
    elapsed = time.perf_counter() - start

    n = args.pretrain_steps or DIGITS.PRETRAIN_STEPS
    print(
        f"\nseeds {args.seeds}; N = {n} pre-training steps; {elapsed / 60:.1f} min wall; load "
        f"average {os.getloadavg()[0]:.1f} at the end; {jax.device_count()} devices"
    )
    for seed, result in per_seed.items():
        timings = ", ".join(f"{name} {value:.0f}" for name, value in result["timings"].items())
        print(f"seed {seed} seconds: {timings}")
    for seed, result in per_seed.items():
        print(f"\nseed {seed}:")
        _table(
            {arm: [scores] for arm, scores in {**result["arms"], **result["references"]}.items()}
        )
    print("\nmean over seeds (each seed's value in brackets):")
    rows = {arm: [r["arms"][arm] for r in per_seed.values()] for arm in ARMS}
    first = next(iter(per_seed.values()))
    rows.update(
        {ref: [r["references"][ref] for r in per_seed.values()] for ref in first["references"]}
    )
    _table(rows)


if __name__ == "__main__":
    main()
