"""Mixup and CutMix on device, with timm's batch-mode semantics.

One lambda per batch; every example is mixed with its partner in the batch
reversed along its first axis (example i with example B-1-i), as timm's
``Mixup(mode="batch")``. With both alphas positive, CutMix is chosen with
probability ``switch_prob``, else Mixup. CutMix pastes one box (the same for
the whole batch) whose sides are sqrt(1 - lambda) of the image's, centred
uniformly at random and clipped to the image; lambda is then corrected to the
fraction of the image left unpasted, so the soft labels match the pixels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, ...]:
    """timm's ``rand_bbox``: (top, bottom, left, right), clipped to the image."""
    cut_ratio = jnp.sqrt(1.0 - lam)
    cut_height = (height * cut_ratio).astype(jnp.int32)
    cut_width = (width * cut_ratio).astype(jnp.int32)
    key_y, key_x = jax.random.split(rng)
    centre_y = jax.random.randint(key_y, (), 0, height)
    centre_x = jax.random.randint(key_x, (), 0, width)
    top = jnp.clip(centre_y - cut_height // 2, 0, height)
    bottom = jnp.clip(centre_y + cut_height // 2, 0, height)
    left = jnp.clip(centre_x - cut_width // 2, 0, width)
    right = jnp.clip(centre_x + cut_width // 2, 0, width)
    return top, bottom, left, right


def mix_batch(
    rng: jax.Array,
    inputs: jax.Array,
    labels_onehot: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """Mixes a batch with its reverse by Mixup or CutMix.

    Args:
      rng: PRNG key.
      inputs: [B, ...]; [B, H, W, C] when cutmix_alpha > 0.
      labels_onehot: [B, num_classes] (one-hot, or already label-smoothed).
      mixup_alpha, cutmix_alpha: Beta(alpha, alpha) for lambda; 0 turns one off.
        Both 0 returns the inputs and labels unchanged.
      switch_prob: probability of CutMix when both are on.

    Returns:
      (mixed inputs [B, ...] in inputs' dtype, soft labels [B, num_classes]) where
      soft = lam * labels + (1 - lam) * reversed labels, lam corrected for CutMix.
    """
    # "not >= 0" rather than "< 0": a NaN alpha (a config typo) must fail here, not
    # fall through both branches below.
    if not (0 <= mixup_alpha < math.inf and 0 <= cutmix_alpha < math.inf):
        raise ValueError(
            f"mixup_alpha, cutmix_alpha: expected finite values >= 0, got {mixup_alpha}, "
            f"{cutmix_alpha}."
        )
    if not 0 <= switch_prob <= 1:
        raise ValueError(f"switch_prob: expected a probability in [0, 1], got {switch_prob}.")
    if labels_onehot.ndim != 2 or labels_onehot.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"labels_onehot: expected shape [{inputs.shape[0]}, num_classes] (batch of inputs "
            f"{inputs.shape}), got {labels_onehot.shape}."
        )
    if cutmix_alpha > 0 and inputs.ndim != 4:
        raise ValueError(f"inputs: CutMix expects shape [B, H, W, C], got {inputs.shape}.")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return inputs, labels_onehot

    key_switch, key_mixup, key_cutmix, key_box = jax.random.split(rng, 4)
    partner_inputs = inputs[::-1]
    mixed, lam = None, None
    if mixup_alpha > 0:
        lam_mixup = jax.random.beta(key_mixup, mixup_alpha, mixup_alpha).astype(jnp.float32)
        mixed = lam_mixup * inputs.astype(jnp.float32) + (1 - lam_mixup) * partner_inputs.astype(
            jnp.float32
        )
        mixed, lam = mixed.astype(inputs.dtype), lam_mixup
    if cutmix_alpha > 0:
        lam_cutmix = jax.random.beta(key_cutmix, cutmix_alpha, cutmix_alpha).astype(jnp.float32)
        height, width = inputs.shape[1], inputs.shape[2]
        top, bottom, left, right = _cutmix_box(key_box, lam_cutmix, height, width)
        rows = jnp.arange(height)[:, None]
        cols = jnp.arange(width)[None, :]
        in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
        pasted = jnp.where(in_box[None, :, :, None], partner_inputs, inputs)
        lam_corrected = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (
            height * width
        )
        if mixed is None:
            mixed, lam = pasted, lam_corrected
        else:
            use_cutmix = jax.random.uniform(key_switch) < switch_prob
            mixed = jnp.where(use_cutmix, pasted, mixed)
            lam = jnp.where(use_cutmix, lam_corrected, lam)
    labels = labels_onehot.astype(jnp.float32)
    soft_labels = lam * labels + (1.0 - lam) * labels[::-1]
    return mixed, soft_labels
