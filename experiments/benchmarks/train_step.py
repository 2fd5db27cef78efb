"""Train-step throughput of the trainer's jitted step on this machine.

For each model: step time (median over repeats, after compiling), examples/s,
and the achieved FLOP/s (XLA's cost analysis of the compiled step) as a
fraction of this machine's float32 matmul peak, measured here with a large
jitted matmul.

    .venv/bin/python experiments/benchmarks/train_step.py [--batch 128] [--repeats 5] [--models cct_7_3x1]

The CCT-7/3x1 row is also measured with the batch split into micro-batches
(``config.grad_accum_steps``, accumulated inside the one jitted step): the same
update, with activations a quarter of the size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from effformer.data import DatasetInfo
from effformer.train import default_config
from effformer.train import experiment as experiment_lib
from effformer.train.steps import make_train_step


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
    """float32 FLOP/s of a jitted square matmul, the best of ``repeats``."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = min(_time(lambda: matmul(a, b).block_until_ready()) for _ in range(repeats))
    return 2 * size**3 / best


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def benchmark_model(
    name: str,
    model_kwargs: dict,
    image_shape: tuple,
    num_classes: int,
    batch: int,
    repeats: int,
    grad_accum_steps: int = 1,
) -> dict:
    config = default_config()
    config.model.name = name
    config.model.kwargs = model_kwargs
    config.data.name = "digits"
    config.task.name = "image_classification"
    config.global_batch_size = batch
    config.grad_accum_steps = grad_accum_steps
    config.num_train_steps = 1000
    config.mesh.num_devices = 1
    info = DatasetInfo(
        name="synthetic",
        task="image_classification",
        num_classes=num_classes,
        input_shape=image_shape,
        splits={"train": 50_000, "test": 10_000},
        train_split="train",
        eval_split="test",
    )
    # The step does not depend on the data source: use synthetic inputs of the right shape.
    original = experiment_lib.get_dataset_info
    experiment_lib.get_dataset_info = lambda data_config: info
    try:
        exp = experiment_lib.build_experiment(config)
    finally:
        experiment_lib.get_dataset_info = original
    state = exp.init_state()
    rng = np.random.default_rng(0)
    batch_arrays = {
        "inputs": jnp.asarray(rng.normal(size=(batch, *image_shape)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, num_classes, size=batch), jnp.int32),
    }
    step = make_train_step(exp)
    compiled = step.lower(state, batch_arrays).compile()
    flops = compiled.cost_analysis().get("flops", float("nan"))
    # XLA's cost analysis counts a loop body once: the micro-batch loop runs it
    # grad_accum_steps times. (The optimizer update outside the loop is then
    # overcounted by that factor, a few FLOPs per parameter: negligible here.)
    flops *= grad_accum_steps
    state, _ = compiled(state, batch_arrays)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, batch_arrays)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return dict(
        name=name, params=params, seconds=seconds, examples=batch / seconds, flops=flops / seconds
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=None, help="only these model names")
    args = parser.parse_args()
    peak = matmul_peak_flops()
    cases = [  # name, kwargs, input shape, classes, micro-batches
        ("vit_digits", {}, (8, 8, 1), 10, 1),
        ("vit_digits", {"patch_size": 1}, (8, 8, 1), 10, 1),  # pixel tokens: 64 + class token
        ("cct_7_3x1", {}, (32, 32, 3), 10, 1),
        ("cct_7_3x1", {}, (32, 32, 3), 10, 4),
    ]
    if args.models:
        cases = [case for case in cases if case[0] in args.models]
    print(
        f"float32 matmul peak (2048^3, best of 10): {peak / 1e9:.1f} GFLOP/s on {jax.devices()[0].device_kind}"
    )
    print()
    print(
        "| model | input | params | batch (micro-batches) | step time (s) | examples/s | GFLOP/s "
        "| % of peak |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory():
        for name, kwargs, shape, classes, micro in cases:
            r = benchmark_model(name, kwargs, shape, classes, args.batch, args.repeats, micro)
            print(
                f"| {name} | {'x'.join(map(str, shape))} | {r['params']:,} | {args.batch} ({micro}) | "
                f"{r['seconds']:.3f} | {r['examples']:.1f} | {r['flops'] / 1e9:.1f} | "
                f"{100 * r['flops'] / peak:.0f}% |"
            )


if __name__ == "__main__":
    main()
