"""SOLO trained from scratch on digits_vqa, beside a text-only control.

    .venv/bin/effformer train --config experiments/solo/digits_vqa.py:solo --workdir /tmp/solo_vqa
    nice -n 10 .venv/bin/python experiments/solo/run.py --seeds 0 1

Data: ``digits_vqa`` (``effformer/data/digits_vqa.py``): each digits image
(upscaled to 16x16, 16 patches of 4x4 in SOLO's layout) with each of four
questions (what digit; is it even; is it greater than 4; digit plus k mod 10),
5,748 train / 1,440 test records. Task ``solo_vqa``: the loss is on the answer
and ``<eos>`` only; ``exact_match`` (overall and per question) is greedy
decoding's exact match on the test split.

Model: ``solo_small`` (``effformer/models/solo.py``): Mistral's recipe (pre-RMSNorm,
SwiGLU, RoPE, GQA, no biases, untied head) at 4 layers x 64, 4 query / 2 KV
heads, SwiGLU 224, plus the bias-free linear patch embedding (16 -> 64):
226,752 parameters. ARG:

* ``solo``: the model as it is;
* ``text_only``: the same model and data with every patch multiplied by 0
  (``config.task.zero_patches``): the ``<vpatch>`` tokens carry nothing, so the
  answers can use the question only.

Budget (both arms): AdamW, lr 2e-3, weight decay 0.01, 100 warm-up steps then
cosine to 0, gradient clipping 1.0, batch 64, 1,000 steps (about 11 epochs of
the 5,748 records). Results: experiments/solo/README.md.

Measured (shared 2-core CPU, load average 25-34, about 33 minutes per run),
test exact match, seeds 0 and 1: ``solo`` what digit 96.4 / 95.6, even 97.8 /
97.8, greater than 4 96.1 / 95.0, plus k mod 10 11.4 / 10.8 (not learned at
this budget), all 75.4 / 74.8; ``text_only`` at chance (10.0, 50.0, 50.0, 6.9;
all 29.2) for both seeds.
"""

from effformer.train import default_config

ARMS = ("solo", "text_only")


def get_config(arg: str = "solo"):
    if arg not in ARMS:
        raise ValueError(f"experiments/solo/digits_vqa.py: ARG must be one of {ARMS}, got {arg!r}.")
    config = default_config()
    config.model.name = "solo_small"
    config.data.name = "digits_vqa"
    config.task.name = "solo_vqa"
    config.task.zero_patches = arg == "text_only"
    config.global_batch_size = 64
    config.num_train_steps = 1000
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 0.01
    config.optimizer.warmup_steps = 100
    config.optimizer.grad_clip_norm = 1.0
    config.log_every_steps = 250
    config.eval_batch_size = 480
    config.progress_bar = False
    return config
