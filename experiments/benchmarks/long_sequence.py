"""Long sequences: forward + backward of one causal mixer layer, time and memory vs length.

One mixer (projections included) at width 512 with 8 heads, batch 1, float32,
jitted: value and gradients (w.r.t. the input and the parameters) of
``sum(mixer(x) ** 2)``. Rows:

* ``full (xla_blockwise)``: ``MultiHeadAttention`` with the memory-efficient
  blockwise path of ``dot_product_attention`` (never builds L x L);
* ``combiner <variant>``: ``CombinerAttention`` (segment length ceil(sqrt(L))
  unless ``--segment-length``).

Time: median wall time of ``--repeats`` calls after a warm-up call (one call
when a call takes over ``--single-call-seconds``). Memory: the compiled
program's ``memory_analysis()`` temp + output bytes (XLA's buffer assignment,
the peak it allocates beyond the inputs; not a measured RSS). The fitted
exponent is the slope of log(value) against log(L) over the measured lengths
(least squares). The machine's load average is printed with the table.

    .venv/bin/python experiments/benchmarks/long_sequence.py
    .venv/bin/python experiments/benchmarks/long_sequence.py --lengths 1024 2048 --mixers fixed
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from effformer.mixers import CombinerAttention, MultiHeadAttention
from effformer.ops.masks import AttentionMask

WIDTH, HEADS = 512, 8
MIXERS = ("full", "fixed", "logsparse", "axial", "mixture")


def build(name: str, segment_length: int | None):
    """(mixer, mask) of one causal layer."""
    if name == "full":
        mixer = MultiHeadAttention(
            num_heads=HEADS, qkv_bias=False, out_bias=False, implementation="xla_blockwise"
        )
        return mixer, AttentionMask(causal=True)
    segment_length = None if name == "logsparse" else segment_length
    return CombinerAttention(
        num_heads=HEADS, variant=name, causal=True, segment_length=segment_length
    ), None


def measure(name: str, length: int, repeats: int, single_call_seconds: float, segment_length):
    """(median seconds, temp + output bytes) of one forward + backward."""
    mixer, mask = build(name, segment_length)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, length, WIDTH)), jnp.float32)
    # The parameters do not depend on L: initialise on a short prefix.
    params = mixer.init(jax.random.key(0), x[:, : 4 * (segment_length or 64)])

    def loss(params, x):
        return jnp.sum(mixer.apply(params, x, mask=mask) ** 2)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
    memory = compiled.memory_analysis()
    nbytes = memory.temp_size_in_bytes + memory.output_size_in_bytes
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, x))  # warm-up
    first = time.perf_counter() - start
    if first > single_call_seconds:
        repeats = 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - start)
    return statistics.median(times), nbytes


def exponent(lengths, values) -> float:
    return float(np.polyfit(np.log(lengths), np.log(values), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single-call-seconds", type=float, default=5.0)
    parser.add_argument("--segment-length", type=int, default=None)
    args = parser.parse_args()

    print(f"load average at start: {os.getloadavg()}")
    print(f"\nforward + backward, one causal layer, width {WIDTH}, {HEADS} heads, batch 1, f32\n")
    header = " | ".join(f"L={n}" for n in args.lengths)
    print(f"| mixer | {header} | time exp. | memory exp. |")
    print("| --- |" + " ---: |" * (len(args.lengths) + 2))
    for name in args.mixers:
        seconds, nbytes = [], []
        for length in args.lengths:
            t, b = measure(
                name, length, args.repeats, args.single_call_seconds, args.segment_length
            )
            seconds.append(t)
            nbytes.append(b)
        cells = " | ".join(
            f"{t * 1e3:.0f} ms / {b / 2**20:.0f} MiB" for t, b in zip(seconds, nbytes, strict=True)
        )
        label = "full (xla_blockwise)" if name == "full" else f"combiner {name}"
        time_exp = exponent(args.lengths, seconds) if len(args.lengths) > 1 else float("nan")
        mem_exp = exponent(args.lengths, nbytes) if len(args.lengths) > 1 else float("nan")
        print(f"| {label} | {cells} | {time_exp:.2f} | {mem_exp:.2f} |", flush=True)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
