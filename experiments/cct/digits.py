"""CPU-scale CCT vs ViT-Lite on the embedded digits dataset (8x8x1, 1,437 train / 360 test).

    .venv/bin/effformer train --config experiments/cct/digits.py:cct --workdir /tmp/cct_digits
    .venv/bin/effformer train --config experiments/cct/digits.py:vit_lite --workdir /tmp/vit_lite_digits
    .venv/bin/python experiments/cct/compare.py --seeds 0 1 2   # both, several seeds, a table

The two models share everything but the tokenizer and the pooling (the CCT
paper's central comparison): 2 encoder layers of width 128, 2 heads, MLP
ratio 1, the CCT layer ordering, attention dropout 0.1, stochastic depth 0.1,
a learned position table, 16 image tokens.

* ``cct``: CCT-2/3x1: one 3x3 conv (stride 1) + ReLU + 3x3/2 max pool -> 4x4
  tokens, SeqPool. 203,275 parameters.
* ``vit_lite``: ViT-Lite-2/2: 2x2 patches -> 4x4 tokens, class token.
  202,890 parameters.

Results (mean and spread over seeds, machine, time): experiments/cct/README.md.
"""

from effformer.train import default_config

_COMMON = dict(num_layers=2, embed_dim=128, num_heads=2, mlp_ratio=1.0)
MODELS = {
    "cct": ("cct_2_3x2", dict(conv_layers=1)),
    "vit_lite": ("vit_lite_7_4", dict(_COMMON, patch_size=2)),
}


def get_config(arg: str = "cct"):
    if arg not in MODELS:
        raise ValueError(
            f"experiments/cct/digits.py: ARG must be one of {sorted(MODELS)}, got {arg!r}."
        )
    name, kwargs = MODELS[arg]
    config = default_config()
    config.model.name = name
    config.model.kwargs = kwargs
    config.data.name = "digits"
    config.task.name = "image_classification"
    config.task.label_smoothing = 0.1
    config.global_batch_size = 128
    config.num_epochs = 20.0
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 0.05
    config.optimizer.warmup_steps = 20
    config.log_every_steps = 50
    config.progress_bar = False
    return config
