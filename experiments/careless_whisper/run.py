"""Train the arms of ``config.py`` and score them offline and streaming; prints Markdown tables.

    nice -n 10 .venv/bin/python experiments/careless_whisper/run.py --seeds 0 1 --chunks 2 4 \
        [--arms lora_causal full_causal scratch_causal] [--workdir /tmp/cw_runs] [--out r.json]

For each seed: an ``offline`` run, the ``offline_more`` control when asked for,
then for each chunk size C (encoder frames, 2 input frames each) the causal arms
(the fine-tunes and the control start from that seed's offline run). ``--score-only`` restores the runs of ``--workdir`` and scores
them again. On the held-out ``test`` split (512 utterances, batches of 64):

* ``offline TER``: greedy decoding with the whole input encoded at once (the
  offline run with its bidirectional encoder, a causal run with its
  block-causal one);
* ``streaming TER (C)``: :func:`stream_transcribe`, the frames fed C encoder
  frames at a time, the official greedy streaming rule (look-back 2 tokens);
  the offline run is streamed with the block-causal mask at every C and no
  fine-tuning (the naive conversion), each causal run at its own C;
* ``commit delay``: over the utterances streamed exactly right, the mean number
  of chunks between the chunk in which a token's audio ends and the chunk after
  which it is committed (final).

Token error rate = summed Levenshtein distances to the references (``<eos>``
removed) over the number of reference tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from effformer.data.tasks.speech_like import ALIGNED_DATASET as DATASET
from effformer.models.careless_whisper import greedy_transcribe, stream_transcribe
from effformer.train import restore, train_and_evaluate
from effformer.train.paraformer_task import edit_distance

CONFIG = Path(__file__).with_name("config.py")
BATCH = 64
MAX_TOKENS = DATASET.max_targets  # 12 tokens + <eos>: room for one extra


def load_config(arg: str):
    """``experiments/careless_whisper/config.py:get_config(arg)`` (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location("careless_whisper_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_batches() -> list[dict[str, np.ndarray]]:
    records = [DATASET.example("test", i) for i in range(DATASET.num_examples["test"])]
    return [
        {key: np.stack([r[key] for r in records[i : i + BATCH]]) for key in records[0]}
        for i in range(0, len(records), BATCH)
    ]


def distances(tokens: np.ndarray, length: np.ndarray, targets: np.ndarray) -> np.ndarray:
    hypothesis_mask = np.arange(tokens.shape[1])[None, :] < length[:, None]
    reference_length = np.sum((targets != 0) & (targets != DATASET.eos_id), axis=1)
    return np.asarray(
        edit_distance(jnp.asarray(tokens), jnp.asarray(hypothesis_mask), jnp.asarray(targets),
                      jnp.asarray(reference_length))
    )  # fmt: skip


def error_rate(results, batches) -> float:
    errors = sum(
        int(distances(t, n, b["targets"]).sum()) for (t, n), b in zip(results, batches, strict=True)
    )
    words = sum(
        int(np.sum((b["targets"] != 0) & (b["targets"] != DATASET.eos_id))) for b in batches
    )
    return errors / words


def commit_delay(result, batch, chunk_frames: int) -> list[float]:
    """Per exactly streamed utterance: chunks from each token's end to its commit."""
    delays = []
    exact = distances(result.tokens, result.length, batch["targets"]) == 0
    for row in np.flatnonzero(exact):
        for slot in range(int(result.length[row])):
            end_chunk = -(-int(batch["token_ends"][row, slot]) // chunk_frames) - 1
            commit_chunk = int(np.argmax(result.history_committed[:, row] > slot))
            delays.append(commit_chunk - end_chunk)
    return delays


def score(run, batches, chunks: list[int]) -> dict[str, float]:
    model, params = run.model, run.params
    common = dict(max_tokens=MAX_TOKENS, eos_id=DATASET.eos_id)
    offline = [
        greedy_transcribe(model, params, b["inputs"], b["frame_mask"], **common) for b in batches
    ]
    scores = {"offline_ter": error_rate([tuple(map(np.asarray, o)) for o in offline], batches)}
    for chunk in chunks:
        streamed = [
            stream_transcribe(model, params, b["inputs"], b["frame_mask"], chunk_size=chunk,
                              **common)
            for b in batches
        ]  # fmt: skip
        scores[f"stream_ter_{chunk}"] = error_rate(
            [(s.tokens, s.length) for s in streamed], batches
        )
        delays = sum((commit_delay(s, b, chunk * model.stem_stride)
                      for s, b in zip(streamed, batches, strict=True)), [])  # fmt: skip
        scores[f"commit_delay_{chunk}"] = float(np.mean(delays)) if delays else float("nan")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arms", nargs="+", default=["lora_causal", "full_causal", "scratch_causal"]
    )
    parser.add_argument("--chunks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="a JSON file for every run's scores")
    parser.add_argument(
        "--score-only",
        action="store_true",
        help="restore the runs already in --workdir and score them again",
    )
    args = parser.parse_args()
    if args.score_only and not args.workdir:
        parser.error("--score-only needs the --workdir of earlier runs")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="careless_whisper_runs_"))
    print(f"load average at start: {os.getloadavg()}; workdirs under {root}", flush=True)
    batches = test_batches()
    results = []

    def run_arm(arg: str, seed: int, chunks: list[int], init_from: Path | None = None) -> None:
        config = load_config(arg)
        config.seed = seed
        if init_from is not None:
            config.init_from.workdir = str(init_from)
        workdir = root / f"{arg.replace(',', '_')}_seed{seed}"
        start, cpu = time.perf_counter(), time.process_time()
        if not args.score_only:
            train_and_evaluate(config, workdir)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        run = restore(workdir)
        trainable = run.params.get("lora", run.params)
        result = dict(arm=arg, seed=seed, step=run.step,
                      params=sum(x.size for x in jax.tree.leaves(run.params)),
                      trained_params=sum(x.size for x in jax.tree.leaves(trainable)))  # fmt: skip
        if not args.score_only:
            result.update(train_wall_s=round(wall, 1), train_cpu_s=round(cpu, 1))
        result.update(score(run, batches, chunks))
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    for seed in args.seeds:
        run_arm("offline", seed, args.chunks)
        offline = root / f"offline_seed{seed}"
        if "offline_more" in args.arms:  # the control, streamed at every chunk size
            run_arm("offline_more", seed, args.chunks, offline)
        for chunk in args.chunks:
            for arm in args.arms:
                if arm == "offline_more":
                    continue
                init = offline if arm in ("lora_causal", "full_causal") else None
                run_arm(f"{arm},{chunk}", seed, [chunk], init)
    print(f"\nload average at end: {os.getloadavg()}\n")
    print(
        "| run | trained params | offline TER | "
        + " | ".join(f"streaming TER (C={c})" for c in args.chunks)
        + " | commit delay (chunks) |"
    )
    print("| --- " * (4 + len(args.chunks)) + "|")
    for arg in dict.fromkeys(r["arm"] for r in results):
        rows = [r for r in results if r["arm"] == arg]
        cells = [", ".join(f"{r['offline_ter']:.3f}" for r in rows)]
        for chunk in args.chunks:
            key = f"stream_ter_{chunk}"
            cells.append(", ".join(f"{r[key]:.3f}" for r in rows) if key in rows[0] else "-")
        delays = [f"{r[k]:.2f}" for r in rows for k in r if k.startswith("commit_delay")]
        cells.append(", ".join(delays))
        print(f"| {arg} | {rows[0]['trained_params']:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
