"""Language models: layer patterns, causality, cross-attention support, packing, MLM, presets."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer import models
from effformer.data.packing import pack_sequences
from effformer.models.lm_layers import (
    LayerSpec,
    LayerStack,
    attention_window,
    expand_layer_pattern,
    segment_positions,
)
from effformer.models.transformer_lm import ETTIN_SIZES, TransformerLM
from effformer.train.tasks import CausalLMTask, MaskedLMTask

TINY = dict(vocab_size=32, embed_dim=16, num_heads=2, ffn_hidden_dim=32, max_length=64)


def _init(model, **inputs):
    return model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, **inputs)


def _embedding_jacobian(model, variables, inputs, out_indices, **kwargs):
    """|d sum(logits[0, t]) / d token-embedding| summed over D, [len(out_indices), L].

    One compiled VJP (a perturbation on nn.Embed), vmapped over one-hot cotangents at
    the output positions t in out_indices, so every position costs no new compilation.
    """
    length = inputs.shape[1]

    def per_position(delta):
        def add_delta(next_fun, args, call_kwargs, context):
            out = next_fun(*args, **call_kwargs)
            is_embedding = (
                isinstance(context.module, nn.Embed) and context.method_name == "__call__"
            )
            if is_embedding and out.shape[:2] == inputs.shape:
                return out + delta[None]
            return out

        with nn.intercept_methods(add_delta):
            logits = model.apply(variables, inputs, **kwargs)
        return jnp.sum(logits[0], axis=-1)  # [L]: sum(logits[0, t]) for every t

    @jax.jit
    def reach(cotangents):
        _, vjp = jax.vjp(per_position, jnp.zeros((length, model.embed_dim)))
        return jnp.abs(jax.vmap(lambda c: vjp(c)[0])(cotangents)).sum(-1)

    return np.asarray(reach(jax.nn.one_hot(jnp.asarray(out_indices), length)))


# ---------------------------------------------------------------------------- patterns


def test_pattern_string_is_a_cycle_and_overrides_replace_layers():
    specs = expand_layer_pattern("global,local:128,local:128", 7)
    assert [str(s) for s in specs] == ["global", "local:128", "local:128"] * 2 + ["global"]
    specs = expand_layer_pattern("local:256", 4, {0: "global", "3": "mamba"})
    assert specs == (
        LayerSpec("global"),
        LayerSpec("local", 256),
        LayerSpec("local", 256),
        LayerSpec("mamba"),
    )
    assert expand_layer_pattern(["mamba", "global"], 2)[0].kind == "mamba"


@pytest.mark.parametrize(
    "pattern, num_layers, overrides, message",
    [
        ("global,flash", 2, None, "unknown mixer; expected one of"),
        ("local", 2, None, "'local:W' with W a positive int"),
        ("local:0", 2, None, "'local:W' with W a positive int"),
        ("global", 3, {3: "global"}, r"layer index must be in \[0, 3\), got 3"),
        ("global", 3, {-1: "global"}, r"layer index must be in \[0, 3\)"),
        (["global", "global"], 3, None, "needs num_layers=3 entries, got 2"),
        ("global", 0, None, "num_layers must be a positive int"),
    ],
)
def test_bad_patterns_raise(pattern, num_layers, overrides, message):
    with pytest.raises(ValueError, match=message):
        expand_layer_pattern(pattern, num_layers, overrides)


def test_the_pattern_builds_the_layers_it_says():
    model = TransformerLM(
        num_layers=3,
        layer_pattern="mamba,global",
        layer_overrides={2: "local:2"},
        mixer_kwargs={"mamba": {"d_state": 4}},
        **TINY,
    )
    inputs = jnp.arange(8, dtype=jnp.int32)[None] % 32
    params = jax.eval_shape(lambda: _init(model, inputs=inputs))["params"]["decoder"]
    assert "A_log" in params["layer_0_mamba"]
    assert "query" in params["layer_1_attention"] and "query" in params["layer_2_attention"]
    assert "layer_0_attention" not in params and "layer_1_mamba" not in params
    # Layer 2 is local with window 2: with only that layer, position t sees t-1 and t.
    local = TransformerLM(num_layers=1, layer_pattern="local:2", **TINY)
    variables = _init(local, inputs=inputs)
    (reach,) = _embedding_jacobian(local, variables, inputs, [5]) > 0
    np.testing.assert_array_equal(reach, (np.arange(8) >= 4) & (np.arange(8) <= 5))
    bidirectional = TransformerLM(kind="encoder", num_layers=1, layer_pattern="local:4", **TINY)
    variables = _init(bidirectional, inputs=inputs)
    (reach,) = _embedding_jacobian(bidirectional, variables, inputs, [4]) > 0
    np.testing.assert_array_equal(reach, (np.arange(8) >= 2) & (np.arange(8) <= 6))


# ---------------------------------------------------------------------------- causality


@pytest.mark.parametrize(
    "pattern, position_encoding",
    [("global", "rope"), ("local:3,global", "alibi"), ("mamba,global", "learned")],
)
def test_decoder_is_causal_by_gradient(pattern, position_encoding):
    model = TransformerLM(
        num_layers=2,
        layer_pattern=pattern,
        position_encoding=position_encoding,
        mixer_kwargs={"mamba": {"d_state": 4}},
        **TINY,
    )
    inputs = jax.random.randint(jax.random.PRNGKey(2), (1, 10), 0, 32)
    variables = _init(model, inputs=inputs)
    positions = (0, 4, 9)
    for t, reach in zip(
        positions, _embedding_jacobian(model, variables, inputs, positions), strict=True
    ):
        assert np.all(reach[t + 1 :] == 0), f"position {t} depends on later tokens"
        assert np.all(reach[: t + 1] > 0), f"position {t} misses an earlier token"


def test_encoder_sees_both_sides_and_prefix_lm_sees_its_prefix():
    inputs = jax.random.randint(jax.random.PRNGKey(3), (1, 8), 0, 32)
    encoder = TransformerLM(kind="encoder", num_layers=2, **TINY)
    variables = _init(encoder, inputs=inputs)
    assert np.all(_embedding_jacobian(encoder, variables, inputs, [2]) > 0)

    prefix = TransformerLM(kind="prefix_lm", num_layers=2, **TINY)
    lengths = jnp.array([3])
    variables = _init(prefix, inputs=inputs, prefix_lengths=lengths)
    kwargs = dict(prefix_lengths=lengths)
    inside, after = _embedding_jacobian(prefix, variables, inputs, [0, 5], **kwargs) > 0
    np.testing.assert_array_equal(inside, np.arange(8) < 3)  # the prefix, both ways
    np.testing.assert_array_equal(after, np.arange(8) <= 5)  # prefix + causal


@pytest.mark.parametrize(
    "mixer, mixer_kwargs",
    [
        ("ecoformer", {"num_heads": 2, "num_bits": 4, "num_anchors": 3}),
        ("combiner", {"num_heads": 2, "variant": "fixed", "segment_length": 4}),
    ],
)
def test_mixers_with_a_causal_field_follow_the_stack(mixer, mixer_kwargs):
    # Both mixers default to causal=True; an encoder stack must make them bidirectional
    # (it passes non-attention mixers no causal mask), and a decoder must stay causal.
    inputs = jax.random.randint(jax.random.PRNGKey(3), (1, 8), 0, 32)
    fields = dict(TINY, num_layers=1, layer_pattern=mixer, position_encoding="learned")
    fields["mixer_kwargs"] = {mixer: mixer_kwargs}
    encoder = TransformerLM(kind="encoder", **fields)
    assert np.all(_embedding_jacobian(encoder, _init(encoder, inputs=inputs), inputs, [2]) > 0)
    decoder = TransformerLM(kind="decoder", **fields)
    reach = _embedding_jacobian(decoder, _init(decoder, inputs=inputs), inputs, [2])[0] > 0
    np.testing.assert_array_equal(reach, np.arange(8) <= 2)
    leaky = TransformerLM(kind="decoder", **{**fields, "mixer_kwargs": {
        mixer: {**mixer_kwargs, "causal": False}}})  # fmt: skip
    with pytest.raises(ValueError, match="causal=False in mixer_kwargs inside a causal stack"):
        _init(leaky, inputs=inputs)


def test_encoder_decoder_cross_attention_sees_the_whole_source_and_no_padding():
    model = models.create("lm_encoder_decoder", tiny=True, num_decoder_layers=2)
    source = jnp.array([[5, 6, 7, 8, 9, 0, 0]], jnp.int32)  # 0 = padding
    target = jnp.array([[1, 2, 3, 4]], jnp.int32)
    variables = _init(model, inputs=source, decoder_inputs=target)

    def per_position(deltas):
        """Per target position t: sum(logits[0, t]), with deltas added to the embeddings."""
        source_delta, target_delta = deltas

        def add(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(context.module, nn.Embed):
                if out.shape[1] == source.shape[1]:
                    return out + source_delta[None]
                if out.shape[1] == target.shape[1]:
                    return out + target_delta[None]
            return out

        with nn.intercept_methods(add):
            return jnp.sum(model.apply(variables, source, target)[0], axis=-1)

    @jax.jit
    def reach(cotangents):  # One compiled VJP for both checks.
        zeros = (
            jnp.zeros((source.shape[1], model.embed_dim)),
            jnp.zeros((target.shape[1], model.embed_dim)),
        )
        _, vjp = jax.vjp(per_position, zeros)
        grads = jax.vmap(lambda c: vjp(c)[0])(cotangents)
        return jax.tree.map(lambda g: jnp.abs(g).sum(-1), grads)

    source_reach, decoder_reach = reach(jax.nn.one_hot(jnp.array([0, 1]), target.shape[1]))
    reach = np.asarray(source_reach[0])  # of the first target token
    assert np.all(reach[:5] > 0), "the first target token must see every real source token"
    assert np.all(reach[5:] == 0), "padding source tokens must be invisible"
    # The decoder itself stays causal (target token 1 sees target tokens 0 and 1).
    np.testing.assert_array_equal(np.asarray(decoder_reach[1]) > 0, np.arange(4) <= 1)


# ---------------------------------------------------------------------------- packing


def _random_sequences(key, lengths, vocab):
    keys = jax.random.split(key, len(lengths))
    return [
        np.asarray(jax.random.randint(k, (n,), 1, vocab))
        for k, n in zip(keys, lengths, strict=True)
    ]


@pytest.mark.parametrize("pattern, position_encoding", [("local:3,global", "learned")])
def test_packed_batch_equals_padded_batch_losses_and_gradients(pattern, position_encoding):
    model = TransformerLM(
        num_layers=2, layer_pattern=pattern, position_encoding=position_encoding, **TINY
    )
    sequences = _random_sequences(jax.random.PRNGKey(4), [5, 3, 7, 2, 4], 32)
    packed = {k: jnp.asarray(v) for k, v in pack_sequences(sequences, 10).items()}
    assert packed["inputs"].shape[0] < len(sequences)
    width = max(map(len, sequences))
    padded_inputs = np.zeros((len(sequences), width), np.int32)
    for row, sequence in enumerate(sequences):
        padded_inputs[row, : len(sequence)] = sequence
    padded = {
        "inputs": jnp.asarray(padded_inputs),
        "weights": jnp.asarray(padded_inputs != 0, jnp.float32),
    }
    params = _init(model, inputs=packed["inputs"])["params"]
    task = CausalLMTask(ml_collections.ConfigDict({"name": "causal_lm"}), None)

    @jax.jit
    def loss_grads_logits(params, batch):  # One compilation per layout.
        def loss(params):
            logits = model.apply({"params": params}, **task.model_inputs(batch))
            loss_sum, count = task.loss_and_metrics(logits, batch)[:2]
            return loss_sum, (count, logits)

        (loss_sum, (count, logits)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return loss_sum, count, grads, logits

    packed_sum, packed_count, packed_grads, packed_logits = loss_grads_logits(params, packed)
    padded_sum, padded_count, padded_grads, padded_logits = loss_grads_logits(params, padded)
    # Every sequence of n tokens scores n - 1 next-token predictions in both layouts.
    assert float(packed_count) == float(padded_count) == sum(len(s) - 1 for s in sequences)
    np.testing.assert_allclose(packed_sum, padded_sum, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        packed_grads,
        padded_grads,
    )
    # Per sequence: the logits of each sequence are the same in both layouts
    # (first-fit reorders the sequences; their lengths are distinct and identify them).
    segments = np.asarray(packed["segment_ids"])
    seen = []
    for row in range(segments.shape[0]):
        for segment in range(1, segments[row].max() + 1):
            in_segment = segments[row] == segment
            index = [len(s) for s in sequences].index(int(in_segment.sum()))
            np.testing.assert_array_equal(packed["inputs"][row][in_segment], sequences[index])
            np.testing.assert_allclose(
                packed_logits[row][in_segment],
                padded_logits[index, : len(sequences[index])],
                rtol=1e-4,
                atol=1e-5,
            )
            seen.append(index)
    assert sorted(seen) == list(range(len(sequences)))


def test_segment_positions_restart_in_every_segment():
    segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(segment_positions(segments), [[0, 1, 2, 0, 1, 0, 0, 1]])


# ---------------------------------------------------------------------------- MLM


def test_masked_lm_scores_only_masked_positions():
    vocab, mask_token = 32, 31
    model = models.create("lm_encoder", tiny=True, vocab_size=vocab)
    info = types.SimpleNamespace(vocab_size=vocab)
    config = ml_collections.ConfigDict(
        {"name": "masked_lm", "mask_token_id": mask_token, "mask_rate": 0.15}
    )
    task = MaskedLMTask(config, info)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (16, 64), 1, mask_token)
    tokens = tokens.at[:, 56:].set(0)  # padding is never chosen
    batch = task.prepare_batch({"inputs": tokens}, jax.random.PRNGKey(6), train=True)
    chosen = np.asarray(batch["weights"]) > 0
    assert not chosen[:, 56:].any()
    assert abs(chosen[:, :56].mean() - 0.15) < 0.035
    corrupted = np.asarray(batch["inputs"])
    assert (corrupted[chosen] == mask_token).mean() == pytest.approx(0.8, abs=0.1)
    np.testing.assert_array_equal(corrupted[~chosen], np.asarray(tokens)[~chosen])

    params = _init(model, inputs=batch["inputs"])["params"]

    @jax.jit
    def loss_grad_wrt_logits(params, batch):  # One compilation.
        logits = model.apply({"params": params}, **task.model_inputs(batch))
        return jax.grad(lambda x: task.loss_and_metrics(x, batch)[0])(logits)

    grad = loss_grad_wrt_logits(params, batch)
    per_position = np.asarray(jnp.abs(grad).sum(-1))
    assert np.all(per_position[~chosen] == 0) and np.all(per_position[chosen] > 0)


# ---------------------------------------------------------------------------- presets, heads


@pytest.mark.parametrize("size", ["17m", "32m", "68m", "150m", "400m", "1b"])
def test_ettin_presets_have_their_published_parameter_counts(size):
    model = models.create(f"ettin_decoder_{size}")
    layers, hidden, intermediate, heads = ETTIN_SIZES[size]
    assert (model.num_layers, model.embed_dim, model.num_heads) == (layers, hidden, heads)
    shapes = jax.eval_shape(lambda: _init(model, inputs=jnp.ones((1, 4), jnp.int32)))
    count = sum(x.size for x in jax.tree.leaves(shapes["params"]))
    nominal = {"17m": 17e6, "32m": 32e6, "68m": 68e6, "150m": 150e6, "400m": 400e6, "1b": 1e9}
    assert abs(count / nominal[size] - 1) < 0.06, count
    assert all("bias" not in "/".join(map(str, path)) for path, _ in
               jax.tree_util.tree_flatten_with_path(shapes["params"])[0])  # fmt: skip


def test_ettin_local_layers_see_modernberts_left_half_window_in_the_decoder():
    # ModernBERT's 128-token window is 64 keys either side; Ettin's decoder keeps the left 64
    # (Hugging Face's ModernBertDecoderConfig: sliding_window = local_attention // 2).
    windows = {}
    for kind in ("encoder", "decoder"):
        model = models.create(f"ettin_{kind}_17m")
        specs = expand_layer_pattern(model.layer_pattern, model.num_layers, None)
        assert [spec.kind for spec in specs[:3]] == ["global", "local", "local"]
        windows[kind] = attention_window(specs[1], causal=model.causal)
    assert windows["encoder"] == (64, 64)
    assert windows["decoder"] == (63, 0)  # the query and the 63 keys before it: 64 keys


def test_gqa_classifier_and_untied_head_shapes():
    model = TransformerLM(
        kind="encoder", num_layers=1, num_kv_heads=1, num_classes=3, pooling="mean", **TINY
    )
    inputs = jnp.ones((2, 6), jnp.int32)
    segments = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    # Shapes only: abstract evaluation traces the same code without compiling it.
    variables = jax.eval_shape(lambda: _init(model, inputs=inputs, segment_ids=segments))
    logits = jax.eval_shape(lambda v: model.apply(v, inputs, segment_ids=segments), variables)
    assert logits.shape == (2, 3)
    key_kernel = variables["params"]["encoder"]["layer_0_attention"]["key"]["kernel"]
    assert key_kernel.shape == (16, 1, 8)
    untied = TransformerLM(num_layers=1, tie_embeddings=False, **TINY)
    variables = jax.eval_shape(lambda: _init(untied, inputs=inputs))
    assert variables["params"]["lm_head"]["kernel"].shape == (16, 32)


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    # The checks run while tracing, so abstract evaluation raises them without compiling.
    def apply(model, variables, *args, **kwargs):
        return jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), variables)

    def init(model, **inputs):
        return jax.eval_shape(lambda: _init(model, **inputs))

    model = TransformerLM(num_layers=1, **TINY)
    inputs = jnp.ones((2, 6), jnp.int32)
    variables = init(model, inputs=inputs)
    with pytest.raises(ValueError, match=r"inputs must be integer token ids \[B, L\]"):
        apply(model, variables, jnp.ones((2, 6)))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(2, 6\), got \(2, 5\)"):
        apply(model, variables, inputs, segment_ids=jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="prefix_lengths is only for kind='prefix_lm'"):
        apply(model, variables, inputs, prefix_lengths=jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match="decode=True needs explicit positions"):
        apply(model, variables, inputs, decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match="kind must be one of"):
        init(TransformerLM(kind="seq2seq", num_layers=1, **TINY), inputs=inputs)
    with pytest.raises(ValueError, match="decode=True needs kind='decoder' or 'prefix_lm'"):
        apply(TransformerLM(kind="encoder", num_layers=1, **TINY), variables, inputs,
              positions=inputs, decode=True, mutable=["cache"])  # fmt: skip
    # A stack whose caches do not record mask positions cannot decode with them.
    stack = LayerStack(num_layers=1, num_heads=2, ffn_hidden_dim=8, max_decode_length=4)
    x, positions = jnp.zeros((2, 1, 8)), jnp.zeros((2, 1), jnp.int32)
    with pytest.raises(ValueError, match="decode=True with mask_positions needs prefix_lm=True"):
        jax.eval_shape(lambda: stack.init(jax.random.PRNGKey(0), x, positions=positions,
                                          mask_positions=positions, decode=True))  # fmt: skip
    with pytest.raises(ValueError, match="'mamba', a causal-only mixer, in a bidirectional"):
        init(TransformerLM(kind="encoder", num_layers=1, layer_pattern="mamba", **TINY),
             inputs=inputs)  # fmt: skip
    enc_dec = models.create("lm_encoder_decoder", tiny=True)
    variables = init(enc_dec, **enc_dec.dummy_inputs(2))
    with pytest.raises(ValueError, match="decoder_inputs batch must equal inputs batch 2, got 3"):
        apply(enc_dec, variables, inputs, jnp.ones((3, 4), jnp.int32))
