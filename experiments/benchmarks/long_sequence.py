"""Long sequences: forward + backward of one causal mixer layer, time and memory vs length.

One mixer (projections included) at width 512 with 8 heads, batch 1, float32,
jitted: value and gradients (w.r.t. the input and the parameters) of
``sum(mixer(x) ** 2)``. Rows:

* ``full (xla_blockwise)``: ``MultiHeadAttention`` with the memory-efficient
  blockwise path of ``dot_product_attention`` (never builds L x L);
* ``combiner <variant>``: ``CombinerAttention`` (segment length ceil(sqrt(L))
  unless ``--segment-length``);
* ``fit n=N, m=M``: the token mixing of one decoder FIT block
  (``effformer/models/fit.py``), attention only like the other rows (no norms,
  no MLPs), residuals kept: the sequence is cut into ``L/N`` groups of
  ``--fit-group-size`` N tokens; (1) causal self-attention inside every group;
  (2) READ: the group's M (``--fit-num-latents``) learned latents attend to
  its tokens; (3) chunk-causal self-attention over all ``L/N * M`` latents;
  (4) WRITE: the tokens attend to their group's latents after the shift right
  by one group. Cost ``O(L N + (L M / N)^2)``: linear in L while the local
  term dominates (``L N > (L M / N)^2``, i.e. L < N^3 / M^2 = 65,536 tokens at
  N=256, M=16), quadratic beyond.

Time: median wall time of ``--repeats`` calls after a warm-up call (one call
when a call takes over ``--single-call-seconds``). Memory: the compiled
program's ``memory_analysis()`` temp + output bytes (XLA's buffer assignment,
the peak it allocates beyond the inputs; not a measured RSS). The fitted
exponent is the slope of log(value) against log(L) over the measured lengths
(least squares). The machine's load average is printed with the table.

    .venv/bin/python experiments/benchmarks/long_sequence.py
    .venv/bin/python experiments/benchmarks/long_sequence.py --lengths 1024 2048 --mixers fixed
    .venv/bin/python experiments/benchmarks/long_sequence.py --mixers fit full
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effformer.mixers import CombinerAttention, CrossAttention, MultiHeadAttention
from effformer.models.fit import shift_latents_right
from effformer.ops.masks import AttentionMask

WIDTH, HEADS = 512, 8
MIXERS = ("full", "fixed", "logsparse", "axial", "mixture", "fit")


class FITBlockAttention(nn.Module):
    """The attention of one decoder FIT block: [B, L, D] -> [B, L, D] (see the module docstring).

    Mirrors ``FITCore`` (causal=True, plan ``(1)1(...)``) without its norms and MLPs, so
    that the row compares token mixing with token mixing.
    """

    group_size: int
    num_latents: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask | None = None) -> jax.Array:
        del mask  # the masks are FIT's own (causal in groups, chunk-causal over latents)
        batch, length, dim = x.shape
        n, m = self.group_size, self.num_latents
        if length % n:
            raise ValueError(f"FITBlockAttention: L={length} must be a multiple of group_size={n}.")
        groups = length // n
        attention = dict(num_heads=HEADS, qkv_bias=False, out_bias=False)
        tokens = x.reshape(batch * groups, n, dim)
        tokens = tokens + MultiHeadAttention(**attention, name="local")(
            tokens, mask=AttentionMask(causal=True)
        )
        table = self.param("latents", nn.initializers.normal(0.02), (groups, m, dim))
        latents = jnp.broadcast_to(table, (batch, groups, m, dim)).reshape(batch * groups, m, dim)
        latents = latents + CrossAttention(**attention, name="read")(latents, tokens)
        latents = latents.reshape(batch, groups * m, dim)
        # One position per group: causal over positions = chunk-causal over latents.
        chunk = jnp.broadcast_to(jnp.arange(groups * m) // m, (batch, groups * m))
        latents = latents + MultiHeadAttention(**attention, name="global")(
            latents, mask=AttentionMask(causal=True, q_positions=chunk, kv_positions=chunk)
        )
        written = shift_latents_right(latents.reshape(batch, groups, m, dim))
        tokens = tokens + CrossAttention(**attention, name="write")(
            tokens, written.reshape(batch * groups, m, dim)
        )
        return tokens.reshape(batch, length, dim)


def build(name: str, segment_length: int | None, fit_group_size: int, fit_num_latents: int):
    """(mixer, mask) of one causal layer."""
    if name == "fit":
        return FITBlockAttention(group_size=fit_group_size, num_latents=fit_num_latents), None
    if name == "full":
        mixer = MultiHeadAttention(
            num_heads=HEADS, qkv_bias=False, out_bias=False, implementation="xla_blockwise"
        )
        return mixer, AttentionMask(causal=True)
    segment_length = None if name == "logsparse" else segment_length
    return CombinerAttention(
        num_heads=HEADS, variant=name, causal=True, segment_length=segment_length
    ), None


def measure(name: str, length: int, repeats: int, single_call_seconds: float, args):
    """(median seconds, temp + output bytes) of one forward + backward."""
    segment_length = args.segment_length
    mixer, mask = build(name, segment_length, args.fit_group_size, args.fit_num_latents)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, length, WIDTH)), jnp.float32)
    # The parameters do not depend on L (except FIT's latent table, one row per group):
    # initialise on a short prefix.
    prefix = length if name == "fit" else 4 * (segment_length or 64)
    params = jax.jit(mixer.init)(jax.random.key(0), x[:, :prefix])

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
    parser.add_argument("--fit-group-size", type=int, default=256)
    parser.add_argument("--fit-num-latents", type=int, default=16)
    args = parser.parse_args()

    print(f"load average at start: {os.getloadavg()}")
    print(f"\nforward + backward, one causal layer, width {WIDTH}, {HEADS} heads, batch 1, f32\n")
    header = " | ".join(f"L={n}" for n in args.lengths)
    print(f"| mixer | {header} | time exp. | memory exp. |")
    print("| --- |" + " ---: |" * (len(args.lengths) + 2))
    for name in args.mixers:
        seconds, nbytes = [], []
        for length in args.lengths:
            t, b = measure(name, length, args.repeats, args.single_call_seconds, args)
            seconds.append(t)
            nbytes.append(b)
        cells = " | ".join(
            f"{t * 1e3:.0f} ms / {b / 2**20:.0f} MiB" for t, b in zip(seconds, nbytes, strict=True)
        )
        label = {
            "full": "full (xla_blockwise)",
            "fit": f"fit n={args.fit_group_size}, m={args.fit_num_latents}",
        }.get(name, f"combiner {name}")
        time_exp = exponent(args.lengths, seconds) if len(args.lengths) > 1 else float("nan")
        mem_exp = exponent(args.lengths, nbytes) if len(args.lengths) > 1 else float("nan")
        print(f"| {label} | {cells} | {time_exp:.2f} | {mem_exp:.2f} |", flush=True)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
