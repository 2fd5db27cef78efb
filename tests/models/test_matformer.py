"""MatFormer for the language models: nested FFN widths, the multi-granularity loss, Mix'n'Match.

References: a second model whose FFN weights are the first ``w`` hidden units
of the first (width ``w`` must compute it), a model whose FFN output rows past
a layer's width are zero (per-layer widths must compute it), losses computed
by hand in numpy, and a brute-force search over per-layer width choices.
"""

import itertools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer import models
from effformer.models.generate import generate
from effformer.models.lm_layers import mix_n_match_widths, resolve_ffn_widths
from effformer.train import default_config, validate_config
from effformer.train.experiment import build_experiment
from effformer.train.tasks import create_task

HIDDEN = 16
TINY = dict(vocab_size=16, embed_dim=8, num_heads=2, num_kv_heads=2, ffn_hidden_dim=HIDDEN)
TOKENS = jnp.array([[1, 5, 9, 3, 7, 2], [4, 4, 8, 15, 0, 6]], jnp.int32)


def _decoder(**overrides):
    return models.create("lm_decoder", tiny=True, **{**TINY, "num_layers": 2, **overrides})


def _params(model, dtype=jnp.float32, **inputs):
    inputs = inputs or {"inputs": TOKENS}
    params = jax.jit(model.init)(jax.random.PRNGKey(0), **inputs)["params"]
    return jax.tree.map(lambda p: p.astype(dtype), params)


@pytest.fixture(scope="module")
def decoder():
    """A 2-layer decoder with a GELU MLP of width 16 and its float32 parameters."""
    model = _decoder()
    return model, _params(model)


def _float64(params):
    return jax.tree.map(lambda p: p.astype(jnp.float64), params)


def _ffn_names(params, stack="decoder"):
    return sorted(name for name in params[stack] if name.endswith("_ffn"))


def _first_units(ffn, width):
    """The FFN parameters of a model with ``ffn_hidden_dim=width``: the first ``width`` units."""
    sliced = {}
    for name, dense in ffn.items():
        out_layer = name in ("fc2", "w2")  # its input is the hidden layer
        kernel = dense["kernel"]
        sliced[name] = {"kernel": kernel[:width] if out_layer else kernel[:, :width]}
        if "bias" in dense:
            sliced[name]["bias"] = dense["bias"] if out_layer else dense["bias"][:width]
    return sliced


# ------------------------------------------------------------------------ the forward pass


def test_no_width_is_the_full_model_bit_for_bit(decoder):
    model, params = decoder

    @jax.jit
    def outputs(params):
        run = lambda **kwargs: model.apply({"params": params}, TOKENS, **kwargs)
        widths = [run(ffn_widths=widths) for widths in (HIDDEN, 1.0, (HIDDEN, 1.0))]
        return run(), widths, run(ffn_granularities=(HIDDEN,))[0]

    plain, widths, stacked = outputs(params)
    for same in [*widths, stacked]:
        np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))


def test_width_equals_a_model_with_the_first_units(decoder, x64):
    """The whole LM at width 4 is a model built with ffn_hidden_dim=4 holding the first 4
    hidden units (tests/nn/test_ffn.py checks the same for each FFN kind on its own)."""
    width = 4
    model, params = decoder
    params = _float64(params)
    small = model.clone(ffn_hidden_dim=width)
    small_params = jax.tree.map(lambda p: p, params)
    for name in _ffn_names(params):
        small_params["decoder"][name] = _first_units(params["decoder"][name], width)

    @jax.jit
    def outputs(params, small_params):
        run = lambda **kwargs: model.apply({"params": params}, TOKENS, **kwargs)
        expected = small.apply({"params": small_params}, TOKENS)
        return expected, [run(ffn_widths=width), run(ffn_widths=width / HIDDEN)], run()

    expected, widths, full = outputs(params, small_params)
    for got in widths:
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-12, atol=1e-12)
    # The width matters: the full model differs by far more than the tolerance.
    assert np.abs(np.asarray(full) - np.asarray(expected)).max() > 1e-5


def _zero_rows_past(ffn, width):
    """Full-width FFN parameters whose hidden units from ``width`` on contribute nothing."""
    out = "fc2" if "fc2" in ffn else "w2"
    return {**ffn, out: {**ffn[out], "kernel": ffn[out]["kernel"].at[width:].set(0.0)}}


