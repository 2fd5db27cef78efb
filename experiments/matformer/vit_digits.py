"""MatViT on the digits: one CCT over 4 FFN granularities vs each width trained alone.

    .venv/bin/effformer train --config experiments/matformer/vit_digits.py:joint \\
        --workdir /tmp/matvit_joint
    nice -n 10 .venv/bin/python experiments/matformer/run_vit_digits.py --seeds 0 1

Data: the embedded ``digits`` (scikit-learn's 8x8 handwritten digits, 1,437
train / 360 test images, 10 classes), no augmentation. Task
``image_classification``, label smoothing 0.1 in training; the eval ``loss``
is the plain test cross-entropy (nats) and ``accuracy`` the test accuracy.

Model: a CCT-2/3x1 narrowed to width d = 64 with a 4d MLP: one 3x3 conv
(stride 1) + ReLU + 3x3/2 max pool -> 4x4 = 16 tokens, 2 encoder layers of
width 64, 2 heads, learned positions, SeqPool, the CCT block ordering,
attention dropout 0.1 and stochastic depth 0.1 (experiments/cct/digits.py's
``cct`` arm with ``embed_dim=64, mlp_ratio=4``). ARG:

* ``joint``: MLP width 4d = 256 trained with ``task.matformer_widths`` =
  (32, 64, 128, 256), MatViT's FFN ratios {0.5, 1, 2, 4} of d: each step's
  loss is the sum of the four granularities' losses on the same batch;
* ``alone_W`` (W in 32, 64, 128, 256): a model built with MLP width W
  (``mlp_ratio = W / 64``), trained on its own (``alone_256`` is the full
  model trained as usual).

Budget (every arm): AdamW, lr 2e-3, weight decay 0.05, 20 warm-up steps then
cosine to 0, batch 128, 20 epochs (225 steps): experiments/cct/digits.py's.
``joint`` runs the encoder, pooling and head four times per step (the
tokenizer once), so its step costs about the sum of the four ``alone`` steps.

Measured on the shared 2-core CPU (load average 9-13), seeds 0, 1, 2: a joint run
takes about 170 s, an ``alone`` run 60-120 s; test accuracy 96.8-97.2% (means) for
every width of both arms; test cross-entropy of the joint model at widths 32 / 64 /
128 / 256: 0.225 / 0.202 / 0.190 / 0.187, of the ``alone`` models 0.210 / 0.203 /
0.195 / 0.188. Tables and Mix'n'Match rows: experiments/matformer/README.md.
"""

from effformer.train import default_config

EMBED_DIM = 64
GRANULARITIES = (32, 64, 128, 256)  # d/2, d, 2d, 4d
ARMS = ("joint", *(f"alone_{width}" for width in GRANULARITIES))
_MODEL = dict(conv_layers=1, embed_dim=EMBED_DIM, num_heads=2)


def get_config(arg: str = "joint"):
    if arg not in ARMS:
        raise ValueError(
            f"experiments/matformer/vit_digits.py: ARG must be one of {ARMS}, got {arg!r}."
        )
    config = default_config()
    config.model.name = "cct_2_3x2"
    if arg == "joint":
        width = GRANULARITIES[-1]
        config.task.matformer_widths = GRANULARITIES
    else:
        width = int(arg.removeprefix("alone_"))
    config.model.kwargs = dict(_MODEL, mlp_ratio=width / EMBED_DIM)
    config.data.name = "digits"
    config.task.name = "image_classification"
    config.task.label_smoothing = 0.1
    config.global_batch_size = 128
    config.num_epochs = 20.0
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 0.05
    config.optimizer.warmup_steps = 20
    config.log_every_steps = 75
    config.progress_bar = False
    return config
