"""Train the arms of ``config.py`` and score their greedy decodes; prints a Markdown table.

    nice -n 10 .venv/bin/python experiments/paraformer/run.py --seeds 0 1 --steps 300 \
        [--arms paraformer paraformer_mwer ...] [--workdir /tmp/paraformer_runs]

``--score-only`` restores the runs of ``--workdir`` and scores them again, all
arms in one process (so their decode times are measured under the same
load). Every run goes through ``train_and_evaluate`` (the config's model, task and
optimiser; ``--steps`` replaces ``num_train_steps``). Then, on the held-out
``test`` split (512 utterances, batches of 64):

* Paraformer arms: ``Paraformer.recognize``, one jitted call per batch (the
  predictor's count, one decoder pass, argmax per fired slot);
* ``encoder_decoder``: ``generate_seq2seq``, greedy, one compiled loop over 13
  steps with a KV cache, stopping at ``<eos>``;

token error rate = summed Levenshtein distances to the references (``<eos>``
removed from both) over the number of reference tokens; sequence accuracy =
utterances decoded exactly; decode time = median over the 8 test batches of
the wall time of one batch's decode (after a warm-up call that compiles it),
on this machine's CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from effformer.data.tasks.speech_like import DATASET
from effformer.models.generate import generate_seq2seq
from effformer.train import restore, train_and_evaluate
from effformer.train.paraformer_task import edit_distance

CONFIG = Path(__file__).with_name("config.py")
BATCH = 64


def load_config(arm: str):
    """``experiments/paraformer/config.py:get_config(arm)`` (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location("paraformer_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arm)


def test_batches() -> list[dict[str, np.ndarray]]:
    records = [DATASET.example("test", i) for i in range(DATASET.num_examples["test"])]
    return [
        {key: np.stack([r[key] for r in records[i : i + BATCH]]) for key in records[0]}
        for i in range(0, len(records), BATCH)
    ]


def decoder(run) -> callable:
    """batch -> (hypothesis [b, H], hypothesis_mask [b, H]) for the run's model, jitted."""
    model, params = run.model, run.params
    if run.config.model.name == "paraformer":
        recognize = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, method="recognize"))

        def decode(batch):
            tokens, counts = recognize(params, batch["inputs"], batch["frame_mask"])
            tokens = jax.block_until_ready(tokens)
            slots = np.arange(tokens.shape[1])[None, :] < np.asarray(counts)[:, None]
            return np.asarray(tokens), slots & (np.asarray(tokens) != DATASET.eos_id)

        return decode

    def decode(batch):
        out = generate_seq2seq(
            model, params, jnp.asarray(batch["inputs"]), max_new_tokens=DATASET.max_targets,
            eos_id=DATASET.eos_id, pad_id=0,
        )  # fmt: skip
        tokens = np.asarray(jax.block_until_ready(out.new_tokens))
        before_eos = np.cumsum(tokens == DATASET.eos_id, axis=1) == 0
        return tokens, before_eos & (tokens != 0)

    return decode


def score(run, batches) -> dict[str, float]:
    decode = decoder(run)
    decode(batches[0])  # compiles
    distances, references, exact, times = 0, 0, 0, []
    for batch in batches:
        start = time.perf_counter()
        tokens, mask = decode(batch)
        times.append(time.perf_counter() - start)
        targets = batch["targets"]
        lengths = np.sum((targets != 0) & (targets != DATASET.eos_id), axis=1)
        distance = np.asarray(
            edit_distance(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(targets),
                          jnp.asarray(lengths))
        )  # fmt: skip
        distances += int(distance.sum())
        references += int(lengths.sum())
        exact += int((distance == 0).sum())
    return {
        "token_error_rate": distances / references,
        "sequence_accuracy": exact / sum(len(b["targets"]) for b in batches),
        "decode_ms_per_batch": 1000 * statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arms = ["paraformer", "paraformer_no_glancing", "paraformer_mwer", "encoder_decoder"]
    parser.add_argument("--arms", nargs="+", default=arms)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="a JSON file for every run's scores")
    parser.add_argument(
        "--score-only", action="store_true",
        help="restore the runs already in --workdir and score them again (decode times of "
        "every arm measured in one process, under the same load)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.score_only and not args.workdir:
        parser.error("--score-only needs the --workdir of earlier runs")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="paraformer_runs_"))
    print(f"load average at start: {os.getloadavg()}; workdirs under {root}", flush=True)
    batches = test_batches()
    results = []
    for arm in args.arms:
        for seed in args.seeds:
            config = load_config(arm)
            config.seed = seed
            config.num_train_steps = args.steps
            config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, args.steps // 4)
            workdir = root / f"{arm}_seed{seed}"
            start, cpu = time.perf_counter(), time.process_time()
            if not args.score_only:
                train_and_evaluate(config, workdir)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            run = restore(workdir)
            params = sum(x.size for x in jax.tree.leaves(run.params))
            result = dict(arm=arm, seed=seed, params=params, step=run.step)
            if not args.score_only:
                result.update(train_wall_s=wall, train_cpu_s=cpu)
            result.update(score(run, batches))
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nload average at end: {os.getloadavg()}\n")
    print(
        "| arm | params | test token error rate | test sequence accuracy | decode ms / batch of 64 |"
    )
    print("| --- | --- | --- | --- | --- |")
    for arm in args.arms:
        rows = [r for r in results if r["arm"] == arm]
        ter = ", ".join(f"{r['token_error_rate']:.3f}" for r in rows)
        acc = ", ".join(f"{r['sequence_accuracy']:.3f}" for r in rows)
        ms = statistics.median(r["decode_ms_per_batch"] for r in rows)
        print(f"| {arm} | {rows[0]['params']:,} | {ter} | {acc} | {ms:.1f} |")


if __name__ == "__main__":
    main()
