"""EcoFormer attention vs softmax attention on 16x16 digits (64 tokens), CPU-sized.

    .venv/bin/python experiments/ecoformer/run.py --seeds 0 1       # every arm, a table
    .venv/bin/effformer train --config experiments/ecoformer/digits.py --workdir /tmp/eco_softmax

Model and recipe: experiments/tome/digits.py's (the README demo's recipe on a
model with enough tokens for the attention to matter): the digits resized to
16x16, CCT-4/3x1 (one 3x3 conv + 3x3/2 max pool -> 8x8 = 64 tokens, 4 blocks of
width 128, 2 heads of width 64, MLP ratio 1, SeqPool), AdamW 2e-3, weight decay
0.05, label smoothing 0.1, batch 128, 20 epochs (225 steps), no augmentation.

Arms (``get_config(arm)``), identical but for the token mixer and how it starts:

* ``softmax`` (the default): softmax attention, 407,819 parameters.
* ``ecoformer``: EcoFormer attention in every block (``mixer="ecoformer"``: shared
  q = k projection, 16-bit kernelised hash codes from 25 anchors, Hamming-affinity
  linear attention; 342,283 parameters, no key projection). The hash functions are
  fitted by KSH (``effformer.mixers.ecoformer.refit_hashing``) on the first
  ``ecoformer.fit_examples`` images of the batch at step 0 and every
  ``ecoformer.refit_every_steps`` steps, with the official KSH settings
  (top-k 10, SGD lr 5e-4, Nesterov momentum 0.9, 100 steps per bit).
* ``ecoformer_unfitted``: the same, but the hash functions are never fitted: the
  random kernelised hashing ``init`` makes (the ablation of the KSH fit).
* ``finetune``: the paper's protocol (its ImageNet models are MSA-pretrained, then
  fine-tuned for a tenth of the epochs at a tenth of the learning rate): this config
  is the fine-tuning stage. run.py trains the ``softmax`` arm, carries its parameters
  into the EcoFormer model (the q/k projection from the query projection, as the
  official code loads ``to_qk`` from ``qkv[:dim]``), fits the hash functions once on
  the first batch (the official ``k = 300`` epochs: once), then fine-tunes for 5
  epochs at lr 2e-4 (5 warm-up steps, cosine).

effformer's trainer trains the ``softmax``, ``ecoformer`` and ``ecoformer_unfitted``
arms (it carries the ``hashing`` collection and refits it as
``config.model_state.hashing`` says); the ``finetune`` arm needs run.py, which maps the
softmax run's parameters into the EcoFormer model. The table below was measured with
run.py's own loop (the same data pipeline, task, optimiser, schedule and fits; written
before the trainer could train EcoFormer models).

Measured on the 2-core development CPU under load average 9-11 (JAX 0.10.2), seeds 0
and 1, ``run.py --seeds 0 1`` (about an hour for the eight runs): test accuracy softmax
96.2 ± 1.0, ecoformer 89.9 ± 3.3, ecoformer_unfitted 91.9 ± 0.8, finetune 80.0 ± 2.7
(%, mean ± std). Tables and reading: README.md here.
"""

from effformer.train import default_config

ARMS = ("softmax", "ecoformer", "ecoformer_unfitted", "finetune")


def get_config(arm: str = "softmax"):
    if arm not in ARMS:
        raise ValueError(
            f"experiments/ecoformer/digits.py: ARG must be one of {ARMS}, got {arm!r}."
        )
    config = default_config()
    config.model.name = "cct_4_3x2"
    config.model.kwargs = dict(conv_layers=1)
    if arm != "softmax":
        config.model.kwargs.update(
            mixer="ecoformer", mixer_kwargs=dict(num_bits=16, num_anchors=25)
        )
    config.data.name = "digits"
    config.data.image_size = 16
    config.task.name = "image_classification"
    config.task.label_smoothing = 0.1
    config.global_batch_size = 128
    config.num_epochs = 20.0
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 0.05
    config.optimizer.warmup_steps = 20
    config.log_every_steps = 25
    config.progress_bar = False
    if arm == "finetune":
        config.num_epochs = 5.0
        config.optimizer.learning_rate = 2e-4
        config.optimizer.warmup_steps = 5

    config.arm = arm  # Read by run.py only.
    # KSH fits of the hash functions (effformer.train.model_state), used by the trainer and
    # by run.py for the EcoFormer arms (the softmax model has no hash functions).
    config.model_state.hashing.update(
        at_start=arm != "ecoformer_unfitted",
        every_steps=0 if arm in ("ecoformer_unfitted", "finetune") else 25,
        examples=32,  # the official fit sees one GPU's batch of 32
        top_k=10,
        learning_rate=5e-4,
        momentum=0.9,
        iterations=100,
    )
    return config
