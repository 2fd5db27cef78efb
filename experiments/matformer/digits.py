"""MatFormer on the digits as pixel sequences: one MatLM over 4 FFN granularities vs each alone.

    .venv/bin/effformer train --config experiments/matformer/digits.py:joint --workdir /tmp/mat_joint
    nice -n 10 .venv/bin/python experiments/matformer/run_digits.py --seeds 0

Data: ``digits_pixels`` (``effformer/data/digits_pixels.py``): each 8x8 image a
row of 64 pixel tokens in raster order (values 0..16) after a BOS token, 1,437
train / 360 test images. Task ``causal_lm``: the eval ``loss`` is the test NLL
per pixel in nats; bits/dim = loss / ln 2.

Model: ``lm_decoder``, 2 pre-norm layers, width d = 64, 4 heads, GELU MLP,
learned absolute positions, tied embeddings, no dropout (the ``full`` arm of
experiments/combiner/digits.py). ARG:

* ``joint``: FFN width 4d = 256 trained with ``task.matformer_widths`` =
  (32, 64, 128, 256), MatFormer's {d/2, d, 2d, 4d}: each step's loss is the
  sum of the four granularities' losses on the same batch;
* ``alone_W`` (W in 32, 64, 128, 256): a model built with FFN width W, trained
  on its own (``alone_256`` is the full model trained as usual).

Budget (every arm): AdamW, lr 2e-3, weight decay 0.01, 40 warm-up steps then
cosine to 0, gradient clipping 1.0, batch 32, 400 steps (about 9 epochs).
``joint`` runs the model four times per step, so its step costs about the sum
of the four ``alone`` steps. Results: experiments/matformer/README.md.
"""

from effformer.train import default_config

GRANULARITIES = (32, 64, 128, 256)  # d/2, d, 2d, 4d with d = 64
ARMS = ("joint", *(f"alone_{width}" for width in GRANULARITIES))
_SIZE = dict(
    embed_dim=64,
    num_layers=2,
    num_heads=4,
    max_length=64,
    position_encoding="learned",
)


def get_config(arg: str = "joint"):
    if arg not in ARMS:
        raise ValueError(
            f"experiments/matformer/digits.py: ARG must be one of {ARMS}, got {arg!r}."
        )
    config = default_config()
    config.model.name = "lm_decoder"
    if arg == "joint":
        config.model.kwargs = dict(_SIZE, ffn_hidden_dim=GRANULARITIES[-1])
        config.task.matformer_widths = GRANULARITIES
    else:
        config.model.kwargs = dict(_SIZE, ffn_hidden_dim=int(arg.removeprefix("alone_")))
    config.data.name = "digits_pixels"
    config.task.name = "causal_lm"
    config.global_batch_size = 32
    config.num_train_steps = 400
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 0.01
    config.optimizer.warmup_steps = 40
    config.optimizer.grad_clip_norm = 1.0
    config.log_every_steps = 100
    config.progress_bar = False
    return config
