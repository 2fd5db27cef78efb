"""trunc_normal: PyTorch's trunc_normal_(std=s), cut at +-2 in value."""

import jax
import numpy as np
import pytest

from effformer.initializers import trunc_normal


@pytest.mark.parametrize("std", [0.02, 0.2])
def test_std_is_the_requested_one(std):
    # flax's truncated_normal(stddev=s) would give 0.88 * s; 250k samples put the sample
    # std within 0.5% of the true one.
    w = np.asarray(trunc_normal(std)(jax.random.key(0), (500, 500)), np.float64)
    assert abs(w.std() / std - 1) < 0.005
    assert abs(w.mean()) < 0.005 * std


def test_values_are_cut_at_two_in_value():
    # At std 1 the +-2 cut is +-2 std: the std shrinks to 0.88 and nothing lies beyond 2.
    w = np.asarray(trunc_normal(1.0)(jax.random.key(1), (500, 500)), np.float64)
    assert np.abs(w).max() <= 2.0
    assert abs(w.std() - 0.8796) < 0.005


@pytest.mark.parametrize("std", [0.0, -0.02, True, "0.02", float("nan")])
def test_bad_std_is_named(std):
    with pytest.raises(ValueError, match="std must be a positive number"):
        trunc_normal(std)
