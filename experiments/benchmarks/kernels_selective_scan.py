"""Benchmark of the Pallas selective-scan kernel against the XLA implementations.

Three Markdown tables:

  1. correctness: ``implementation="pallas"`` against ``"reference"`` at small
     sizes (forward, last state and every gradient; the largest absolute
     difference divided by the reference's largest magnitude), in interpret
     mode on CPU and compiled on a GPU;
  2. speed at the issue's shape (batch 2, d 1536, n 16, L 4096; B and C
     ``[batch, n, L]``; D, z, delta_bias and softplus as the Mamba block calls
     the op): forward and forward+backward time of every implementation, the
     achieved GB/s over the bytes the op must move (inputs read and outputs
     written once; the ``[batch, d, n, L]`` states never reaching memory), that
     as a fraction of the measured copy bandwidth, and the speed-up of the
     kernel over the fastest XLA implementation. On CPU this table is printed
     with "not measured" cells: interpret mode says nothing about GPU speed, and
     the CPU timings of the XLA paths are in selective_scan.py's table;
  3. with ``--sweep`` on a GPU: the kernel alone (``selective_scan_pallas`` on
     pre-processed inputs) for the defaults and their untimed neighbours
     (sequence blocks, channel blocks, chunks, warps), to tune the defaults.

Run:
  .venv/bin/python experiments/benchmarks/kernels_selective_scan.py            # CPU or GPU
  python experiments/benchmarks/kernels_selective_scan.py --sweep               # GPU, tuning
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from effformer.kernels.selective_scan import (
    DEFAULT_CHANNEL_BLOCK,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_NUM_WARPS,
    DEFAULT_NUM_WARPS_CHUNKED,
    DEFAULT_SEQ_BLOCK,
    selective_scan_pallas,
)
from effformer.ops.selective_scan import IMPLEMENTATIONS as XLA_IMPLEMENTATIONS
from effformer.ops.selective_scan import selective_scan

sys.path.insert(0, str(Path(__file__).parent))
from timing import median_seconds  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, d, n, length, B_shape=None, C_shape=None, dtype=jnp.float32, seed=0):
    """The op's arguments as the Mamba block passes them (B, C [batch, n, L] by default)."""
    keys = jax.random.split(jax.random.key(seed), 8)
    normal = lambda i, shape: jax.random.normal(keys[i], shape, dtype)
    return dict(
        u=normal(0, (batch, d, length)),
        delta=normal(1, (batch, d, length)) * 0.5 - 2.0,
        A=-jnp.exp(normal(2, (d, n))),
        B=normal(3, B_shape or (batch, n, length)),
        C=normal(4, C_shape or (batch, n, length)),
        D=jnp.ones((d,), dtype),
        z=normal(5, (batch, d, length)),
        delta_bias=jax.random.uniform(keys[6], (d,), dtype, minval=-4.0, maxval=-2.0),
    )


def op_functions(implementation: str, mask=None):
    """Jitted forward (out, last state) and forward+backward (gradients of all arguments)."""

    def forward(args):
        return selective_scan(**args, delta_softplus=True, return_last_state=True, mask=mask,
                              implementation=implementation)  # fmt: skip

    def loss(args):
        out, state = forward(args)
        # Cotangents that are not all ones: z for out, A (broadcast) for the state.
        return jnp.sum(out * args["z"]) + jnp.sum(state * args["A"])

    return jax.jit(forward), jax.jit(jax.grad(loss))


def copy_bandwidth(reps: int) -> float:
    """Measured bytes/s of a large elementwise copy (read + write) on the default device."""
    big = jnp.arange(256 * 2**20, dtype=jnp.float32)  # 1 GiB
    return 2 * big.nbytes / median_seconds(jax.jit(lambda a: a + 1.0), big, repeats=reps)


def io_bytes(batch, d, n, length, backward: bool) -> int:
    """Bytes the op must move, float32: [batch, d, L] arrays and B, C [batch, n, L].

    Forward: read u, delta, z, B, C; write out (the small A, D, bias, state
    ignored). Backward adds: read u, delta, z, B, C and the output cotangent
    again, write du, ddelta, dz, dB, dC.
    """
    per_channel = 4 * batch * d * length
    per_state = 4 * batch * n * length
    forward = 4 * per_channel + 2 * per_state
    if not backward:
        return forward
    return forward + (4 * per_channel + 2 * per_state) + (3 * per_channel + 2 * per_state)


def correctness_table(interpret_note: str) -> None:
    cases = [
        ("B, C [batch, n, L], mask", dict(), True),
        ("B [d, n], C [batch, 2, n, L]", dict(B_shape=(16, 16), C_shape=(2, 2, 16, 100)), False),
    ]
    print(f"Correctness of implementation='pallas' vs 'reference' ({interpret_note}), float32, "
          "batch 2, d 16, n 16, L 100: max |pallas - reference| / max |reference|.\n")  # fmt: skip
    print("| case | out | last state | " + " | ".join(f"d{name}" for name in NAMES) + " |")
    print("| --- " * (3 + len(NAMES)) + "|")
    for label, shapes, with_mask in cases:
        args = make_inputs(2, 16, 16, 100, **shapes)
        mask = None
        if with_mask:
            mask = jnp.arange(100)[None, :] < jnp.array([[100], [61]])
        results = {}
        for implementation in ("pallas", "reference"):
            forward, grad = op_functions(implementation, mask)
            results[implementation] = (*forward(args), *(grad(args)[k] for k in NAMES))
        errors = [
            float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
            for g, w in zip(results["pallas"], results["reference"], strict=True)
        ]
        print(f"| {label} | " + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)
    print()


