"""Host-side augmentation: crop, flip, erasing, and each RandAugment op."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from effformer.data import augment, randaugment


def _image(seed=0, shape=(12, 10, 3), levels=True):
    rng = np.random.default_rng(seed)
    if levels:  # Exact 8-bit levels, so 8-bit reference ops compare exactly.
        return (rng.integers(0, 256, shape) / 255.0).astype(np.float32)
    return rng.random(shape, dtype=np.float32)


def _pil(image):
    return Image.fromarray(np.round(image * 255).astype(np.uint8))


def _from_pil(pil_image):
    return np.asarray(pil_image).astype(np.float32) / 255.0


def test_random_crop_with_padding_is_a_shifted_window():
    image = _image(levels=False) + 1.0  # Strictly positive, so padding zeros are visible.
    padded = np.pad(image, ((3, 3), (3, 3), (0, 0)))
    offsets = set()
    for seed in range(40):
        crop = augment.random_crop_with_padding(image, 3, np.random.default_rng(seed))
        assert crop.shape == image.shape
        matches = [
            (top, left)
            for top in range(7)
            for left in range(7)
            if np.array_equal(crop, padded[top : top + 12, left : left + 10])
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 10
    assert augment.random_crop_with_padding(image, 0, np.random.default_rng(0)) is image


def test_flip_mirrors_half_the_time():
    image = _image(levels=False)
    flips = 0
    for seed in range(200):
        out = augment.random_horizontal_flip(image, np.random.default_rng(seed))
        assert out.shape == image.shape
        if np.array_equal(out, image[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(out, image)
    assert 70 < flips < 130


def test_random_erasing_changes_exactly_one_rectangle():
    image = _image(levels=False, shape=(16, 16, 3))
    erased_count = 0
    for seed in range(50):
        out = augment.random_erasing(image, 0.5, np.random.default_rng(seed))
        changed = (out != image).any(axis=-1)
        if not changed.any():
            continue
        erased_count += 1
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        box = changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert box.all()  # The changed pixels form one filled rectangle...
        assert changed.sum() == box.size  # ...and nothing outside it changed.
        assert 0.02 * 256 * 0.5 <= box.size <= 256 / 3 * 1.5
    assert 10 < erased_count < 40
    assert augment.random_erasing(image, 0.0, np.random.default_rng(0)) is image
    with pytest.raises(ValueError, match=r"probability: expected a value in \[0, 1\], got 2"):
        augment.random_erasing(image, 2, np.random.default_rng(0))


def test_augmentations_reject_non_images():
    with pytest.raises(ValueError, match=r"image: expected shape \[H, W, C\], got \(40, 1\)"):
        augment.random_crop_with_padding(np.zeros((40, 1)), 2, np.random.default_rng(0))


# 8-bit ops against PIL, on images whose values are exact 8-bit levels.
@pytest.mark.parametrize(
    "op, reference",
    [
        (randaugment.auto_contrast, ImageOps.autocontrast),
        (randaugment.equalize, ImageOps.equalize),
        (lambda im, m, r: randaugment.solarize(im, 3.0, r), lambda p: ImageOps.solarize(p, 179.2)),
        (lambda im, m, r: randaugment.posterize(im, 10.0, r), lambda p: ImageOps.posterize(p, 4)),
        (lambda im, m, r: randaugment.posterize(im, 5.0, r), lambda p: ImageOps.posterize(p, 6)),
    ],
)
def test_level_ops_match_pil(op, reference):
    image = _image(shape=(24, 20, 3))
    # A channel not spanning the full range (still exact 8-bit levels).
    image[..., 1] = np.round(image[..., 1] * 127 + 64) / 255
    ours = op(image, 0.0, np.random.default_rng(0))
    expected = _from_pil(reference(_pil(image)))
    if op is randaugment.auto_contrast:
        # PIL's lookup table truncates the stretched level to an int; ours is exact.
        ours = np.floor(ours * 255 + 1e-4) / 255
    np.testing.assert_allclose(ours, expected, atol=1e-6)


@pytest.mark.parametrize(
    "op, enhancer",
    [
        (randaugment.color, ImageEnhance.Color),
        (randaugment.contrast, ImageEnhance.Contrast),
        (randaugment.brightness, ImageEnhance.Brightness),
        (randaugment.sharpness, ImageEnhance.Sharpness),
    ],
)
def test_enhance_ops_match_pil(op, enhancer):
    image = _image(shape=(24, 20, 3))
    rng = np.random.default_rng(3)
    factor = randaugment._enhance_factor(7.0, np.random.default_rng(3))
    ours = op(image, 7.0, rng)
    # PIL rounds to 8 bits (and rounds its grey mean); ours stays in float.
    np.testing.assert_allclose(ours, _from_pil(enhancer(_pil(image)).enhance(factor)), atol=3 / 255)


def test_affine_resampling_matches_exact_transforms():
    image = _image(levels=False, shape=(9, 9, 2))
    quarter_turn = np.array([[0.0, -1.0, 9.0], [1.0, 0.0, 0.0]])  # Counter-clockwise 90 degrees.
    np.testing.assert_allclose(randaugment._affine(image, quarter_turn), np.rot90(image), atol=1e-6)
    shift = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])  # Output x reads input x + 2.
    shifted = randaugment._affine(image, shift)
    np.testing.assert_allclose(shifted[:, :-2], image[:, 2:], atol=1e-6)
    np.testing.assert_allclose(shifted[:, -2:], randaugment.FILL_VALUE)


@pytest.mark.parametrize("name", sorted(randaugment.OPS))
def test_each_op_keeps_shape_and_range_and_is_identity_at_zero_where_it_should(name):
    op = randaugment.OPS[name]
    for image in (_image(shape=(12, 10, 3)), _image(shape=(8, 8, 1))):
        out = op(image, 9.0, np.random.default_rng(0))
        assert out.shape == image.shape and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 1
        if name not in ("AutoContrast", "Equalize"):
            np.testing.assert_allclose(op(image, 0.0, np.random.default_rng(0)), image, atol=1e-6)


def test_rand_augment_is_deterministic_per_seed():
    image = _image(shape=(16, 16, 3))
    outs = [randaugment.rand_augment(image, 3, 9.0, np.random.default_rng(s)) for s in (1, 1, 2)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])
    assert outs[0].shape == image.shape
    np.testing.assert_array_equal(
        randaugment.rand_augment(image, 0, 9.0, np.random.default_rng(1)), image
    )
    with pytest.raises(ValueError, match=r"magnitude: expected a value in \[0, 10.0\], got 12"):
        randaugment.rand_augment(image, 2, 12, np.random.default_rng(0))
    # These failed inside numpy with a TypeError that named no argument.
    for layers in (2.0, True, None):
        with pytest.raises(ValueError, match=rf"num_layers: expected an int >= 0, got {layers}"):
            randaugment.rand_augment(image, layers, 9.0, np.random.default_rng(0))


def test_bad_padding_and_erasing_ranges_are_named():
    image, rng = np.zeros((8, 8, 1), np.float32), np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"padding: expected an int >= 0, got 1.5"):
        augment.random_crop_with_padding(image, 1.5, rng)
    with pytest.raises(ValueError, match=r"area_range: expected \(low, high\) with 0 < low"):
        augment.random_erasing(image, 1.0, rng, area_range=(0.5, 0.1))
    # Refused even when the coin flip would have skipped erasing.
    with pytest.raises(ValueError, match=r"aspect_range: expected \(low, high\) with 0 < low"):
        augment.random_erasing(image, 0.0, rng, aspect_range=(0.0, 3.0))
