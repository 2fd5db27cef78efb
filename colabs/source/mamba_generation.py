# %% [markdown]
# # Mamba: train a small language model, then generate with its recurrent state
#
# What this notebook shows:
#
# 1. a small Mamba LM (2 layers of width 64; `mamba_130m`'s architecture, shrunk)
#    trained with the library's trainer on the generated **copy** task: the prompt is
#    a string of 1-8 symbols, the answer the same string (`prompt <sep> answer <eos>`);
# 2. generation with `effformer.models.mamba_lm.generate_mamba`: the prompt runs
#    through the parallel selective scan, whose final states become the decode
#    cache, then one recurrent step per token. A fixed-size state, so no KV cache
#    that grows with the length;
# 3. exact-match accuracy of the generated answers by length, including lengths
#    never seen in training (9-16);
# 4. the check that the recurrent mode and the parallel scan compute the same
#    thing: the logits of a token-by-token decode against one parallel forward.
#
# **Time**: 6.3 minutes measured on the 2-core development CPU while it was shared
# (load average about 7), almost all of it the 800 training steps; less on an idle
# CPU. That run: 100% of the answers right at the trained lengths, 7% at 9-16. **Fast mode**: `EFFFORMER_FAST=1` in the environment
# trains a tiny model for a few steps (seconds; used by the test suite).

# %% [setup]

# %%
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from effformer.data.registry import get_dataset_spec
from effformer.models.mamba_lm import generate_mamba
from effformer.train import default_config, restore, train_and_evaluate

# %% [markdown]
# ## 1. The task and the training run
#
# The generated datasets are computed on the fly (nothing is stored); each
# example is a row of token ids, and the loss is on the answer only.

# %%
dataset = get_dataset_spec("copy").generated
vocabulary = dataset.vocabulary
SEP, EOS = vocabulary.encode(["<sep>", "<eos>"])
size, prompt, answer = dataset.instance("train", 0)
print(f"{len(vocabulary)} symbols; a training example of size {size}:", " ".join(prompt),
      "->", " ".join(answer))
print("row of token ids:", dataset.example("train", 0)["inputs"].tolist())

# %%
config = default_config()
config.model.name = "mamba_130m"
config.model.kwargs = dict(embed_dim=64, num_layers=2, d_state=16)  # vocab_size: from the data
config.data.name = "copy"
config.task.name = "causal_lm"
config.global_batch_size = 64
config.num_train_steps = 800
config.optimizer.learning_rate = 3e-3
config.optimizer.weight_decay = 0.05
config.optimizer.warmup_steps = 50
config.optimizer.grad_clip_norm = 1.0
config.log_every_steps = 100
config.progress_bar = False
config.checkpoint.async_save = False
if FAST:
    config.model.kwargs = dict(embed_dim=16, num_layers=1, d_state=4)
    config.global_batch_size = 16
    config.num_train_steps = 4
    config.optimizer.warmup_steps = 1

workdir = Path(tempfile.mkdtemp(prefix="effformer_mamba_"))
losses = []
result = train_and_evaluate(
    config, workdir, on_step=lambda step, metrics: losses.append(metrics["loss"])
)
print("test metrics (per answer token, teacher forcing):", result["eval"])

