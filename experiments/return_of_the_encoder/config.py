"""Return of the Encoder at CPU scale: the arms of ``run.py`` on ``lis_direct``.

    nice -n 10 .venv/bin/effformer train \
        --config experiments/return_of_the_encoder/config.py:encoder_decoder --workdir runs/roe_ed

Task: the length of the longest increasing subsequence of 1-8 digits, answered
directly (``lis_direct``, ``effformer/data/tasks/chain_of_thought.py``): the
input is up to 8 digits, the output one count and ``<eos>``, so input and
output differ in length and in kind, the asymmetric case of the paper. Decoder
arms read ``digits <sep> answer <eos>`` (``lis_direct``, causal_lm format),
encoder-decoder arms the digits in the encoder and ``answer <eos>`` in the
decoder (``lis_direct_seq2seq``); one vocabulary (14 tokens).

Arms (``get_config(arm)``; width 64, 4 heads, RoPE, pre-norm):

* ``teacher``: decoder-only, 4 layers x 128, FFN 256, learning rate 1e-3;
* ``decoder``: decoder-only, 3 layers, FFN 171 (118,081 parameters);
* ``encoder_decoder``: 2 encoder + 1 decoder layers (the paper's 2/3-1/3
  split), FFN 128 (118,336 parameters: the cross-attention's weights are what
  the decoder-only arm has in its wider FFN);
* ``encoder_decoder_kd``: the same, task ``seq2seq_distillation`` from the teacher
  run (``config.task.teacher_workdir``, set by ``run.py``);
* ``decoder_kd``: the decoder arm, task ``causal_lm_distillation`` from the same
  teacher (the control: distillation without the architecture change);
* ``encoder_decoder_kd_t4``: ``encoder_decoder_kd`` at T = 4 (a near-certain
  teacher's distribution at T = 1 is almost its one-hot label).

Distillation: w = 0.9 and T = 1, the official code's ``kd_alpha`` and its
temperature-free KL. All: AdamW 3e-3, 10% warm-up, cosine decay, batch 64,
``num_train_steps`` from ``run.py`` (equal for the students). Results and the
machine: ``README.md`` beside this file.
"""

from __future__ import annotations

import ml_collections

from effformer.data import default_data_config
from effformer.train import default_config

ARMS = (
    "teacher",
    "decoder",
    "encoder_decoder",
    "encoder_decoder_kd",
    "decoder_kd",
    "encoder_decoder_kd_t4",
)
BASE = dict(embed_dim=64, num_heads=4, max_length=64, position_encoding="rope")
MODELS = {
    "teacher": ("lm_decoder", dict(BASE, embed_dim=128, num_layers=4, ffn_hidden_dim=256)),
    "decoder": ("lm_decoder", dict(BASE, num_layers=3, ffn_hidden_dim=171)),
    "encoder_decoder": (
        "lm_encoder_decoder",
        dict(BASE, num_encoder_layers=2, num_decoder_layers=1, ffn_hidden_dim=128),
    ),
}


def get_config(arm: str = "encoder_decoder") -> ml_collections.ConfigDict:
    if arm not in ARMS:
        raise ValueError(
            f"experiments/return_of_the_encoder/config.py: arm must be one of {ARMS}, got {arm!r}."
        )
    architecture, _, distilled = arm.partition("_kd")
    seq2seq = architecture == "encoder_decoder"
    config = default_config()
    config.data = default_data_config("lis_direct_seq2seq" if seq2seq else "lis_direct")
    config.model.name, kwargs = MODELS[architecture]
    config.model.kwargs = ml_collections.ConfigDict(kwargs)
    if "_kd" in arm:
        config.task.name = "seq2seq_distillation" if seq2seq else "causal_lm_distillation"
        config.task.teacher_workdir = ""  # run.py sets the teacher run's workdir
        config.task.distill_weight = 0.9
        config.task.distill_temperature = 4.0 if distilled == "_t4" else 1.0
    else:
        config.task.name = "seq2seq" if seq2seq else "causal_lm"
    config.global_batch_size = 64
    config.num_train_steps = 1000
    # The teacher's lower rate: a 6 x 128 teacher at 3e-3 ended below the students (README).
    config.optimizer.learning_rate = 1e-3 if arm == "teacher" else 3e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.weight_decay = 0.01
    config.optimizer.grad_clip_norm = 1.0
    config.log_every_steps = 250
    config.eval_batch_size = 256
    config.progress_bar = False
    config.checkpoint.async_save = False
    return config
