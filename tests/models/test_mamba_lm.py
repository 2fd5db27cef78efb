"""Mamba LM and sequence classifier: sizes, init, tied padded head, decoding, padding, training."""

import importlib
import math
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from effformer import models
from effformer.models.mamba_classifier import MambaClassifier
from effformer.models.mamba_lm import (
    MAMBA_SIZES,
    MAMBA_VOCAB_SIZE,
    MambaLM,
    generate_mamba,
    pad_vocab_size,
)
from effformer.train import default_config, train_and_evaluate
from effformer.train.metric_writers import read_metrics
from effformer.train.tasks import CausalLMTask

TINY_LM = dict(vocab_size=61, embed_dim=16, num_layers=2, d_state=4)

generate_module = importlib.import_module("effformer.models.generate")


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def original_parameter_count(num_layers: int, d_model: int, vocab_size: int = MAMBA_VOCAB_SIZE):
    """MambaLMHeadModel's parameter count, tensor by tensor (d_state 16, d_conv 4, expand 2)."""
    d_inner, d_state, d_conv = 2 * d_model, 16, 4
    dt_rank = math.ceil(d_model / 16)
    per_layer = (
        d_model * 2 * d_inner  # in_proj.weight (no bias)
        + d_inner * d_conv + d_inner  # conv1d.weight [E, 1, 4] and bias
        + d_inner * (dt_rank + 2 * d_state)  # x_proj.weight
        + dt_rank * d_inner + d_inner  # dt_proj.weight and bias
        + d_inner * d_state  # A_log
        + d_inner  # D
        + d_inner * d_model  # out_proj.weight
        + d_model  # the block's RMSNorm weight
    )  # fmt: skip
    embedding = pad_vocab_size(vocab_size, 8) * d_model  # tied with lm_head: counted once
    return num_layers * per_layer + embedding + d_model  # + norm_f


@pytest.mark.parametrize("size", list(MAMBA_SIZES))
def test_parameter_counts_equal_the_original(size):
    model = models.create(f"mamba_{size}")
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs(1)))
    num_layers, d_model = MAMBA_SIZES[size]
    assert _count(shapes) == original_parameter_count(num_layers, d_model)


def test_parameter_count_formula_matches_the_published_counts():
    # Printed by the original code for the released checkpoints (state-spaces/mamba issue #48).
    assert original_parameter_count(24, 768) == 129_135_360
    assert original_parameter_count(64, 2560) == 2_768_345_600


def _init(model, inputs):
    return model.init(jax.random.PRNGKey(0), inputs)


# Compilation dominates these tests on CPU, so the LM tests share one model, one jitted
# init and two jitted forwards, and use token batches of one shape, [2, 9], wherever the
# property allows (each new shape or function is another XLA compilation).


@pytest.fixture(scope="module")
def tiny_lm():
    """The tiny LM and its parameters, initialised once (parameters do not depend on L)."""
    model = MambaLM(**TINY_LM)
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]


@pytest.fixture(scope="module")
def forward(tiny_lm):
    """The tiny LM's jitted forward: (params, tokens, segment_ids=None) -> logits."""
    model, _ = tiny_lm
    return jax.jit(lambda params, tokens, segment_ids=None: model.apply(
        {"params": params}, tokens, segment_ids=segment_ids))  # fmt: skip


@pytest.fixture(scope="module")
def forward_sown(tiny_lm):
    """The jitted forward that also returns the sown states and the captured outputs."""
    model, _ = tiny_lm
    return jax.jit(lambda params, tokens: model.apply(
        {"params": params}, tokens, capture_intermediates=True, mutable=["intermediates"]))  # fmt: skip


def test_vocabulary_is_padded_and_logits_cover_the_real_tokens(tiny_lm, forward_sown):
    assert pad_vocab_size(50277, 8) == 50280 and pad_vocab_size(64, 8) == 64
    _, params = tiny_lm
    tokens = jnp.array([[1, 60, 3, 4, 5, 6, 7, 8, 9]] * 2, jnp.int32)
    assert params["embedding"]["embedding"].shape == (64, 16)
    logits, _ = forward_sown(params, tokens)
    assert logits.shape == (2, 9, 61)


def test_head_is_tied_to_the_embedding(tiny_lm, forward_sown):
    _, params = tiny_lm
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 61)
    assert set(params) == {"embedding", "backbone"}  # no separate head
    logits, state = forward_sown(params, tokens)
    (hidden,) = state["intermediates"]["backbone"]["__call__"]
    table = params["embedding"]["embedding"]
    np.testing.assert_allclose(logits, hidden @ table[:61].T, rtol=1e-5, atol=1e-6)


