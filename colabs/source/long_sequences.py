# %% [markdown]
# # Long sequences: time and memory against length
#
# What this notebook shows: four causal language models of the same width and
# depth, measured live on this runtime at growing sequence lengths:
#
# | model | token mixing | cost in the length L |
# | --- | --- | --- |
# | full attention (`lm_decoder`) | softmax over every earlier token, dense XLA path | L^2 |
# | Combiner (`combiner_lm`, mixture) | direct attention in a segment of ~sqrt(L), structured summaries beyond | L sqrt(L) |
# | FIT (`fit_lm`) | local layers in groups of ~sqrt(L) tokens, a global layer over a few latents per group | between L and L^2 (the latent layer is quadratic in the number of groups) |
# | Mamba (`mamba_130m` shrunk) | selective state-space scan | L |
#
# For each length: the wall time of one jitted forward + backward of the
# next-token loss (batch 1, median of a few calls) and the memory XLA plans for
# it (`compiled.memory_analysis()`: temporaries + outputs, not a measured RSS).
# Both are plotted on log-log axes with the slope of a least-squares line, the
# fitted exponent. At CPU-friendly sizes fixed costs still weigh on the shortest
# lengths, so the exponents are lower bounds on the asymptotic ones; the repository's
# `experiments/benchmarks/long_sequence.py` measures one layer up to 16K tokens.
#
# **Time**: 7 minutes measured on the 2-core development CPU while it was shared (load
# average 5 to 14; 4 minutes of CPU time), mostly compilation and the longest lengths.
# That run's fitted time / memory exponents: full attention 2.15 / 1.89, Combiner
# 1.65 / 1.28, FIT 1.18 / 1.00, Mamba 1.02 / 0.98 (times under that load are noisy). **Fast mode**: `EFFFORMER_FAST=1` in the environment
# measures tiny models at two short lengths (seconds; the test suite).

# %% [setup]

# %%
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from effformer import models

WIDTH, HEADS, LAYERS, VOCAB = 64, 4, 2, 256
LENGTHS = [256, 512, 1024, 2048, 4096]
REPEATS = 3
if FAST:
    WIDTH, HEADS, LAYERS = 16, 2, 1
    LENGTHS = [32, 64]
    REPEATS = 1
print("devices:", jax.devices(), "| CPU count:", os.cpu_count())


def build(name, length):
    """The causal LM ``name`` for sequences of ``length`` tokens."""
    common = dict(vocab_size=VOCAB, embed_dim=WIDTH)
    side = 2 ** round(math.log2(math.sqrt(length)))  # ~sqrt(L), a power of two
    if name == "full attention":
        return models.create(
            "lm_decoder", num_layers=LAYERS, num_heads=HEADS, ffn_hidden_dim=2 * WIDTH,
            max_length=length, attention_implementation="xla", **common,
        )
    if name == "Combiner":
        return models.create(
            "combiner_lm", num_layers=LAYERS, num_heads=HEADS, ffn_hidden_dim=2 * WIDTH,
            max_length=length, **common,
        )
    if name == "FIT":
        # (LAYERS - 1) local layers, one global layer over 4 latents per group, one local layer.
        plan = f"({max(1, LAYERS - 1)})1(1)"
        return models.create(
            "fit_lm", num_heads=HEADS, layer_plan=plan, num_latents=4, group_size=side,
            max_length=length, mlp_ratio=2.0, **common,
        )
    if name == "Mamba":
        return models.create("mamba_130m", num_layers=LAYERS, **common)
    raise ValueError(name)


def measure(name, length):
    """(median seconds, XLA bytes) of one forward + backward at ``length``."""
    model = build(name, length)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, length), 0, VOCAB)
    # Random N(0, 0.02) parameters of the right shapes: their values do not change the
    # cost, and this spares compiling an initialiser for every model and length.
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(1), inputs=tokens)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.02, s.shape), s.dtype), shapes)

    def loss(params):
        logits = model.apply({"params": params}, inputs=tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(params))  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params))
        times.append(time.perf_counter() - start)
    return statistics.median(times), memory.temp_size_in_bytes + memory.output_size_in_bytes

# %% [markdown]
# ## Measure
#
# The load of the machine changes the times (not the planned memory); it is printed
# with the results.

# %%
NAMES = ["full attention", "Combiner", "FIT", "Mamba"]
results = {}
print("load average before:", os.getloadavg())
for name in NAMES:
    results[name] = [measure(name, length) for length in LENGTHS]
    cells = ", ".join(f"L={n}: {t * 1e3:.1f} ms / {b / 2**20:.1f} MiB"
                      for n, (t, b) in zip(LENGTHS, results[name]))
    print(f"{name:>15}: {cells}")
print("load average after:", os.getloadavg())

# %% [markdown]
# ## Log-log plots and fitted exponents

# %%
def exponent(values):
    return float(np.polyfit(np.log(LENGTHS), np.log(values), 1)[0])


fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(12, 4.2))
rows = []
for name in NAMES:
    seconds = [t for t, _ in results[name]]
    mebibytes = [b / 2**20 for _, b in results[name]]
    time_exp, memory_exp = exponent(seconds), exponent(mebibytes)
    rows.append((name, time_exp, memory_exp))
    ax_time.loglog(LENGTHS, seconds, "o-", base=2, label=f"{name} (slope {time_exp:.2f})")
    ax_memory.loglog(LENGTHS, mebibytes, "o-", base=2, label=f"{name} (slope {memory_exp:.2f})")
ax_time.set(xlabel="sequence length L", ylabel="seconds per forward + backward", title="time")
ax_memory.set(xlabel="sequence length L", ylabel="MiB (XLA temporaries + outputs)",
              title="memory")
for ax in (ax_time, ax_memory):
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

print("| model | time exponent | memory exponent |")
print("| --- | ---: | ---: |")
for name, time_exp, memory_exp in rows:
    print(f"| {name} | {time_exp:.2f} | {memory_exp:.2f} |")
