"""FIT: layer plans, causality across groups, information flow through latents,
READ/WRITE structure, equality with a plain Transformer, shapes, bad input, training."""

from functools import partial

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer import models
from effformer.models.fit import (
    FITLM,
    FITBlock,
    FITClassifier,
    FITCore,
    parse_layer_plan,
    shift_latents_right,
)
from effformer.models.transformer_lm import TransformerLM
from effformer.models.vit import VisionTransformer

# --------------------------------------------------------------------------- layer plans


@pytest.mark.parametrize(
    "plan, blocks",
    [
        ("(2)4(2)", ((2, 4), (2, 0))),
        ("(1)", ((1, 0),)),
        ("(0)2(3)1(1)", ((0, 2), (3, 1), (1, 0))),
        (" (12)10 (2)", ((12, 10), (2, 0))),
    ],
)
def test_parse_layer_plan(plan, blocks):
    assert parse_layer_plan(plan) == tuple(FITBlock(*block) for block in blocks)


@pytest.mark.parametrize(
    "plan, message",
    [
        ("", "at least one block"),
        ("2(2)", "malformed at character 0"),
        ("(2)4(", "malformed at character 4"),
        ("(2)x", "malformed at character 3"),
        ("(-1)", "malformed"),
        ("(2)(0)", "block 1 has no layers"),
        ("(2)4", "last block has 4 global layers"),
        (24, "must be a string"),
    ],
)
def test_parse_layer_plan_errors(plan, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_plan(plan)


# --------------------------------------------------------------------------- structure


def _param_shapes(model, **inputs):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **inputs))["params"]