def speed_table(batch, d, n, length, implementations, reps, on_gpu: bool) -> None:
    bandwidth = copy_bandwidth(reps) if on_gpu else None
    device = jax.devices()[0].device_kind
    if on_gpu:
        print(f"Speed on {device}: batch {batch}, d {d}, n {n}, L {length}, float32; "
              f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s; median of {reps}.\n")  # fmt: skip
    else:
        print(f"Speed: batch {batch}, d {d}, n {n}, L {length}: GPU columns not measured "
              f"(backend {jax.default_backend()}: no GPU).\n")  # fmt: skip
    print("| implementation | pass | ms | GB/s | of copy bandwidth | pallas speed-up |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    args = make_inputs(batch, d, n, length)
    for backward, label in ((False, "forward"), (True, "fwd+bwd")):
        moved = io_bytes(batch, d, n, length, backward)
        seconds = {}
        for implementation in implementations:
            if not on_gpu:
                print(f"| {implementation} | {label} | not measured | not measured | "
                      "not measured | not measured |")  # fmt: skip
                continue
            fn = op_functions(implementation)[int(backward)]
            seconds[implementation] = median_seconds(fn, args, repeats=reps)
        if not on_gpu:
            continue
        xla = [s for impl, s in seconds.items() if impl in XLA_IMPLEMENTATIONS]
        for implementation, s in seconds.items():
            speedup = f"{min(xla) / s:.1f}x" if implementation == "pallas" and xla else ""
            print(f"| {implementation} | {label} | {s * 1e3:.2f} | {moved / s / 1e9:.0f} | "
                  f"{moved / s / bandwidth:.0%} | {speedup} |", flush=True)  # fmt: skip
    print()


def sweep_table(batch, d, n, length, reps) -> None:
    """The kernel alone on pre-processed inputs, for each block / chunk configuration."""
    args = make_inputs(batch, d, n, length)
    dt = jax.nn.softplus(args["delta"] + args["delta_bias"][:, None])
    core = (args["u"], dt, args["A"], args["B"], args["C"])
    print(f"Kernel alone (selective_scan_pallas, no D/z/softplus), batch {batch}, d {d}, n {n}, "
          f"L {length}; defaults: seq_block {DEFAULT_SEQ_BLOCK}, channel_block "
          f"{DEFAULT_CHANNEL_BLOCK}, chunk_size {DEFAULT_CHUNK_SIZE}, num_warps "
          f"{DEFAULT_NUM_WARPS_CHUNKED} (chunks) / {DEFAULT_NUM_WARPS} (one chunk). "
          f"chunk_size {length}: one chunk, the one-pass scan.\n")  # fmt: skip
    print("| channel_block | seq_block | chunk_size | num_warps | forward ms | fwd+bwd ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    # The defaults first, then their untimed neighbours (the chunk sizes and warps around
    # them were timed on the H200: experiments/benchmarks/README.md, second session).
    configurations = [
        (DEFAULT_CHANNEL_BLOCK, DEFAULT_SEQ_BLOCK, DEFAULT_CHUNK_SIZE, DEFAULT_NUM_WARPS_CHUNKED),
        *itertools.product((4, 8), (8, 32), (256,), (1,)),
        (4, DEFAULT_SEQ_BLOCK, 256, 1),
        (8, DEFAULT_SEQ_BLOCK, 1024, 1),
    ]
    for channel_block, seq_block, chunk_size, num_warps in configurations:
        options = dict(
            channel_block=channel_block,
            seq_block=seq_block,
            chunk_size=chunk_size,
            num_warps=num_warps,
        )

        def forward(core, options=options):
            return selective_scan_pallas(*core, **options)

        def loss(core, options=options):
            y, last = selective_scan_pallas(*core, **options)
            return jnp.sum(y * core[0]) + jnp.sum(last)

        cells = []
        for fn in (jax.jit(forward), jax.jit(jax.grad(loss))):
            try:
                cells.append(f"{median_seconds(fn, core, repeats=reps) * 1e3:.2f}")
            except Exception as error:  # a configuration Triton cannot compile: report it
                cells.append(f"failed: {type(error).__name__}")
        row = f"| {channel_block} | {seq_block} | {chunk_size} | {num_warps} | "
        print(row + " | ".join(cells) + " |", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--d", type=int, default=1536)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument(
        "--implementations", nargs="+", default=["pallas", "chunked", "associative", "reference"]
    )
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="GPU: time block configurations")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()

    on_gpu = jax.default_backend() == "gpu"
    if not args.skip_correctness:
        correctness_table("compiled" if on_gpu else "interpret mode on CPU")
    if not args.skip_speed:
        speed_table(
            args.batch, args.d, args.n, args.length, args.implementations, args.reps, on_gpu
        )
    if args.sweep and on_gpu:
        sweep_table(args.batch, args.d, args.n, args.length, args.reps)


if __name__ == "__main__":
    main()
