"""FIT vs full causal attention: memory and time of one LM training step vs sequence length.

    .venv/bin/python experiments/benchmarks/fit_memory.py --lengths 1024 2048 4096
    .venv/bin/python experiments/benchmarks/fit_memory.py --lengths 163840 --models fit --remat \
        --steps 1 --group-size 512 --num-latents 32    # the paper's 160K claim (needs ~16 GB free)

One step = forward, backward and an Adam update of a decoder LM (batch 1,
vocabulary 256) under ``jax.jit``. "XLA memory" is the compiled step's
``memory_analysis()`` (arguments + outputs + temporaries, what XLA plans, not
a measurement of the process); "peak RSS" is ``ru_maxrss`` of this process
after the run (measured; includes the Python/JAX runtime, about 0.3-0.5 GB).
Run one length per process when the RSS matters. ``--compile-only`` stops
after compilation (XLA memory and FLOPs only, nothing run; RSS then measures
the compilation): enough to find the longest full-attention step that fits.
"GFLOP" is XLA's ``cost_analysis()`` of the step. Prints a Markdown table and
the load average.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import jax
import numpy as np
import optax

from effformer.models.fit import FITLM
from effformer.models.transformer_lm import TransformerLM


def build(name: str, length: int, args) -> object:
    common = dict(vocab_size=256, embed_dim=args.width, num_heads=args.heads)
    if name == "fit":
        return FITLM(group_size=args.group_size, max_length=length, num_latents=args.num_latents,
                     layer_plan=args.layer_plan, mlp_ratio=2.0, remat=args.remat, **common)  # fmt: skip
    return TransformerLM(kind="decoder", num_layers=args.full_layers, ffn="gelu",
                         ffn_hidden_dim=2 * args.width, position_encoding="learned",
                         max_length=length, attention_implementation=args.full_implementation,
                         **common)  # fmt: skip


def measure(name: str, length: int, args) -> dict:
    model = build(name, length, args)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, length), 0, 256)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), inputs=tokens)["params"]
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)

    def loss_fn(params):
        logits = model.apply({"params": params}, inputs=tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state).compile()
    analysis = compiled.memory_analysis()
    xla_bytes = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    num_params = sum(x.size for x in jax.tree.leaves(params))
    result = dict(model=name, length=length, params=num_params, xla_gb=xla_bytes / 2**30,
                  gflop=float(cost.get("flops", float("nan"))) / 1e9, seconds=float("nan"),
                  loss=float("nan"))  # fmt: skip
    if args.compile_only:
        return dict(result, rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state)
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    return dict(result, seconds=float(np.median(times)), loss=float(loss),
                rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--models", nargs="+", default=["fit", "full"])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=256)
    parser.add_argument("--num-latents", type=int, default=16)
    parser.add_argument("--layer-plan", default="(1)1(1)")
    parser.add_argument("--full-layers", type=int, default=3)
    parser.add_argument("--full-implementation", default=None, help="e.g. 'blockwise'")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile-only", action="store_true")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    print(f"width {args.width}, heads {args.heads}, FIT plan {args.layer_plan!r}, groups of "
          f"{args.group_size}, {args.num_latents} latents/group, remat {args.remat}; full: "
          f"{args.full_layers} layers, implementation {args.full_implementation}\n")  # fmt: skip
    print("| model | length | params | XLA memory (GB) | GFLOP | step (s) | loss "
          "| peak RSS so far (GB) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        for name in args.models:
            r = measure(name, length, args)
            print(f"| {r['model']} | {r['length']} | {r['params']:,} | {r['xla_gb']:.3f} | "
                  f"{r['gflop']:.1f} | {r['seconds']:.3f} | {r['loss']:.3f} | {r['rss_gb']:.2f} |",
                  flush=True)  # fmt: skip
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
