"""MASFormer: all-full vs all-local vs mixed attention spans, at equal size and budget.

No language-model dataset exists in the library yet (the sequence-task suite,
issue 10, is not built), so this runs on a synthetic **associative recall**
task generated here, which needs attention beyond a short span:

    k1 v1 k2 v2 ... kP vP  f f f ... f  q  v(q)

P (``--pairs``, default 8) key/value pairs (keys from 1..16, values from 17..32, keys distinct) open
the sequence, filler tokens (33..40) follow, and the last two tokens are a
query key q (one of the 8) and its value. Only the prediction of the final
token is scored. Solving it takes two hops: a value token must learn its
preceding key (a short span suffices), then the query must find that value
~L tokens back (a span reaching the start is needed). With ``--pairs 1`` it is
one hop (the query need only reach position 1). A model whose layers all
have span s cannot see the pairs from the query at all when 4 (s - 1) < L - 2P - 1
(the query sits at position L - 2, the last pair's value at 2P - 1).

4-layer decoders of identical size (width 64, 4 heads, RoPE) and training
budget (same steps, batch, optimiser, data), chosen with ``--models``
(default the first three):

* ``full``: global attention in every layer;
* ``local``: sliding window of ``--span`` keys in every layer;
* ``mixed``: MASFormer, full attention in layer 1 only (``--global_layers``),
  window ``--span`` elsewhere;
* ``block``: block-local attention (MASFormer's other short span: fixed,
  non-overlapping blocks of ``--span`` tokens, causal inside each) in every layer;
* ``mixed_block``: full attention in layer 1 only, blocks of ``--span`` elsewhere.

Reported: recall accuracy on 1024 held-out sequences, measured median train
step time, XLA's cost-analysis FLOPs of the compiled train step, and the
analytic count of attention score FLOPs (query-key pairs actually visible).
On this CPU the attention path materialises all scores (the ``xla``
implementation) and masks them, so XLA's FLOPs do not fall with the span;
the analytic column shows what a block-sparse kernel would save.

    .venv/bin/python experiments/masformer/run.py [--steps 400] [--length 64] [--span 8]
        [--models full local mixed block mixed_block]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effformer.models.lm_layers import attention_window, expand_layer_pattern
from effformer.models.transformer_lm import TransformerLM

NUM_KEYS, VALUE_OFFSET, FILLER = 16, 17, (33, 41)
VOCAB = 41


def recall_batch(rng: np.random.Generator, batch: int, length: int, pairs: int) -> np.ndarray:
    """[batch, length] int32 sequences of the associative recall task (see the docstring)."""
    tokens = rng.integers(*FILLER, size=(batch, length)).astype(np.int32)
    for row in range(batch):
        keys = rng.choice(np.arange(1, NUM_KEYS + 1), pairs, replace=False)
        values = rng.integers(VALUE_OFFSET, VALUE_OFFSET + 16, size=pairs)
        tokens[row, 0 : 2 * pairs : 2] = keys
        tokens[row, 1 : 2 * pairs : 2] = values
        query = rng.integers(pairs)
        tokens[row, -2], tokens[row, -1] = keys[query], values[query]
    return tokens


def attention_score_flops(pattern, overrides, layers, length, batch, heads, head_dim) -> int:
    """Analytic forward FLOPs of q.k and p.v over the visible (causal, windowed, block) pairs."""
    total = 0
    positions = np.arange(length)
    for spec in expand_layer_pattern(pattern, layers, overrides):
        left, _ = attention_window(spec, causal=True)
        distance = positions[:, None] - positions[None, :]
        visible = (distance >= 0) & (True if left is None else distance <= left)
        if spec.kind == "block":
            blocks = positions // spec.window
            visible &= blocks[:, None] == blocks[None, :]
        total += 2 * 2 * int(visible.sum()) * head_dim * heads * batch
    return total


def run(name, pattern, overrides, args) -> dict:
    model = TransformerLM(kind="decoder", vocab_size=VOCAB, num_layers=4, embed_dim=64,
                          num_heads=4, ffn_hidden_dim=256, layer_pattern=pattern,
                          layer_overrides=overrides, position_encoding="rope")  # fmt: skip
    data_rng = np.random.default_rng(0)  # identical data for every model
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, args.length), jnp.int32))["params"]
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 3e-3, 50, args.steps), weight_decay=0.01)
    opt_state = tx.init(params)

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, -2], tokens[:, -1]).mean()

    @jax.jit
    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    example = jnp.asarray(recall_batch(data_rng, args.batch, args.length, args.pairs))
    compiled = train_step.lower(params, opt_state, example).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    times = []
    for step in range(args.steps):
        tokens = jnp.asarray(recall_batch(data_rng, args.batch, args.length, args.pairs))
        start = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, tokens)
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
        if step % 100 == 0:
            print(f"  {name} step {step} loss {float(loss):.3f}", flush=True)

    eval_tokens = jnp.asarray(recall_batch(np.random.default_rng(1), 1024, args.length, args.pairs))
    logits = jax.jit(model.apply)({"params": params}, eval_tokens)
    accuracy = float(jnp.mean(jnp.argmax(logits[:, -2], -1) == eval_tokens[:, -1]))
    return dict(
        name=name,
        layers=", ".join(map(str, expand_layer_pattern(pattern, 4, overrides))),
        accuracy=accuracy,
        step_ms=1e3 * float(np.median(times[10:])),
        xla_gflops=float(cost.get("flops", float("nan"))) / 1e9,
        attention_mflops=attention_score_flops(
            pattern, overrides, 4, args.length, args.batch, 4, 16
        )
        / 1e6,  # fmt: skip
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--span", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--global_layers", type=int, nargs="+", default=[1])
    parser.add_argument("--models", nargs="+", default=["full", "local", "mixed"],
                        choices=["full", "local", "mixed", "block", "mixed_block"])  # fmt: skip
    args = parser.parse_args()
    local, block = f"local:{args.span}", f"block:{args.span}"
    global_layers = {layer: "global" for layer in args.global_layers}
    configs = {
        "full": ("global", None),
        "local": (local, None),
        "mixed": (local, global_layers),
        "block": (block, None),
        "mixed_block": (block, global_layers),
    }
    results = [run(name, *configs[name], args) for name in args.models]
    print(f"\nlength {args.length}, span {args.span}, {args.pairs} pairs, "
          f"{args.steps} steps of batch {args.batch}\n")  # fmt: skip
    print("| model | layers | recall accuracy | step (ms) | XLA GFLOPs / step | "
          "attention score MFLOPs (fwd, analytic) |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['name']} | {r['layers']} | {r['accuracy']:.3f} | {r['step_ms']:.1f} | "
              f"{r['xla_gflops']:.3f} | {r['attention_mflops']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
