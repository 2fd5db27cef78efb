"""Benchmark of effformer.ops.selective_scan: every implementation, forward and forward+backward.

Shapes as the Mamba block uses the op: batch 2, d 1536, n 16, B and C [batch, n, L],
with D, z, delta_bias and softplus. Prints Markdown tables:

  * the machine: measured memory bandwidth (large-array copy), float32 matmul
    peak, and float32 exp throughput (XLA's vectorised exp on a large array);
  * per implementation and length: median wall time, XLA's compiled
    ``memory_analysis().temp_size_in_bytes`` (peak temporary buffers, not
    counting arguments and outputs), and the time floor for the shape.

Run:
  .venv/bin/python experiments/benchmarks/selective_scan.py --lengths 1024 4096
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from effformer.ops.selective_scan import IMPLEMENTATIONS, selective_scan

# The scan touches each (batch, d, n, t) element with: dt*A, exp, dA*x + dBu (FMA),
# (dt*u)*B, x*C and the sum over n: 6 FLOPs and one exp.
FLOPS_PER_ELEMENT = 6


def wall_times(fn, *args, reps: int) -> list[float]:
    """Wall times of ``reps`` calls after a warm-up; one call when a call takes over 2 s."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if time.perf_counter() - start > 2.0:
        reps = 1
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def median_time(fn, *args, reps: int) -> float:
    return float(np.median(wall_times(fn, *args, reps=reps)))


def machine_rates(reps: int) -> dict[str, float]:
    """Measured bandwidth (bytes/s), matmul FLOP/s and exp/s on this machine."""
    big = jnp.arange(64 * 2**20, dtype=jnp.float32)  # 256 MiB
    copy = jax.jit(lambda a: a + 1.0)
    bandwidth = 2 * big.nbytes / median_time(copy, big, reps=reps)  # read + write
    m = jnp.ones((2048, 2048), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul_flops = 2 * 2048**3 / median_time(matmul, m, reps=reps)
    x = jnp.linspace(-5.0, 0.0, 16 * 2**20, dtype=jnp.float32)  # 64 MiB, stays cheap to stream
    exp_sum = jax.jit(lambda a: jnp.sum(jnp.exp(a)))
    exp_rate = x.size / median_time(exp_sum, x, reps=reps)
    return {"bandwidth": bandwidth, "matmul": matmul_flops, "exp": exp_rate}


def make_inputs(batch: int, d: int, n: int, length: int):
    keys = jax.random.split(jax.random.key(0), 8)
    u = jax.random.normal(keys[0], (batch, d, length))
    delta = jax.random.normal(keys[1], (batch, d, length)) * 0.5 - 2.0
    A = -jnp.exp(jax.random.normal(keys[2], (d, n)))
    B = jax.random.normal(keys[3], (batch, n, length))
    C = jax.random.normal(keys[4], (batch, n, length))
    D = jnp.ones((d,))
    z = jax.random.normal(keys[5], (batch, d, length))
    delta_bias = jax.random.uniform(keys[6], (d,), minval=-4.0, maxval=-2.0)
    return u, delta, A, B, C, D, z, delta_bias


def make_functions(implementation: str, chunk_size: int):
    def forward(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
            implementation=implementation, chunk_size=chunk_size,
        )  # fmt: skip

    def loss(*args):
        return jnp.sum(forward(*args) * args[6])  # a cotangent that is not all ones

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=tuple(range(8))))


def floor_row(batch: int, d: int, n: int, length: int, rates: dict[str, float]) -> str:
    elements = batch * d * n * length
    # Read u, delta, z, B, C (+ tiny A, D, bias), write out: the floor when the
    # [batch, d, n, L] state never reaches memory.
    io_bytes = 4 * (4 * batch * d * length + 2 * batch * n * length + d * n + 2 * d)
    times = {
        "bytes": io_bytes / rates["bandwidth"],
        "flops": FLOPS_PER_ELEMENT * elements / rates["matmul"],
        "exp": elements / rates["exp"],
    }
    floor = max(times.values())
    return (
        f"| floor L={length} | {io_bytes / 1e6:.0f} MB -> {times['bytes'] * 1e3:.1f} ms | "
        f"{FLOPS_PER_ELEMENT * elements / 1e6:.0f} MFLOP -> {times['flops'] * 1e3:.1f} ms | "
        f"{elements / 1e6:.1f} M exp -> {times['exp'] * 1e3:.1f} ms | {floor * 1e3:.1f} ms |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--d", type=int, default=1536)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS))
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--max-temp-gb", type=float, default=6.0,
        help="skip a configuration whose compiled temporary buffers exceed this",
    )  # fmt: skip
    args = parser.parse_args()

    rates = machine_rates(args.reps)
    print(
        f"backend: {jax.default_backend()}, devices: {jax.device_count()}, "
        f"load average at start: {os.getloadavg()[0]:.1f} (other processes share the cores)\n"
    )
    print("| machine | measured |\n| --- | --- |")
    print(f"| memory bandwidth (copy) | {rates['bandwidth'] / 1e9:.1f} GB/s |")
    print(f"| float32 matmul 2048^3 | {rates['matmul'] / 1e9:.1f} GFLOP/s |")
    print(f"| float32 exp | {rates['exp'] / 1e9:.2f} G exp/s |\n")

    print(
        "| shape | bytes floor | FLOP floor | exp floor | floor |\n| --- | --- | --- | --- | --- |"
    )
    for length in args.lengths:
        print(floor_row(args.batch, args.d, args.n, length, rates))
    print()

    print(
        "| implementation | L | forward ms (median / min) | forward temp MB "
        "| fwd+bwd ms (median / min) | fwd+bwd temp MB |\n| --- | --- | --- | --- | --- | --- |"
    )
    for length in args.lengths:
        inputs = make_inputs(args.batch, args.d, args.n, length)
        for implementation in args.implementations:
            cells = []
            for fn in make_functions(implementation, args.chunk_size):
                compiled = fn.lower(*inputs).compile()
                temp = compiled.memory_analysis().temp_size_in_bytes
                if temp > args.max_temp_gb * 1e9:
                    cells += ["skipped (memory)", f"{temp / 1e6:.0f}"]
                    continue
                times = wall_times(compiled, *inputs, reps=args.reps)
                cells += [
                    f"{np.median(times) * 1e3:.1f} / {np.min(times) * 1e3:.1f}",
                    f"{temp / 1e6:.0f}",
                ]
            print(f"| {implementation} | {length} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
