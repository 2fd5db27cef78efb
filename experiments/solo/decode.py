"""Answer the digits_vqa test questions by KV-cached greedy decoding with a trained SOLO run.

    nice -n 10 .venv/bin/python experiments/solo/decode.py --workdir /tmp/solo_digits_vqa/solo_seed0

Restores the run's checkpoint (``effformer.train.restore``), feeds every test
record's prompt (its image tokens and question, ``inputs[:prompt_length]``,
right-padded) with its patches to ``effformer.models.solo.generate`` (greedy,
stops at ``<eos>``), and prints the exact match of the generated answers (the
answer token and ``<eos>``) per question and overall, beside the run's
teacher-forced ``exact_match`` eval metrics, which must be the same numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from effformer.data import digits_vqa as vqa
from effformer.models import solo
from effformer.train import restore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--batch", type=int, default=480)
    args = parser.parse_args()
    run = restore(args.workdir)
    if run.experiment.config.task.get("zero_patches", False):
        raise SystemExit(
            "decode.py: this run is the text-only control (zero_patches); use a solo run."
        )
    model, params = run.experiment.model, run.params
    size = vqa.DATASET.info.splits["test"]
    right = np.zeros(size, bool)
    questions = np.zeros(size, np.int32)
    for start in range(0, size, args.batch):
        records = [
            vqa.DATASET.example("test", i) for i in range(start, min(start + args.batch, size))
        ]
        batch = {key: np.stack([r[key] for r in records]) for key in records[0]}
        lengths = batch["prompt_length"]
        width = int(lengths.max())
        prompts = np.where(np.arange(width) < lengths[:, None], batch["inputs"][:, :width], 0)
        indices = np.where(
            np.arange(width) < lengths[:, None], batch["patch_indices"][:, :width], -1
        )
        out = solo.generate(model, params, prompts.astype(np.int32), batch["patches"],
                            indices.astype(np.int32), lengths, max_new_tokens=2,
                            eos_id=vqa.EOS_ID, pad_id=vqa.PAD_ID)  # fmt: skip
        rows = np.arange(len(records))
        answers = np.stack(
            [batch["targets"][rows, lengths - 1], batch["targets"][rows, lengths]], 1
        )
        right[start : start + len(records)] = (np.asarray(out.new_tokens) == answers).all(1)
        questions[start : start + len(records)] = batch["question_type"]
    metrics = [
        json.loads(line) for line in (Path(args.workdir) / "metrics.jsonl").read_text().splitlines()
    ]
    forced = [m for m in metrics if m.get("split") == "eval"][-1]
    print("| question | generated (KV cache) exact match | teacher-forced eval exact_match |")
    print("| --- | ---: | ---: |")
    for index, name in enumerate(vqa.QUESTION_TYPES):
        chosen = questions == index
        print(
            f"| {name} | {100 * right[chosen].mean():.2f} | {100 * forced[f'exact_match/{name}']:.2f} |"
        )
    print(f"| all | {100 * right.mean():.2f} | {100 * forced['exact_match']:.2f} |")


if __name__ == "__main__":
    main()
