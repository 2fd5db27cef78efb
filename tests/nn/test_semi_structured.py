import itertools

import numpy as np
import pytest

from effformer.nn.semi_structured import n_m_mask, n_m_param_count


def _loop_mask(kernel: np.ndarray, n: int, m: int) -> np.ndarray:
    """For every output and group, the n inputs of largest |w|, the earlier one on ties."""
    mask = np.zeros(kernel.shape, bool)
    for column, start in itertools.product(range(kernel.shape[1]), range(0, kernel.shape[0], m)):
        group = [(-abs(kernel[start + i, column]), i) for i in range(m)]
        for _, i in sorted(group)[:n]:
            mask[start + i, column] = True
    return mask


@pytest.mark.parametrize("n, m", [(2, 4), (2, 6), (1, 3), (3, 3)])
def test_mask_keeps_the_largest_n_of_every_m_inputs(n, m):
    rng = np.random.default_rng(n * 10 + m)
    kernel = rng.standard_normal((4 * m, 5)).astype(np.float32)
    kernel[:m, 0] = 0.5  # a fully tied group
    kernel[m : m + 2, 1] = -kernel[m + 2, 1]  # ties of equal magnitude, opposite sign
    mask = np.asarray(n_m_mask(kernel, n, m))
    np.testing.assert_array_equal(mask, _loop_mask(kernel, n, m))
    assert np.all(mask.reshape(4, m, 5).sum(axis=1) == n)
    assert mask.sum() == n_m_param_count(4 * m, 5, n, m)


def test_bad_arguments_are_refused():
    kernel = np.ones((8, 3), np.float32)
    with pytest.raises(ValueError, match=r"n must be <= m=4, got n=5"):
        n_m_mask(kernel, 5, 4)
    with pytest.raises(ValueError, match=r"multiple of m=3 .* got kernel.shape=\(8, 3\)"):
        n_m_mask(kernel, 1, 3)
    with pytest.raises(ValueError, match=r"kernel must be a matrix"):
        n_m_mask(np.ones((8,)), 2, 4)
    with pytest.raises(ValueError, match=r"m must be a positive int, got 0"):
        n_m_mask(kernel, 1, 0)
    with pytest.raises(ValueError, match=r"d_in must be a multiple of m=3"):
        n_m_param_count(8, 3, 1, 3)
    # n > m counted more values than the dense kernel holds (80 of 64) without a word.
    with pytest.raises(ValueError, match=r"n_m_param_count: n must be <= m=4, got n=5"):
        n_m_param_count(8, 8, 5, 4)
    with pytest.raises(ValueError, match=r"n_m_param_count: n must be a positive int, got 0"):
        n_m_param_count(8, 8, 0, 4)
