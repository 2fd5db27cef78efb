import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.nn.tokenizers import ConvTokenizer, PatchEmbed


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_patch_embed_equals_reshape_matmul_and_conv(patch):
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    module = PatchEmbed(patch, embed_dim=5, bias_init=jax.nn.initializers.normal(1.0))
    variables = module.init(jax.random.key(1), images)
    tokens, grid = module.apply(variables, images)
    n = 8 // patch
    assert grid == (n, n) and tokens.shape == (2, n * n, 5)
    kernel = np.asarray(variables["params"]["kernel"], np.float64)
    bias = np.asarray(variables["params"]["bias"], np.float64)
    x = np.asarray(images, np.float64)
    want = np.zeros((2, n * n, 5))
    for b in range(2):
        for r in range(n):
            for c in range(n):
                patch_pixels = x[b, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]
                want[b, r * n + c] = np.einsum("ijc,ijcd->d", patch_pixels, kernel) + bias
    np.testing.assert_allclose(tokens, want, atol=1e-4)
    conv_tokens, _ = PatchEmbed(patch, embed_dim=5, use_conv=True).apply(variables, images)
    np.testing.assert_allclose(conv_tokens, tokens, atol=1e-5)


def test_patch_embed_rectangular_patches():
    images = jnp.ones((1, 6, 8, 2))
    tokens, grid = PatchEmbed((3, 2), 4).init_with_output(jax.random.key(0), images)[0]
    assert grid == (2, 4) and tokens.shape == (1, 8, 4)


def test_patch_size_must_divide_image():
    with pytest.raises(ValueError, match=r"patch_size \(4, 4\) must divide.*got image.*\(10, 8\)"):
        PatchEmbed(4, 8).init(jax.random.key(0), jnp.ones((1, 10, 8, 3)))
    with pytest.raises(ValueError, match=r"images must be \[B, H, W, C\], got shape \(8, 8, 3\)"):
        PatchEmbed(4, 8).init(jax.random.key(0), jnp.ones((8, 8, 3)))


@pytest.mark.parametrize(
    "module, message",
    [
        # Each crashed with a division by zero (or a TypeError) inside the initialiser.
        (PatchEmbed(0, 8), r"patch_size must be a positive int or a pair of them, got 0"),
        (PatchEmbed(2.0, 8), r"patch_size must be a positive int or a pair of them, got 2.0"),
        (PatchEmbed((2, 2, 2), 8), r"patch_size must be .* got \(2, 2, 2\)"),
        (PatchEmbed(2, 0), r"PatchEmbed: embed_dim must be a positive int, got 0"),
        (ConvTokenizer(8, kernel_size=0), r"kernel_size must be a positive int, got 0"),
        (ConvTokenizer(0), r"ConvTokenizer: embed_dim must be a positive int, got 0"),
        (ConvTokenizer(8, num_conv_layers=2, in_planes=0), r"in_planes must be a positive int"),
    ],
)
def test_bad_sizes_are_named(module, message):
    with pytest.raises(ValueError, match=message):
        module.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))


@pytest.mark.parametrize(
    "size, kernel, layers, tokens",
    [(32, 3, 1, 256), (32, 3, 2, 64), (224, 7, 2, 196)],
)
def test_cct_token_counts(size, kernel, layers, tokens):
    module = ConvTokenizer(embed_dim=8, kernel_size=kernel, num_conv_layers=layers, in_planes=4)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    out, grid = jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x)[0], images)
    assert out.shape == (1, tokens, 8)


def _max_pool_torch(x):
    """PyTorch MaxPool2d(3, stride 2, padding 1): pads with -inf, floor mode."""
    b, h, w, c = x.shape
    padded = np.full((b, h + 2, w + 2, c), -np.inf)
    padded[:, 1:-1, 1:-1] = x
    oh, ow = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
    out = np.zeros((b, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            out[:, i, j] = padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(1, 2))
    return out


def _conv_torch(x, kernel, stride, padding):
    """Conv2d without bias, NHWC input, HWIO kernel, zero padding."""
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    k = kernel.shape[0]
    oh = (x.shape[1] - k) // stride + 1
    ow = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, kernel.shape[-1]))
    for i in range(oh):
        for j in range(ow):
            window = x[:, i * stride : i * stride + k, j * stride : j * stride + k]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", window, kernel)
    return out


def test_conv_tokenizer_matches_pytorch_semantics():
    # kernel 5 -> stride 1, padding 2; two blocks: 3 -> 4 -> 6 channels.
    images = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    module = ConvTokenizer(embed_dim=6, kernel_size=5, num_conv_layers=2, in_planes=4)
    variables = module.init(jax.random.key(1), images)
    tokens, grid = module.apply(variables, images)
    x = np.asarray(images, np.float64)
    for i in range(2):
        kernel = np.asarray(variables["params"][f"conv_{i}"]["kernel"], np.float64)
        x = _max_pool_torch(np.maximum(_conv_torch(x, kernel, stride=1, padding=2), 0))
    assert grid == x.shape[1:3] == (3, 3)
    np.testing.assert_allclose(tokens, x.reshape(2, 9, 6), atol=1e-4)
    assert set(variables["params"]["conv_0"]) == {"kernel"}  # no bias


def test_max_pool_pads_with_minus_infinity():
    """The pooling call used by ConvTokenizer matches PyTorch's -inf padding.

    After the ReLU the values are >= 0, where 0 and -inf padding agree; on
    negative inputs zero padding would put 0 at the border.
    """
    x = -jax.random.uniform(jax.random.key(0), (1, 5, 5, 2)) - 1.0
    got = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    np.testing.assert_allclose(got, _max_pool_torch(np.asarray(x)), atol=1e-6)


def test_conv_init_is_kaiming_normal():
    module = ConvTokenizer(embed_dim=256, kernel_size=3, num_conv_layers=1)
    variables = module.init(jax.random.key(0), jnp.ones((1, 8, 8, 16)))
    kernel = np.asarray(variables["params"]["conv_0"]["kernel"])
    fan_in = 3 * 3 * 16
    assert abs(kernel.std() / np.sqrt(2 / fan_in) - 1) < 0.05  # untruncated: std sqrt(2/fan_in)
