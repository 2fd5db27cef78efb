"""Mask builders of effformer.ops.masks against plain loops over (query, key) pairs."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from effformer.ops.masks import AttentionMask, dense_mask, soft_causal_mask, soft_causal_multiplier

B, LQ, LK = 2, 4, 6


def _loop_mask(causal, window_left, window_right, q_seg, kv_seg, q_pos, kv_pos):
    want = np.zeros((B, 1, LQ, LK), bool)
    for b, i, j in itertools.product(range(B), range(LQ), range(LK)):
        pq = q_pos[b, i] if q_pos is not None else LK - LQ + i  # last query on the last key
        pk = kv_pos[b, j] if kv_pos is not None else j
        visible = not (causal and pk > pq)
        visible &= window_left is None or pq - pk <= window_left
        visible &= window_right is None or pk - pq <= window_right
        if q_seg is not None:
            visible &= q_seg[b, i] == kv_seg[b, j] != 0
        want[b, 0, i, j] = visible
    return want


@pytest.mark.parametrize(
    "causal, window_left, window_right, segments, positions",
    [
        (True, None, None, False, False),
        (False, 1, 0, False, False),
        (False, 2, 1, True, False),
        (True, 1, None, True, True),
        (False, None, None, True, True),
    ],
)
def test_dense_mask_matches_loops(causal, window_left, window_right, segments, positions):
    rng = np.random.default_rng(0)
    kv_seg = rng.integers(0, 3, (B, LK)) if segments else None
    q_seg = kv_seg[:, -LQ:] if segments else None
    kv_pos = rng.integers(0, 8, (B, LK)) if positions else None
    q_pos = rng.integers(0, 8, (B, LQ)) if positions else None
    mask = AttentionMask(
        causal=causal,
        window_left=window_left,
        window_right=window_right,
        q_segment_ids=None if q_seg is None else jnp.asarray(q_seg),
        kv_segment_ids=None if kv_seg is None else jnp.asarray(kv_seg),
        q_positions=None if q_pos is None else jnp.asarray(q_pos),
        kv_positions=None if kv_pos is None else jnp.asarray(kv_pos),
    )
    want = _loop_mask(causal, window_left, window_right, q_seg, kv_seg, q_pos, kv_pos)
    np.testing.assert_array_equal(dense_mask(mask, B, LQ, LK), want)


def test_soft_causal_multiplier_matches_loops():
    q_pos, kv_pos = np.arange(LQ)[:, None], np.arange(LK)[None, :]
    got = np.asarray(soft_causal_multiplier(0.25, jnp.asarray(q_pos), jnp.asarray(kv_pos)))
    want = [[1.0 if k <= q else 0.25 for k in range(LK)] for q in range(LQ)]
    np.testing.assert_allclose(got, want)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_soft_causal_ratio_outside_unit_interval_is_refused(ratio):
    # Before, r = 1.5 scaled future keys' probabilities by 1.5 and past ones by 1 silently.
    with pytest.raises(ValueError, match=r"soft_causal_ratio must be in \[0, 1\]"):
        soft_causal_mask(ratio)
    for valid in (0.0, 1, jnp.float32(0.5)):
        soft_causal_mask(valid)


@pytest.mark.parametrize("field, value", [("window_left", True), ("window_right", -1)])
def test_bad_window_is_named(field, value):
    with pytest.raises(ValueError, match=f"AttentionMask.{field} must be a non-negative int"):
        AttentionMask(**{field: value})
