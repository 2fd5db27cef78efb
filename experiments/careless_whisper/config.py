"""CarelessWhisper on the ``speech_like_aligned`` frames: offline model, then causal fine-tuning.

    nice -n 10 .venv/bin/effformer train --config experiments/careless_whisper/config.py:offline \
        --workdir runs/cw_offline
    nice -n 10 .venv/bin/effformer train \
        --config experiments/careless_whisper/config.py:lora_causal,4 --workdir runs/cw_lora4 \
        --config.init_from.workdir=runs/cw_offline

Arms (``get_config("arm[,chunk_size]")``):

* ``offline``: the bidirectional encoder (``chunk_size=None``), no LoRA, trained
  from scratch on whole utterances (teacher-forced cross-entropy);
* ``lora_causal``: the paper's method: the block-causal encoder with
  ``chunk_size`` encoder frames per chunk, LoRA (rank 8, alpha 8: scale 1) on
  every attention projection, only the adapters trained
  (``trainable_modules = "lora"``), started from an ``offline`` run
  (``init_from``, the adapters fresh), weakly aligned targets at 4 cuts per
  utterance;
* ``full_causal``: the same, every weight trained, no adapters;
* ``scratch_causal``: the block-causal model trained from scratch with the weak
  alignment;
* ``offline_more`` (a control, no chunk size): the ``offline`` run trained 150
  more steps offline, as the fine-tunes are, so that their gains can be told
  apart from the extra steps.

All: width 64, 4 heads, FFN 128, 2 encoder + 2 decoder layers, stem stride 2,
AdamW 3e-3 (warm-up a quarter of the steps, cosine decay), batch 32; 300 steps
from scratch, 150 for the fine-tunes. ``experiments/careless_whisper/run.py``
runs them and measures offline and streaming token error rates; its README
holds the results (2 shared CPU cores, each run 1-4 minutes).
"""

from __future__ import annotations

import ml_collections

from effformer.data import default_data_config
from effformer.train import default_config

ARMS = ("offline", "lora_causal", "full_causal", "scratch_causal", "offline_more")
OFFLINE_ARMS = ("offline", "offline_more")
WIDTH = dict(embed_dim=64, num_heads=4, ffn_hidden_dim=128, num_encoder_layers=2,
             num_decoder_layers=2, max_target_length=16)  # fmt: skip
LORA_RANK = 8


def get_config(arg: str = "offline") -> ml_collections.ConfigDict:
    arm, _, chunk = arg.partition(",")
    if arm not in ARMS:
        raise ValueError(
            f"experiments/careless_whisper/config.py: arm must be one of {ARMS}, got {arm!r}."
        )
    if (arm in OFFLINE_ARMS) != (chunk == ""):
        raise ValueError(
            "experiments/careless_whisper/config.py: the causal arms need a chunk size "
            f"('lora_causal,4'), the offline arms none; got {arg!r}."
        )
    config = default_config()
    config.data = default_data_config("speech_like_aligned")
    config.model.name = "careless_whisper"
    kwargs = dict(WIDTH, chunk_size=int(chunk) if chunk else None)
    if arm == "lora_causal":
        kwargs["lora_rank"] = LORA_RANK
        config.optimizer.trainable_modules = "lora"
        config.init_from.reinit = "lora"
    config.model.kwargs = ml_collections.ConfigDict(kwargs)
    config.task.name = "careless_whisper"
    config.task.weak_alignment = arm not in OFFLINE_ARMS
    config.task.num_cuts = 4
    config.global_batch_size = 32
    config.num_train_steps = 150 if arm in ("lora_causal", "full_causal", "offline_more") else 300
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = config.num_train_steps // 4
    config.optimizer.weight_decay = 0.01
    config.optimizer.grad_clip_norm = 1.0
    config.log_every_steps = 150
    config.eval_batch_size = 64
    config.progress_bar = False
    config.checkpoint.async_save = False
    return config
