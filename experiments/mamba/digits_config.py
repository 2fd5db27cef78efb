"""Mamba vs a Transformer on pixel-by-pixel digits (each 8x8 image a 64-step sequence).

    .venv/bin/effformer train --config experiments/mamba/digits_config.py:mamba --workdir /tmp/dig_mamba
    .venv/bin/python experiments/mamba/compare.py --dataset digits --seeds 0 1 2

The ``image_classification`` task passes ``image_size=8, num_channels=1``; both
models then read the image in raster order as 64 steps of one pixel (the
sequential-MNIST setting at the scale of scikit-learn's digits). Arms and
optimiser as in mnist1d_config.py. Measured results (2-core CPU): README.md here.
"""

import importlib.util
from pathlib import Path


def _mnist1d_config():
    path = Path(__file__).with_name("mnist1d_config.py")
    spec = importlib.util.spec_from_file_location("mamba_experiments_mnist1d", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arm="mamba"):
    config = _mnist1d_config().get_config(arm)
    config.data.name = "digits"
    config.task.name = "image_classification"
    config.num_train_steps = 300  # ~13 epochs of the 1,437 training images at batch 64
    if arm == "lmu":
        config.model.kwargs.mixer_kwargs.lmu.theta = 64.0  # 64 pixel steps
    if arm in ("lmuformer", "spiking_lmuformer"):
        config.model.kwargs.theta = 64.0
    return config
