"""Cached generation equals recomputing the whole sequence at every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer import models
from effformer.mixers import attention as attention_module
from effformer.mixers.attention import MultiHeadAttention
from effformer.models import generate as generate_module
from effformer.models.generate import generate, generate_seq2seq, sample_logits
from effformer.nn.position import make_position_encoding
from effformer.ops.masks import AttentionMask

PROMPTS = jnp.array([[5, 6, 7, 8], [9, 10, 0, 0], [3, 0, 0, 0]], jnp.int32)
LENGTHS = [4, 2, 1]
NEW = 4


def _init(model):
    return model.init(jax.random.PRNGKey(0), **model.dummy_inputs(2))


def _recompute(full_logits, prompts, lengths, new, choose):
    """The slow twin: run the whole (right-padded) sequence again for every position.

    full_logits(tokens [B, T]) -> [B, T, V]; choose(t, logits [B, V]) -> tokens [B].
    Returns (tokens [B, P + new], logits [B, P + new, V] with row t predicting token t).
    """
    batch, width = prompts.shape
    tokens = np.array(jnp.pad(prompts, ((0, 0), (0, new))))
    scores = None
    for t in range(1, width + new):
        logits = np.asarray(full_logits(jnp.asarray(tokens)))[:, t - 1]
        if scores is None:
            scores = np.zeros((batch, width + new, logits.shape[-1]), np.float32)
        scores[:, t] = logits
        chosen = np.asarray(choose(t, jnp.asarray(logits)))
        for row in range(batch):
            if t >= lengths[row]:
                tokens[row, t] = chosen[row]
    return tokens, scores


# Each case is a separate cache path: RoPE with block-local and local-window caches, a learned
# position table, and Mamba's and the LMU's recurrent states next to a global attention cache.
DECODERS = {
    "rope_local_block": (
        "lm_decoder",
        dict(layer_pattern="block:3,local:3", position_encoding="rope"),
    ),
    "learned": ("lm_decoder", dict(num_layers=1, position_encoding="learned")),
    "hybrid_mamba": ("lm_hybrid_mamba", dict(num_layers=2, layer_pattern="mamba,global")),
    "hybrid_lmu": (
        "lm_decoder",
        dict(layer_pattern="lmu,global", mixer_kwargs={"lmu": {"order": 4, "theta": 6.0}}),
    ),
    # EcoFormer's running sums, and its hash functions read from model_state.
    "hybrid_ecoformer": (
        "lm_decoder",
        dict(
            layer_pattern="ecoformer,global",
            mixer_kwargs={"ecoformer": {"num_heads": 2, "num_bits": 4, "num_anchors": 3}},
        ),
    ),
}


@pytest.fixture(scope="module")
def decoder():
    """case -> (model, variables, jitted full apply, greedy output), each built once."""
    built = {}

    def get(case):
        if case not in built:
            name, overrides = DECODERS[case]
            model = models.create(name, tiny=True, **overrides)
            variables = _init(model)
            apply = jax.jit(lambda tokens: model.apply(variables, tokens))
            model_state = {k: v for k, v in variables.items() if k != "params"}
            greedy = generate(model, variables["params"], PROMPTS, LENGTHS, max_new_tokens=NEW,
                              return_logits=True, model_state=model_state)  # fmt: skip
            built[case] = model, variables, apply, greedy
        return built[case]

    return get


@pytest.mark.parametrize("case", list(DECODERS))
def test_greedy_cached_generation_equals_recomputation(decoder, case):
    _, _, apply, out = decoder(case)
    tokens, scores = _recompute(
        apply, PROMPTS, LENGTHS, NEW, lambda t, logits: jnp.argmax(logits, -1)
    )
    np.testing.assert_array_equal(out.sequences, tokens)
    np.testing.assert_allclose(out.logits[:, 1:], scores[:, 1:], rtol=1e-4, atol=1e-5)
    for row, length in enumerate(LENGTHS):
        np.testing.assert_array_equal(out.new_tokens[row], tokens[row, length : length + NEW])
    # The prompt tokens are kept as given.
    for row, length in enumerate(LENGTHS):
        np.testing.assert_array_equal(out.sequences[row, :length], PROMPTS[row, :length])


def test_top_k_sampling_equals_recomputation_and_stays_in_the_top_k(decoder):
    model, variables, apply, _ = decoder("rope_local_block")
    rng = jax.random.PRNGKey(7)
    kwargs = dict(temperature=0.8, top_k=3)
    out = generate(model, variables["params"], PROMPTS, LENGTHS, max_new_tokens=NEW, rng=rng,
                   return_logits=True, **kwargs)  # fmt: skip
    sample = jax.jit(lambda logits, key: sample_logits(logits, key, **kwargs))
    tokens, scores = _recompute(
        apply,
        PROMPTS,
        LENGTHS,
        NEW,
        lambda t, logits: sample(logits, jax.random.fold_in(rng, t)),
    )
    np.testing.assert_array_equal(out.sequences, tokens)
    for row, length in enumerate(LENGTHS):
        for t in range(length, PROMPTS.shape[1] + NEW):
            top3 = np.argsort(scores[row, t])[-3:]
            assert tokens[row, t] in top3


def test_sampling_rules():
    logits = jnp.array([[0.0, 3.0, 1.0, 2.0]])
    assert int(sample_logits(logits, jax.random.PRNGKey(0))[0]) == 1
    samples = jax.jit(jax.vmap(
        lambda k: sample_logits(logits, k, temperature=1.0, top_k=2)[0]
    ))(jax.random.split(jax.random.PRNGKey(1), 200))  # fmt: skip
    assert set(np.asarray(samples).tolist()) == {1, 3}
    top1 = sample_logits(logits, jax.random.PRNGKey(2), temperature=5.0, top_k=1)
    assert int(top1[0]) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1.0),  # would sample the least likely tokens most often
        dict(temperature=float("nan")),
        dict(temperature=float("inf")),
        dict(temperature=True),
        dict(temperature=1.0, top_k=0),
        dict(temperature=1.0, top_k=5),
        dict(temperature=1.0, top_k=True),
    ],
)
def test_sampling_refuses_bad_settings(kwargs):
    logits = jnp.array([[0.0, 3.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match=r"sample_logits: (temperature|top_k) must be"):
        sample_logits(logits, jax.random.PRNGKey(0), **kwargs)
    with pytest.raises(ValueError, match=r"generate: (temperature|top_k) must be"):
        generate_module.check_sampling(kwargs["temperature"], kwargs.get("top_k"), 4)


def test_eos_pads_the_rest_of_a_row(decoder):
    model, variables, _, greedy = decoder("rope_local_block")
    params = variables["params"]
    eos = int(greedy.new_tokens[0, 0])
    out = generate(model, params, PROMPTS, LENGTHS, max_new_tokens=NEW, eos_id=eos, pad_id=63)
    for row in range(3):
        generated = np.asarray(out.new_tokens[row])
        hits = np.flatnonzero(generated == eos)
        if hits.size:
            assert np.all(generated[hits[0] + 1 :] == 63)
    assert np.all(np.asarray(out.new_tokens[0, 1:]) == 63)


def test_encoder_decoder_cached_generation_equals_recomputation():
    model = models.create("lm_encoder_decoder", tiny=True, num_decoder_layers=2,
                          decoder_pattern="global,local:2")  # fmt: skip
    variables = _init(model)
    source = jnp.array([[4, 5, 6, 0, 0], [7, 8, 9, 10, 11]], jnp.int32)
    prompts = jnp.array([[1, 12, 13], [1, 0, 0]], jnp.int32)
    lengths = [3, 1]
    out = generate_seq2seq(model, variables["params"], source, max_new_tokens=NEW,
                           decoder_prompts=prompts, decoder_prompt_lengths=lengths,
                           return_logits=True)  # fmt: skip
    apply = jax.jit(lambda tokens: model.apply(variables, source, tokens))
    tokens, scores = _recompute(
        apply, prompts, lengths, NEW, lambda t, logits: jnp.argmax(logits, -1)
    )
    np.testing.assert_array_equal(out.sequences, tokens)
    np.testing.assert_allclose(out.logits[:, 1:], scores[:, 1:], rtol=1e-4, atol=1e-5)
    # Default decoder prompt: one start token per row.
    default = generate_seq2seq(model, variables["params"], source, max_new_tokens=2,
                               decoder_start_id=1)  # fmt: skip
    assert default.sequences.shape == (2, 3) and np.all(np.asarray(default.sequences[:, 0]) == 1)


def test_bad_generation_requests_raise(decoder):
    model, variables, _, _ = decoder("rope_local_block")
    params = variables["params"]
    with pytest.raises(ValueError, match="need 7 cached positions, more than the cache_length 5"):
        generate(model, params, PROMPTS, LENGTHS, max_new_tokens=NEW, cache_length=5)
    learned = models.create("lm_decoder", tiny=True, position_encoding="learned", max_length=6)
    with pytest.raises(ValueError, match="past the learned position table of max_length=6"):
        generate(learned, _init(learned)["params"], PROMPTS, LENGTHS, max_new_tokens=NEW)
    with pytest.raises(ValueError, match=r"prompt_lengths must be \[B=3\] ints in \[1, 4\]"):
        generate(model, params, PROMPTS, [4, 0, 1], max_new_tokens=NEW)
    with pytest.raises(ValueError, match="top_k must be None or in"):
        generate(model, params, PROMPTS, LENGTHS, max_new_tokens=NEW, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generate(model, params, PROMPTS, LENGTHS, max_new_tokens=0)
    encoder = models.create("lm_encoder", tiny=True)
    with pytest.raises(ValueError, match="kind='decoder' or 'prefix_lm', got TransformerLM kind="):
        generate(encoder, params, PROMPTS, LENGTHS, max_new_tokens=NEW)
    with pytest.raises(ValueError, match="prefix_lengths is only for kind='prefix_lm'"):
        generate(model, params, PROMPTS, LENGTHS, max_new_tokens=NEW, prefix_lengths=[1, 1, 1])
    with pytest.raises(ValueError, match=r"model_state holds the collections besides params"):
        generate(model, params, PROMPTS, LENGTHS, max_new_tokens=NEW, model_state=variables)


@pytest.mark.parametrize("lengths", [[4, 2.5, 1], [True, True, True], ["4", "2", "1"]])
def test_prompt_lengths_that_are_not_whole_numbers_are_refused(lengths):
    # A cast to int32 alone would run 2.5 as 2 and True as 1 without a word.
    with pytest.raises(ValueError, match=r"prompt_lengths must be \[B=3\] ints in \[1, 4\]"):
        generate_module.check_prompts(PROMPTS, lengths)
    np.testing.assert_array_equal(generate_module.check_prompts(PROMPTS, [4.0, 2, 1]), [4, 2, 1])


def test_prompts_without_tokens_are_refused():
    # Width 0 gave lengths 0 (against [1, P]) and then a ZeroDivisionError inside the loop.
    with pytest.raises(ValueError, match=r"prompts must hold at least one token per row"):
        generate_module.check_prompts(jnp.zeros((2, 0), jnp.int32), None)


# Prefix LM: the same layers as the "rope_local_block" decoder. The local window is measured
# on mask positions (the whole prefix counts as one place), so it needs the cache's record of
# each key's mask position; the blocks follow the tokens' own positions.
PREFIX_LM = ("lm_prefix", dict(layer_pattern="block:3,local:3", position_encoding="rope"))


def test_prefix_lm_generation_equals_recomputation_with_the_prefix():
    name, overrides = PREFIX_LM
    model = models.create(name, tiny=True, **overrides)
    variables = jax.jit(lambda: _init(model))()  # one compilation, not eager dispatch
    apply = jax.jit(
        lambda tokens, prefixes: model.apply(variables, tokens, prefix_lengths=prefixes)
    )
    greedy = lambda t, logits: jnp.argmax(logits, -1)  # noqa: E731
    traces = generate_module._TRACES["decoder"]
    # The whole prompt as the prefix (the default), then shorter prefixes (one of them empty,
    # i.e. causal): prefix_lengths are data, so both runs share one compilation.
    runs = []
    for prefixes in (None, [2, 1, 0]):
        out = generate(model, variables["params"], PROMPTS, LENGTHS, max_new_tokens=NEW,
                       prefix_lengths=prefixes, return_logits=True)  # fmt: skip
        rows = jnp.asarray(LENGTHS if prefixes is None else prefixes, jnp.int32)
        tokens, scores = _recompute(
            lambda t, rows=rows: apply(t, rows), PROMPTS, LENGTHS, NEW, greedy
        )
        np.testing.assert_array_equal(out.sequences, tokens)
        np.testing.assert_allclose(out.logits[:, 1:], scores[:, 1:], rtol=1e-4, atol=1e-5)
        runs.append(out)
    assert generate_module._TRACES["decoder"] == traces + 1  # the counter counts compilations
    # The prefix matters (the test would see a decoder's causal prompt as wrong).
    assert not np.allclose(runs[0].logits[:, 1:], runs[1].logits[:, 1:], atol=1e-3)


def test_prefix_lm_generation_rejects_a_prefix_longer_than_the_prompt_and_mamba_layers():
    name, overrides = PREFIX_LM
    model = models.create(name, tiny=True, **overrides)
    params = jax.eval_shape(lambda: _init(model))["params"]  # errors come before any compute
    with pytest.raises(ValueError, match=r"0 <= prefix_length <= prompt_length .*\[4, 2, 1\]\), "
                       r"got \[4, 3, 1\]"):  # fmt: skip
        generate(model, params, PROMPTS, LENGTHS, max_new_tokens=NEW, prefix_lengths=[4, 3, 1])
    with pytest.raises(ValueError, match="need 7 cached positions, more than the cache_length 6"):
        generate(model, params, PROMPTS, LENGTHS, max_new_tokens=NEW, cache_length=6)
    hybrid = models.create(name, tiny=True, layer_pattern="mamba,global")
    with pytest.raises(ValueError, match="a prefix LM decodes its prefix in one call"):
        generate(hybrid, params, PROMPTS, LENGTHS, max_new_tokens=NEW)


def test_second_generate_call_with_the_same_shapes_does_not_recompile(decoder):
    model, variables, _, first = decoder("learned")  # compiled by the fixture
    traces = dict(generate_module._TRACES)
    # Other prompts, prompt lengths, parameter values and key; an equal but new model object.
    params = jax.tree.map(lambda p: p * 1.5, variables["params"])
    twin = models.create(*DECODERS["learned"][0:1], tiny=True, **DECODERS["learned"][1])
    prompts = (PROMPTS + 1) % model.vocab_size
    again = generate(twin, params, prompts, [2, 3, 4], max_new_tokens=NEW, return_logits=True,
                     rng=jax.random.PRNGKey(3))  # fmt: skip
    assert dict(generate_module._TRACES) == traces
    assert not np.array_equal(again.sequences, first.sequences)


def _attention_steps(module, params, x, chunks):
    """Feed x [B, L, D] through module's cache in chunks; returns the concatenated outputs."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x[:, :1], decode=True))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
    outputs, start = [], 0
    for size in chunks:
        out, mutated = module.apply({"params": params, "cache": cache}, x[:, start : start + size],
                                    decode=True, mutable=["cache"])  # fmt: skip
        outputs.append(out)
        cache, start = mutated["cache"], start + size
    return jnp.concatenate(outputs, axis=1)