@pytest.mark.parametrize("name", ["lm_decoder", "lm_encoder_decoder"])
def test_per_layer_widths_equal_zeroed_hidden_units(decoder, name, x64):
    if name == "lm_decoder":
        model, params = decoder
        inputs, stacks, widths = {"inputs": TOKENS}, ["decoder"], (4, HIDDEN)
    else:  # one encoder layer, then one decoder layer
        model = models.create(name, tiny=True, **TINY)
        inputs = {"inputs": TOKENS, "decoder_inputs": TOKENS[:, ::-1]}
        stacks, widths, params = ["encoder", "decoder"], (8, 4), _params(model, **inputs)
    params = _float64(params)
    zeroed = jax.tree.map(lambda p: p, params)
    layers = [(stack, ffn) for stack in stacks for ffn in _ffn_names(params, stack)]
    for (stack, ffn), width in zip(layers, widths, strict=True):
        zeroed[stack][ffn] = _zero_rows_past(params[stack][ffn], width)

    # The model's ffn_widths field gives its widths to a call that passes none.
    with_field = model.clone(ffn_widths=widths)

    @jax.jit
    def outputs(params, zeroed):
        return model.apply({"params": zeroed}, **inputs), with_field.apply(
            {"params": params}, **inputs
        )

    expected, got = outputs(params, zeroed)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-12, atol=1e-12)


def test_generation_at_a_width_equals_recomputation(decoder):
    """``generate`` passes no width: the model's ``ffn_widths`` field carries it into every
    cached step, whose logits then equal a full pass at that width over the final tokens."""
    model, params = decoder
    widths = (4, 8)
    prompts = jnp.array([[3, 1, 4], [1, 5, 0]], jnp.int32)
    out = generate(
        model.clone(ffn_widths=widths), params, prompts, [3, 2], max_new_tokens=3,
        return_logits=True,
    )  # fmt: skip
    # Full passes over the final tokens (row t - 1 predicts token t), at the widths and full.
    full_passes = jax.jit(
        lambda tokens: model.apply({"params": params}, tokens, ffn_granularities=(widths, HIDDEN))[
            :, :, :-1
        ]
    )
    expected, full_width = np.asarray(full_passes(out.sequences))
    np.testing.assert_allclose(np.asarray(out.logits)[:, 1:], expected, rtol=1e-5, atol=1e-6)
    assert np.abs(full_width - expected).max() > 1e-4


# ----------------------------------------------------------------- the multi-granularity loss


def _causal_lm_task(matformer_widths):
    config = ml_collections.ConfigDict({"name": "causal_lm", "matformer_widths": matformer_widths})
    return create_task(config, types.SimpleNamespace(vocab_size=TINY["vocab_size"]))


def _next_token_nll(logits, tokens):
    """Mean NLL of tokens[:, 1:] under logits[:, :-1], numpy float64."""
    logits = np.asarray(logits, np.float64)[:, :-1]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    targets = np.asarray(tokens)[:, 1:]
    return -np.take_along_axis(log_probs, targets[..., None], -1).mean()


def test_loss_is_the_sum_of_the_granularities_losses(decoder):
    granularities = (0.25, (4, 8), HIDDEN)
    task = _causal_lm_task(granularities)
    model, params = decoder
    plain = _causal_lm_task(())
    batch = {"inputs": TOKENS}

    @jax.jit
    def outputs(params):
        run = lambda **kwargs: model.apply({"params": params}, TOKENS, **kwargs)
        joint = model.apply({"params": params}, **task.model_inputs(batch))
        separate = [run(ffn_widths=widths) for widths in granularities]
        return (
            joint,
            task.loss_and_metrics(joint, batch),
            separate,
            run(),
            plain.model_inputs(batch),
        )

    joint, (loss_sum, weight, metrics), separate, logits, plain_inputs = outputs(params)
    assert joint.shape == (3, *TOKENS.shape, TINY["vocab_size"])
    by_hand = {
        label: _next_token_nll(one, TOKENS)
        for label, one in zip(("ffn_0.25", "ffn_4-8", "ffn_16"), separate, strict=True)
    }
    assert float(weight) == TOKENS.shape[0] * (TOKENS.shape[1] - 1)
    np.testing.assert_allclose(float(loss_sum / weight), sum(by_hand.values()), rtol=1e-5)
    total, count = metrics["loss"]
    np.testing.assert_allclose(float(total / count), sum(by_hand.values()), rtol=1e-5)
    for label, value in by_hand.items():
        total, count = metrics[f"{label}/loss"]
        np.testing.assert_allclose(float(total / count), value, rtol=1e-5)
        assert f"{label}/accuracy" in metrics
    # Without the option the task is unchanged: one output, its own loss.
    assert set(plain_inputs) == {"inputs"}
    plain_sum, plain_weight, _ = plain.loss_and_metrics(logits, batch)
    np.testing.assert_allclose(float(plain_sum / plain_weight), by_hand["ffn_16"], rtol=1e-5)


