"""Benchmark of the Pallas selective-scan kernel against the XLA implementations.

Three Markdown tables:

  1. correctness: ``implementation="pallas"`` in float32 against the float64
     ``"reference"`` (run on the host CPU) at small sizes (forward, last state
     and every gradient; the largest absolute difference divided by the
     reference's largest magnitude), in interpret mode on CPU, compiled on a
     GPU (the Triton kernel) or a TPU (the Mosaic kernel);
  2. speed at the issue's shape (batch 2, d 1536, n 16, L 4096; B and C
     ``[batch, n, L]``; D, z, delta_bias and softplus as the Mamba block calls
     the op): forward and forward+backward time of every implementation, the
     achieved GB/s over the bytes the op must move (inputs read and outputs
     written once; the ``[batch, d, n, L]`` states never reaching memory), that
     as a fraction of the measured copy bandwidth, and the speed-up of the
     kernel over the fastest XLA implementation. Timed on a GPU or a TPU; on
     CPU this table is printed with "not measured" cells: interpret mode says
     nothing about speed, and the CPU timings of the XLA paths are in
     selective_scan.py's table;
  3. with ``--sweep`` on a GPU or a TPU: the kernel alone on pre-processed
     inputs (``selective_scan_pallas`` on a GPU: the defaults and their
     untimed neighbours in sequence blocks, channel blocks, chunks and warps;
     ``selective_scan_tpu`` on a TPU: sequence blocks and channel blocks), to
     tune the defaults.

Run:
  .venv/bin/python experiments/benchmarks/kernels_selective_scan.py     # CPU, GPU or TPU
  python experiments/benchmarks/kernels_selective_scan.py --sweep        # GPU or TPU, tuning
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from effformer.kernels import selective_scan_tpu
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
from kernel_baselines import accelerator, failure, reference_device  # noqa: E402
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
    print(f"Correctness of implementation='pallas' in float32 vs 'reference' in float64 "
          f"({interpret_note}), batch 2, d 16, n 16, L 100: max |pallas - reference| / "
          "max |reference|.\n")  # fmt: skip
    print("| case | out | last state | " + " | ".join(f"d{name}" for name in NAMES) + " |")
    print("| --- " * (3 + len(NAMES)) + "|")
    for label, shapes, with_mask in cases:
        try:
            errors = _correctness_errors(shapes, with_mask)
        except Exception as error:  # e.g. a compiler rejecting a case: say so, go on
            print(f"| {label} | {failure(error)} |" + " |" * (1 + len(NAMES)), flush=True)
            continue
        print(f"| {label} | " + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)
    print()


def _correctness_errors(shapes: dict, with_mask: bool) -> list[float]:
    """Relative errors of out, last state and every gradient against the float64 reference."""
    args = make_inputs(2, 16, 16, 100, **shapes)
    mask = None
    if with_mask:
        mask = jnp.arange(100)[None, :] < jnp.array([[100], [61]])
    forward, grad = op_functions("pallas", mask)
    gradients = grad(args)
    got = [np.asarray(x, np.float64) for x in (*forward(args), *(gradients[k] for k in NAMES))]
    with reference_device():
        as64 = {name: np.asarray(x, np.float64) for name, x in args.items()}
        forward, grad = op_functions("reference", None if mask is None else np.asarray(mask))
        gradients = grad(as64)
        expected = [np.asarray(x) for x in (*forward(as64), *(gradients[k] for k in NAMES))]
    return [
        float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, expected, strict=True)
    ]


def speed_table(batch, d, n, length, implementations, reps, backend: str | None) -> None:
    """``backend``: "gpu" or "tpu" to time, None (CPU) for a table of "not measured"."""
    bandwidth = copy_bandwidth(reps) if backend else None
    device = jax.devices()[0].device_kind
    if backend:
        print(f"Speed on {device}: batch {batch}, d {d}, n {n}, L {length}, float32; "
              f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s; median of {reps}.\n")  # fmt: skip
    else:
        print(f"Speed: batch {batch}, d {d}, n {n}, L {length}: not measured "
              f"(backend {jax.default_backend()}: no GPU or TPU).\n")  # fmt: skip
    print("| implementation | pass | ms | GB/s | of copy bandwidth | pallas speed-up |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    args = make_inputs(batch, d, n, length)
    for backward, label in ((False, "forward"), (True, "fwd+bwd")):
        moved = io_bytes(batch, d, n, length, backward)
        seconds = {}
        for implementation in implementations:
            if not backend:
                print(f"| {implementation} | {label} | not measured | not measured | "
                      "not measured | not measured |")  # fmt: skip
                continue
            fn = op_functions(implementation)[int(backward)]
            try:
                seconds[implementation] = median_seconds(fn, args, repeats=reps)
            except Exception as error:  # e.g. a new kernel the compiler rejects: report it
                print(f"| {implementation} | {label} | {failure(error)} | | | |", flush=True)
        if not backend:
            continue
        xla = [s for impl, s in seconds.items() if impl in XLA_IMPLEMENTATIONS]
        for implementation, s in seconds.items():
            is_kernel = implementation in ("pallas", "pallas_mosaic_gpu")
            speedup = f"{min(xla) / s:.1f}x" if is_kernel and xla else ""
            print(f"| {implementation} | {label} | {s * 1e3:.2f} | {moved / s / 1e9:.0f} | "
                  f"{moved / s / bandwidth:.0%} | {speedup} |", flush=True)  # fmt: skip
    print()


def _kernel_cells(kernel, options: dict, core, reps: int) -> list[str]:
    """Forward and forward + backward ms of ``kernel(*core, **options)``, or why it failed."""

    def forward(core):
        return kernel(*core, **options)

    def loss(core):
        y, last = kernel(*core, **options)
        return jnp.sum(y * core[0]) + jnp.sum(last)

    cells = []
    for fn in (jax.jit(forward), jax.jit(jax.grad(loss))):
        try:
            cells.append(f"{median_seconds(fn, core, repeats=reps) * 1e3:.2f}")
        except Exception as error:  # a configuration the compiler rejects: report it
            cells.append(f"failed: {type(error).__name__}")
    return cells


def _gpu_sweep(core, length, reps) -> None:
    print(f"defaults: seq_block {DEFAULT_SEQ_BLOCK}, channel_block {DEFAULT_CHANNEL_BLOCK}, "
          f"chunk_size {DEFAULT_CHUNK_SIZE}, num_warps {DEFAULT_NUM_WARPS_CHUNKED} (chunks) / "
          f"{DEFAULT_NUM_WARPS} (one chunk). chunk_size {length}: one chunk, the one-pass "
          "scan.\n")  # fmt: skip
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
        cells = _kernel_cells(selective_scan_pallas, options, core, reps)
        row = f"| {channel_block} | {seq_block} | {chunk_size} | {num_warps} | "
        print(row + " | ".join(cells) + " |", flush=True)


def _tpu_sweep(core, reps) -> None:
    default = (selective_scan_tpu.DEFAULT_SEQ_BLOCK, selective_scan_tpu.DEFAULT_CHANNEL_BLOCK)
    print(f"defaults: seq_block {default[0]}, channel_block {default[1]} (untuned).\n")
    print("| seq_block | channel_block | forward ms | fwd+bwd ms |")
    print("| ---: | ---: | ---: | ---: |")
    # Sequence blocks are unrolled in the kernel (longer: more code, fewer grid steps);
    # channel blocks are lanes of the state (wider: fewer, larger programs).
    others = itertools.product((8, 16, 32, 64), (128, 256, 512))
    for seq_block, channel_block in [default, *(c for c in others if c != default)]:
        options = dict(seq_block=seq_block, channel_block=channel_block)
        cells = _kernel_cells(selective_scan_tpu.selective_scan_tpu, options, core, reps)
        print(f"| {seq_block} | {channel_block} | " + " | ".join(cells) + " |", flush=True)


def sweep_table(batch, d, n, length, reps, backend: str) -> None:
    """The backend's kernel alone on pre-processed inputs, for each block configuration."""
    args = make_inputs(batch, d, n, length)
    dt = jax.nn.softplus(args["delta"] + args["delta_bias"][:, None])
    core = (args["u"], dt, args["A"], args["B"], args["C"])
    kernel = "selective_scan_pallas" if backend == "gpu" else "selective_scan_tpu"
    print(f"Kernel alone ({kernel} on {jax.devices()[0].device_kind}, no D/z/softplus), "
          f"batch {batch}, d {d}, n {n}, L {length}; ", end="")  # fmt: skip
    if backend == "gpu":
        _gpu_sweep(core, length, reps)
    else:
        _tpu_sweep(core, reps)
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
    parser.add_argument("--sweep", action="store_true", help="GPU or TPU: time block sizes")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    backend = accelerator()
    if args.sweep and not backend:
        parser.error("--sweep times the kernel: it needs a GPU or a TPU.")

    if not args.skip_correctness:
        correctness_table("compiled" if backend else "interpret mode on CPU")
    if not args.skip_speed:
        speed_table(
            args.batch, args.d, args.n, args.length, args.implementations, args.reps, backend
        )
    if args.sweep:
        sweep_table(args.batch, args.d, args.n, args.length, args.reps, backend)


if __name__ == "__main__":
    main()