def test_initialisation_follows_the_original():
    num_layers, width = 4, 32
    model = MambaLM(vocab_size=4000, embed_dim=width, num_layers=num_layers, d_state=4)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
    table = np.asarray(params["embedding"]["embedding"])
    assert abs(table.std() - 0.02) < 0.001 and abs(table.mean()) < 0.001
    for index in range(num_layers):
        mixer = params["backbone"][f"layers_{index}"]["mixer"]
        # out_proj: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) / sqrt(num_layers); in_proj not rescaled.
        out_bound = 1 / math.sqrt(2 * width) / math.sqrt(num_layers)
        out = np.abs(np.asarray(mixer["out_proj"]["kernel"]))  # 2048 draws: max within 0.5%
        assert out_bound * 0.995 < out.max() <= out_bound
        in_bound = 1 / math.sqrt(width)
        inp = np.abs(np.asarray(mixer["in_proj"]["kernel"]))
        assert in_bound * 0.995 < inp.max() <= in_bound
        # dt_proj's bias keeps its inverse-softplus init: softplus(bias) in [1e-3, 0.1].
        dt = jax.nn.softplus(mixer["dt_proj_bias"])
        assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001


def _decode_all(model, params, tokens):
    """Logits of every position computed one token per call from the recurrent state."""
    batch, length = tokens.shape
    cache = model.init(jax.random.PRNGKey(0), tokens[:, :1], decode=True)["cache"]
    cache = jax.tree.map(jnp.zeros_like, cache)

    @jax.jit
    def step(cache, token):
        logits, mutated = model.apply(
            {"params": params, "cache": cache}, token, decode=True, mutable=["cache"]
        )
        return mutated["cache"], logits[:, 0]

    outputs = []
    for t in range(length):
        cache, logits = step(cache, tokens[:, t : t + 1])
        outputs.append(logits)
    return jnp.stack(outputs, axis=1), cache


def test_recurrent_decoding_equals_the_parallel_forward(tiny_lm, forward_sown):
    model, params = tiny_lm
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, 61)
    parallel, sown = forward_sown(params, tokens)
    recurrent, cache = _decode_all(model, params, tokens)
    np.testing.assert_allclose(recurrent, parallel, rtol=1e-4, atol=1e-5)
    # The states the parallel scan sows are the states decoding reaches.
    for layer in range(2):
        states = sown["intermediates"]["backbone"][f"layers_{layer}"]["mixer"]
        decoded = cache["backbone"][f"layers_{layer}"]["mixer"]
        for name in ("conv_state", "ssm_state"):
            np.testing.assert_allclose(states[name][0], decoded[name], rtol=1e-4, atol=1e-5)


def test_generation_is_greedy_over_the_full_recomputation_and_top_1_sampling_agrees(
    tiny_lm, forward
):
    model, params = tiny_lm
    prompts = jax.random.randint(jax.random.PRNGKey(3), (2, 5), 1, 61)
    lengths = [5, 3]  # ragged: row 1 is right-padded and continues 2 tokens further
    out = generate_mamba(model, params, prompts, lengths, max_new_tokens=4, return_logits=True)
    assert out.sequences.shape == (2, 9) and out.new_tokens.shape == (2, 4)
    # The slow twin: the parallel forward over the finished sequences. It is causal,
    # so position t - 1 sees exactly the prefix from which token t was chosen.
    full = forward(params, out.sequences)
    for row, length in enumerate(lengths):
        np.testing.assert_array_equal(out.sequences[row, :length], prompts[row, :length])
        np.testing.assert_array_equal(
            out.sequences[row, length:], jnp.argmax(full[row, length - 1 : -1], axis=-1)
        )
        np.testing.assert_array_equal(out.new_tokens[row], out.sequences[row, length : length + 4])
    # logits[:, t] are those that chose (or, in the prompt, predicted) token t; row 0 is zeros.
    np.testing.assert_allclose(out.logits[:, 1:], full[:, :-1], rtol=1e-4, atol=1e-5)
    # Sampling restricted to the single most likely token is greedy decoding.
    top1 = generate_mamba(model, params, prompts, lengths, max_new_tokens=4, temperature=1.0,
                          top_k=1, rng=jax.random.PRNGKey(7))  # fmt: skip
    np.testing.assert_array_equal(top1.sequences, out.sequences)
    # The compiled loop is cached: other prompts of the same shapes, lengths with the same
    # shortest prompt, and an equal model object do not compile it again.
    traces = generate_module._TRACES["mamba"]
    other = generate_mamba(model.clone(), params, prompts[::-1], [3, 4], max_new_tokens=4,
                           return_logits=True)  # fmt: skip
    assert generate_module._TRACES["mamba"] == traces
    np.testing.assert_array_equal(other.sequences[0, :3], prompts[1, :3])


