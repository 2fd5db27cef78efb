"""CCT-7/7x2 on Flowers-102 at 224x224 from scratch, the Compact-Transformers recipe (GPU; not run here).

    effformer train --config experiments/cct/flowers102.py --workdir runs/cct_flowers

Hardware: the paper used NVIDIA GPUs (batch 128, e.g. 4 GPUs x 32); a single
recent GPU or a TPU v3-8 runs this config. Needs ``tfds build oxford_flowers102``.
Not run on the 2-core development CPU.

Published (Compact-Transformers README): 99.76% top-1 on Flowers-102 is the
ImageNet-pretrained CCT-14/7x2 fine-tuned at 384; for CCT-7/7x2 trained from
scratch see the original README's Flowers-102 table (not transcribed here:
not verified by us).

Recipe: the CCT recipe of ../shared/REFERENCES.md (AdamW lr 5.5e-4, weight
decay 0.06, batch 128, cosine after 10 warm-up epochs, label smoothing 0.1,
Mixup 0.8 / CutMix 1.0, RandAugment), 300 epochs; check
``configs/pretrained/cct_7-7x2_flowers102.yml`` of the original before a
comparison.
"""

from effformer.train import default_config

TRAIN_EXAMPLES = 2040  # Flowers-102 train + validation, as the original trains on both


def get_config(arg=None):
    del arg
    config = default_config()
    config.model.name = "cct_7_7x2"
    config.data.name = "oxford_flowers102"
    config.data.image_size = 224
    config.data.flip = True
    config.data.randaugment_num_layers = 2
    config.data.randaugment_magnitude = 9.0
    config.task.name = "image_classification"
    config.task.label_smoothing = 0.1
    config.task.mixup_alpha = 0.8
    config.task.cutmix_alpha = 1.0
    config.global_batch_size = 128
    config.num_epochs = 300.0
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 5.5e-4
    config.optimizer.weight_decay = 6e-2
    config.optimizer.warmup_steps = 10 * TRAIN_EXAMPLES // 128
    config.eval_every_steps = 10 * TRAIN_EXAMPLES // 128
    config.checkpoint.best_metric = "accuracy"
    return config
