"""SOLO: the image layout, patches, the forward pass against a dense reference, causality,
input checks, SOLO-7B's parameter count, KV-cached generation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer import models
from effformer.models import solo
from effformer.models.solo import (
    NON_VISION,
    SOLO_VISION_TOKENS,
    VisionTokenIds,
    image_to_patches,
    image_token_layout,
    num_image_tokens,
    resize_shape,
)

VOCAB = 32
IDS = VisionTokenIds(start=2, patch=3, row_sep=4, end=5)


def _tiny(**overrides):
    return models.create("solo_small", tiny=True, vocab_size=VOCAB, **overrides)


def _prompt_rows(rng, batch, rows, cols, text):
    """Image layouts followed by ``text`` random text tokens: (tokens, patch_indices) [B, T]."""
    ids, indices = image_token_layout(rows, cols, tokens=IDS)
    words = rng.integers(6, VOCAB, (batch, text))
    tokens = np.concatenate([np.broadcast_to(ids, (batch, len(ids))), words], axis=1)
    patch_indices = np.concatenate(
        [np.broadcast_to(indices, (batch, len(ids))), np.full((batch, text), NON_VISION)], axis=1
    )
    return tokens.astype(np.int32), patch_indices.astype(np.int32)


# ------------------------------------------------------------------------------- layout


def test_image_layout_rows_separators_and_raster_patch_indices():
    rows, cols = 3, 4
    tokens, indices = image_token_layout(rows, cols)
    assert len(tokens) == len(indices) == num_image_tokens(rows, cols) == 12 + 2 + 2
    assert tokens[0] == solo.VISION_START and tokens[-1] == solo.VISION_END
    assert indices[0] == indices[-1] == NON_VISION
    separators = np.flatnonzero(tokens == solo.VISION_ROW_SEP)
    # A separator before every row but the first: after rows of 4 patches.
    assert separators.tolist() == [1 + cols, 1 + cols + 1 + cols]
    assert (indices[separators] == NON_VISION).all()
    is_patch = tokens == solo.VISION_PATCH
    assert is_patch.sum() == rows * cols
    assert indices[is_patch].tolist() == list(range(rows * cols))  # raster order
    assert (indices[~is_patch] == NON_VISION).all()
    # Row r's patches lie between separator r - 1 and separator r.
    bounds = [0, *separators.tolist(), len(tokens) - 1]
    for row in range(rows):
        between = indices[bounds[row] + 1 : bounds[row + 1]]
        assert between.tolist() == [row * cols + c for c in range(cols)]
    # A second image in the same row continues the numbering; custom token ids.
    tokens2, indices2 = image_token_layout(1, 2, tokens=IDS, first_patch_index=12)
    assert tokens2.tolist() == [2, 3, 3, 5] and indices2.tolist() == [-1, 12, 13, -1]
    assert SOLO_VISION_TOKENS.start == 32000 and solo.SOLO_VOCAB_SIZE == 32000 + 5 + 1024 + 2


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: image_token_layout(0, 2), "num_rows must be a positive int, got 0"),
        (lambda: image_token_layout(2, 2, first_patch_index=-1), "first_patch_index must be"),
        (
            lambda: image_to_patches(np.zeros((6, 8, 3)), 4),
            r"multiples of patch_size 4.*\(6, 8, 3\)",
        ),
        (
            lambda: resize_shape(100, 100, patch_size=32, max_resolution=1000),
            "multiple of patch_size",
        ),
    ],
)
def test_layout_and_preprocessing_refuse_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_image_to_patches_is_channel_first_inside_raster_ordered_patches():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 9, 2))
    patches = image_to_patches(image, 3)
    assert patches.shape == (2, 3, 2 * 3 * 3)
    for r in range(2):
        for c in range(3):
            block = image[3 * r : 3 * r + 3, 3 * c : 3 * c + 3, :]  # [p, p, C]
            expected = [block[i, j, ch] for ch in range(2) for i in range(3) for j in range(3)]
            np.testing.assert_array_equal(patches[r, c], expected)


def test_resize_shape_keeps_the_aspect_ratio_in_multiples_of_32_up_to_1024():
    assert resize_shape(480, 640) == (480, 640)
    assert resize_shape(1000, 2000) == (512, 1024)  # longer side capped at 1024
    assert resize_shape(50, 100) == (64, 128)  # 128 * 50 / 100 = 64
    assert resize_shape(100, 30) == (128, 64)  # int(128 * 0.3) = 38 -> 64
    assert resize_shape(1000, 1000) == (1024, 1024)


# ------------------------------------------------------------------------------- model


def _random_params(model, *inputs):
    """Random parameters from numpy in the model's shapes (no initialiser is compiled)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]
    rng = np.random.default_rng(1)
    leaves, tree = jax.tree.flatten(shapes)
    values = [rng.normal(0.0, 0.3, leaf.shape).astype(np.float32) for leaf in leaves]
    return jax.tree.unflatten(tree, values)


