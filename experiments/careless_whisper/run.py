"""Train the arms of ``config.py`` and score them offline and streaming; prints Markdown tables.

    nice -n 10 .venv/bin/python experiments/careless_whisper/run.py --seeds 0 1 --chunks 2 4 \
        [--arms lora_causal full_causal scratch_causal] [--workdir /tmp/cw_runs] [--out r.json] \
        [--beams 2 4] [--extra-first-chunks 1] [--score-only]

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
* ``streaming TER (C, beam K)`` with ``--beams``: the same streams with the
  official beam rule (:func:`stream_beam_step`, K beams);
* ``commit delay``: over the utterances streamed exactly right, the mean number
  of chunks between the chunk in which a token's audio ends and the chunk after
  which it is committed (final);
* ``timestamp MAE / bias`` (``ts_*``: the step after which the final token was
  emitted; ``first_ts_*``: the step that first filled its slot, the official
  greedy rule's stamp): over the tokens of the utterances streamed exactly
  right, the stamp (input frames heard by then) minus the true end frame
  (``token_ends``); ``oracle_ts_mae``: the error of stamping every test token
  with the end of the chunk holding its last frame; ``exact``: the share of
  utterances streamed exactly right.

``--extra-first-chunks e`` streams with a first chunk of ``1 + e`` chunks (the
official ``extra_gran_blocks``; the runs were trained without it).

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


def timestamp_errors(result, batch, first: bool = False) -> np.ndarray:
    """Per token of the exactly streamed utterances: timestamp - true end frame (input frames).

    ``result.timestamps`` (the step after which the final token was emitted) or, with
    ``first``, ``result.first_timestamps`` (the official greedy rule's: the step that first
    filled the slot); the true end is ``token_ends`` (the frame after the token's last one).
    """
    stamps = result.first_timestamps if first else result.timestamps
    exact = distances(result.tokens, result.length, batch["targets"]) == 0
    errors = []
    for row in np.flatnonzero(exact):
        n = int(result.length[row])
        errors.append(stamps[row, :n] - batch["token_ends"][row, :n])
    return np.concatenate(errors) if errors else np.zeros((0,))


def commit_delay(result, batch, chunk_frames: int) -> list[float]:
    """Per exactly streamed utterance: chunks from each token's end to its commit."""
    delays = []
    exact = distances(result.tokens, result.length, batch["targets"]) == 0
    for row in np.flatnonzero(exact):
        for slot in range(int(result.length[row])):
            # The first step whose heard frames reach the token's end (a larger first chunk
            # counts its chunks as one step).
            end_chunk = int(np.searchsorted(result.chunk_frames, batch["token_ends"][row, slot]))
            commit_chunk = int(np.argmax(result.history_committed[:, row] > slot))
            delays.append(commit_chunk - end_chunk)
    return delays


def stream_scores(streamed, batches, chunk_frames: int, suffix: str) -> dict[str, float]:
    """TER, commit delay, timestamp errors and the share of exactly streamed utterances."""
    scores = {f"stream_ter_{suffix}": error_rate([(s.tokens, s.length) for s in streamed], batches)}
    pairs = list(zip(streamed, batches, strict=True))
    delays = sum((commit_delay(s, b, chunk_frames) for s, b in pairs), [])
    scores[f"commit_delay_{suffix}"] = float(np.mean(delays)) if delays else float("nan")
    exact = sum(int(np.sum(distances(s.tokens, s.length, b["targets"]) == 0)) for s, b in pairs)
    scores[f"exact_{suffix}"] = exact / sum(len(b["targets"]) for b in batches)
    for name, first in (("ts", False), ("first_ts", True)):
        errors = np.concatenate([timestamp_errors(s, b, first) for s, b in pairs])
        scores[f"{name}_mae_{suffix}"] = float(np.mean(np.abs(errors))) if errors.size else np.nan
        scores[f"{name}_bias_{suffix}"] = float(np.mean(errors)) if errors.size else np.nan
    # The error of a perfect streamer that stamps each token with the end of its chunk:
    ends = np.concatenate([b["token_ends"][(b["targets"] != 0) & (b["targets"] != DATASET.eos_id)]
                           for b in batches])  # fmt: skip
    scores[f"oracle_ts_mae_{suffix}"] = float(np.mean(-ends % chunk_frames))
    return scores


def score(run, batches, chunks: list[int], beams: list[int], extra: int = 0) -> dict[str, float]:
    model, params = run.model, run.params
    common = dict(max_tokens=MAX_TOKENS, eos_id=DATASET.eos_id)
    offline = [
        greedy_transcribe(model, params, b["inputs"], b["frame_mask"], **common) for b in batches
    ]
    scores = {"offline_ter": error_rate([tuple(map(np.asarray, o)) for o in offline], batches)}
    for chunk in chunks:
        for beam in [None, *beams]:
            streamed = [
                stream_transcribe(model, params, b["inputs"], b["frame_mask"], chunk_size=chunk,
                                  beam_size=beam, extra_first_chunks=extra, **common)
                for b in batches
            ]  # fmt: skip
            suffix = f"{chunk}" if beam is None else f"{chunk}_beam{beam}"
            scores.update(stream_scores(streamed, batches, chunk * model.stem_stride, suffix))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arms", nargs="+", default=["lora_causal", "full_causal", "scratch_causal"]
    )
    parser.add_argument("--chunks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--beams", type=int, nargs="*", default=[], help="beam widths to stream with too"
    )
    parser.add_argument(
        "--extra-first-chunks", type=int, default=0,
        help="stream with a first chunk of 1 + this many chunks (the official extra_gran_blocks)",
    )  # fmt: skip
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
        if args.extra_first_chunks:
            result["extra_first_chunks"] = args.extra_first_chunks
        result.update(score(run, batches, chunks, args.beams, args.extra_first_chunks))
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
    suffixes = [f"{c}" for c in args.chunks] + [f"{c}_beam{k}" for c in args.chunks
                                                 for k in args.beams]  # fmt: skip
    print("| run | trained params | offline TER | " + " | ".join(
        f"streaming TER ({x}) | timestamp MAE ({x})" for x in suffixes) + " |")  # fmt: skip
    print("| --- " * (3 + 2 * len(suffixes)) + "|")
    for arg in dict.fromkeys(r["arm"] for r in results):
        rows = [r for r in results if r["arm"] == arg]
        cells = [", ".join(f"{r['offline_ter']:.3f}" for r in rows)]
        for x in suffixes:
            for key in (f"stream_ter_{x}", f"ts_mae_{x}"):
                cells.append(", ".join(f"{r[key]:.3f}" for r in rows) if key in rows[0] else "-")
        print(f"| {arg} | {rows[0]['trained_params']:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
