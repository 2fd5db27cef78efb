"""IA-RED²'s interpreters trained by REINFORCE on the frozen digits CCT of experiments/tome.

    .venv/bin/effformer train --config experiments/tome/digits.py --workdir /tmp/tome_digits
    .venv/bin/effformer train --config experiments/ia_red/digits.py --workdir /tmp/ia_red_digits \\
        --config.init_from.workdir=/tmp/tome_digits
    .venv/bin/python experiments/ia_red/evaluate.py --workdir /tmp/ia_red_digits

The backbone is the CCT-4/3x1 of experiments/tome/digits.py (digits at 16x16,
64 tokens, 4 blocks of width 128, SeqPool, no class token), trained there
without any token reduction and loaded here through ``config.init_from``; the
two multi-head interpreters (before blocks 0 and 2: two groups of two blocks,
2 heads each) start fresh (``init_from.reinit``) and are the only parameters
trained (``optimizer.trainable_modules``). The backbone runs as at inference
(no attention dropout, no stochastic depth). Task ``ia_red_policy``
(``effformer/train/ia_red_task.py``): REINFORCE with reward ``1 - c^2`` for a
correct prediction, ``-tau`` for a wrong one, leave-one-out baseline.
AdamW lr 1e-3 (constant, 10 warm-up steps, no weight decay), gradient clipping
1.0, batch 128, 300 steps (27 epochs).

ARG: tau, the error penalty (default 1.0), e.g. ``digits.py:0.5``.

Without ``--config.init_from.workdir`` the interpreters are trained on an
untrained backbone (what tests/test_experiment_configs.py builds).

Measured on the shared development machine (Intel Xeon, 2 CPUs, JAX 0.10.2 on
CPU, load average about 10): each policy run 3-4 min wall; with the paper's
p > 0.5 rule, tau = 1 keeps 60% of the patch-token work at 91.67% test accuracy
and tau = 4 keeps 70% at 92.50% (the backbone alone: 97.22%). The full table
(top-k at ToMe's token counts, images/s, FLOPs) and heat maps:
experiments/ia_red/README.md.
"""

import effformer.train.ia_red_task  # noqa: F401  (registers the task "ia_red_policy")
from effformer.train import default_config

STAGES = (0, 2)


def get_config(arg=None):
    config = default_config()
    config.model.name = "cct_4_3x2"
    config.model.kwargs = dict(
        conv_layers=1,
        attention_dropout_rate=0.0,
        drop_path_rate=0.0,
        ia_red_stages=STAGES,
        ia_red_heads=2,
    )
    config.data.name = "digits"
    config.data.image_size = 16
    config.task.name = "ia_red_policy"
    config.task.ia_red_error_penalty = 1.0 if arg is None else float(arg)
    config.task.ia_red_baseline = "leave_one_out"
    config.global_batch_size = 128
    config.num_train_steps = 300
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "constant"
    config.optimizer.warmup_steps = 10
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.trainable_modules = "ia_red_*"
    config.init_from.reinit = ",".join(f"ia_red_interpreter_{i}" for i in range(len(STAGES)))
    config.log_every_steps = 25
    config.progress_bar = False
    return config
