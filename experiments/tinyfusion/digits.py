"""TinyFusion's learnable depth pruning on an 8-layer pixel LM of the digits (2:4 -> 4 layers).

    .venv/bin/effformer train --config experiments/tinyfusion/digits.py:dense --workdir /tmp/tf/dense
    .venv/bin/effformer train --config experiments/tinyfusion/digits.py:search --workdir /tmp/tf/search \\
        --config.init_from.workdir=/tmp/tf/dense
    nice -n 10 .venv/bin/python experiments/tinyfusion/run_digits.py --seeds 0 1

Data: ``digits_pixels`` (``effformer/data/digits_pixels.py``): each 8x8 image a
row of 64 pixel tokens after a BOS token, 1,437 train / 360 test images. Task
``causal_lm``: the eval ``loss`` is the test NLL per pixel in nats; bits/dim =
loss / ln 2.

ARG:

* ``dense``: ``lm_decoder``, 8 pre-norm layers, width 64, 4 heads, GELU MLP
  256, learned absolute positions, tied embeddings, no dropout; AdamW lr 1e-3,
  weight decay 0.01, 40 warm-up steps then cosine, clipping 1.0, batch 32, 600
  steps (about 13 epochs);
* ``search`` (and ``search_full``, ``search_frozen``): ``tinyfusion_lm`` over the
  same model (``effformer/models/tinyfusion.py``), 2:4 groups (layers 0-3 and
  4-7, 2 kept in each), started from a ``dense`` run (``--config.init_from.workdir``;
  ``init_from.reinit="tinyfusion"`` keeps the search's own parameters fresh). The
  weight update is LoRA of rank 8, alpha 16 on every linear layer (``search``),
  every weight (``search_full``) or none (``search_frozen``). As in TinyFusion's
  script: AdamW without weight decay at a constant rate, clipping 1.0, a mask per
  example, Gumbel temperature from 4 to 0.1 linearly over the search; lr 1e-3
  (the script's 1e-4 is for a 28-layer DiT over an ImageNet epoch, about 5,000
  steps; this search has 200) and ``logit_scale`` 100, so the logits move by at
  most lr x 100 = 0.1 a step, as the script's (1e-4 x 10 x 1e2); batch 32, 200
  steps (4.5 epochs);
* ``finetune`` and ``finetune_long``: the pruned 4-layer ``lm_decoder`` (same
  width), started from an exported pruned run
  (``effformer.train.depth_pruning.export_pruned_run``; ``--config.init_from.workdir``):
  AdamW lr 1e-3, weight decay 0.01, cosine after a warm-up, clipping 1.0, batch
  32; ``finetune``: 30 steps (3 warm-up; 5% of the dense run's steps, 0.7 epochs:
  a short recovery, as the paper's 10K-100K steps are for a model pre-trained for
  7M); ``finetune_long``: 150 steps (10 warm-up; 3.3 epochs). Every pruning
  method gets the same budgets.

``run_digits.py`` runs the whole comparison (TinyFusion against keeping the first
half, a loss-based importance choice, the 2:4 mask of least calibration loss and
a random 2:4 mask). Measured on the shared 2-core CPU (load average 5-13), seeds
0 and 1, test bits/dim: dense 2.0538; pruned to 4 layers and fine-tuned 30 steps:
TinyFusion (LoRA) 2.0938, first half 2.0880, min-loss 2:4 2.0917, random 2:4
2.2566 (dense run 13-28 min, search 6-7 min, each fine-tuning under 2 min, wall
time under that load). Details: experiments/tinyfusion/README.md.
"""

from effformer.train import default_config

ARMS = ("dense", "search", "search_full", "search_frozen", "finetune", "finetune_long")
NUM_LAYERS = 8
KEEP, GROUP_SIZE = 2, 4  # 2:4 layer sparsity
_SIZE = dict(
    embed_dim=64,
    num_heads=4,
    ffn_hidden_dim=256,
    max_length=64,
    position_encoding="learned",
)
_WEIGHT_UPDATES = {"search": "lora", "search_full": "full", "search_frozen": "frozen"}


def get_config(arg: str = "search"):
    if arg not in ARMS:
        raise ValueError(
            f"experiments/tinyfusion/digits.py: ARG must be one of {ARMS}, got {arg!r}."
        )
    config = default_config()
    config.data.name = "digits_pixels"
    config.task.name = "causal_lm"
    config.global_batch_size = 32
    config.optimizer.name = "adamw"
    config.optimizer.grad_clip_norm = 1.0
    config.log_every_steps = 50
    config.progress_bar = False
    if arg == "dense":
        config.model.name = "lm_decoder"
        config.model.kwargs = dict(_SIZE, num_layers=NUM_LAYERS)
        config.num_train_steps = 600
        config.optimizer.learning_rate = 1e-3
        config.optimizer.weight_decay = 0.01
        config.optimizer.warmup_steps = 40
    elif arg in ("finetune", "finetune_long"):
        config.model.name = "lm_decoder"
        config.model.kwargs = dict(_SIZE, num_layers=NUM_LAYERS * KEEP // GROUP_SIZE)
        config.num_train_steps = 30 if arg == "finetune" else 150
        config.optimizer.learning_rate = 1e-3
        config.optimizer.weight_decay = 0.01
        config.optimizer.warmup_steps = 3 if arg == "finetune" else 10
    else:
        config.model.name = "tinyfusion_lm"
        config.model.kwargs = dict(
            _SIZE,
            num_layers=NUM_LAYERS,
            keep=KEEP,
            group_size=GROUP_SIZE,
            weight_update=_WEIGHT_UPDATES[arg],
            lora_rank=8,
            lora_alpha=16.0,
            logit_scale=100.0,
            per_example_masks=True,
        )
        config.num_train_steps = 200
        config.optimizer.learning_rate = 1e-3
        config.optimizer.schedule = "constant"
        config.optimizer.weight_decay = 0.0  # the frozen dense weights must not decay
        config.model_schedules.gumbel_temperature = dict(
            kind="linear", start=4.0, end=0.1, cutoff_steps=config.num_train_steps
        )
        config.init_from.reinit = "tinyfusion"
    return config
