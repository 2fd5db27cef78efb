"""Mamba vs a Transformer on MNIST-1D (signals of 40 steps, 10 classes), CPU-sized.

    .venv/bin/effformer train --config experiments/mamba/mnist1d_config.py:mamba --workdir /tmp/m1d_mamba
    .venv/bin/effformer train --config experiments/mamba/mnist1d_config.py:transformer --workdir /tmp/m1d_tf
    .venv/bin/python experiments/mamba/compare.py --dataset mnist1d --seeds 0 1 2

Arms (similar size; two Mamba blocks per Transformer layer, as in the Mamba paper):
  mamba:       mamba_classifier, 4 blocks x 64, d_state 16, mean pooling;
  transformer: signal_transformer, 2 layers x 64, 4 heads, MLP 256, RoPE, mean pooling;
  lmu:         the same skeleton with LMU mixers (order 64, theta = the sequence length)
               in place of attention: causal, no position encoding;
  lmuformer:   LMUFormer's own model (conv patch embedding, BatchNorm), 2 x 64, order 64;
  spiking_lmuformer: its spiking model (LIF neurons after every BatchNorm), 2 x 64,
               order 128 (2D, as the original).
Same data, optimiser, schedule and budget. Measured results (2-core CPU): README.md here.
"""

import importlib.util
import sys
from pathlib import Path

from effformer.train import default_config

ARMS = {
    "mamba": ("mamba_classifier", dict(embed_dim=64, num_layers=4)),
    "transformer": ("signal_transformer", dict(embed_dim=64, num_layers=2, num_heads=4)),
    # LMUFormer-style blocks; theta (the memory's window) = the sequence length.
    "lmu": (
        "signal_transformer",
        dict(
            embed_dim=64,
            num_layers=2,
            num_heads=4,
            layer_pattern="lmu",
            causal=True,
            position_encoding="none",
            mixer_kwargs={"lmu": {"order": 64, "theta": 40.0}},
        ),
    ),
    # LMUFormer as its code builds it: convolutional patch embedding, BatchNorm, no
    # LayerNorm (effformer/models/lmuformer.py), at this width.
    "lmuformer": ("lmuformer", dict(embed_dim=64, num_layers=2, order=64, theta=40.0)),
    # The spiking LMUFormer (official slmu_rnn_ms_conv1d); its memory order is 2D.
    "spiking_lmuformer": ("spiking_lmuformer", dict(embed_dim=64, num_layers=2, theta=40.0)),
}


def register_baseline() -> None:
    """Import signal_transformer.py (which registers the baseline) once per process."""
    if "mamba_experiments_signal_transformer" in sys.modules:
        return
    path = Path(__file__).with_name("signal_transformer.py")
    spec = importlib.util.spec_from_file_location("mamba_experiments_signal_transformer", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


def get_config(arm="mamba"):
    if arm not in ARMS:
        raise ValueError(f"mnist1d_config.py: arm must be one of {sorted(ARMS)}, got {arm!r}.")
    register_baseline()
    name, kwargs = ARMS[arm]
    config = default_config()
    config.model.name = name
    config.model.kwargs.update(kwargs)
    config.data.name = "mnist1d"
    config.task.name = "sequence_classification"
    config.global_batch_size = 64
    config.num_train_steps = 300  # ~5 epochs: CPU-small (Mamba ~1 s/step on the loaded 2-core CPU)
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.weight_decay = 0.05
    config.optimizer.warmup_steps = 50
    config.optimizer.grad_clip_norm = 1.0
    config.log_every_steps = 100
    return config
