"""Cached generation equals recomputing the whole sequence at every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer import models
from effformer.models.generate import generate, generate_seq2seq, sample_logits

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
# position table, and Mamba's recurrent state next to a global attention cache.
DECODERS = {
    "rope_local_block": (
        "lm_decoder",
        dict(layer_pattern="block:3,local:3", position_encoding="rope"),
    ),
    "learned": ("lm_decoder", dict(num_layers=1, position_encoding="learned")),
    "hybrid_mamba": ("lm_hybrid_mamba", dict(num_layers=2, layer_pattern="mamba,global")),
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
            greedy = generate(model, variables["params"], PROMPTS, LENGTHS, max_new_tokens=NEW,
                              return_logits=True)  # fmt: skip
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
    with pytest.raises(ValueError, match="kind='decoder', got TransformerLM kind='encoder'"):
        generate(encoder, params, PROMPTS, LENGTHS, max_new_tokens=NEW)
