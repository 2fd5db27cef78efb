"""iLLaMA on ImageNet-1K at 224x224, following the paper's recipe (``get_config("tiny" | "small" | "base")``).

    effformer train --config experiments/illama/imagenet.py:tiny --workdir runs/illama_tiny

Hardware of the original runs: 8 GPUs, 128 images each, gradient accumulation 4
(global batch 4096), 300 epochs. Published ImageNet-1K top-1 (224x224):
iLLaMA-T 75.0, iLLaMA-S 79.9, iLLaMA-B 81.6. These configs were NOT run here
(no ImageNet on the development CPU); they are checked to validate and to build.
Needs ImageNet prepared for TFDS (``imagenet2012``) in ``config.data.data_dir``.

The recipe, from the official scripts (techmonsterwang/iLLaMA,
``scripts/train_illama_{tiny,small,base}_in1k.sh`` and ``main_soft.py`` defaults):
AdamW lr 4e-3 at batch 4096, weight decay 0.05 (none on 1-D parameters, the
position table and the class token), cosine to 1e-6, warm-up 5 epochs (tiny,
small) or 50 (base, the script's default), label smoothing 0.1, RandAugment
rand-m9, random erasing 0.25, horizontal flip, Mixup/CutMix
(0.1/0.1, 0.5/0.5, 0.95/1.0), drop path 0 / 0.1 / 0.4. Soft mask: r = 1 then 0,
"constant" with cutoff 50 epochs (tiny), "linear" over 50 (small) or 25 (base)
epochs; evaluation at r = 0.

Not reproduced by this trainer: timm's RandomResizedCrop and colour jitter
(the data pipeline crops by padding only), and the original's per-step Mixup
probability 1.0 (here Mixup/CutMix are applied to every batch as well, with
switch probability 0.5).
"""

from effformer.data import default_data_config
from effformer.train import default_config

# variant -> (model, warm-up epochs, mixup alpha, cutmix alpha, drop path, mask schedule, cutoff)
VARIANTS = {
    "tiny": ("illama_tiny", 5, 0.1, 0.1, 0.0, "constant", 50),
    "small": ("illama_small", 5, 0.5, 0.5, 0.1, "linear", 50),
    "base": ("illama_base", 50, 0.95, 1.0, 0.4, "linear", 25),
}
GLOBAL_BATCH_SIZE = 4096
IMAGENET_TRAIN_EXAMPLES = 1_281_167


def get_config(arg: str = "tiny"):
    if arg not in VARIANTS:
        raise ValueError(
            f"experiments/illama/imagenet.py: variant must be one of {sorted(VARIANTS)}, got {arg!r}."
        )
    model_name, warmup_epochs, mixup, cutmix, drop_path, mask_kind, cutoff = VARIANTS[arg]
    config = default_config()
    config.model.name = model_name
    config.model.kwargs.drop_path_rate = drop_path

    config.data = default_data_config("imagenet2012")
    config.data.image_size = 224
    config.data.flip = True
    config.data.randaugment_num_layers = 2
    config.data.randaugment_magnitude = 9.0
    config.data.random_erasing = 0.25

    config.task.name = "image_classification"
    config.task.label_smoothing = 0.1
    config.task.mixup_alpha = mixup
    config.task.cutmix_alpha = cutmix
    config.task.mix_switch_prob = 0.5

    config.global_batch_size = GLOBAL_BATCH_SIZE
    config.num_epochs = 300.0
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 4e-3
    config.optimizer.weight_decay = 0.05
    config.optimizer.schedule = "cosine"
    config.optimizer.min_lr_ratio = 1e-6 / 4e-3
    config.optimizer.warmup_steps = warmup_epochs * IMAGENET_TRAIN_EXAMPLES // GLOBAL_BATCH_SIZE
    # The original's no_weight_decay(): pos_embed and cls_token (1-D parameters are
    # excluded by the optimizer anyway).
    config.optimizer.no_decay_names = ("embedding", "token")

    config.model_schedules.soft_mask_ratio = dict(
        kind=mask_kind, start=1.0, end=0.0, cutoff_epochs=float(cutoff), eval_value=0.0
    )
    config.log_every_steps = 100
    config.eval_every_steps = IMAGENET_TRAIN_EXAMPLES // GLOBAL_BATCH_SIZE * 10
    config.checkpoint.every_steps = IMAGENET_TRAIN_EXAMPLES // GLOBAL_BATCH_SIZE
    config.checkpoint.best_metric = "accuracy"
    return config