@pytest.fixture(scope="module")
def tiny_model():
    model = _tiny(num_layers=1)
    rng = np.random.default_rng(0)
    tokens, indices = _prompt_rows(rng, 2, 2, 3, text=3)  # 6 patches of dim 4, T = 12
    patches = rng.normal(size=(2, 6, model.patch_dim)).astype(np.float32)
    return model, _random_params(model, tokens, patches, indices), tokens, patches, indices


def _dense_reference(model, params, tokens, patches, indices):
    """The decoder LM given the embeddings written out: W @ patch at each <vpatch>, 0 else.

    The embedding is a dense selection matrix S[b, t, n] = 1 iff indices[b, t] == n
    (built by loops), times the patches, times W: differentiable in patches and W.
    """
    batch, length = tokens.shape
    select = np.zeros((batch, length, patches.shape[1]))
    for b in range(batch):
        for t in range(length):
            if indices[b, t] >= 0:
                select[b, t, indices[b, t]] = 1.0

    def logits(params, patches):
        kernel = params["patch_embedding"]["kernel"]
        embeddings = jnp.einsum("btn,bnp,pd->btd", select, patches, kernel)
        return model.lm.apply({"params": params["lm"]}, tokens, input_embeddings=embeddings)

    return logits


def test_forward_and_gradients_equal_the_lm_with_hand_built_embeddings(tiny_model, x64):
    model, params, tokens, patches, indices = tiny_model
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    patches = jnp.asarray(patches, jnp.float64)
    indices = indices.copy()
    indices[1, 1] = 5  # any patch may sit anywhere, twice
    reference = _dense_reference(model, params, tokens, patches, indices)

    def fast(params, patches):
        return model.apply({"params": params}, tokens, patches, indices)

    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, tokens.shape[1], VOCAB)))

    def logits_and_grads(fn):
        def loss(params, patches):
            logits = fn(params, patches)
            return jnp.sum(logits * weights), logits

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, patches)

    # Both paths in one compiled program (one compilation instead of two).
    both = jax.jit(lambda: (logits_and_grads(fast), logits_and_grads(reference)))
    ((_, fast_logits), fast_grads), ((_, ref_logits), ref_grads) = both()
    np.testing.assert_allclose(fast_logits, ref_logits, atol=1e-12)
    for got, want in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)
    # The patches matter: zeroing them changes the logits at and after the first patch.
    apply = jax.jit(model.apply)
    zeroed = apply({"params": params}, tokens, jnp.zeros_like(patches), indices)
    assert np.abs(np.asarray(zeroed - fast_logits)[:, 1:]).max() > 1e-4
    text_only = jax.jit(model.lm.apply)({"params": params["lm"]}, tokens)
    np.testing.assert_allclose(zeroed, text_only, atol=1e-12)


