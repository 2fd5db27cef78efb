"""CCT-14/7x2 on ImageNet-1k at 224 (and the 384 fine-tune), the Compact-Transformers recipe.

    effformer train --config experiments/cct/imagenet.py --workdir runs/cct14_in1k
    effformer train --config experiments/cct/imagenet.py:finetune384 --workdir runs/cct14_384 \
        --config.init_from.workdir=runs/cct14_in1k

Hardware: the paper trained with timm's train.py on 8 NVIDIA GPUs (global
batch 1024 at 224; 768 at 384, assuming the fine-tune ran on 8 GPUs as well) for
310 epochs; here a TPU v3-32 / v4-32 pod slice or 8 GPUs (``config.mesh``
data-parallel) fit the same global batch. Needs
``imagenet2012`` prepared for TFDS (manual download). Not run on the 2-core
development CPU.

Published top-1 (Compact-Transformers README): 80.67% at 224, 82.71% after
fine-tuning at 384. The 384 run starts from the 224 run's latest checkpoint
(``config.init_from``, default ``runs/cct14_in1k``), its position table resized
on the token grid (196 -> 576 tokens) by
``effformer.models.vit.interpolate_position_embedding``; every other parameter
is copied and the optimizer starts fresh.

Recipe: the original's ``configs/pretrained/cct_14-7x2_imagenet.yml`` and
``configs/finetuned/cct_14-7x2_imagenet384.yml``, run with timm's train.py on 8 GPUs
(``./dist_classification.sh 8``, 128 images per GPU for 224 and 96 for 384; the
learning rate is absolute, not scaled with the batch). At 224: AdamW lr 5e-4,
weight decay 0.05, cosine to 1e-5 after 10 warm-up epochs, 300 epochs and 10
cool-down epochs (run here as 310 epochs of the cosine), label smoothing 0.1, Mixup
0.8 / CutMix 1.0, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25. The 384
fine-tune: lr 1e-5 with no warm-up, cosine to 0, weight decay 0, 30 epochs (and 10
cool-down epochs, not run), the same augmentation.

Not reproduced by this trainer: timm's RandomResizedCrop (scale 0.08-1, random
interpolation) and the evaluation's centre crop (crop_pct 0.9), the warm-up's start
at 1e-6 (here 0); RandAugment's differences are in ``effformer/data/randaugment.py``.
"""

from effformer.train import default_config

TRAIN_EXAMPLES = 1_281_167


def get_config(arg: str = "224"):
    if arg not in ("224", "finetune384"):
        raise ValueError(
            f"experiments/cct/imagenet.py: ARG must be '224' or 'finetune384', got {arg!r}."
        )
    finetune = arg == "finetune384"
    batch = 8 * (96 if finetune else 128)  # 8 GPUs
    config = default_config()
    config.model.name = "cct_14_7x2"
    config.data.name = "imagenet2012"
    config.data.image_size = 384 if finetune else 224
    config.data.flip = True
    config.data.randaugment_num_layers = 2
    config.data.randaugment_magnitude = 9.0
    config.data.random_erasing = 0.25
    config.task.name = "image_classification"
    config.task.label_smoothing = 0.1
    config.task.mixup_alpha = 0.8
    config.task.cutmix_alpha = 1.0
    config.global_batch_size = batch
    config.num_epochs = 30.0 if finetune else 310.0
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-5 if finetune else 5e-4
    config.optimizer.weight_decay = 0.0 if finetune else 0.05
    config.optimizer.schedule = "cosine"
    config.optimizer.min_lr_ratio = 0.0 if finetune else 1e-5 / 5e-4
    config.optimizer.warmup_steps = 0 if finetune else 10 * TRAIN_EXAMPLES // batch
    config.eval_every_steps = TRAIN_EXAMPLES // batch
    config.checkpoint.every_steps = TRAIN_EXAMPLES // batch
    config.checkpoint.best_metric = "accuracy"
    config.compute_dtype = "bfloat16"
    if finetune:
        config.init_from.workdir = "runs/cct14_in1k"
    return config
