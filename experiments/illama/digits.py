"""CPU-scale iLLaMA ablation on the embedded digits dataset (8x8x1, 1,437 train / 360 test).

    effformer train --config experiments/illama/digits.py:c --workdir /tmp/illama_c
    python experiments/illama/ablation.py        # every arm, 3 seeds, Markdown table

One model shape for every arm (iLLaMA blocks: 32 wide, 4 layers, 2 heads,
SwiGLU 96 = int(8*32/3) rounded up to a multiple of 32 (not 256: that would be
8x the width at this size), RoPE + learned positions; patch 2 -> 16 patches +
class token; 55k parameters);
the arms differ only in the class token's place and the attention mask:

  a  causal (the original's post-softmax tril, r = 0 throughout), class token FIRST
  b  causal (r = 0 throughout), class token LAST (post-sequence)
  c  class token last, soft mask: r = 1 for the first 1/6 of training (2.5 of 15 epochs), then 0
     (iLLaMA-T's "constant" schedule, cutoff 50 of 300 epochs); evaluated at r = 0
  d  bidirectional attention (a ViT of the same size and parts), class token last
  a_strict  class token first with a strictly causal softmax (mask="causal"): the
     class token's output then depends on no patch at all (attention collapse)

Results and the exact commands: experiments/illama/README.md.
"""

from effformer.train import default_config

ARMS = {
    "a": dict(class_token="first", mask="soft", schedule=False),
    "b": dict(class_token="last", mask="soft", schedule=False),
    "c": dict(class_token="last", mask="soft", schedule=True),
    "d": dict(class_token="last", mask="bidirectional", schedule=False),
    "a_strict": dict(class_token="first", mask="causal", schedule=False),
}
NUM_EPOCHS = 15.0


def get_config(arg: str = "c"):
    if arg not in ARMS:
        raise ValueError(
            f"experiments/illama/digits.py: arm must be one of {sorted(ARMS)}, got {arg!r}."
        )
    arm = ARMS[arg]
    config = default_config()
    config.model.name = "illama_tiny"
    config.model.kwargs.embed_dim = 32
    config.model.kwargs.num_layers = 4
    config.model.kwargs.num_heads = 2
    config.model.kwargs.ffn_multiple_of = 32
    config.model.kwargs.patch_size = 2
    config.model.kwargs.class_token = arm["class_token"]
    config.model.kwargs.mask = arm["mask"]
    config.data.name = "digits"
    config.data.crop_padding = 1
    config.task.name = "image_classification"
    config.task.label_smoothing = 0.1
    config.global_batch_size = 64
    config.num_epochs = NUM_EPOCHS
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 0.05
    config.optimizer.warmup_steps = 50
    config.optimizer.no_decay_names = ("embedding", "token")
    if arm["schedule"]:
        config.model_schedules.soft_mask_ratio = dict(
            kind="constant", start=1.0, end=0.0, cutoff_epochs=NUM_EPOCHS / 6, eval_value=0.0
        )
    config.log_every_steps = 200
    config.progress_bar = False
    config.checkpoint.async_save = False
    return config
