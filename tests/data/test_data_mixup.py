"""Mixup / CutMix on device against a direct numpy construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.data import mix_batch

# Compiled once per alpha setting: eager dispatch of each op would dominate the test time.
_mix = jax.jit(mix_batch, static_argnames=("mixup_alpha", "cutmix_alpha", "switch_prob"))


def _batch(batch=6, classes=8):
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((batch, 10, 12, 3)).astype(np.float32)
    labels = jax.nn.one_hot(rng.permutation(classes)[:batch], classes)  # Distinct labels.
    return jnp.asarray(inputs), labels


def _lam(labels, soft_labels):
    """Weight of each example's own label (the same for the whole batch)."""
    lam = np.asarray((soft_labels * labels).sum(-1))
    np.testing.assert_allclose(lam, lam[0], atol=1e-6)
    return float(lam[0])


def test_both_alphas_zero_is_identity():
    inputs, labels = _batch()
    mixed, soft = mix_batch(jax.random.key(0), inputs, labels, mixup_alpha=0.0, cutmix_alpha=0.0)
    assert mixed is inputs and soft is labels


@pytest.mark.parametrize("seed", range(4))
def test_mixup_is_convex_combination_with_reversed_batch(seed):
    inputs, labels = _batch()
    mixed, soft = _mix(jax.random.key(seed), inputs, labels, mixup_alpha=0.8, cutmix_alpha=0.0)
    lam = _lam(labels, soft)
    assert 0 <= lam <= 1
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(soft, lam * labels + (1 - lam) * labels[::-1], atol=1e-6)
    np.testing.assert_allclose(mixed, lam * inputs + (1 - lam) * inputs[::-1], atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_pastes_one_box_and_corrects_lambda(seed):
    inputs, labels = _batch()
    mixed, soft = _mix(jax.random.key(seed), inputs, labels, mixup_alpha=0.0, cutmix_alpha=1.0)
    lam = _lam(labels, soft)
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
    pasted = np.asarray((mixed != inputs).any(-1).any(0))  # [H, W]
    np.testing.assert_array_equal(np.asarray(mixed)[:, pasted], np.asarray(inputs[::-1])[:, pasted])
    np.testing.assert_array_equal(np.asarray(mixed)[:, ~pasted], np.asarray(inputs)[:, ~pasted])
    if pasted.any():
        rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
        assert pasted[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # One rectangle.
    np.testing.assert_allclose(lam, 1 - pasted.mean(), atol=1e-6)


def test_switch_chooses_between_mixup_and_cutmix():
    inputs, labels = _batch()
    kinds = set()
    for seed in range(12):
        mixed, soft = _mix(jax.random.key(seed), inputs, labels, mixup_alpha=0.8, cutmix_alpha=1.0)
        lam = _lam(labels, soft)
        as_mixup = np.allclose(mixed, lam * inputs + (1 - lam) * inputs[::-1], atol=1e-5)
        kinds.add("mixup" if as_mixup and 0 < lam < 1 else "cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_jit_and_bad_shapes():
    inputs, labels = _batch()
    mixed, soft = _mix(jax.random.key(0), inputs, labels, mixup_alpha=0.8, cutmix_alpha=1.0)
    assert mixed.shape == inputs.shape and soft.shape == labels.shape
    with pytest.raises(ValueError, match=r"labels_onehot: expected shape \[6, num_classes\]"):
        mix_batch(jax.random.key(0), inputs, labels[:5], mixup_alpha=0.8, cutmix_alpha=0.0)
    with pytest.raises(ValueError, match=r"inputs: CutMix expects shape \[B, H, W, C\]"):
        mix_batch(jax.random.key(0), inputs[:, :, :, 0], labels, mixup_alpha=0.0, cutmix_alpha=1.0)


@pytest.mark.parametrize(
    "alphas", [(float("nan"), 0.0), (0.0, float("nan")), (float("inf"), 0.0), (-0.1, 1.0)]
)
def test_non_finite_or_negative_alpha_is_named(alphas):
    inputs, labels = _batch()
    with pytest.raises(ValueError, match="mixup_alpha, cutmix_alpha: expected finite values >= 0"):
        mix_batch(jax.random.key(0), inputs, labels, mixup_alpha=alphas[0], cutmix_alpha=alphas[1])
