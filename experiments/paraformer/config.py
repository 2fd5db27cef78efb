"""Paraformer vs its ablation and an autoregressive baseline on the ``speech_like`` frames.

    nice -n 10 .venv/bin/effformer train --config experiments/paraformer/config.py:paraformer \
        --workdir runs/paraformer

Arms (``get_config(arm)``): ``paraformer`` (glancing ratio 0.75, FunASR's),
``paraformer_no_glancing`` (ratio 0: one decoder pass over the acoustic
embeddings), ``paraformer_mwer`` (``paraformer`` plus the minimum word error
rate loss with negative sampling, weight 1, 4 candidates) and ``encoder_decoder`` (``frame_encoder_decoder``: the library's
encoder-decoder LM with a frame projection, teacher-forced ``seq2seq`` task).
All: width 64, 4 heads, FFN 128, 2 encoder + 2 decoder layers, RoPE, AdamW
3e-3 with 75 warm-up steps and cosine decay, batch 32, 300 steps, on
``speech_like`` (3-12 tokens of 12 symbols, 2-6 frames each, 16 channels,
blurred and noisy). ``experiments/paraformer/run.py`` trains the arms,
measures the greedy decodes' token error rate on the held-out ``test`` split
and their decode time; its README holds the measured results (2 shared CPU
cores: each run takes 1-3 minutes).
"""

from __future__ import annotations

import ml_collections

from effformer.data import default_data_config
from effformer.train import default_config

ARMS = ("paraformer", "paraformer_no_glancing", "paraformer_mwer", "encoder_decoder")
WIDTH = dict(embed_dim=64, num_heads=4, ffn_hidden_dim=128, num_encoder_layers=2,
             num_decoder_layers=2)  # fmt: skip


def get_config(arm: str = "paraformer") -> ml_collections.ConfigDict:
    if arm not in ARMS:
        raise ValueError(
            f"experiments/paraformer/config.py: arm must be one of {ARMS}, got {arm!r}."
        )
    config = default_config()
    config.data = default_data_config("speech_like")
    if arm == "encoder_decoder":
        config.model.name = "frame_encoder_decoder"
        # input_dim: the frames' channels (the seq2seq task passes only the vocabulary).
        config.model.kwargs = ml_collections.ConfigDict(dict(WIDTH, input_dim=16))
        config.task.name = "seq2seq"
    else:
        config.model.name = "paraformer"
        config.model.kwargs = ml_collections.ConfigDict(dict(WIDTH, max_tokens=16))
        config.task.name = "paraformer"
        config.task.glancing_ratio = 0.0 if arm == "paraformer_no_glancing" else 0.75
        config.task.quantity_weight = 1.0
        if arm == "paraformer_mwer":
            config.task.mwer_weight = 1.0
            config.task.mwer_hypotheses = 4
    config.global_batch_size = 32
    config.num_train_steps = 300
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 75
    config.optimizer.weight_decay = 0.01
    config.optimizer.grad_clip_norm = 1.0
    config.log_every_steps = 250
    config.eval_batch_size = 64
    config.progress_bar = False
    config.checkpoint.async_save = False
    return config
