"""Local learning on digits: a 4-layer CCT trained end to end or as K = 2 or 4 local modules.

    .venv/bin/effformer train --config experiments/local_learning/digits.py:k2_features --workdir /tmp/ll
    .venv/bin/python experiments/local_learning/compare.py --seeds 0 1   # every arm, a table

The backbone is experiments/cct/digits.py's CCT-2/3x1 (one 3x3 conv + max pool
tokenizer -> 4x4 tokens, width 128, 2 heads, MLP ratio 1, SeqPool) with 4
layers instead of 2, so that it splits into 2 or 4 modules: CCT-4/3x1, 20
epochs of batch 128, the same optimizer and label smoothing.

Arms (ARG):

* ``e2e``: the plain CCT-4/3x1 and the ``image_classification`` task.
* ``k{2,4}_features``: ``local_learning_vit`` with K modules, each non-final
  module with an auxiliary classifier and an MLP decoder reconstructing its input
  tokens (the paper's method), task ``local_learning``.
* ``k{2,4}_image``: the same with InfoPro's decoder reconstructing the image.
* ``k{2,4}_none``: the auxiliary classifiers alone (no decoder).
* ``k{2,4}_features_conv`` / ``_linear``: the feature decoder as a 3x3 conv stack
  on the token grid, or one Dense layer.

lambda (``config.task.local_reconstruction_weight``) is 1 and the auxiliary
classification weight 1. Measured on the shared 2-core CPU (seed 0; 2 to 24
minutes a run depending on the load): test accuracy e2e 98.1%, k2_features 97.8%,
k2_image 98.6%, k2_none 98.9%, k4_features 98.6%, k4_image 98.1%, k4_none 97.2%,
all within one seed-spread of each other; experiments/local_learning/README.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_BACKBONE = dict(num_layers=4, conv_layers=1)
_RECONSTRUCTIONS = {
    "features": dict(reconstruction="features", decoder="mlp"),
    "features_conv": dict(reconstruction="features", decoder="conv"),
    "features_linear": dict(reconstruction="features", decoder="linear"),
    "image": dict(reconstruction="image"),
    "none": dict(reconstruction="none"),
}
ARMS = ("e2e",) + tuple(f"k{k}_{name}" for k in (2, 4) for name in _RECONSTRUCTIONS)


def get_config(arg: str = "k2_features"):
    if arg not in ARMS:
        raise ValueError(
            f"experiments/local_learning/digits.py: ARG must be one of {ARMS}, got {arg!r}."
        )
    path = Path(__file__).resolve().parents[1] / "cct" / "digits.py"
    spec = importlib.util.spec_from_file_location("cct_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("cct")
    if arg == "e2e":
        config.model.name = "cct_4_3x2"
        config.model.kwargs = dict(_BACKBONE)
        return config
    modules, reconstruction = arg.split("_", 1)
    config.model.name = "local_learning_vit"
    config.model.kwargs = dict(
        backbone="cct_4_3x2",
        num_modules=int(modules[1:]),
        **_BACKBONE,
        **_RECONSTRUCTIONS[reconstruction],
    )
    config.task.name = "local_learning"
    config.task.local_reconstruction_weight = 1.0
    config.task.local_classification_weight = 1.0
    # "joint" (one jax.grad) or "sequential" (module by module, README): present here so that
    # --config.task.local_schedule=sequential can override it from the command line.
    config.task.local_schedule = "joint"
    return config
