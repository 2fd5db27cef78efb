"""Decoder-only vs encoder-decoder LM of (nearly) equal size: time to first token and throughput.

Return of the Encoder (Elfeki et al., 2025) reports that an encoder-decoder
answers with lower first-token latency and generates faster than a
decoder-only model of the same size, because the input is processed once by
the encoder and the decoder's KV cache holds only the output. Both models here
generate with the library's KV-cached loop (``effformer.models.generate``:
``generate`` for the decoder, ``generate_seq2seq`` for the encoder-decoder;
one compiled loop per shape, greedy, no early stop), so they are measured the
same way:

* the decoder-only model continues a prompt of Ls tokens (the input; its
  separator is the prompt's last token), so its cache holds Ls + Lt positions;
* the encoder-decoder encodes the Ls tokens once and decodes from one start
  token, its self-attention cache holding Lt positions and every step
  cross-attending to the Ls encoded tokens.

Measured, each the median of ``--repeats`` timed calls after a warm-up call that
compiles the shape; the four calls of a shape (TTFT and Lt tokens, both models)
alternate, so that they share whatever load the machine has:

* time to first token (TTFT): ``max_new_tokens=1`` (the prefill of the input, or
  the encoder and one decoder step, and the first token);
* throughput: ``B * Lt / t(Lt)``, the new tokens per second of a whole call
  that generates Lt tokens for B rows (prefill included);
* decode rate: ``B * (Lt - 1) / (t(Lt) - TTFT)``, the tokens per second of the
  steps after the first.

Models (default): width 256, 4 heads, RoPE, vocabulary 512; the decoder-only
model has 6 layers with FFN 1195, the encoder-decoder 4 encoder + 2 decoder
layers (the paper's 2/3-1/3 split) with FFN 1024, so the decoder-only model's
wider FFN holds the weights of the encoder-decoder's cross-attention (both
counts are printed). Random weights and tokens: the time does not depend on them.

    nice -n 10 .venv/bin/python experiments/benchmarks/encoder_decoder_latency.py \
        [--shapes 1024x16,512x32,128x128,32x256] [--batches 1,8] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

from effformer import models
from effformer.models.generate import generate, generate_seq2seq

VOCAB = 512
WIDTH = dict(vocab_size=VOCAB, embed_dim=256, num_heads=4, position_encoding="rope")


def build(max_length: int) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """((decoder, params), (encoder-decoder, params)), initialised from fixed keys."""
    decoder = models.create(
        "lm_decoder", num_layers=6, ffn_hidden_dim=1195, max_length=max_length, **WIDTH
    )
    encoder_decoder = models.create(
        "lm_encoder_decoder",
        num_encoder_layers=4,
        num_decoder_layers=2,
        ffn_hidden_dim=1024,
        max_length=max_length,
        **WIDTH,
    )
    out = []
    for model in (decoder, encoder_decoder):
        params = jax.jit(model.init)(jax.random.PRNGKey(0), **model.dummy_inputs(1))["params"]
        out.append((model, params))
    return out[0], out[1]


def count(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each call, the calls alternating so that they share the load."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compiles the shape
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(
    decoder: tuple[Any, Any],
    encoder_decoder: tuple[Any, Any],
    source_length: int,
    target_length: int,
    batch: int,
    repeats: int,
) -> dict[str, float]:
    """TTFT (s) and whole-call time (s) for Lt tokens of both models on one random input."""
    source = jax.random.randint(jax.random.PRNGKey(1), (batch, source_length), 1, VOCAB)
    (dec, dec_params), (ed, ed_params) = decoder, encoder_decoder

    def run_decoder(new: int) -> Any:
        return generate(dec, dec_params, source, max_new_tokens=new).new_tokens

    def run_encoder_decoder(new: int) -> Any:
        return generate_seq2seq(ed, ed_params, source, max_new_tokens=new).new_tokens

    return interleaved_medians(
        {
            "decoder_ttft": lambda: run_decoder(1),
            "encoder_decoder_ttft": lambda: run_encoder_decoder(1),
            "decoder_total": lambda: run_decoder(target_length),
            "encoder_decoder_total": lambda: run_encoder_decoder(target_length),
        },
        repeats,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1024x16,512x32,128x128,32x256",
                        help="comma-separated LsxLt: input length x new tokens")  # fmt: skip
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    decoder, encoder_decoder = build(max(ls + lt for ls, lt in shapes) + 1)
    print(f"load average at start: {os.getloadavg()}")
    print(
        f"parameters: decoder-only {count(decoder[1]):,}, "
        f"encoder-decoder {count(encoder_decoder[1]):,}\n"
    )
    print(
        "| Ls | Lt | batch | TTFT dec (ms) | TTFT enc-dec (ms) | enc-dec / dec | "
        "tokens/s dec | tokens/s enc-dec | enc-dec / dec | decode rate dec | "
        "decode rate enc-dec |"
    )
    print("|" + " ---: |" * 11)
    for source_length, target_length in shapes:
        for batch in batches:
            r = measure(decoder, encoder_decoder, source_length, target_length, batch, args.repeats)
            rate = {
                name: batch * target_length / r[f"{name}_total"]
                for name in ("decoder", "encoder_decoder")
            }
            steps = {}
            for name in ("decoder", "encoder_decoder"):
                after_first = r[f"{name}_total"] - r[f"{name}_ttft"]
                # Under load the difference of two medians can be noise (or negative).
                steps[name] = (
                    f"{batch * (target_length - 1) / after_first:.0f}"
                    if target_length > 1 and after_first > 0.1 * r[f"{name}_total"]
                    else "n/a"
                )
            print(
                f"| {source_length} | {target_length} | {batch} | {1e3 * r['decoder_ttft']:.1f} | "
                f"{1e3 * r['encoder_decoder_ttft']:.1f} | "
                f"{r['encoder_decoder_ttft'] / r['decoder_ttft']:.2f} | {rate['decoder']:.0f} | "
                f"{rate['encoder_decoder']:.0f} | "
                f"{rate['encoder_decoder'] / rate['decoder']:.2f} | {steps['decoder']} | "
                f"{steps['encoder_decoder']} |",
                flush=True,
            )
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