def _random_params(model, dtype=np.float32, seed=0, **inputs):
    """Parameters of ``model`` drawn from N(0, 0.1^2) with numpy, from the traced shapes.

    No XLA compilation (a jitted init costs seconds on CPU). Every property below
    holds for any parameters, and random norm scales, biases and latent tables
    exercise more of the model than the zero/one initialisers do.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: jnp.asarray(rng.normal(0.0, 0.1, leaf.shape).astype(dtype)),
        _param_shapes(model, **inputs),
    )


def test_read_write_structure_no_write_after_last_block():
    model = FITLM(vocab_size=11, embed_dim=8, num_heads=2, num_latents=3, latent_dim=6,
                  group_size=4, max_length=16, layer_plan="(1)2(0)1(1)")  # fmt: skip
    core = _param_shapes(model, inputs=jnp.ones((1, 16), jnp.int32))["fit"]
    assert sorted(core) == [
        "block_0_global_0", "block_0_global_1", "block_0_local_0", "block_0_read",
        "block_0_write", "block_1_global_0", "block_1_read", "block_1_write",
        "block_2_local_0", "latent_embedding",
    ]  # fmt: skip
    assert core["latent_embedding"].shape == (4, 3, 6)
    # READ: latent queries (width 6) over token keys (width 8); WRITE the other way round.
    assert core["block_0_read"]["cross_attention"]["query"]["kernel"].shape == (6, 2, 3)
    assert core["block_0_read"]["cross_attention"]["key"]["kernel"].shape == (8, 2, 3)
    assert core["block_0_write"]["cross_attention"]["query"]["kernel"].shape == (8, 2, 4)
    assert core["block_0_write"]["cross_attention"]["key"]["kernel"].shape == (6, 2, 4)
    local_only = FITLM(vocab_size=11, embed_dim=8, num_heads=2, group_size=4, max_length=16,
                       layer_plan="(1)(1)")  # fmt: skip
    core = _param_shapes(local_only, inputs=jnp.ones((1, 16), jnp.int32))["fit"]
    assert sorted(core) == ["block_0_local_0", "block_1_local_0"]


@pytest.mark.parametrize(
    "patch_size, group_size, num_latents, groups, group_tokens",
    [(1, 4, 1, 4, 16), (2, 2, 3, 4, 4), (2, 4, 2, 1, 16), (4, 1, 2, 4, 1)],
)
def test_image_shapes(patch_size, group_size, num_latents, groups, group_tokens):
    model = FITClassifier(num_classes=5, image_size=8, num_channels=3, patch_size=patch_size,
                          group_size=group_size, embed_dim=8, num_heads=2,
                          num_latents=num_latents, layer_plan="(1)1(1)")  # fmt: skip
    assert model.num_groups == groups
    inputs = model.dummy_inputs(2)
    params = _param_shapes(model, **inputs)
    assert params["position_encoding"]["embedding"].shape == (group_tokens, 8)
    assert params["fit"]["latent_embedding"].shape == (groups, num_latents, 8)
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), **inputs)[0])
    assert out.shape == (2, 5)


@pytest.mark.parametrize("length, group_size, latent_dim", [(7, 4, None), (12, 3, 4), (1, 5, 6)])
def test_lm_shapes(length, group_size, latent_dim):
    model = FITLM(vocab_size=13, embed_dim=8, num_heads=2, num_latents=2, latent_dim=latent_dim,
                  group_size=group_size, max_length=12, layer_plan="(1)1(1)")  # fmt: skip
    inputs = jnp.ones((3, length), jnp.int32)
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), inputs=inputs)[0])
    assert out.shape == (3, length, 13)


def test_registered_tiny_presets_build():
    assert models.list_models("fit_*") == ["fit_classifier", "fit_lm"]
    for name in ("fit_classifier", "fit_lm"):
        model = models.create(name, tiny=True)
        out = jax.eval_shape(
            lambda m=model: m.init_with_output(jax.random.PRNGKey(0), **m.dummy_inputs(2))[0]
        )
        assert out.shape[0] == 2


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, inputs, message",
    [
        (dict(num_latents=0), None, "num_latents must be an int >= 1, got 0"),
        (dict(layer_plan="(1)1"), None, "last block has 1 global layers"),
        (dict(latent_dim=5), None, "num_heads=2 must divide latent_dim, got latent_dim=5"),
        # Regressions: a ZeroDivisionError; latent_dim=0 silently meant embed_dim; mlp_ratio=0
        # built MLPs without hidden units.
        (dict(num_heads=0), None, "num_heads must be a positive int, got 0"),
        (dict(latent_dim=0), None, r"latent_dim must be a positive int or None \(embed_dim\)"),
        (dict(mlp_ratio=0.0), None, "mlp_ratio must be > 0, got 0.0"),
        (dict(max_length=8), jnp.ones((1, 9), jnp.int32), "<= max_length=8, got 9"),
        (dict(), jnp.ones((1, 4)), "integer token ids"),
    ],
)
def test_lm_bad_input(overrides, inputs, message):
    kwargs = dict(vocab_size=11, embed_dim=8, num_heads=2, group_size=4, max_length=16)
    model = FITLM(**{**kwargs, **overrides})
    inputs = jnp.ones((1, 8), jnp.int32) if inputs is None else inputs
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.PRNGKey(0), inputs=inputs)


def test_lm_refuses_packed_sequences():
    model = FITLM(vocab_size=11, embed_dim=8, num_heads=2, group_size=4, max_length=16)
    tokens = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="packed sequences"):
        model.init(jax.random.PRNGKey(0), inputs=tokens, segment_ids=tokens)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(group_size=3), "group_size .* must divide the patch grid side 4.*got group_size=3"),
        (dict(patch_size=3), "patch_size must be a positive divisor of image_size=8"),
        (dict(num_latents=-1), "num_latents must be an int >= 1"),
    ],
)
def test_classifier_bad_config(overrides, message):
    kwargs = dict(image_size=8, num_channels=1, patch_size=2, group_size=2, embed_dim=8,
                  num_heads=2, num_classes=3)  # fmt: skip
    model = FITClassifier(**{**kwargs, **overrides})
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.PRNGKey(0), inputs=jnp.zeros((1, 8, 8, 1)))


def test_classifier_bad_image_shape():
    model = FITClassifier(image_size=8, num_channels=1, patch_size=2, group_size=2, embed_dim=8,
                          num_heads=2, num_classes=3)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"inputs must be \[B, 8, 8, 1\], got shape \(1, 8, 8, 3\)"
    ):
        model.init(jax.random.PRNGKey(0), inputs=jnp.zeros((1, 8, 8, 3)))


def test_core_refuses_more_groups_than_its_latent_table():
    core = FITCore(layer_plan="(1)1(1)", max_groups=2, num_latents=1, num_heads=2)
    with pytest.raises(ValueError, match="at most max_groups=2 groups .* got 3 groups"):
        core.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 2, 8)))


# --------------------------------------------------------------------------- information flow

GROUPS, GROUP_SIZE, DIM = 3, 3, 8
LENGTH = GROUPS * GROUP_SIZE


def _position_jacobians(causal: bool):
    """|d out_i / d in_j| summed over channels, [L, L], for the final output and for
    the tokens before the first WRITE (block 0 after its local layers); float64."""
    core = FITCore(layer_plan="(1)1(1)1(1)", max_groups=GROUPS, num_latents=2, num_heads=2,
                   mlp_ratio=2.0, causal=causal)  # fmt: skip
    x = jax.random.normal(jax.random.PRNGKey(1), (1, GROUPS, GROUP_SIZE, DIM), jnp.float64)
    shapes = jax.eval_shape(lambda: core.init(jax.random.PRNGKey(2), x))
    rng = np.random.default_rng(2)
    variables = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(0.0, 0.3, leaf.shape)), shapes)

    def outputs(x):
        out, state = core.apply(variables, x, mutable=["intermediates"])
        first = state["intermediates"]["block_0_tokens"][0]
        return out.reshape(LENGTH, DIM), first.reshape(LENGTH, DIM)

    jacobians = jax.jit(jax.jacrev(outputs))(x)
    # [L, D, 1, T, n, D] -> [L, L]
    return [np.abs(np.asarray(j)).reshape(LENGTH, DIM, LENGTH, DIM).sum((1, 3)) for j in jacobians]


def test_decoder_is_causal_across_groups(x64):
    final, before_write = _position_jacobians(causal=True)
    future = np.triu(np.ones((LENGTH, LENGTH), bool), k=1)
    assert np.all(final[future] == 0.0), "an output depends on a later input"
    # Every earlier input reaches every later output, across group boundaries too
    # (through the shifted latents).
    assert np.all(final[~future] > 1e-8)
    group = np.arange(LENGTH) // GROUP_SIZE
    same_group = group[:, None] == group[None, :]
    assert np.all(before_write[~same_group] == 0.0)


def test_encoder_reaches_every_token_only_after_a_write(x64):
    final, before_write = _position_jacobians(causal=False)
    group = np.arange(LENGTH) // GROUP_SIZE
    same_group = group[:, None] == group[None, :]
    assert np.all(final > 1e-8), "some token does not reach some other token"
    assert np.all(before_write[~same_group] == 0.0), "groups mixed before the first WRITE"
    assert np.all(before_write[same_group] > 1e-8)


SMALL_LM = dict(vocab_size=11, embed_dim=8, num_heads=2, num_latents=2, group_size=3,
                max_length=9, layer_plan="(1)1(1)")  # fmt: skip


@pytest.fixture(scope="module")
def small_lm():
    """The small FITLM, random parameters, tokens [2, 9] and one jitted forward that also
    returns the sown intermediates (shared by three tests: compiled once per shape)."""
    model = FITLM(**SMALL_LM)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 11)
    params = _random_params(model, inputs=tokens)
    apply = jax.jit(partial(model.apply, mutable=["intermediates"]))
    return model, params, tokens, apply


def test_decoder_group_zero_reads_zero_latents(small_lm):
    _, params, tokens, apply = small_lm
    _, state = apply({"params": params}, inputs=tokens)
    (written,) = state["intermediates"]["fit"]["block_0_write_latents"]
    assert written.shape == (2, 3, 2, 8)
    assert np.all(np.asarray(written[:, 0]) == 0.0)
    assert np.all(np.abs(np.asarray(written[:, 1:])).sum(-1) > 0)


def test_shift_latents_right():
    latents = jnp.arange(2 * 3 * 1 * 2, dtype=jnp.float32).reshape(2, 3, 1, 2)
    shifted = np.asarray(shift_latents_right(latents))
    np.testing.assert_array_equal(shifted[:, 0], 0.0)
    np.testing.assert_array_equal(shifted[:, 1:], np.asarray(latents[:, :-1]))


# --------------------------------------------------------------------------- equalities


def test_one_group_local_only_lm_equals_a_plain_decoder():
    """FIT with one group and no global layers is TransformerLM with the same weights."""
    kwargs = dict(vocab_size=17, embed_dim=8, num_heads=2)
    fit = FITLM(group_size=6, max_length=6, layer_plan="(2)", mlp_ratio=2.0, **kwargs)
    plain = TransformerLM(kind="decoder", num_layers=2, ffn="gelu", ffn_hidden_dim=16,
                          position_encoding="learned", max_length=6, norm_epsilon=1e-6,
                          **kwargs)  # fmt: skip
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 6), 0, 17)
    params = _random_params(plain, inputs=tokens)
    stack = params["decoder"]
    fit_params = {
        "token_embedding": params["token_embedding"],
        "position_encoding": stack["position_encoding"],
        "final_norm": stack["final_norm"],
        "fit": {
            f"block_0_local_{i}": {
                "attention": stack[f"layer_{i}_attention"],
                "ffn": stack[f"layer_{i}_ffn"],
                "layer": stack[f"layer_{i}"],
            }
            for i in range(2)
        },
    }
    expected = jax.eval_shape(lambda: fit.init(jax.random.PRNGKey(0), inputs=tokens))["params"]
    assert jax.tree.structure(expected) == jax.tree.structure(fit_params)
    np.testing.assert_allclose(
        jax.jit(fit.apply)({"params": fit_params}, inputs=tokens),
        jax.jit(plain.apply)({"params": params}, inputs=tokens),
        rtol=1e-5,
        atol=1e-5,
    )


def test_one_group_local_only_classifier_equals_a_plain_vit():
    kwargs = dict(num_classes=4, image_size=8, num_channels=1, patch_size=2, embed_dim=8,
                  num_heads=2, mlp_ratio=2.0)  # fmt: skip
    fit = FITClassifier(group_size=4, layer_plan="(2)", **kwargs)
    plain = VisionTransformer(num_layers=2, pooling="mean", position_embedding="learned",
                              **kwargs)  # fmt: skip
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    params = _random_params(plain, inputs=images)
    fit_params = {
        "tokenizer": params["tokenizer"],
        "position_encoding": params["position_embedding"],
        "final_norm": params["final_norm"],
        "head": params["head"],
        "fit": {
            f"block_0_local_{i}": {
                "attention": params[f"block_{i}"]["mixer"],
                "ffn": params[f"block_{i}"]["ffn"],
                "layer": {
                    "mixer_norm": params[f"block_{i}"]["norm1"],
                    "ffn_norm": params[f"block_{i}"]["norm2"],
                },
            }
            for i in range(2)
        },
    }
    expected = jax.eval_shape(lambda: fit.init(jax.random.PRNGKey(0), inputs=images))["params"]
    assert jax.tree.structure(expected) == jax.tree.structure(fit_params)
    np.testing.assert_allclose(
        jax.jit(fit.apply)({"params": fit_params}, inputs=images),
        jax.jit(plain.apply)({"params": params}, inputs=images),
        rtol=1e-5,
        atol=1e-5,
    )


def test_lm_right_padding_to_whole_groups_is_exact(small_lm):
    """L = 7 with groups of 3 is padded to 9 inside; the 7 outputs equal those of a
    9-token input with the same first 7 tokens (causality makes the padding invisible)."""
    _, params, tokens, apply = small_lm
    full, _ = apply({"params": params}, inputs=tokens)
    short, _ = apply({"params": params}, inputs=tokens[:, :7])
    np.testing.assert_allclose(short, full[:, :7], rtol=1e-5, atol=1e-6)


def test_remat_gives_the_same_loss_and_gradients(small_lm):
    _, params, tokens, _ = small_lm

    def loss(params, remat):
        logits = FITLM(remat=remat, **SMALL_LM).apply({"params": params}, inputs=tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    plain_loss, plain_grads = value_and_grad(params, False)
    remat_loss, remat_grads = value_and_grad(params, True)
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    flat_plain = flax.traverse_util.flatten_dict(plain_grads)
    flat_remat = flax.traverse_util.flatten_dict(remat_grads)
    assert flat_plain.keys() == flat_remat.keys()
    for key, value in flat_plain.items():
        np.testing.assert_allclose(flat_remat[key], value, rtol=1e-5, atol=1e-7, err_msg=str(key))


# --------------------------------------------------------------------------- training


def test_tiny_classifier_trains_on_digits(tmp_path):
    from effformer.train import train_and_evaluate
    from effformer.train.config import load_config_file

    config = load_config_file("experiments/fit/digits.py:fit")
    config.model.tiny = True
    config.model.kwargs = ml_collections.ConfigDict()  # the tiny preset: width 16, 4 groups
    config.num_epochs = 0.0
    config.num_train_steps = 40
    config.global_batch_size = 64
    config.optimizer.learning_rate = 1e-2
    config.optimizer.warmup_steps = 0
    config.mesh.num_devices = 1
    losses = {}
    result = train_and_evaluate(
        config, tmp_path, on_step=lambda step, m: losses.update({step: float(m["loss"])})
    )
    steps = sorted(losses)
    first = np.mean([losses[s] for s in steps[:5]])
    last = np.mean([losses[s] for s in steps[-5:]])
    assert last < first - 0.05, (first, last)
    assert np.isfinite(result["eval"]["loss"])
