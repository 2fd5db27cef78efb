"""One KV-cached decode step of the attention mixer: split-K path vs the masked attention.

``MultiHeadAttention`` sends a one-token decode step whose visible keys are the
cache slots up to its own to :func:`effformer.ops.decode_attention` (split-K,
``implementation=None``); with ``implementation="xla"`` the same step runs the
general masked attention (:func:`effformer.ops.attention.dot_product_attention`),
the path used before. Both compute the same function
(tests/models/test_generate.py). For each cache length the cache is half full
(the cost of both paths reads the whole cache either way); jitted, median of
repeated runs after a warm-up, the two paths interleaved so that load changes
hit both.

    .venv/bin/python experiments/benchmarks/mixer_decode_step.py [--lengths 1024,4096,16384]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from effformer.mixers import MultiHeadAttention
from effformer.nn.position import make_position_encoding

PATHS = {"split-K": None, "masked attention": "xla"}


def decode_step(implementation, length, batch, dim, heads, kv_heads):
    """A jitted decode step and its arguments, for a cache of ``length`` slots."""
    module = MultiHeadAttention(num_heads=heads, num_kv_heads=kv_heads, max_decode_length=length,
                                implementation=implementation,
                                position_encoding=make_position_encoding("rope"))  # fmt: skip
    token = jax.random.normal(jax.random.key(0), (batch, 1, dim))
    params = module.init(jax.random.key(1), token)["params"]
    cache = module.init(jax.random.key(1), token, decode=True)["cache"]
    cache = {
        name: jax.random.normal(jax.random.key(2), value.shape, value.dtype)
        if name in ("cached_key", "cached_value")
        else value
        for name, value in cache.items()
    }
    cache["cache_index"] = jnp.array(length // 2, jnp.int32)

    @jax.jit
    def step(params, cache, token):
        variables = {"params": params, "cache": cache}
        return module.apply(variables, token, decode=True, mutable=["cache"])[0]

    return step, (params, cache, token)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"batch {args.batch}, width {args.dim}, {args.heads} heads / {args.kv_heads} kv heads, "
          f"RoPE, float32, {jax.devices()[0].platform}\n")  # fmt: skip
    print("| cache length | split-K step (ms) | masked-attention step (ms) | masked / split-K |")
    print("| ---: | ---: | ---: | ---: |")
    for length in map(int, args.lengths.split(",")):
        steps = {
            name: decode_step(impl, length, args.batch, args.dim, args.heads, args.kv_heads)
            for name, impl in PATHS.items()
        }
        times = {name: [] for name in PATHS}
        for step, arguments in steps.values():
            jax.block_until_ready(step(*arguments))  # compile and warm up
        for _ in range(args.repeats):
            for name, (step, arguments) in steps.items():
                start = time.perf_counter()
                jax.block_until_ready(step(*arguments))
                times[name].append(time.perf_counter() - start)
        split_k, masked = (1e3 * statistics.median(times[name]) for name in PATHS)
        print(f"| {length} | {split_k:.3f} | {masked:.3f} | {masked / split_k:.2f} |")


if __name__ == "__main__":
    main()