def test_temperature_sampling_draws_real_tokens_from_the_model(tiny_lm):
    model, params = tiny_lm
    prompts = jnp.ones((64, 1), jnp.int32)
    sampled = generate_mamba(
        model, params, prompts, max_new_tokens=1, temperature=1.0, rng=jax.random.PRNGKey(8)
    ).new_tokens[:, 0]
    assert int(sampled.min()) >= 0 and int(sampled.max()) < 61
    # At initialisation the next-token distribution is nearly uniform over 61 tokens:
    # 64 draws give many distinct tokens (greedy would give one).
    assert len(np.unique(np.asarray(sampled))) > 20


def test_lm_padding_leaves_real_tokens_unchanged(tiny_lm, forward):
    _, params = tiny_lm
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 9), 1, 61)
    # The 6 tokens' logits alone are the first 6 of the unpadded 9-token run: the model is
    # causal (the recurrent decoding test), and this keeps to the one compiled [2, 9] shape.
    alone = forward(params, tokens)[:, :6]
    padded = jnp.concatenate([jnp.zeros((2, 3), jnp.int32), tokens[:, :6]], axis=1)  # left pad
    segment_ids = jnp.broadcast_to((jnp.arange(9) >= 3).astype(jnp.int32), (2, 9))
    logits = forward(params, padded, segment_ids)
    np.testing.assert_allclose(logits[:, 3:], alone, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_params_in_float32(tiny_lm, forward):
    reference_model, params = tiny_lm
    model = reference_model.clone(dtype=jnp.bfloat16)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 9), 0, 61)
    shapes = jax.eval_shape(lambda: _init(model, tokens))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    logits = jax.jit(lambda params: model.apply({"params": params}, tokens))(params)
    reference = forward(params, tokens)
    assert logits.dtype == jnp.bfloat16
    np.testing.assert_allclose(logits.astype(jnp.float32), reference, atol=0.05)


def test_lm_bad_inputs_are_named(tiny_lm):
    model, params = tiny_lm
    with pytest.raises(ValueError, match=r"inputs must be integer token ids \[B, L\]"):
        model.apply({"params": params}, jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"segment_ids must have the shape of inputs \(1, 4\)"):
        model.apply({"params": params}, jnp.ones((1, 4), jnp.int32), segment_ids=jnp.ones((1, 3)))
    with pytest.raises(ValueError, match=r"decode=True advances one token.*got \(1, 4\)"):
        model.apply({"params": params}, jnp.ones((1, 4), jnp.int32), decode=True, mutable=True)
    with pytest.raises(ValueError, match="model must be a MambaLM"):
        generate_mamba(models.create("lm_decoder", tiny=True), params, jnp.ones((1, 2), jnp.int32),
                       max_new_tokens=2)  # fmt: skip
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"):
        generate_mamba(model, params, jnp.ones((1, 2), jnp.int32), max_new_tokens=0)


def test_tiny_lm_trains_with_the_causal_lm_task(tiny_lm):
    # No token dataset is registered yet, so the train_and_evaluate path cannot
    # serve a causal LM; this runs the causal_lm task's loss with the trainer's
    # optimiser default (AdamW) on a memorisable synthetic batch.
    model, params = tiny_lm
    assert model == models.create("mamba_130m", tiny=True)  # the registered tiny preset
    task = CausalLMTask(ml_collections.ConfigDict({"name": "causal_lm"}), None)
    batch = {"inputs": jax.random.randint(jax.random.PRNGKey(6), (4, 12), 0, 61)}
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state):
        def loss_fn(params):
            logits = model.apply({"params": params}, **task.model_inputs(batch), train=True)
            loss_sum, count, _ = task.loss_and_metrics(logits, batch)
            return loss_sum / count

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(15):
        params, opt_state, loss = train_step(params, opt_state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------------------- classifier


TINY_CLASSIFIER = dict(num_classes=5, input_dim=3, embed_dim=16, num_layers=2, d_state=4)


@pytest.fixture(scope="module")
def classifier_params():
    """The tiny classifier's parameters (they do not depend on the pooling), initialised once."""
    model = MambaClassifier(**TINY_CLASSIFIER)
    return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((1, 6, 3)))["params"]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padded_batch_equals_sequences_run_unpadded(pooling, classifier_params):
    model = MambaClassifier(pooling=pooling, **TINY_CLASSIFIER)
    keys = jax.random.split(jax.random.PRNGKey(8), 2)
    sequences = [jax.random.normal(k, (n, 3)) for k, n in zip(keys, (6, 3), strict=True)]
    width = 8
    padded = {}
    for side in ("right", "left"):
        rows, masks = [], []
        for s in sequences:
            pad = (
                ((0, width - len(s)), (0, 0)) if side == "right" else ((width - len(s), 0), (0, 0))
            )
            rows.append(jnp.pad(s, pad, constant_values=3.0))  # padding values must not matter
            masks.append(jnp.pad(jnp.ones(len(s), bool), pad[0]))
        padded[side] = (jnp.stack(rows), jnp.stack(masks))

    @jax.jit  # every run in one program: one compilation per pooling
    def run(params, sequences, padded):
        apply = partial(model.apply, {"params": params})
        alone = jnp.concatenate([apply(s[None]) for s in sequences])
        return alone, {side: apply(x, token_mask=m) for side, (x, m) in padded.items()}

    alone, logits = run(classifier_params, sequences, padded)
    for side in ("right", "left"):
        np.testing.assert_allclose(logits[side], alone, rtol=1e-4, atol=1e-5, err_msg=side)


