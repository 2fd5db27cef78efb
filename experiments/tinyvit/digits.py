"""TinyViT's sparse distillation at CPU scale: a CCT teacher, a small TinyViT student, digits at 16x16.

    D=/tmp/tinyvit_digits
    .venv/bin/effformer train --config experiments/tinyvit/digits.py:teacher --workdir $D/teacher
    .venv/bin/effformer save-teacher-logits --config experiments/tinyvit/digits.py:student \
        --teacher_workdir $D/teacher --out $D/store_k3 --top_k 3
    .venv/bin/effformer train --config experiments/tinyvit/digits.py:student \
        --workdir $D/student_k3 --config.data.teacher_store=$D/store_k3
    .venv/bin/effformer train --config experiments/tinyvit/digits.py:scratch --workdir $D/scratch
    .venv/bin/python experiments/tinyvit/run.py --seeds 0 1 2   # every arm, a table

Data: the digits resized to 16x16 (bicubic), random crops after 2 pixels of
zero padding and random erasing (p = 0.25), as the training stream of every arm.

* ``teacher``: CCT-4/3x1 (experiments/tome/digits.py's model: one 3x3 conv +
  3x3/2 max pool -> 64 tokens, 4 layers of width 128; 407,819 parameters), 20
  epochs, label smoothing 0.1 (the README's teacher A, 95.3%; its teacher B, 96.7%,
  adds ``--config.num_epochs=30 --config.data.random_erasing=0.0``).
* ``scratch``: the student, a two-stage TinyViT (stem -> 4x4 tokens, MBConv
  stage of width 16, patch merging -> 2x2, one stage of two TinyViT blocks of
  width 32 with a 2x2 window; 32,714 parameters), 30 epochs on the labels,
  label smoothing 0.1.
* ``student``: the same student and schedule trained on the teacher's stored
  probabilities only (task ``distillation``, weight 1, T = 1: TinyViT's soft
  cross-entropy), from ``config.data.teacher_store`` (written by
  ``effformer save-teacher-logits`` for this config and seed; ``--top_k 10``
  stores the whole softmax, i.e. dense distillation).

Optimiser for all: AdamW 2e-3, weight decay 0.05, 20 warm-up steps, cosine,
batch 128. Results (machine, load, time): experiments/tinyvit/README.md.
"""

from effformer.train import default_config

STUDENT = dict(
    embed_dims=(16, 32),
    depths=(1, 2),
    num_heads=(1, 1),
    window_sizes=(1, 2),
    mlp_ratio=4.0,
    drop_path_rate=0.0,
)
ARMS = ("teacher", "scratch", "student")


def get_config(arg: str = "student"):
    if arg not in ARMS:
        raise ValueError(f"experiments/tinyvit/digits.py: ARG must be one of {ARMS}, got {arg!r}.")
    config = default_config()
    config.data.name = "digits"
    config.data.image_size = 16
    config.data.crop_padding = 2
    config.data.random_erasing = 0.25
    config.global_batch_size = 128
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 0.05
    config.optimizer.warmup_steps = 20
    config.log_every_steps = 50
    config.progress_bar = False
    if arg == "teacher":
        config.model.name = "cct_4_3x2"
        config.model.kwargs = dict(conv_layers=1)
        config.task.name = "image_classification"
        config.task.label_smoothing = 0.1
        config.num_epochs = 20.0
        return config
    config.model.name = "tinyvit_5m"
    config.model.kwargs = dict(STUDENT)
    config.num_epochs = 30.0
    if arg == "scratch":
        config.task.name = "image_classification"
        config.task.label_smoothing = 0.1
    else:
        config.task.name = "distillation"
        config.task.distill_weight = 1.0
        config.task.distill_temperature = 1.0
    return config