def test_an_answer_token_does_not_see_later_tokens_or_patches(tiny_model):
    model, params, tokens, patches, indices = tiny_model
    # Positions 0..t use patches 0..2 (the first row); change what comes after t.
    t = 4  # the first row: <vision> p0 p1 p2 <vrow_sep>
    later_tokens = tokens.copy()
    later_tokens[:, t + 1 :] = (later_tokens[:, t + 1 :] + 7) % VOCAB
    later_patches = patches.copy()
    later_patches[:, 3:] += 5.0
    apply = jax.jit(model.apply)
    before = np.asarray(apply({"params": params}, tokens, patches, indices))
    after = np.asarray(apply({"params": params}, later_tokens, later_patches, indices))
    np.testing.assert_allclose(after[:, : t + 1], before[:, : t + 1], atol=1e-6)
    assert np.abs(after[:, t + 1 :] - before[:, t + 1 :]).max() > 1e-3


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(patches=np.zeros((2, 6, 5), np.float32)), r"patches must be \[B=2, N, patch_dim=4\]"),
        (dict(patches=np.zeros((3, 6, 4), np.float32)), r"patches must be \[B=2.*\(3, 6, 4\)"),
        (
            dict(patch_indices=np.zeros((2, 11), np.int32)),
            r"patch_indices must be integer \[B, L\]",
        ),
        (dict(patch_indices=np.full((2, 12), 6, np.int32)), r"in \[0, N=6\).*\[6, 6\]"),
        (dict(patch_indices=np.full((2, 12), -2, np.int32)), r"-1 \(not a patch\).*\[-2, -2\]"),
        (dict(patch_indices=None), "patches and patch_indices must be given together"),
    ],
)
def test_bad_patches_and_indices_are_refused_by_name(tiny_model, change, message):
    model, params, tokens, patches, indices = tiny_model
    arguments = {"inputs": tokens, "patches": patches, "patch_indices": indices, **change}
    with pytest.raises(ValueError, match=message):
        model.apply({"params": params}, **arguments)


def test_the_lm_refuses_input_embeddings_of_the_wrong_shape(tiny_model):
    model, params, tokens, _, _ = tiny_model
    with pytest.raises(ValueError, match=r"input_embeddings must have shape \(2, 12, 16\)"):
        model.lm.apply({"params": params["lm"]}, tokens, input_embeddings=jnp.zeros((2, 12, 8)))


def _param_count(model, *inputs) -> int:
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def test_solo_7b_has_mistral_7b_plus_the_added_rows_and_the_patch_embedding():
    # The 32 layers are identical: count 1 and 2 layers (tracing 32 takes seconds).
    one, two = (models.create("solo_7b", num_layers=n) for n in (1, 2))
    counts = [_param_count(m, *m.dummy_inputs(1).values()) for m in (one, two)]
    per_layer = counts[1] - counts[0]
    assert per_layer == 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    solo_7b = counts[0] + 31 * per_layer
    # Mistral-7B-v0.1: untied embedding and head of 32,000 rows, 32 layers, final norm.
    mistral_7b = 2 * 32000 * 4096 + 32 * per_layer + 4096
    assert mistral_7b == 7_241_732_096
    assert solo_7b == mistral_7b + 2 * 1031 * 4096 + 32 * 32 * 3 * 4096 == 7_262_760_960


def test_kv_cached_generation_equals_greedy_decoding_by_full_forward_passes(tiny_model):
    model, params, _, patches, _ = tiny_model
    rng = np.random.default_rng(3)
    prompts, indices = _prompt_rows(rng, 2, 2, 3, text=3)
    # The second prompt stops inside the image, so the first row's later image tokens are
    # fed one per step (each with its own patch) while the second row generates.
    lengths = np.array([12, 5])
    indices[1, 5:] = NON_VISION
    new = 3
    out = solo.generate(model, params, prompts, patches, indices, lengths, max_new_tokens=new)
    # Reference: append the argmax of a full forward pass, one token at a time.
    width = prompts.shape[1] + new
    apply = jax.jit(model.apply)
    for row in range(2):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, : lengths[row]] = prompts[row, : lengths[row]]
        row_indices = np.full((1, width), NON_VISION, np.int32)
        row_indices[0, : lengths[row]] = indices[row, : lengths[row]]
        for step in range(new):
            at = lengths[row] + step
            logits = apply({"params": params}, tokens, patches[row : row + 1], row_indices)
            tokens[0, at] = int(np.argmax(logits[0, at - 1]))
        np.testing.assert_array_equal(
            out.new_tokens[row], tokens[0, lengths[row] : lengths[row] + new]
        )
