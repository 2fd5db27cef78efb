"""A CCT with 64 tokens on digits, trained without merging, for ToMe's off-the-shelf test.

    .venv/bin/effformer train --config experiments/tome/digits.py --workdir /tmp/tome_digits
    .venv/bin/python experiments/tome/evaluate.py --workdir /tmp/tome_digits --r 0 2 4 8 16

The demo's recipe (experiments/cct/digits.py: AdamW 2e-3, weight decay 0.05,
label smoothing 0.1, batch 128, 20 epochs) on a model with enough tokens for
merging to matter: the digits resized to 16x16 (bicubic), CCT-4/3x1 (one 3x3
conv + 3x3/2 max pool -> 8x8 = 64 tokens, 4 layers of width 128, 2 heads, MLP
ratio 1, SeqPool). ``tome_r`` stays 0 in training; evaluate.py rebuilds the
trained model with merging at several r.

Results (machine, load, time): experiments/tome/README.md.
"""

from effformer.train import default_config


def get_config(arg=None):
    del arg
    config = default_config()
    config.model.name = "cct_4_3x2"
    config.model.kwargs = dict(conv_layers=1)
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
    return config
