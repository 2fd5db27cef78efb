# %% [markdown]
# # effformer quickstart: a small vision Transformer on handwritten digits
#
# What this notebook shows, with the library's public API only:
#
# 1. the model registry (`effformer.models.list_models`, `create`);
# 2. training CCT-2/3x1 (the README's demo model, 203k parameters) on the embedded
#    digits dataset (scikit-learn's 8x8 digits: 1,437 train / 360 test images; no
#    download) with the library's trainer, `effformer.train.train_and_evaluate`;
# 3. the loss and accuracy curves, read back from the run's `metrics.jsonl`;
# 4. restoring the checkpoint with `effformer.train.evaluate` (it needs only the
#    workdir), and the test digits the model gets wrong.
#
# **Time**: 32 s measured on the idle 2-core development CPU, most of it the 225
# training steps; test accuracy 98.1% (353 of 360 test digits).
# **Fast mode**: `EFFFORMER_FAST=1` in the environment shrinks the model and runs a
# handful of steps (seconds; used by the test suite).

# %% [setup]

# %% [markdown]
# ## 1. The registry
#
# Every architecture is registered under names; `list_models` takes a glob pattern.

# %%
import jax
import numpy as np

from effformer import models

print(len(models.list_models()), "models, e.g.", models.list_models("cct*"))

# %% [markdown]
# `create(name, **overrides)` builds a Flax module. What the data decides
# (classes, image size, channels) is an override: the trainer passes it from the
# dataset. Here the digits' 8x8x1 images and 10 classes, with one convolution in
# the tokenizer (CCT-2/3x**1**). Every model gives example inputs with
# `dummy_inputs`; `jax.eval_shape` gives the parameters' shapes without computing
# anything (the trainer below initialises the model for real).

# %%
model = models.create("cct_2_3x2", conv_layers=1, num_classes=10, image_size=8, num_channels=1)
shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), **model.dummy_inputs(2))
num_params = sum(x.size for x in jax.tree.leaves(shapes["params"]))
logits = jax.eval_shape(model.apply, shapes, **model.dummy_inputs(2))
print(f"{type(model).__name__}: {num_params:,} parameters, logits {logits.shape}")
print({name: jax.tree.map(lambda x: x.shape, tree) for name, tree in shapes["params"].items()
       if name.startswith("block_0")})

# %% [markdown]
# ## 2. Train with the library's trainer
#
# A run is an `ml_collections` config (the same one as
# `experiments/digits/vit.py`, which the command line `effformer train` uses)
# and a workdir. We evaluate on the test split every few steps so that there is
# an accuracy curve; `on_step` receives the training metrics of every step.

# %%
import tempfile

from effformer.train import default_config, evaluate, train_and_evaluate

config = default_config()
config.model.name = "cct_2_3x2"
config.model.kwargs = dict(conv_layers=1)
config.data.name = "digits"
config.task.name = "image_classification"
config.task.label_smoothing = 0.1
config.global_batch_size = 128
config.num_epochs = 20.0  # 225 steps
config.optimizer.name = "adamw"
config.optimizer.learning_rate = 2e-3
config.optimizer.weight_decay = 0.05
config.optimizer.warmup_steps = 20
config.eval_every_steps = 25
config.log_every_steps = 25
config.progress_bar = False
if FAST:
    config.model.kwargs = dict(conv_layers=1, num_layers=1, embed_dim=32, num_heads=2)
    config.global_batch_size = 32
    config.num_epochs = 0.0
    config.num_train_steps = 6
    config.optimizer.warmup_steps = 2
    config.eval_every_steps = 3
    config.log_every_steps = 3

WORKDIR = Path(tempfile.mkdtemp(prefix="effformer_quickstart_"))
train_log = []
result = train_and_evaluate(
    config, WORKDIR, on_step=lambda step, metrics: train_log.append((step, metrics))
)
print("final step", result["step"], "test metrics", result["eval"])

# %% [markdown]
# ## 3. Curves
#
# The per-step training metrics came through `on_step` (each is one batch, so
# they are noisy); the evaluations over the whole test split are in the
# workdir's `metrics.jsonl`, next to TensorBoard files.

# %%
import matplotlib.pyplot as plt

from effformer.train.metric_writers import read_metrics

evals = read_metrics(WORKDIR, "eval")
steps = [step for step, _ in train_log]
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.5))
ax_loss.plot(steps, [m["loss"] for _, m in train_log], label="train (one batch)", alpha=0.7)
ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="test")
ax_loss.set(xlabel="step", ylabel="cross-entropy (label smoothing 0.1)", title="loss")
ax_acc.plot(steps, [m["accuracy"] for _, m in train_log], label="train (one batch)", alpha=0.7)
ax_acc.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", label="test")
ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
for ax in (ax_loss, ax_acc):
    ax.legend()
    ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Restore and evaluate
#
# `evaluate(workdir)` rebuilds everything from the config saved in the workdir
# and restores the latest checkpoint: what `effformer eval --workdir` does. It
# must reproduce the final evaluation of the training run.

# %%
restored = evaluate(WORKDIR)
print("restored:", restored)
print("training:", result["eval"])
assert restored["step"] == result["step"]
assert abs(restored["accuracy"] - result["eval"]["accuracy"]) < 1e-6

# %% [markdown]
# ### The digits it gets wrong
#
# For predictions we need the model and its parameters: `restore(workdir)`
# reads them back (what `evaluate` does first), then we run the model on the
# test split's input pipeline.

# %%
from effformer.data import create_input_pipeline
from effformer.train import restore

run = restore(WORKDIR)
experiment, step = run.experiment, run.step

predict = jax.jit(lambda params, images: run.model.apply({"params": params}, inputs=images))
images, labels, predictions = [], [], []
test_pipeline = create_input_pipeline(
    experiment.config.data, split="test", global_batch_size=120, train=False, seed=0
)
for batch in test_pipeline:
    keep = batch["mask"]  # the last batch is padded with mask=False examples
    images.append(batch["inputs"][keep])
    labels.append(batch["label"][keep])
    predictions.append(np.asarray(predict(run.params, batch["inputs"]).argmax(-1))[keep])
images, labels, predictions = map(np.concatenate, (images, labels, predictions))
wrong = np.flatnonzero(predictions != labels)
print(f"step {step}: {len(wrong)} of {len(labels)} test digits misclassified "
      f"(accuracy {np.mean(predictions == labels):.4f})")
assert abs(np.mean(predictions == labels) - restored["accuracy"]) < 1e-6

# %%
shown = wrong[:16]
if len(shown):
    cols = min(8, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, shown):
        ax.imshow(images[index][..., 0], cmap="gray_r")
        ax.set_title(f"true {labels[index]}\npred {predictions[index]}", fontsize=9)
    plt.suptitle("misclassified test digits")
    plt.tight_layout()
    plt.show()
else:
    print("no misclassified digits")
