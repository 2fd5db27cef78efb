"""Throughput of the input pipelines on this machine (host-side, in-process).

    .venv/bin/python experiments/benchmarks/input_pipeline.py [--data_dir DIR] [--batches N]

Builds the embedded datasets in DIR on first use. Prints a Markdown table:
examples/s of train pipelines (with and without augmentation) after one warm-up batch,
and of a whole eval pass over the train split (timed from its creation).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from effformer.data import create_input_pipeline, default_data_config

CASES = [
    ("digits", "train", True, {}),
    ("digits", "train", True, dict(crop_padding=1, flip=True)),
    (
        "digits",
        "train",
        True,
        dict(
            crop_padding=1,
            flip=True,
            randaugment_num_layers=2,
            randaugment_magnitude=9.0,
            random_erasing=0.25,
        ),
    ),
    ("digits", "train", False, {}),
    ("mnist1d", "train", True, {}),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "effformer_tfds"))
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=128)
    args = parser.parse_args()
    print("| dataset | split | augmentation | batch | examples/s |")
    print("| --- | --- | --- | ---: | ---: |")
    for name, split, train, augmentation in CASES:
        config = default_data_config(name)
        config.data_dir = args.data_dir
        config.update(augmentation)
        created = time.perf_counter()
        pipeline = create_input_pipeline(
            config,
            split=split,
            global_batch_size=args.batch_size,
            train=train,
            seed=0,
            process_index=0,
            process_count=1,
        )
        if train:
            next(pipeline)  # Warm-up: opens files, starts prefetch threads.
            batches = args.batches
        else:  # A whole eval pass, timed from the pipeline's creation.
            batches = pipeline.num_batches
        start = time.perf_counter()
        for _ in range(batches):
            next(pipeline)
        elapsed = time.perf_counter() - (start if train else created)
        described = ", ".join(f"{k}={v}" for k, v in augmentation.items()) or "none"
        print(
            f"| {name} | {split} | {described} | {args.batch_size} | "
            f"{batches * args.batch_size / elapsed:,.0f} |"
        )


if __name__ == "__main__":
    main()
