"""ViT on the embedded digits dataset at patch size 4, 2 or 1 (pixel tokens): "Scaling Laws in
Patchification" at CPU scale.

    .venv/bin/effformer train --config experiments/patch_scaling/digits.py:2 --workdir /tmp/ps2
    .venv/bin/python experiments/patch_scaling/run.py --patch-sizes 4 2 1 --seeds 0 1 2

The model is ``vit_digits`` (pre-norm ViT, dim 64, 4 layers, 4 heads, MLP
ratio 2) with only ``patch_size`` changed, so the parameter budget is the
same up to the patch projection and the position table: 136,138 (patch 4:
4 tokens + class token), 136,138 (patch 2: 16 + 1), 139,018 (patch 1: 64 + 1);
the compute grows with the token count.

Results: experiments/patch_scaling/README.md.
"""

from effformer.train import default_config

PATCH_SIZES = (4, 2, 1)


def get_config(arg: str = "2"):
    patch_size = int(arg)
    if patch_size not in PATCH_SIZES:
        raise ValueError(
            f"experiments/patch_scaling/digits.py: ARG must be one of {PATCH_SIZES}, got {arg!r}."
        )
    config = default_config()
    config.model.name = "vit_digits"
    config.model.kwargs = dict(patch_size=patch_size)
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
