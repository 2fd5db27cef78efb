"""KV-cached decoding with the attention mixer vs recomputing the prefix.

For each context length T, the time to produce the output for token T:
``cached`` runs one ``MultiHeadAttention`` decode step (one query against a
cache of T keys, ``decode=True``); ``recompute`` runs the full causal forward
over all T tokens, which is what a model without a cache does per new token.
Both are jitted; the median of repeated runs after a warm-up is reported.

    .venv/bin/python experiments/benchmarks/attention_decode.py [--lengths 256,1024,4096]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from effformer.mixers import MultiHeadAttention
from effformer.nn.position import make_position_encoding
from effformer.ops.masks import AttentionMask


def _median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(module: MultiHeadAttention, length: int, dim: int, repeats: int) -> tuple[float, float]:
    """(cached step, full recompute) median seconds at context length ``length``."""
    causal = AttentionMask(causal=True)
    x = jax.random.normal(jax.random.key(0), (1, length, dim))
    params = module.init(jax.random.key(1), x[:, :8])["params"]
    cache = module.init(jax.random.key(1), x, decode=True)["cache"]
    # A cache holding the first T - 1 tokens (its contents do not change the cost).
    cache = dict(cache, cache_index=jnp.array(length - 1, jnp.int32))

    @jax.jit
    def step(params, cache, token):
        variables = {"params": params, "cache": cache}
        return module.apply(variables, token, mask=causal, decode=True, mutable=["cache"])[0]

    @jax.jit
    def full(params, x):
        return module.apply({"params": params}, x, mask=causal)

    token = x[:, -1:]
    cached = _median_seconds(lambda: step(params, cache, token), repeats)
    recompute = _median_seconds(lambda: full(params, x), repeats)
    return cached, recompute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024,4096")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    rope = make_position_encoding("rope")
    module = MultiHeadAttention(num_heads=args.heads, position_encoding=rope)
    print(
        f"backend {jax.default_backend()}, dim {args.dim}, heads {args.heads}, batch 1, float32\n"
    )
    print("| context T | cached step (ms) | recompute T tokens (ms) | speed-up |")
    print("| ---: | ---: | ---: | ---: |")
    for length in (int(n) for n in args.lengths.split(",")):
        cached, recompute = measure(module, length, args.dim, args.repeats)
        print(
            f"| {length} | {cached * 1e3:.3f} | {recompute * 1e3:.2f} | {recompute / cached:.0f}x |"
        )


if __name__ == "__main__":
    main()
