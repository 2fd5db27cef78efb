"""Ettin's paired encoder / decoder recipe in miniature: digits pixels, MLM vs CLM.

    .venv/bin/effformer train --config experiments/ettin/digits.py:mlm --workdir /tmp/ettin/enc
    .venv/bin/effformer train --config experiments/ettin/digits.py:clm --workdir /tmp/ettin/dec
    .venv/bin/effformer train --config experiments/ettin/digits.py:mlm_from_clm \\
        --workdir /tmp/ettin/dec_enc --config.init_from.workdir=/tmp/ettin/dec_half
    .venv/bin/effformer train --config experiments/ettin/digits.py:classify_encoder \\
        --workdir /tmp/ettin/enc_cls --config.init_from.workdir=/tmp/ettin/enc
    nice -n 10 .venv/bin/python experiments/ettin/run_digits.py --seeds 0 1

Data: ``digits_pixels`` (``effformer/data/digits_pixels.py``): each 8x8 image a
row of 64 pixel tokens (values 0..16) after a BOS token (17), 1,437 train / 360
test images, with the digit as ``label``. Token 18 is the MLM ``[MASK]`` token,
so both objectives use a 19-token model vocabulary (``config.task.vocab_size``)
and every run can start from every other.

Model: one shape for both objectives, Ettin's recipe scaled down
(``ettin_encoder_17m`` / ``ettin_decoder_17m`` with overrides): 3 pre-LayerNorm
layers without biases, width 64, 4 heads, GeGLU 96 (Ettin-17m's 1.5x), RoPE,
tied embeddings, the pattern "global, local, local" with ``local:16`` in both
objectives: the encoder's local layers see 8 tokens either way (one image row;
Ettin's window is 128 tokens of sequences up to 8K), the decoder's the query
and the 15 tokens before it (the presets' decoder keeps ModernBERT's left half
window, ``local:64``; these runs, measured before that, do not), 106K parameters. The encoder adds the ModernBERT MLM head transform (dense +
GELU + norm, 4K parameters); the decoder has none.

ARG (N = ``PRETRAIN_STEPS`` = 400, batch 32, about 9 epochs; AdamW, lr 2e-3,
weight decay 0.01, clipping 1.0, 10% warm-up then cosine; Ettin uses
StableAdamW and a trapezoidal schedule over 2T tokens):

* ``mlm``: the encoder, masked LM at Ettin's 30% mask rate, N steps;
* ``clm``: the decoder, causal LM, N steps;
* ``mlm_half`` / ``clm_half``: the same for N/2 steps (first phase of the
  cross-objective arms);
* ``mlm_from_clm``: MLM for N/2 more steps from a ``clm_half`` run
  (``--config.init_from.workdir``), attention now bidirectional: the layer
  stack is renamed ``decoder -> encoder`` (``config.init_from.rename``) and the
  MLM head transform starts fresh (Ettin's encoder-from-decoder);
* ``clm_from_mlm``: CLM for N/2 more steps from an ``mlm_half`` run, attention
  now causal (``encoder -> decoder``; the MLM head transform is dropped);
* ``classify_encoder`` / ``classify_decoder``: fine-tune a pretrained encoder /
  decoder (``--config.init_from.workdir``; without it, from scratch) as a
  10-class digit classifier (task ``lm_classification``; mean of the final
  hidden states, a fresh ``classifier``), attention as in pretraining; AdamW
  lr 1e-3, weight decay 0.01, 10 warm-up steps then cosine, 100 steps (2.2
  epochs). Ettin fine-tunes both kinds for classification likewise.

Causal LM runs report the test bits/dim as eval ``loss / ln 2``; MLM runs their
masked-token loss at 30% masking; classifiers their test ``accuracy``.
Measured on the shared 2-core CPU (see experiments/ettin/README.md for the
table, the load and the times).
"""

from effformer.train import default_config

PRETRAIN_STEPS = 400
CLASSIFY_STEPS = 100
VOCAB_SIZE = 19  # 17 pixel values, BOS = 17, [MASK] = 18
MASK_TOKEN = 18
MASK_RATE = 0.3  # Ettin / ModernBERT pre-training mask rate
NUM_CLASSES = 10
MODEL = dict(
    num_layers=3,
    embed_dim=64,
    num_heads=4,
    ffn_hidden_dim=96,
    layer_pattern="global,local:16,local:16",
    max_length=64,
)
PRETRAIN_ARGS = ("mlm", "clm", "mlm_half", "clm_half", "mlm_from_clm", "clm_from_mlm")
ARGS = (*PRETRAIN_ARGS, "classify_encoder", "classify_decoder")
# The top-level modules the encoder has and the decoder lacks (the MLM head transform).
ENCODER_HEAD = "head_dense,head_norm"


def get_config(arg: str = "mlm"):
    if arg not in ARGS:
        raise ValueError(f"experiments/ettin/digits.py: ARG must be one of {ARGS}, got {arg!r}.")
    config = default_config()
    config.data.name = "digits_pixels"
    config.global_batch_size = 32
    config.optimizer.name = "adamw"
    config.optimizer.weight_decay = 0.01
    config.optimizer.grad_clip_norm = 1.0
    config.log_every_steps = 100
    config.progress_bar = False
    config.task.vocab_size = VOCAB_SIZE
    encoder = arg.startswith("mlm") or arg == "classify_encoder"
    config.model.name = "ettin_encoder_17m" if encoder else "ettin_decoder_17m"
    config.model.kwargs = dict(MODEL)
    if arg in PRETRAIN_ARGS:
        config.num_train_steps = PRETRAIN_STEPS if arg in ("mlm", "clm") else PRETRAIN_STEPS // 2
        config.optimizer.learning_rate = 2e-3
        config.optimizer.warmup_steps = config.num_train_steps // 10
        if encoder:
            config.task.name = "masked_lm"
            config.task.mask_token_id = MASK_TOKEN
            config.task.mask_rate = MASK_RATE
            config.task.pad_id = -1  # no padding: 0 is a pixel value
        else:
            config.task.name = "causal_lm"
        if arg == "mlm_from_clm":
            config.init_from.rename = "decoder:encoder"
            config.init_from.reinit = ENCODER_HEAD
        elif arg == "clm_from_mlm":
            config.init_from.rename = "encoder:decoder"
    else:
        config.task.name = "lm_classification"
        config.task.num_classes = NUM_CLASSES
        config.model.kwargs.pooling = "mean"
        config.num_train_steps = CLASSIFY_STEPS
        config.optimizer.learning_rate = 1e-3
        config.optimizer.warmup_steps = CLASSIFY_STEPS // 10
        config.init_from.reinit = "classifier"
    return config
