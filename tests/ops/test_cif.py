"""Continuous integrate-and-fire: the vectorised op against the left-to-right loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.ops.cif import cif, cif_reference, quantity_loss, scale_to_length

# One compiled program per setting rather than op-by-op compilation.
_cif = jax.jit(cif, static_argnames=("max_tokens", "threshold", "tail_threshold"))


def _inputs(seed: int, batch=2, length=9, dim=3, low=0.05, high=0.95):
    rng = np.random.default_rng(seed)
    frames = rng.normal(size=(batch, length, dim))
    alphas = rng.uniform(low, high, size=(batch, length))
    return frames, alphas


def _finite_difference_grads(fn, frames, alphas, eps=1e-6):
    """Central differences of a scalar NumPy function; exact here (CIF is piecewise bilinear)."""
    grads = []
    for array in (frames, alphas):
        grad = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            plus, minus = array.copy(), array.copy()
            plus[index] += eps
            minus[index] -= eps
            args = (plus, alphas) if array is frames else (frames, plus)
            args_minus = (minus, alphas) if array is frames else (frames, minus)
            grad[index] = (fn(*args) - fn(*args_minus)) / (2 * eps)
        grads.append(grad)
    return grads


@pytest.mark.parametrize(
    "high, tail", [(0.95, 0.0), (2.6, 0.45)], ids=["below-threshold", "several-fires-per-frame"]
)
def test_cif_equals_the_loop_forward_and_gradients(x64, high, tail):
    """Eq. (1) = the integrate-and-fire loop, with weights > 1 firing several times per frame."""
    frames, alphas = _inputs(0, high=high)
    mask = np.ones(alphas.shape, bool)
    mask[1, 6:] = False  # the second row has 6 real frames
    max_tokens = 14
    probe = np.random.default_rng(1).normal(size=(2, max_tokens, 3))
    kwargs = dict(max_tokens=max_tokens, frame_mask=mask, tail_threshold=tail)

    want, want_count = cif_reference(frames, alphas, **kwargs)
    got = _cif(jnp.asarray(frames), jnp.asarray(alphas), **kwargs)
    np.testing.assert_allclose(np.asarray(got.embeddings), want, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(got.num_tokens), want_count)
    np.testing.assert_array_equal(
        np.asarray(got.token_mask), np.arange(max_tokens) < want_count[:, None]
    )
    if high > 1:  # some frame fired more than once
        per_frame = np.diff(np.floor(np.cumsum(alphas * mask, 1)), prepend=0, axis=1)
        assert per_frame.max() >= 2

    def reference_loss(f, a):
        return float(np.sum(cif_reference(f, a, **kwargs)[0] * probe))

    def loss(f, a):
        return jnp.sum(cif(f, a, **kwargs).embeddings * probe)

    got_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(frames), jnp.asarray(alphas))
    want_grads = _finite_difference_grads(reference_loss, frames, alphas)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got_grad), want_grad, atol=1e-7)
    # Padding frames get no gradient and contribute nothing.
    assert np.all(np.asarray(got_grads[0])[1, 6:] == 0)
    assert np.all(np.asarray(got_grads[1])[1, 6:] == 0)


def test_padding_frames_never_contribute_and_count_is_floor_of_the_sum():
    frames, alphas = _inputs(2, length=10)
    mask = np.arange(10)[None, :] < np.array([[10], [7]])
    garbage = frames.copy()
    garbage[1, 7:] = np.nan  # whatever padding holds, even NaN
    alphas_garbage = alphas.copy()
    alphas_garbage[1, 7:] = 50.0
    clean = _cif(jnp.asarray(frames), jnp.asarray(alphas), max_tokens=12, frame_mask=mask)
    dirty = _cif(jnp.asarray(garbage), jnp.asarray(alphas_garbage), max_tokens=12, frame_mask=mask)
    np.testing.assert_array_equal(np.asarray(clean.embeddings), np.asarray(dirty.embeddings))
    sums = (alphas * mask).sum(1)
    np.testing.assert_array_equal(np.asarray(clean.num_tokens), np.floor(sums).astype(int))
    tail = _cif(jnp.asarray(frames), jnp.asarray(alphas), max_tokens=12, frame_mask=mask,
               tail_threshold=0.45)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(tail.num_tokens), np.floor(sums + 0.45).astype(int))
    capped = _cif(jnp.asarray(frames), jnp.asarray(alphas), max_tokens=2, frame_mask=mask)
    np.testing.assert_array_equal(np.asarray(capped.num_tokens), [2, 2])


def test_scaling_makes_the_target_length_fire_and_the_quantity_loss():
    frames, alphas = _inputs(3, length=12)
    mask = np.arange(12)[None, :] < np.array([[12], [8]])
    alphas = alphas * mask
    lengths = jnp.asarray([7, 11])  # the second asks for more tokens than frames
    scaled = jax.jit(scale_to_length)(jnp.asarray(alphas, jnp.float32), lengths)
    np.testing.assert_allclose(np.asarray(scaled.sum(1)), [7, 11], rtol=1e-6)
    assert float(scaled.max()) > 1  # 11 tokens in 8 frames: some frame fires twice
    out = _cif(jnp.asarray(frames, jnp.float32), scaled, max_tokens=12, frame_mask=mask,
              tail_threshold=0.45)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out.num_tokens), [7, 11])
    np.testing.assert_allclose(
        np.asarray(quantity_loss(jnp.asarray(alphas), lengths)), np.abs(alphas.sum(1) - [7, 11])
    )


def test_bad_arguments_name_what_was_expected():
    frames, alphas = jnp.zeros((2, 5, 3)), jnp.zeros((2, 5))
    with pytest.raises(
        ValueError, match=r"alphas must have shape \[B, T\] = \(2, 5\), got \(2, 4\)"
    ):
        cif(frames, alphas[:, :4], max_tokens=3)
    with pytest.raises(ValueError, match=r"frames must be \[B, T, D\], got shape \(2, 5\)"):
        cif(alphas, alphas, max_tokens=3)
    with pytest.raises(ValueError, match=r"frame_mask must have shape \[B, T\] = \(2, 5\)"):
        cif(frames, alphas, max_tokens=3, frame_mask=jnp.ones((2, 6), bool))
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1, got 0"):
        cif(frames, alphas, max_tokens=0)
    with pytest.raises(
        ValueError, match=r"tail_threshold must be a number in \[0, threshold=1.0\)"
    ):
        cif(frames, alphas, max_tokens=3, tail_threshold=1.0)
    with pytest.raises(ValueError, match="target_lengths"):
        scale_to_length(alphas, jnp.ones(3))