def test_split_k_decode_path_equals_the_masked_attention_and_is_taken_only_where_exact(
    x64, monkeypatch
):
    calls = []
    split_k = attention_module.decode_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return split_k(*args, **kwargs)

    monkeypatch.setattr(attention_module, "decode_attention", counted)
    fields = dict(num_heads=4, num_kv_heads=2, max_decode_length=6, dtype=jnp.float64,
                  param_dtype=jnp.float64, position_encoding=make_position_encoding("rope"))  # fmt: skip
    fast = MultiHeadAttention(**fields)
    dense = MultiHeadAttention(**fields, implementation="reference")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)))
    params = jax.jit(fast.init)(jax.random.PRNGKey(1), x)["params"]  # jitted: eager x64 is slow

    # One compilation for both paths; forward only (decode_attention's gradients are tested
    # against its reference in tests/ops/test_decode_attention.py).
    run = jax.jit(lambda params: [_attention_steps(m, params, x, [4, 1]) for m in (fast, dense)])
    fast_out, dense_out = run(params)
    assert len(calls) == 1  # the fast module's one-token step, none of the dense module's
    np.testing.assert_allclose(fast_out, dense_out, rtol=1e-12, atol=1e-12)

    # Not taken where the visible keys are not the slots up to the query's: a window, a bias,
    # mask positions (prefix LM), blocks (tested through generation above).
    step = x[:, :1]
    for module, mask in [
        (fast, AttentionMask(causal=True, window_left=1)),
        (MultiHeadAttention(**{**fields, "position_encoding": make_position_encoding("alibi")}),
         None),
        (MultiHeadAttention(**fields, decode_mask_positions=True),
         AttentionMask(causal=True, q_positions=jnp.zeros((2, 1), jnp.int32))),
    ]:  # fmt: skip
        variables = jax.eval_shape(
            lambda m=module: m.init(jax.random.PRNGKey(0), step, decode=True)
        )
        jax.eval_shape(
            lambda v, m=module, mask=mask: m.apply(v, step, mask=mask, decode=True, mutable=["cache"]),
            variables,
        )  # fmt: skip
    assert len(calls) == 1


def test_decode_mask_positions_are_required_when_the_cache_records_them():
    module = MultiHeadAttention(num_heads=2, max_decode_length=4, decode_mask_positions=True)
    x = jnp.zeros((2, 1, 8))
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, decode=True))
    assert variables["cache"]["cached_mask_positions"].shape == (2, 4)
    with pytest.raises(ValueError, match=r"needs the queries' mask positions in "
                       r"mask.q_positions \[B=2, L=1\], got None"):  # fmt: skip
        jax.eval_shape(lambda v: module.apply(v, x, decode=True, mutable=["cache"]), variables)
