"""CCT-7/7x2 on Flowers-102 at 224x224 from scratch, the Compact-Transformers recipe (GPU; not run here).

    effformer train --config experiments/cct/flowers102.py --workdir runs/cct_flowers

Hardware: the paper used NVIDIA GPUs; a single recent GPU or a TPU v3-8 runs
this config. Needs ``tfds build oxford_flowers102``. Not run on the 2-core
development CPU.

Published (Compact-Transformers README): CCT-7/7x2 from scratch with
sinusoidal positions, 97.19% top-1 (99.76% is the ImageNet-pretrained
CCT-14/7x2 fine-tuned at 384).

Recipe: the original's ``configs/pretrained/cct_7-7x2_flowers102.yml`` (timm's
train.py): model ``cct_7_7x2_224_sine`` (a fixed sinusoidal position table:
``position_embedding="sinusoidal"``; earlier versions of the original dropped that
option, ../shared/REFERENCES.md), AdamW lr 5e-4, weight decay 6e-2, batch 96,
300 epochs, cosine to 1e-5 after 10 warm-up epochs, label smoothing 0.1, Mixup 0.8 /
CutMix 1.0 (switch probability 0.5), RandAugment ``rand-m9-mstd0.5-inc1``, random
erasing 0.25, horizontal flip. It trains on the ``train`` split (1,020 images) and
validates on ``valid``; the TFDS pipeline here trains on ``train`` and evaluates on
``test``.

Not reproduced by this trainer: timm's RandomResizedCrop (scale 0.8-1, random
interpolation; the images here are resized to 224 and not cropped), the 10 cool-down
epochs at the minimum learning rate, the warm-up's start at 1e-6 (here 0);
RandAugment's differences are in ``effformer/data/randaugment.py``.
"""

from effformer.train import default_config

TRAIN_EXAMPLES = 1020  # oxford_flowers102's train split, what the pipeline trains on
BATCH = 96
LEARNING_RATE = 5e-4
MIN_LR = 1e-5


def get_config(arg=None):
    del arg
    config = default_config()
    config.model.name = "cct_7_7x2"
    config.model.kwargs = dict(position_embedding="sinusoidal")
    config.data.name = "oxford_flowers102"
    config.data.image_size = 224
    config.data.flip = True
    config.data.randaugment_num_layers = 2
    config.data.randaugment_magnitude = 9.0
    config.data.random_erasing = 0.25
    config.task.name = "image_classification"
    config.task.label_smoothing = 0.1
    config.task.mixup_alpha = 0.8
    config.task.cutmix_alpha = 1.0
    config.task.mix_switch_prob = 0.5
    config.global_batch_size = BATCH
    config.num_epochs = 300.0
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = LEARNING_RATE
    config.optimizer.weight_decay = 6e-2
    config.optimizer.schedule = "cosine"
    config.optimizer.min_lr_ratio = MIN_LR / LEARNING_RATE
    config.optimizer.warmup_steps = 10 * TRAIN_EXAMPLES // BATCH
    config.eval_every_steps = 10 * TRAIN_EXAMPLES // BATCH
    config.checkpoint.best_metric = "accuracy"
    return config
