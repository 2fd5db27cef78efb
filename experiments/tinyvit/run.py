"""Every arm of experiments/tinyvit/digits.py for several seeds, and one Markdown table.

    .venv/bin/python experiments/tinyvit/run.py --seeds 0 1 2 [--top_k 1 3 10] [--root DIR] \
        [--teacher_workdir DIR]

Trains the teacher once (``ROOT/teacher``, skipped if it is there; or takes
``--teacher_workdir``, any trained run on the same 16x16 digits), then per
seed: the student from scratch, and for each K a store of the teacher's top-K
over that seed's training stream (``save_teacher_logits``, what
``effformer save-teacher-logits`` runs) and the student trained from it. A run
or store already in ROOT is reused. Prints test accuracy (mean ± std and per
seed) and loss, the teacher's top-1 accuracy on the stored (augmented) stream
and the mean probability its top K hold, the store's size and the wall time of
the teacher pass and of training.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import numpy as np

from effformer.data.registry import get_dataset_spec, load_builder
from effformer.data.teacher_store import open_teacher_store
from effformer.train import evaluate, train_and_evaluate
from effformer.train.metric_writers import read_metrics
from effformer.train.teacher_logits import save_teacher_logits


def _config(arm: str, seed: int = 0):
    path = Path(__file__).with_name("digits.py")
    spec = importlib.util.spec_from_file_location("tinyvit_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arm)
    config.seed = seed
    return config


def _train(config, workdir: Path) -> dict:
    """Test accuracy and loss, training wall time (reused from result.json when present)."""
    result_file = workdir / "result.json"
    if not result_file.is_file():
        start = time.perf_counter()
        result = train_and_evaluate(config, workdir)
        record = {"accuracy": result["eval"]["accuracy"], "seconds": time.perf_counter() - start}
        result_file.write_text(json.dumps(record))
    record = json.loads(result_file.read_text())
    return {**record, "loss": read_metrics(workdir, "eval")[-1]["loss"]}


def _labels() -> np.ndarray:
    config = _config("student").data
    spec = get_dataset_spec(config.name)
    source = load_builder(spec, config.data_dir).as_data_source(spec.train_split)
    return np.asarray([source[i][spec.label_key] for i in range(len(source))])


def _store(seed: int, top_k: int, teacher: Path, out: Path, labels: np.ndarray) -> dict:
    """The store for ``seed`` (written if missing): size, teacher-pass wall time, and over
    the stream the teacher's top-1 accuracy and the mean probability mass of its top K."""
    timing = out.with_name(out.name + ".json")
    if not timing.is_file():
        start = time.perf_counter()
        save_teacher_logits(_config("student", seed), teacher, out, top_k=top_k)
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    store = open_teacher_store(out)
    rows = np.concatenate([store.shard(epoch) for epoch in range(store.epochs)])
    size = sum(path.stat().st_size for path in out.iterdir())
    return {
        "megabytes": size / 2**20,
        "teacher_accuracy": float(np.mean(rows["indices"][:, 0] == labels[rows["record"]])),
        "top_k_mass": float(np.mean(rows["values"].astype(np.float64).sum(-1))),
        **json.loads(timing.read_text()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--top_k", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--root", default="/tmp/tinyvit_digits")
    parser.add_argument(
        "--teacher_workdir", default=None, help="a trained teacher (default: train ROOT/teacher)"
    )
    args = parser.parse_args()
    root = Path(args.root)
    if args.teacher_workdir:
        teacher = Path(args.teacher_workdir)
    else:
        teacher = root / "teacher"
        _train(_config("teacher"), teacher)
    print(f"teacher {teacher}: {json.dumps(evaluate(teacher))}", flush=True)

    labels = _labels()
    rows: dict[str, list[dict]] = {"scratch": []}
    for seed in args.seeds:
        run = _train(_config("scratch", seed), root / f"scratch_s{seed}")
        rows["scratch"].append(run)
        print(f"scratch seed {seed}: {run}", flush=True)
        for top_k in args.top_k:
            store = _store(seed, top_k, teacher, root / f"store_k{top_k}_s{seed}", labels)
            config = _config("student", seed)
            config.data.teacher_store = str(root / f"store_k{top_k}_s{seed}")
            run = {**_train(config, root / f"student_k{top_k}_s{seed}"), "store": store}
            rows.setdefault(f"top-{top_k}", []).append(run)
            print(f"top-{top_k} seed {seed}: {run}", flush=True)

    print()
    print(
        "| student trained on | test accuracy % (mean ± std) | per seed | test loss | "
        "teacher top-1 on the stream % | top-K mass | store MB | teacher pass s | training s |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arm, runs in rows.items():
        accuracies = [100 * run["accuracy"] for run in runs]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        loss = statistics.mean(run["loss"] for run in runs)
        stores = [run["store"] for run in runs if "store" in run]
        cells = ["-"] * 4
        if stores:
            cells = [
                f"{100 * statistics.mean(s['teacher_accuracy'] for s in stores):.2f}",
                f"{statistics.mean(s['top_k_mass'] for s in stores):.4f}",
                f"{statistics.mean(s['megabytes'] for s in stores):.2f}",
                f"{statistics.median(s['seconds'] for s in stores):.0f}",
            ]
        training = statistics.median(run["seconds"] for run in runs)
        per_seed = ", ".join(f"{a:.2f}" for a in accuracies)
        print(
            f"| {arm} | {statistics.mean(accuracies):.2f} ± {spread:.2f} | {per_seed} | "
            f"{loss:.4f} | {' | '.join(cells)} | {training:.0f} |"
        )


if __name__ == "__main__":
    main()
