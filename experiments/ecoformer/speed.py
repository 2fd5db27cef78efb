"""Forward time and FLOPs of one EcoFormer mixer against softmax attention, by length.

    .venv/bin/python experiments/ecoformer/speed.py [--lengths 256 1024 4096 16384] [--repeats 10]

One mixer of the digits model's shape (width 128, 2 heads of 64; EcoFormer with 16
bits and 25 anchors), batch 1, bidirectional, jitted, float32 on the default
backend. Softmax attention is ``MultiHeadAttention`` with the library's default
implementation (the plain XLA path up to 512 x 512 scores, the blockwise
online-softmax path above). Time: median of ``--repeats`` rounds in which every
row is timed once (interleaved, so a change of machine load hits both alike).
FLOPs are counted analytically (2 per multiply-add, matrix products only): XLA's
cost analysis counts a loop body once, so it misses most of the blockwise path.

* softmax: q, k, v, out projections ``8 L D^2``; scores and weighted values ``4 L^2 D``.
* EcoFormer: qk, v, out projections ``6 L D^2``; anchor distances ``2 L m D``; the hash
  projection ``2 L H b m``; the code-value outer products and the read-out ``4 L b D``;
  the normalisers ``4 L H b``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from effformer.mixers import MultiHeadAttention
from effformer.mixers.ecoformer import EcoFormerAttention

WIDTH, HEADS, BITS, ANCHORS = 128, 2, 16, 25


def analytic_flops(name: str, length: int) -> float:
    """Forward FLOPs of one mixer on one sequence (module docstring)."""
    d = WIDTH
    if name == "softmax":
        return 8 * length * d * d + 4 * length * length * d
    return (
        6 * length * d * d
        + 2 * length * ANCHORS * d
        + 2 * length * HEADS * BITS * ANCHORS
        + 4 * length * BITS * d
        + 4 * length * HEADS * BITS
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    mixers = {
        "softmax": MultiHeadAttention(num_heads=HEADS, qkv_bias=False),
        "ecoformer": EcoFormerAttention(
            num_heads=HEADS, num_bits=BITS, num_anchors=ANCHORS, qkv_bias=False, causal=False
        ),
    }
    compiled = {}
    for length in args.lengths:
        x = jax.random.normal(jax.random.key(0), (1, length, WIDTH))
        for name, mixer in mixers.items():
            variables = jax.jit(mixer.init)(jax.random.key(1), x)
            forward = jax.jit(lambda v, x, m=mixer: m.apply(v, x))
            program = forward.lower(variables, x).compile()
            jax.block_until_ready(program(variables, x))  # warm-up
            compiled[name, length] = (program, variables, x)
    seconds = {key: [] for key in compiled}
    for _ in range(args.repeats):
        for key, (program, variables, x) in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(program(variables, x))
            seconds[key].append(time.perf_counter() - start)
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}")
    print("| tokens | softmax ms | EcoFormer ms | time ratio | softmax GFLOPs | EcoFormer GFLOPs |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for length in args.lengths:
        soft = 1e3 * statistics.median(seconds["softmax", length])
        eco = 1e3 * statistics.median(seconds["ecoformer", length])
        print(
            f"| {length} | {soft:.2f} | {eco:.2f} | {soft / eco:.2f}x | "
            f"{analytic_flops('softmax', length) / 1e9:.3f} | "
            f"{analytic_flops('ecoformer', length) / 1e9:.3f} |"
        )


if __name__ == "__main__":
    main()
