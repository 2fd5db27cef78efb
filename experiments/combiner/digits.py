"""Density modelling of scikit-learn's digits as 64-pixel sequences: full attention vs Combiner.

    .venv/bin/effformer train --config experiments/combiner/digits.py:mixture --workdir /tmp/comb_mix
    nice -n 10 .venv/bin/python experiments/combiner/run_digits.py --seeds 0 1 2

Data: ``digits_pixels`` (``effformer/data/digits_pixels.py``): each 8x8 image a
row of 64 pixel tokens in raster order (values 0..16, plus a BOS token that
starts the row), 1,437 train / 360 test images. Task ``causal_lm``: the eval
``loss`` is the test NLL per pixel in nats; bits/dim = loss / ln 2.

ARG picks the model; every one is a 2-layer pre-norm decoder, width 64, 4 heads,
GELU MLP 256, learned absolute positions (Combiner layers see no relative
encoding), no dropout, tied embeddings:

* ``full``: ``lm_decoder`` with softmax attention over all earlier pixels;
* ``fixed``, ``logsparse``, ``axial``, ``mixture``: ``combiner_lm`` with that
  variant, segment length 8 = sqrt(64) (one image row per segment; logsparse
  has dyadic blocks and takes none).

Axial has one more projection per layer (the abstraction keys'), so slightly
more parameters; the others match the baseline to the parameter.

Budget (all arms): AdamW, lr 2e-3, weight decay 0.01, 40 warm-up steps then
cosine to 0, gradient clipping 1.0, batch 32, 400 steps (about 9 epochs).
CPU-sized on purpose: about 2 minutes a run on the shared 2-core CPU. Results:
experiments/combiner/README.md.
"""

from effformer.train import default_config

SEQUENCE_LENGTH = 64
SEGMENT_LENGTH = 8  # sqrt(64): one image row per segment.
_SIZE = dict(
    embed_dim=64,
    num_layers=2,
    num_heads=4,
    ffn_hidden_dim=256,
    max_length=SEQUENCE_LENGTH,
    position_encoding="learned",
)
COMBINER_VARIANTS = ("fixed", "logsparse", "axial", "mixture")
ARMS = ("full", *COMBINER_VARIANTS)


def model_for(arm: str) -> tuple[str, dict]:
    """(registry name, kwargs) of arm ``arm``."""
    if arm not in ARMS:
        raise ValueError(f"experiments/combiner/digits.py: ARG must be one of {ARMS}, got {arm!r}.")
    if arm == "full":
        return "lm_decoder", dict(_SIZE)
    segment = None if arm == "logsparse" else SEGMENT_LENGTH
    return "combiner_lm", dict(_SIZE, combiner_variant=arm, combiner_segment_length=segment)


def get_config(arg: str = "mixture"):
    name, kwargs = model_for(arg)
    config = default_config()
    config.model.name = name
    config.model.kwargs = kwargs
    config.data.name = "digits_pixels"
    config.task.name = "causal_lm"
    config.global_batch_size = 32
    config.num_train_steps = 400
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 0.01
    config.optimizer.warmup_steps = 40
    config.optimizer.grad_clip_norm = 1.0
    config.log_every_steps = 100
    config.progress_bar = False
    return config