run = restore(workdir)
model, params = run.model, run.params
print(f"{model.num_layers} x {model.embed_dim} Mamba LM, "
      f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters")

plt.figure(figsize=(7, 3))
plt.semilogy(np.arange(1, len(losses) + 1), losses)
plt.xlabel("step")
plt.ylabel("train loss (answer tokens)")
plt.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## 2. Generate
#
# Prompts of different lengths share a batch, right-padded, with their lengths.
# Greedy decoding; after `<eos>` a row emits padding.

# %%
def prompts_of(split, count):
    """Right-padded prompts (prompt + <sep>) [count, P], their lengths, answers, sizes."""
    instances = [dataset.instance(split, i) for i in range(count)]
    encoded = [vocabulary.encode(prompt) + [SEP] for _, prompt, _ in instances]
    width = max(map(len, encoded))
    prompts = np.zeros((count, width), np.int32)
    for row, ids in enumerate(encoded):
        prompts[row, : len(ids)] = ids
    answers = [vocabulary.encode(answer) + [EOS] for _, _, answer in instances]
    return prompts, np.array([len(ids) for ids in encoded]), answers, [s for s, _, _ in instances]


def exact_match(split, count):
    """Greedy generation on the first ``count`` examples of ``split``: the outputs and scores."""
    prompts, lengths, answers, sizes = prompts_of(split, count)
    longest = max(map(len, answers))
    out = generate_mamba(model, params, jnp.asarray(prompts), lengths, max_new_tokens=longest,
                         eos_id=EOS)
    generated = np.asarray(out.new_tokens)
    correct = [generated[row, : len(answer)].tolist() == answer
               for row, answer in enumerate(answers)]
    return prompts, lengths, out.sequences, generated, np.array(sizes), np.array(correct)


count = 16 if FAST else 256
by_size, outputs = {}, {}
for split in ("test", "test_long"):
    outputs[split] = prompts, lengths, sequences, generated, sizes, correct = exact_match(split, count)
    for size in np.unique(sizes):
        by_size[int(size)] = float(correct[sizes == size].mean())
    print(f"{split}: {correct.mean():.1%} of {count} answers exactly right; for example")
    for row in range(3):
        answer_length = sizes[row] + 1  # the symbols and <eos>
        print("   ", " ".join(vocabulary.decode(prompts[row, : lengths[row]])), "->",
              " ".join(vocabulary.decode(generated[row, :answer_length])),
              "(right)" if correct[row] else "(wrong)")

plt.figure(figsize=(7, 3))
plt.bar(list(by_size), list(by_size.values()),
        color=["C0" if s <= 8 else "C1" for s in by_size])
plt.axvline(8.5, color="gray", ls="--")
plt.xlabel("string length (blue: trained lengths 1-8, orange: longer)")
plt.ylabel("exact match")
plt.ylim(0, 1.05)
plt.title("copy: generated answers entirely right")
plt.show()

# %% [markdown]
# ## 3. Recurrent decoding equals the parallel scan
#
# The same sequences, twice: once through one parallel forward (the selective
# scan, as in training), once token by token with `decode=True`, each call
# advancing every layer's conv and SSM state in the `cache` collection by one
# step. Position t's logits must agree.

# %%
# Eight generated sequences of unseen lengths: prompt, answer, then padding after <eos>.
sequences = outputs["test_long"][2][:8]
batch, total = sequences.shape

parallel_logits = jax.jit(lambda p, tokens: model.apply({"params": p}, tokens))(params, sequences)

one = jnp.zeros((batch, 1), jnp.int32)
cache_shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), one, decode=True))["cache"]
cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)  # the zero state


@jax.jit
def decode_step(params, cache, token):
    logits, mutated = model.apply({"params": params, "cache": cache}, token, decode=True,
                                  mutable=["cache"])
    return logits[:, 0], mutated["cache"]


recurrent_logits = []
for t in range(total):
    logits, cache = decode_step(params, cache, sequences[:, t : t + 1])
    recurrent_logits.append(logits)
recurrent_logits = jnp.stack(recurrent_logits, axis=1)

difference = np.asarray(jnp.abs(recurrent_logits - parallel_logits).max(axis=(0, 2)))
scale = float(jnp.abs(parallel_logits).max())
print(f"largest |recurrent - parallel| over {total} positions: {difference.max():.2e} "
      f"(logits up to {scale:.1f})")
assert difference.max() < 1e-3 * max(1.0, scale), difference.max()

plt.figure(figsize=(7, 3))
plt.semilogy(np.maximum(difference, 1e-12), "o-")
plt.xlabel("position t")
plt.ylabel("max |difference| of logits")
plt.title("recurrent decode vs parallel scan (float32)")
plt.grid(alpha=0.3)
plt.show()
