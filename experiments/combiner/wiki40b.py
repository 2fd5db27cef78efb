"""The Combiner paper's language-model configuration: Wiki-40B (English), 12 x 768, sequence 2048.

    effformer train --config experiments/combiner/wiki40b.py:mixture --workdir runs/combiner_mixture
    effformer train --config experiments/combiner/wiki40b.py:full --workdir runs/combiner_full

NOT RUN HERE: written for users who have the data and the hardware; nothing in
this file was trained or measured in this repository, so it states no expected
result.

ARG: ``fixed``, ``logsparse``, ``axial``, ``mixture`` (``combiner_lm`` with
that variant, segment length 128; logsparse has dyadic blocks and takes none)
or ``full`` (``lm_decoder`` of the same size with softmax attention, the
baseline). Shape from the paper (Ren et al., 2021; REFERENCES.md): 12 layers,
width 768, 12 heads (MLP 3072), sequence 2048, segment 128; learned absolute
positions for every arm (Combiner layers see no relative encoding).

Data: ``wiki40b_en_bytes`` (``effformer/data/text_bytes.py``), TFDS
``wiki40b/en`` prepared as array_record in ``config.data.data_dir``
(``tfds build wiki40b/en --file_format=array_record --data_dir=DIR``; a Beam
dataset, so building needs apache-beam and tensorflow, reading needs neither).
**Byte-level tokens**: the library has no subword tokenizer, so each article is
its UTF-8 bytes (vocabulary 256 + 3 specials), one article per row, cut after
its first 2048 bytes (longer articles lose the rest) and padded; no packing,
because Combiner layers cannot keep packed documents apart. The paper used a
subword vocabulary, so its perplexities are not comparable with the bits per
byte this reports (eval ``loss`` / ln 2 on ``validation``).

Hardware: 86.8M parameters (axial 101.0M: its abstraction-key projections; counted
with ``jax.eval_shape``, the vocabulary of 259 and the 2048-position table included); a global batch of
64 rows of 2048 tokens in bfloat16 wants an accelerator slice with several
devices (e.g. 8 GPUs of 40 GB or more, or a TPU v3-8 or larger); the mesh is
data parallel over every device by default (``--config.mesh.fsdp=N`` shards
the parameters). The training budget below (steps, learning rate, batch) is this
library's choice, not the paper's, which the REFERENCES do not record.
"""

from effformer.data import default_data_config
from effformer.train import default_config

SEQUENCE_LENGTH = 2048
SEGMENT_LENGTH = 128
_SIZE = dict(
    embed_dim=768,
    num_layers=12,
    num_heads=12,
    ffn_hidden_dim=3072,
    max_length=SEQUENCE_LENGTH,
    position_encoding="learned",
    dropout_rate=0.1,
)
COMBINER_VARIANTS = ("fixed", "logsparse", "axial", "mixture")
ARMS = ("full", *COMBINER_VARIANTS)


def model_for(arm: str) -> tuple[str, dict]:
    """(registry name, kwargs) of arm ``arm``."""
    if arm not in ARMS:
        raise ValueError(
            f"experiments/combiner/wiki40b.py: ARG must be one of {ARMS}, got {arm!r}."
        )
    if arm == "full":
        return "lm_decoder", dict(_SIZE)
    segment = None if arm == "logsparse" else SEGMENT_LENGTH
    return "combiner_lm", dict(_SIZE, combiner_variant=arm, combiner_segment_length=segment)


def get_config(arg: str = "mixture"):
    name, kwargs = model_for(arg)
    config = default_config()
    config.model.name = name
    config.model.kwargs = kwargs
    config.data = default_data_config("wiki40b_en_bytes")
    config.task.name = "causal_lm"
    config.global_batch_size = 64
    config.num_train_steps = 100_000
    config.compute_dtype = "bfloat16"
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 3e-4
    config.optimizer.weight_decay = 0.01
    config.optimizer.warmup_steps = 4000
    config.optimizer.grad_clip_norm = 1.0
    config.log_every_steps = 100
    config.eval_every_steps = 10_000
    config.checkpoint.every_steps = 2000
    config.checkpoint.best_metric = "loss"
    config.checkpoint.best_mode = "min"
    return config
