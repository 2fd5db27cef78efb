"""Packed vs padded training throughput (ByteTransformer's padding-free batches).

A causal LM train step (loss and gradient, jitted) over the same 64 sequences,
laid out two ways: padded, one sequence per row of ``--max_len`` tokens, and
packed first-fit into rows of ``--max_len`` with segment ids and per-sequence
positions (``effformer.data.packing``). Lengths are uniform in
[0.2, 1.0] x max_len, so the mean is 0.6 of the maximum, as in the
ByteTransformer paper's benchmark. Throughput counts real (non-padding)
tokens only; both layouts compute the same losses (tests/models/test_transformer_lm.py).

    .venv/bin/python experiments/benchmarks/packing.py [--max_len 256] [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from effformer import models
from effformer.data.packing import pack_sequences
from effformer.train.tasks import CausalLMTask


def _time(fn, *args, steps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max_len", type=int, default=256)
    parser.add_argument("--num_sequences", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    lengths = rng.integers(int(0.2 * args.max_len), args.max_len + 1, size=args.num_sequences)
    sequences = [rng.integers(1, 1000, size=n).astype(np.int32) for n in lengths]
    packed = {k: jnp.asarray(v) for k, v in pack_sequences(sequences, args.max_len).items()}
    padded_inputs = np.zeros((len(sequences), args.max_len), np.int32)
    for row, sequence in enumerate(sequences):
        padded_inputs[row, : len(sequence)] = sequence
    padded = {
        "inputs": jnp.asarray(padded_inputs),
        "weights": jnp.asarray(padded_inputs != 0, jnp.float32),
    }

    model = models.create("lm_decoder", vocab_size=1000, embed_dim=128, num_heads=4,
                          num_layers=2, ffn_hidden_dim=512)  # fmt: skip
    params = model.init(jax.random.PRNGKey(0), inputs=packed["inputs"][:1])["params"]
    task = CausalLMTask(ml_collections.ConfigDict({"name": "causal_lm"}), None)

    @jax.jit
    def step(params, batch):
        def loss(params):
            logits = model.apply({"params": params}, **task.model_inputs(batch))
            loss_sum, count, _ = task.loss_and_metrics(logits, batch)
            return loss_sum / count

        return jax.value_and_grad(loss)(params)

    real_tokens = int(lengths.sum())
    print(f"{len(sequences)} sequences, mean length {lengths.mean():.1f} "
          f"({lengths.mean() / args.max_len:.2f} of max_len {args.max_len}), "
          f"{real_tokens} real tokens\n")  # fmt: skip
    print("| layout | rows x length | padding | step (ms) | real tokens/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    results = {}
    for name, batch in (("padded", padded), ("packed", packed)):
        seconds = _time(step, params, batch, steps=args.steps)
        rows = batch["inputs"].shape[0]
        padding = 1 - real_tokens / batch["inputs"].size
        results[name] = real_tokens / seconds
        print(f"| {name} | {rows} x {args.max_len} | {padding:.0%} | {seconds * 1e3:.0f} | "
              f"{real_tokens / seconds:,.0f} |")  # fmt: skip
    print(f"\npacked / padded throughput: {results['packed'] / results['padded']:.2f}x")


if __name__ == "__main__":
    main()