def test_images_are_read_pixel_by_pixel():
    images = jax.random.normal(jax.random.PRNGKey(9), (2, 8, 8, 1))
    image_model = MambaClassifier(num_classes=3, image_size=8, num_channels=1, embed_dim=16,
                                  num_layers=1, d_state=4)  # fmt: skip
    signal_model = image_model.clone(image_size=None, num_channels=None, input_dim=1)
    params = jax.jit(image_model.init)(jax.random.PRNGKey(0), **image_model.dummy_inputs(1))

    @jax.jit  # both runs in one program: one compilation
    def both(params, images):
        return (
            image_model.apply(params, images),
            signal_model.apply(params, images.reshape(2, 64, 1)),  # raster order
        )

    np.testing.assert_allclose(*both({"params": params["params"]}, images), rtol=1e-6)


def test_classifier_bad_inputs_are_named(classifier_params):
    model = MambaClassifier(**TINY_CLASSIFIER)
    # The checks run while tracing: eval_shape reaches them without compiling anything.
    variables = {"params": classifier_params}
    with pytest.raises(ValueError, match=r"signals \[B, L, input_dim=3\], got \(2, 6, 2\)"):
        jax.eval_shape(model.apply, variables, jnp.ones((2, 6, 2)))
    with pytest.raises(ValueError, match=r"token_mask must have shape \[B, L\] = \(2, 6\)"):
        jax.eval_shape(
            partial(model.apply, token_mask=jnp.ones((2, 5), bool)), variables, jnp.ones((2, 6, 3))
        )
    with pytest.raises(ValueError, match=r"pooling must be one of \('mean', 'last'\), got 'max'"):
        jax.eval_shape(model.clone(pooling="max").apply, variables, jnp.ones((2, 6, 3)))
    images = MambaClassifier(num_classes=3, image_size=8, num_channels=1)
    with pytest.raises(ValueError, match=r"images \[B, 8, 8, 1\].*got \(2, 8, 7, 1\)"):
        images.init(jax.random.PRNGKey(0), jnp.ones((2, 8, 7, 1)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_tiny_classifier_learns_mnist1d_with_train_and_evaluate(data_dir, tmp_path):
    config = default_config()
    config.model.name = "mamba_classifier"
    config.model.tiny = True
    config.data.name = "mnist1d"
    config.data.data_dir = data_dir
    config.task.name = "sequence_classification"
    config.global_batch_size = 64
    config.num_train_steps = 30
    config.optimizer.learning_rate = 3e-2
    config.log_every_steps = 1
    config.progress_bar = False
    config.checkpoint.async_save = False
    result = train_and_evaluate(config, tmp_path)
    losses = [record["loss"] for record in read_metrics(tmp_path, "train")]
    assert result["step"] == 30 and np.isfinite(losses).all()
    # Chance is log(10) = 2.30; the mean of the last five steps must be clearly below the first.
    assert np.mean(losses[-5:]) < losses[0] - 0.15, losses
    assert result["eval"]["accuracy"] > 0.15  # chance is 0.1


def test_last_real_token_of_an_empty_row_is_zero():
    # Regression: a row with no real token gave its last padded token, unlike mean_pool.
    from effformer.models.mamba_classifier import last_real_token

    x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2) + 1
    mask = jnp.array([[True, True, False], [False, False, False]])
    np.testing.assert_array_equal(last_real_token(x, mask), [x[0, 1], [0.0, 0.0]])
