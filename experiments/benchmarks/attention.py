"""Causal attention: time and memory of each implementation of dot_product_attention.

Batch 1, one head, head_dim 64, float32, causal, default positions. Prints
Markdown tables:

* forward: median wall time of ``--repeats`` runs after compiling, and the
  compiled executable's ``memory_analysis()`` temp + output bytes (XLA's
  buffer assignment for the whole program: the peak of what it allocates
  beyond the inputs, not a measured RSS);
* forward + backward (value and gradients w.r.t. q, k, v), the same columns;
* with ``--tune``: the blockwise path's block sizes at one length.

``jax.nn`` rows are ``jax.nn.dot_product_attention(is_causal=True,
implementation="xla")``, the library's own materialising path, for comparison.

The reference and XLA paths materialise Lq x Lk scores, so they run only where
XLA's own estimate stays under ``--max-bytes``.

    .venv/bin/python experiments/benchmarks/attention.py
    .venv/bin/python experiments/benchmarks/attention.py --tune --tune-length 4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from effformer.ops.attention import dot_product_attention
from effformer.ops.masks import AttentionMask

HEAD_DIM = 64


def _inputs(length: int):
    rng = np.random.default_rng(0)
    shape = (1, length, 1, HEAD_DIM)
    return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))


def _program(implementation: str, backward: bool, **block_sizes):
    def forward(q, k, v):
        if implementation == "jax.nn":  # the library's own XLA path, as a baseline
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        return dot_product_attention(
            q, k, v, mask=AttentionMask(causal=True), implementation=implementation, **block_sizes
        )

    if not backward:
        return jax.jit(forward)
    loss = lambda q, k, v: jnp.sum(forward(q, k, v) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def measure(implementation, length, backward, repeats, max_bytes, **block_sizes):
    """(median seconds or None, temp + output bytes)."""
    q, k, v = _inputs(length)
    compiled = _program(implementation, backward, **block_sizes).lower(q, k, v).compile()
    memory = compiled.memory_analysis()
    nbytes = memory.temp_size_in_bytes + memory.output_size_in_bytes
    if nbytes > max_bytes:
        return None, nbytes
    jax.block_until_ready(compiled(q, k, v))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - start)
    return statistics.median(times), nbytes


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def _table(title, implementations, lengths, backward, repeats, max_bytes):
    print(f"\n### {title}\n")
    print("| implementation | length | time (ms) | temp + output (MiB) |")
    print("| --- | ---: | ---: | ---: |")
    for implementation in implementations:
        for length in lengths:
            seconds, nbytes = measure(implementation, length, backward, repeats, max_bytes)
            shown = "skipped (memory)" if seconds is None else f"{seconds * 1e3:.1f}"
            print(f"| {implementation} | {length} | {shown} | {_mib(nbytes)} |", flush=True)


def _tune(length, repeats, max_bytes):
    print(f"\n### xla_blockwise block sizes, causal, length {length}\n")
    print("| block_q | block_k | forward (ms) | forward + backward (ms) |")
    print("| ---: | ---: | ---: | ---: |")
    for block_q in (256, 512, 1024):
        for block_k in (256, 512, 1024):
            sizes = dict(block_q=block_q, block_k=block_k)
            fwd, _ = measure("xla_blockwise", length, False, repeats, max_bytes, **sizes)
            both, _ = measure("xla_blockwise", length, True, repeats, max_bytes, **sizes)
            print(f"| {block_q} | {block_k} | {fwd * 1e3:.1f} | {both * 1e3:.1f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--backward-lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-bytes", type=float, default=3 * 2**30)
    parser.add_argument("--tune", action="store_true", help="only sweep the blockwise block sizes")
    parser.add_argument("--tune-length", type=int, default=4096)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
    if args.tune:
        _tune(args.tune_length, args.repeats, args.max_bytes)
        return
    implementations = ("reference", "xla", "xla_blockwise", "jax.nn")
    _table("Forward", implementations, args.lengths, False, args.repeats, args.max_bytes)
    _table(
        "Forward + backward",
        ("xla", "xla_blockwise"),
        args.backward_lengths,
        True,
        args.repeats,
        args.max_bytes,
    )


if __name__ == "__main__":
    main()
