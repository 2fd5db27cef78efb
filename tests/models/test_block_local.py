"""Block-local attention layers (``block:B``): mask, model, causality, pattern, bad input."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer import models
from effformer.models.lm_layers import (
    BlockLocalAttention,
    LayerSpec,
    block_segment_ids,
    expand_layer_pattern,
    layer_attention_mask,
)
from effformer.models.transformer_lm import TransformerLM, masformer_config
from effformer.ops.masks import dense_mask

TINY = dict(vocab_size=32, embed_dim=16, num_heads=2, ffn_hidden_dim=32, max_length=64)


def _reference_visibility(positions, segments, block_size, causal):
    """bool [B, L, L] by a loop over every (query, key) pair, straight from the definition."""
    batch, length = positions.shape
    visible = np.zeros((batch, length, length), bool)
    for b, q, k in itertools.product(range(batch), range(length), range(length)):
        same_sequence = segments[b, q] == segments[b, k] != 0
        same_block = positions[b, q] // block_size == positions[b, k] // block_size
        visible[b, q, k] = same_sequence and same_block and (not causal or k <= q)
    return visible


@pytest.mark.parametrize("causal", [True, False])
def test_block_mask_equals_a_dense_reference_with_packed_segments(causal):
    # Row 0: one sequence of 10; row 1: sequences of 5 and 3, then padding.
    segments = np.array([[1] * 10, [1] * 5 + [2] * 3 + [0] * 2])
    positions = np.array([list(range(10)), list(range(5)) + list(range(3)) + [0, 0]])
    mask = layer_attention_mask(
        LayerSpec("block", 3),
        causal=causal,
        positions=jnp.asarray(positions),
        segment_ids=jnp.asarray(segments),
    )
    got = np.asarray(dense_mask(mask, 2, 10, 10))[:, 0]
    np.testing.assert_array_equal(got, _reference_visibility(positions, segments, 3, causal))
    # Without segment ids every token is real and the row is one sequence.
    ids = block_segment_ids(jnp.arange(7)[None], 3)
    np.testing.assert_array_equal(ids, [[1, 1, 1, 2, 2, 2, 3]])


@pytest.fixture(scope="module")
def block_decoder():
    """A 2-layer decoder of block:4 layers, random parameters, one jitted apply."""
    model = TransformerLM(num_layers=2, layer_pattern="block:4", **TINY)
    inputs = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), inputs)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes
    )
    apply = jax.jit(
        lambda tokens, positions: model.apply({"params": params}, tokens, positions=positions)
    )
    return model, apply


def test_block_model_equals_each_block_run_alone_and_is_causal(block_decoder):
    model, apply = block_decoder
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 12), 0, 32)
    positions = jnp.arange(12, dtype=jnp.int32)[None]
    full = np.asarray(apply(tokens, positions))
    # Slow twin: each block alone (its own positions, so RoPE sees the same angles).
    for start in range(0, 12, 4):
        alone = apply(tokens[:, start : start + 4], positions[:, start : start + 4])
        np.testing.assert_allclose(full[:, start : start + 4], alone, rtol=1e-5, atol=1e-5)
    # Causal inside the block: changing token 6 leaves positions 4, 5 (and 0-3) unchanged
    # and changes 6 and 7.
    changed = np.asarray(apply(tokens.at[0, 6].set((tokens[0, 6] + 1) % 32), positions))
    differs = np.abs(changed - full).max(-1)[0] > 1e-6
    np.testing.assert_array_equal(differs, [False] * 6 + [True, True] + [False] * 4)


def test_the_pattern_builds_block_layers():
    specs = expand_layer_pattern("global,block:4", 3, {2: "block:2"})
    assert specs == (LayerSpec("global"), LayerSpec("block", 4), LayerSpec("block", 2))
    assert [str(spec) for spec in specs] == ["global", "block:4", "block:2"]
    model = TransformerLM(num_layers=2, layer_pattern="global,block:4", **TINY)
    built = {}  # attention modules by name, recorded as the model builds them

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and "attention" in (context.module.name or ""):
            built[context.module.name] = context.module
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    assert type(built["layer_0_attention"]).__name__ == "MultiHeadAttention"
    assert isinstance(built["layer_1_attention"], BlockLocalAttention)
    assert built["layer_1_attention"].block_size == 4
    config = masformer_config(4, 8, (0,), masformer_short_span="block")
    assert [str(s) for s in expand_layer_pattern(
        config["layer_pattern"], 4, config["layer_overrides"]
    )] == ["global", "block:8", "block:8", "block:8"]  # fmt: skip
    tiny = models.create("masformer_decoder", tiny=True, masformer_short_span="block")
    assert tiny.layer_pattern == "block:4"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: expand_layer_pattern("block:0", 2), "'block:B' with B a positive int"),
        (lambda: expand_layer_pattern("block", 2), "'block:B' with B a positive int"),
        (lambda: expand_layer_pattern("global,blocks:4", 2), "unknown mixer; expected one of"),
        (lambda: block_segment_ids(jnp.zeros((1, 4), jnp.int32), 0), "block_size must be an int"),
        (lambda: masformer_config(masformer_short_span="dilated"), "masformer_short_span must be"),
    ],
)
def test_bad_block_specs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
