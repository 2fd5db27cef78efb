"""FIT vs a standard Transformer of similar size on the embedded digits dataset (8x8x1).

    .venv/bin/effformer train --config experiments/fit/digits.py:fit --workdir /tmp/fit_digits
    .venv/bin/effformer train --config experiments/fit/digits.py:vit --workdir /tmp/vit_digits
    nice -n 10 .venv/bin/python experiments/fit/run.py --arms fit vit --seeds 0 1 2

Both models see 64 tokens (1x1 patches, one per pixel), width 64, 4 heads,
MLP ratio 2, mean pooling, a learned position table, the same optimiser.

* ``fit``: 2x2 groups of 4x4 pixels (T = 4 groups, n = 16 tokens), 4 latents
  per group, layer plan ``(1)1(1)``: one local layer, READ, one global layer
  over the 16 latents, WRITE, one local layer.
* ``vit``: a plain pre-norm ViT encoder of 4 layers over all 64 tokens
  (FIT's 2 local + 1 global + READ + WRITE are about 4-5 layers' parameters).

Parameters: fit 170,570, vit 138,890. 10 epochs = 113 steps of 128. Measured
(3 seeds, 2-core CPU at load ~13): test accuracy fit 30.8 ± 11.3 %, vit
24.0 ± 3.4 %: both far from converged at this budget, so this is no ranking.
Results (seeds, machine, time): experiments/fit/README.md.
"""

from effformer.train import default_config

_COMMON = dict(patch_size=1, embed_dim=64, num_heads=4, mlp_ratio=2.0)
MODELS = {
    "fit": ("fit_classifier", dict(_COMMON, group_size=4, num_latents=4, layer_plan="(1)1(1)")),
    "vit": (
        "vit_digits",
        dict(_COMMON, num_layers=4, pooling="mean", position_embedding="learned"),
    ),
}


def get_config(arg: str = "fit"):
    if arg not in MODELS:
        raise ValueError(
            f"experiments/fit/digits.py: ARG must be one of {sorted(MODELS)}, got {arg!r}."
        )
    name, kwargs = MODELS[arg]
    config = default_config()
    config.model.name = name
    config.model.kwargs = kwargs
    config.data.name = "digits"
    config.task.name = "image_classification"
    config.global_batch_size = 128
    config.num_epochs = 10.0
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 0.05
    config.optimizer.warmup_steps = 10
    config.log_every_steps = 50
    config.progress_bar = False
    return config