def test_gradients_reach_the_shared_units_from_every_granularity(decoder, x64):
    """Each granularity's loss moves exactly its own hidden units of every layer's W1: the
    first units get gradient from all granularities, the last only from the full width."""
    model, params = decoder
    params = _float64(params)
    granularities = (4, HIDDEN)

    @jax.jit
    def per_granularity_gradients(params):
        def losses(params):  # [G]: the loss of each granularity, from one stacked call
            logits = model.apply({"params": params}, TOKENS, ffn_granularities=granularities)
            return jnp.stack([_jax_nll(one) for one in logits])

        return jax.jacrev(losses)(params)

    gradients = per_granularity_gradients(params)
    for layer in _ffn_names(params):
        w1 = np.asarray(gradients["decoder"][layer]["fc1"]["kernel"])  # [G, D, HIDDEN]
        for index, width in enumerate(granularities):
            assert np.all(np.abs(w1[index, :, :width]).sum(0) > 0), width  # every used unit
            assert np.all(w1[index, :, width:] == 0), width  # no unused unit
        # and the shared W2 rows, too
        w2 = np.asarray(gradients["decoder"][layer]["fc2"]["kernel"])
        assert np.all(np.abs(w2[:, :4]).sum(-1) > 0)


def _jax_nll(logits):
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(log_probs, TOKENS[:, 1:, None], -1).mean()


# ----------------------------------------------------------------------------- bad widths


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ffn_widths=0), r"ffn_widths must be an int in \[1, ffn_hidden_dim=16\]"),
        (dict(ffn_widths=17), r"ffn_widths must be an int in \[1, ffn_hidden_dim=16\].*got 17"),
        (dict(ffn_widths=0.3), r"whole number; got 0.3"),
        (dict(ffn_widths=1.5), r"got 1.5"),
        (dict(ffn_widths=True), r"got True of type bool"),
        (dict(ffn_widths=jnp.array(4)), r"Python numbers, not arrays"),
        (dict(ffn_widths=(4, 8, 16)), r"num_layers=2 entries, got 3"),
        (dict(ffn_widths=(4, 0)), r"ffn_widths\[1\] must be"),
        (dict(ffn_granularities=(4, 99)), r"ffn_granularities\[1\]: ffn_widths must be"),
        (dict(ffn_granularities=(4, None)), r"ffn_granularities\[1\] is None"),
        (dict(ffn_granularities=()), r"non-empty sequence"),
        (dict(ffn_widths=4, ffn_granularities=(4,)), r"not both"),
    ],
)
def test_bad_widths_are_refused(kwargs, message):
    model = _decoder()
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.PRNGKey(0), TOKENS, **kwargs)


def test_granularities_are_refused_when_decoding_and_in_the_config():
    model = _decoder()
    with pytest.raises(ValueError, match="decode=True keeps one KV cache"):
        model.init(
            jax.random.PRNGKey(0), TOKENS, positions=TOKENS, decode=True, ffn_granularities=(4,)
        )
    with pytest.raises(ValueError, match=r"matformer_widths\[1\] must be a positive int"):
        _causal_lm_task((0.5, -2))
    with pytest.raises(ValueError, match=r"matformer_widths\[0\]: a float .* \(0, 1\]"):
        _causal_lm_task((2.0,))
    with pytest.raises(ValueError, match="names a granularity twice"):
        _causal_lm_task((0.5, 0.5))
    # A model without nested FFN widths is refused when the experiment is built.
    config = default_config()
    config.model.name, config.model.tiny, config.data.name = "mamba_classifier", True, "digits"
    config.task.name, config.global_batch_size, config.num_train_steps = (
        "image_classification",
        8,
        1,
    )
    config.task.matformer_widths = (0.5, 1.0)
    validate_config(config)  # the widths' form is fine
    with pytest.raises(ValueError, match="needs a model with nested FFN widths"):
        build_experiment(config)


# ------------------------------------------------------------------------------ Mix'n'Match


def test_resolve_ffn_widths():
    assert resolve_ffn_widths(None, 3, 64) == (None, None, None)
    assert resolve_ffn_widths(0.25, 2, 64) == (16, 16)
    assert resolve_ffn_widths((8, 0.5, 1.0), 3, 64) == (8, 32, 64)


def test_mix_n_match_heuristic_against_brute_force():
    sizes, layers = (32, 64, 128, 256), 4
    assert mix_n_match_widths(sizes, layers, 4 * 64) == (64, 64, 64, 64)
    assert mix_n_match_widths(sizes, layers, 4 * 64 + 2 * 64 + 10) == (64, 64, 128, 128)
    assert mix_n_match_widths(sizes, layers, 5000) == (256,) * 4
    # Among all non-decreasing choices that use at most two neighbouring sizes, the
    # heuristic's is the largest within the budget.
    family = [
        choice
        for choice in itertools.product(sizes, repeat=layers)
        if list(choice) == sorted(choice) and sizes.index(choice[-1]) - sizes.index(choice[0]) <= 1
    ]
    for budget in range(layers * sizes[0], layers * sizes[-1] + 1, 8):
        widths = mix_n_match_widths(sizes, layers, budget)
        best = max(sum(choice) for choice in family if sum(choice) <= budget)
        assert widths in family and sum(widths) == best, budget
    with pytest.raises(ValueError, match="budget must be an int >= .* = 128"):
        mix_n_match_widths(sizes, layers, 127)
    with pytest.raises(ValueError, match="granularities must be one or more positive int"):
        mix_n_match_widths((0.5, 1.0), layers, 300)
