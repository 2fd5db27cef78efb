"""CarelessWhisper: block-causal encoder (causality, KV-cached chunks vs a float64 dense-mask
reference), LoRA (merged == adapter, zero B == base), and the streaming decoder's rule."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from effformer import models
from effformer.models.careless_whisper import (
    PADDING_MASK_POSITION,
    LoRAFactors,
    greedy_transcribe,
    init_encoder_cache,
    lora_targets,
    merge_lora,
    stream_transcribe,
    token_emit_chunks,
)

_MODEL = models.create("careless_whisper", tiny=True)  # D 16, 2 heads, 1 + 1 layers, C 2, rank 2
_EOS = 2


@functools.cache
def _params(seed: int = 0, scale: float = 0.3):
    """Random parameters from NumPy at the model's shapes (LoRA's B not zero)."""
    shapes = jax.eval_shape(_MODEL.init, jax.random.PRNGKey(0), **_MODEL.dummy_inputs(1))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes["params"]
    )


def _frames(seed: int, lengths=(16, 11), width=16):
    rng = np.random.default_rng(seed)
    mask = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    frames = rng.normal(size=(len(lengths), width, 8)) * mask[..., None]
    return frames.astype(np.float32), mask


@functools.cache
def _encode(chunk_size):
    return jax.jit(
        lambda p, x, m: _MODEL.apply({"params": p}, x, m, chunk_size=chunk_size, method="encode")
    )


# ---------------------------------------------------------------------------- the encoder


def test_block_causal_encoder_prefix_equals_full_input():
    frames, mask = _frames(0, lengths=(16, 16))
    params, chunk, stride = _params(), 2, _MODEL.stem_stride
    full, _ = _encode(chunk)(params, frames, mask)
    offline, _ = _encode(None)(params, frames, mask)
    for k in (0, 2):
        # Chunks 0..k read the input frames up to stride * (k + 1) * chunk: the chunks' own
        # frames and one frame of the stem's lookahead. Later frames replaced by garbage:
        heard = stride * (k + 1) * chunk + 1
        garbage = frames.copy()
        garbage[:, heard:] = np.random.default_rng(k).normal(size=garbage[:, heard:].shape) * 5
        rows = (k + 1) * chunk
        causal, _ = _encode(chunk)(params, garbage, mask)
        np.testing.assert_allclose(causal[:, :rows], full[:, :rows], rtol=1e-5, atol=1e-5)
        assert np.max(np.abs(causal[:, rows:] - full[:, rows:])) > 1e-2
        changed, _ = _encode(None)(params, garbage, mask)  # the bidirectional encoder hears them
        assert np.max(np.abs(changed[:, :rows] - offline[:, :rows])) > 1e-2
        # ... and so does the row of the lookahead frame itself:
        lookahead = garbage.copy()
        lookahead[:, heard - 1] += 5.0
        moved, _ = _encode(chunk)(params, lookahead, mask)
        assert np.max(np.abs(moved[:, :rows] - full[:, :rows])) > 1e-2


def _layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def _reference_encoder(params, frames, mask, chunk_size, extra=0):
    """The encoder from its equations in float64 NumPy: loops for the stem's convolutions and
    the dense block-causal mask (row i sees real row j iff j // C <= i // C; with a larger first
    chunk of 1 + extra chunks, iff max(j // C - extra, 0) <= max(i // C - extra, 0))."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(frames, np.float64) * np.asarray(mask)[..., None]  # padding reads as zeros
    batch, length, _ = x.shape
    stride = _MODEL.stem_stride
    h1 = np.zeros((batch, length, 16))
    for t in range(length):  # Conv1d(k=3, padding=1)
        for offset in range(3):
            if 0 <= t + offset - 1 < length:
                h1[:, t] += x[:, t + offset - 1] @ p["stem_conv1"]["kernel"][offset]
    h1 = _gelu(h1 + p["stem_conv1"]["bias"])
    h1 = h1 * np.asarray(mask)[..., None]  # padding is the second conv's zero padding
    rows = -(-length // stride)
    h = np.zeros((batch, rows, 16))
    for j in range(rows):  # Conv1d(k=3, stride, padding=1)
        for offset in range(3):
            if 0 <= stride * j + offset - 1 < length:
                h[:, j] += h1[:, stride * j + offset - 1] @ p["stem_conv2"]["kernel"][offset]
    h = _gelu(h + p["stem_conv2"]["bias"])
    dim = h.shape[-1]
    # The library's sinusoidal table is computed in float32; so is this one.
    inv_freq = np.float32(10000.0) ** (-np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    angles = np.arange(rows, dtype=np.float32)[:, None] * inv_freq
    h = h + np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float64)
    real = np.asarray(mask)[:, ::stride]
    visible = np.zeros((batch, rows, rows), bool)
    for b in range(batch):
        for i in range(rows):
            for j in range(rows):
                block_i = max(i // chunk_size - extra, 0)
                visible[b, i, j] = real[b, j] and max(j // chunk_size - extra, 0) <= block_i
    enc = p["encoder"]
    attention, layer, ffn = enc["layer_0_attention"], enc["layer_0"], enc["layer_0_ffn"]
    y = _layer_norm(h, layer["mixer_norm"])
    q, k, v = (
        np.einsum("btd,dhe->bthe", y, attention[n]["kernel"]) + attention[n]["bias"]
        for n in ("query", "key", "value")
    )
    logits = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(visible[:, None], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhe->bqhe", weights, v)
    h = h + np.einsum("bqhe,hed->bqd", out, attention["out"]["kernel"]) + attention["out"]["bias"]
    y = _layer_norm(h, layer["ffn_norm"])
    y = _gelu(y @ ffn["fc1"]["kernel"] + ffn["fc1"]["bias"]) @ ffn["fc2"]["kernel"]
    h = h + y + ffn["fc2"]["bias"]
    return _layer_norm(h, enc["final_norm"]), real


def test_cached_chunk_encoder_matches_float64_dense_mask_reference(x64):
    base = _MODEL.clone(lora_rank=0)
    params = {k: v for k, v in _params(1).items() if k != "lora"}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    frames, mask = _frames(1, lengths=(16, 11))
    frames = frames.astype(np.float64)
    chunk = 2
    expected, real = _reference_encoder(params, frames, mask, chunk)
    cache = init_encoder_cache(base, jnp.asarray(frames), jnp.asarray(mask))
    encode_chunk = jax.jit(
        lambda cache, k: base.apply(
            {"params": params, "cache": cache}, frames, mask, k, chunk_size=chunk,
            method="encode_chunk", mutable=["cache"],
        )
    )  # fmt: skip
    rows = []
    for k in range(8 // chunk):
        out, mutated = encode_chunk(cache, k)
        cache = mutated["cache"]
        rows.append(out)
    incremental = np.asarray(jnp.concatenate(rows, axis=1))
    assert incremental.dtype == np.float64
    # The library's LayerNorm normalises in float32, so agreement is to float32 precision.
    np.testing.assert_allclose(incremental[real], expected[real], rtol=1e-5, atol=1e-6)
    # The whole-input block-causal pass, forward and input gradients.
    weights = np.random.default_rng(2).normal(size=expected.shape) * real[..., None]

    def weighted(x):
        encoded, encoder_mask = base.apply(
            {"params": params}, x, mask, chunk_size=chunk, method="encode"
        )
        return jnp.sum(encoded * weights), (encoded, encoder_mask)

    (_, (full, encoder_mask)), grad = jax.jit(jax.value_and_grad(weighted, has_aux=True))(
        jnp.asarray(frames)
    )
    np.testing.assert_array_equal(encoder_mask, real)
    np.testing.assert_allclose(np.asarray(full)[real], expected[real], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(incremental[real], np.asarray(full)[real], rtol=1e-6, atol=1e-7)
    # The larger first chunk's mask (the cached rows equal these: the streaming tests below).
    merged = jax.jit(
        lambda x: base.apply(
            {"params": params}, x, mask, chunk_size=chunk, extra_first_chunks=1, method="encode"
        )[0]
    )(frames)
    expected_merged = _reference_encoder(params, frames, mask, chunk, extra=1)[0]
    np.testing.assert_allclose(np.asarray(merged)[real], expected_merged[real], rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    assert np.max(np.abs(expected_merged - expected)[real]) > 1e-3
    step = 1e-6 * np.random.default_rng(3).normal(size=frames.shape)
    change = np.sum(
        (_reference_encoder(params, frames + step, mask, chunk)[0]
         - _reference_encoder(params, frames - step, mask, chunk)[0]) * weights
    )  # fmt: skip
    np.testing.assert_allclose(np.sum(np.asarray(grad) * step) * 2, change, rtol=1e-4)


def test_padding_frames_get_a_mask_position_after_every_chunk():
    assert PADDING_MASK_POSITION > 10**5
    frames, mask = _frames(4, lengths=(16, 9))
    garbage = frames.copy()
    garbage[1, 9:] = 50.0
    for chunk in (2, None):
        clean, encoder_mask = _encode(chunk)(_params(), frames, mask)
        dirty, _ = _encode(chunk)(_params(), garbage, mask)
        # Padding is unseen, also through the stem at the boundary row (9 frames: odd).
        real = np.asarray(encoder_mask)
        np.testing.assert_allclose(clean[real], dirty[real], rtol=1e-5, atol=1e-6)
        # ... so a row computes what it computes alone and unpadded.
        alone, _ = _encode(chunk)(_params(), frames[1:, :9], mask[1:, :9])
        np.testing.assert_allclose(clean[1, real[1]], alone[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- LoRA


def test_lora_zero_b_is_the_base_model_and_merged_weights_equal_the_adapters():
    frames, mask = _frames(5)
    decoder_inputs = jnp.asarray([[0, 3, 4, 5, 6], [0, 7, 8, 9, 0]], jnp.int32)
    base = _MODEL.clone(lora_rank=0)
    trained = dict(_params(6))  # B not zero
    base_params = {k: v for k, v in trained.items() if k != "lora"}
    zero_b = {k: (jnp.zeros_like(v) if k.endswith(".b") else v) for k, v in trained["lora"].items()}

    def run(model):
        return jax.jit(
            lambda p: model.apply({"params": p}, frames, decoder_inputs, frame_mask=mask)
        )

    with_lora, without_lora = run(_MODEL), run(base)
    adapter = with_lora(trained)
    np.testing.assert_allclose(
        adapter, without_lora(merge_lora(trained, _MODEL.lora_rank)), rtol=1e-4, atol=1e-5
    )
    plain = without_lora(base_params)
    zero = with_lora({**trained, "lora": zero_b})
    np.testing.assert_allclose(zero, plain, rtol=1e-6, atol=1e-7)  # B = 0: the base model
    assert np.max(np.abs(adapter - plain)) > 1e-2  # the adapters change the function
    # The initialisation: B zero, A uniform in +-1/sqrt(rank); alpha / rank scales the update.
    targets = lora_targets(1, 1, 16, 16)
    fresh = LoRAFactors(targets, _MODEL.lora_rank).init(jax.random.PRNGKey(0))["params"]
    assert sorted(fresh) == sorted(trained["lora"])
    bound = 1 / np.sqrt(_MODEL.lora_rank)
    for key, value in fresh.items():
        value = np.asarray(value)
        if key.endswith(".b"):
            assert np.all(value == 0), key
        else:
            assert np.all(np.abs(value) <= bound) and np.std(value) > 0.3 * bound, key
    assert _MODEL.clone(lora_alpha=3.0 * _MODEL.lora_rank).lora_scale == 3.0
    # Another rank would silently scale the update by alpha / (that rank).
    with pytest.raises(ValueError, match=r"merge_lora: rank must be the factors' rank 2"):
        merge_lora(trained, 2 * _MODEL.lora_rank, 2.0)
    with pytest.raises(ValueError, match=r"merge_lora: rank must be an int >= 1, got 0"):
        merge_lora(trained, 0)
    once = traverse_util.flatten_dict(merge_lora(trained, _MODEL.lora_rank))
    twice = traverse_util.flatten_dict(
        merge_lora(trained, _MODEL.lora_rank, 2.0 * _MODEL.lora_rank)
    )
    flat = traverse_util.flatten_dict(base_params)
    keys = {k.rsplit(".", 1)[0] for k in trained["lora"]}
    assert len(keys) == 4 * (
        1 + 2
    )  # q, k, v, out of encoder self-, decoder self- and cross-attention
    for key in keys:
        path = (*key.split("."), "kernel")
        np.testing.assert_allclose(
            twice[path] - flat[path], 2 * (once[path] - flat[path]), atol=1e-6
        )


def test_bad_arguments_fail_naming_them():
    frames, mask = _frames(0)
    with pytest.raises(ValueError, match="chunk_size"):
        _MODEL.apply({"params": _params()}, frames, mask, chunk_size=0, method="encode")
    with pytest.raises(ValueError, match="inputs must be frames"):
        _MODEL.apply({"params": _params()}, frames[..., :3], mask, method="encode")
    with pytest.raises(ValueError, match="cut_fractions needs the block-causal"):
        _MODEL.apply({"params": _params()}, frames, jnp.zeros((2, 3), jnp.int32),
                     cut_fractions=jnp.ones((2, 1)), chunk_size=None)  # fmt: skip
    with pytest.raises(ValueError, match="lora_rank"):
        models.create("careless_whisper", tiny=True, lora_rank=-1).init(
            jax.random.PRNGKey(0), **_MODEL.dummy_inputs(1)
        )
    with pytest.raises(ValueError, match="look_back"):
        stream_transcribe(_MODEL, _params(), frames, mask, chunk_size=2, max_tokens=6,
                          eos_id=_EOS, look_back=-1)  # fmt: skip
    # The offline decoder failed later on decoder_inputs, a reduction or a shape instead.
    for max_tokens in (_MODEL.max_target_length, 0, 2.5):
        for transcribe, kwargs in ((greedy_transcribe, {}), (stream_transcribe, {"chunk_size": 2})):
            with pytest.raises(ValueError, match=r"max_tokens must be an int in \[1, "):
                transcribe(_MODEL, _params(), frames, mask, max_tokens=max_tokens, eos_id=_EOS,
                           **kwargs)  # fmt: skip


# ---------------------------------------------------------------------------- streaming


_decode = jax.jit(lambda p, t, e, m: _MODEL.apply({"params": p}, t, e, m, method="decode"))


def _reference_stream(params, frames, mask, chunk_size, look_back, max_tokens, one_chunk=False,
                      argmax_only=False):  # fmt: skip
    """The official greedy StreamingDecoder, one row at a time in Python, over the encoder rows
    of the whole-input block-causal pass (equal to the cached chunks' by the tests above).
    one_chunk: every frame in one chunk (then it is plain greedy decoding). argmax_only: a token
    is kept only when it is still the argmax (no "logit did not drop" clause)."""
    encoded, encoder_mask = _encode(chunk_size)(params, frames, mask)
    decode = _decode
    histories = []
    for b in range(frames.shape[0]):
        real = np.asarray(encoder_mask[b])
        num_chunks = 1 if one_chunk else -(-int(real.sum()) // chunk_size)
        tokens, committed, last, history = [], 0, None, []
        for k in range(num_chunks):
            visible = real & ((np.arange(real.size) < (k + 1) * chunk_size) | one_chunk)

            def logits_of(tokens, visible=visible, row=encoded[b : b + 1]):
                padded = np.zeros((1, max_tokens + 1), np.int32)
                padded[0, 1 : len(tokens) + 1] = tokens
                out = np.array(decode(params, padded, row, visible[None]))[0]
                out[:, 0] = -1e9  # the start token is never emitted
                return out

            logits = logits_of(tokens)
            if k > 0:
                for slot in range(max(committed, len(tokens) - look_back), len(tokens)):
                    token = tokens[slot]
                    kept = (not argmax_only and last[slot, token] <= logits[slot, token]) or (
                        np.argmax(logits[slot]) == token
                    )
                    if not kept:
                        tokens = tokens[:slot]
                        break
            while len(tokens) < max_tokens:
                next_token = int(np.argmax(logits[len(tokens)]))
                if next_token == _EOS:
                    break
                tokens = tokens + [next_token]
                logits = logits_of(tokens)
            last = logits
            final = k == num_chunks - 1
            committed = len(tokens) if final else max(committed, len(tokens) - look_back)
            history.append((list(tokens), committed))
        histories.append(history)
    return histories


def test_streaming_decoder_follows_the_rule_and_commits_a_prefix():
    look_back = 2
    params = _params(7, scale=1.0)  # a random model that revises tokens (checked below)
    frames, mask = _frames(8)  # the shapes of the other tests: their compiled encoders
    frames = 3 * frames
    max_tokens = 6
    result = stream_transcribe(_MODEL, params, frames, mask, chunk_size=2, max_tokens=max_tokens,
                               eos_id=_EOS, look_back=look_back)  # fmt: skip
    expected = _reference_stream(params, frames, mask, 2, look_back, max_tokens)
    revised = False
    for b, history in enumerate(expected):
        assert len(history) == result.num_chunks[b]
        for k, (tokens, committed) in enumerate(history):
            length = int(result.history_length[k, b])
            assert list(result.history_tokens[k, b, :length]) == tokens, (b, k)
            assert int(result.history_committed[k, b]) == committed, (b, k)
        # Committed tokens are a prefix of every later output, and of the final transcript.
        for k, (tokens, committed) in enumerate(history):
            for later, _ in history[k + 1 :]:
                assert later[:committed] == tokens[:committed]
                revised |= later[: len(tokens)] != tokens
        assert history[-1][1] == len(history[-1][0])  # the last chunk commits everything
    assert revised  # the random model does revise tokens, so the rule is exercised


def test_greedy_decoding_is_the_rule_with_one_chunk():
    params = _params(7, scale=1.0)
    frames, mask = _frames(8)  # the shapes of the other tests: their compiled encoders
    frames = 3 * frames
    tokens, length = greedy_transcribe(_MODEL, params, frames, mask, max_tokens=6, eos_id=_EOS,
                                       chunk_size=2)  # fmt: skip
    expected = _reference_stream(params, frames, mask, 2, 2, 6, one_chunk=True)
    for b, [(reference, committed)] in enumerate(expected):
        assert list(np.asarray(tokens[b, : int(length[b])])) == reference
        assert committed == len(reference)


# ---------------------------------------------------------------------------- beam search


@functools.cache
def _encode_extra(extra):
    return jax.jit(
        lambda p, x, m: _MODEL.apply(
            {"params": p}, x, m, chunk_size=2, extra_first_chunks=extra, method="encode"
        )
    )


def _reference_beam_stream(params, frames, mask, chunk_size, extra, look_back, max_tokens, beams):
    """The official BeamStreamingDecoder, one row and one hypothesis at a time in Python, scores
    in float64, over the whole-input encoder rows (first chunk: 1 + extra chunks). With one chunk
    (extra large) it is an offline beam search: keep the `beams` best of each hypothesis' `beams
    + 1` best continuations, stop once one has ended, pick the best score / length. Returns per
    row the (tokens, committed) after each step and the number of crops."""
    encoded, encoder_mask = _encode_extra(extra)(params, frames, mask)
    histories, crops = [], 0
    for b in range(frames.shape[0]):
        real = np.asarray(encoder_mask[b])
        steps = max(-(-int(real.sum()) // chunk_size) - extra, 1)
        hyps = [((), 0)]  # (tokens, committed floor); identical beams count once
        history = []
        for k in range(steps):
            visible = real & (np.arange(real.size) < (k + 1 + extra) * chunk_size)

            @functools.cache
            def log_probs(tokens, visible=visible, row=encoded[b : b + 1]):
                padded = np.zeros((1, max_tokens + 1), np.int32)
                padded[0, 1 : len(tokens) + 1] = tokens
                logits = np.array(_decode(params, padded, row, visible[None]))[0].astype(np.float64)
                logits[:, 0] = -1e9  # the start token is never emitted
                shifted = logits - logits.max(-1, keepdims=True)
                return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

            def score(tokens):
                return sum(log_probs(tokens)[slot, t] for slot, t in enumerate(tokens))

            if k > 0:  # 1. re-examine each beam's last tokens
                checked = []
                for tokens, floor in hyps:
                    for slot in range(max(floor, len(tokens) - look_back), len(tokens)):
                        top = np.argsort(-log_probs(tokens)[slot], kind="stable")[:beams]
                        if tokens[slot] not in top:
                            tokens, crops = tokens[:slot], crops + 1
                            break
                    checked.append((tokens, floor))
                hyps = checked
            scores = [score(tokens) for tokens, _ in hyps]
            ended = [False] * len(hyps)
            while not any(ended) and all(len(t) < max_tokens for t, _ in hyps):  # 2. search
                candidates, seen = [], set()
                for tokens, floor in hyps:
                    if tokens in seen:
                        continue
                    seen.add(tokens)
                    lp = log_probs(tokens)[len(tokens)]
                    for token in np.argsort(-lp, kind="stable")[: beams + 1]:
                        candidates.append((score(tokens) + lp[token], tokens, int(token), floor))
                candidates.sort(key=lambda c: -c[0])  # stable: ties keep their order
                hyps, scores, ended = [], [], []
                for total, tokens, token, floor in candidates[:beams]:
                    hyps.append((tokens if token == _EOS else (*tokens, token), floor))
                    scores.append(total)
                    ended.append(token == _EOS)
            lengths = [len(t) for t, _ in hyps]
            best = int(np.argmax([s / max(n, 1) for s, n in zip(scores, lengths, strict=True)]))
            final = k == steps - 1
            hyps = [(t, len(t) if final else max(f, len(t) - look_back)) for t, f in hyps]
            best_tokens = hyps[best][0]
            common = 0
            while common < len(best_tokens) and all(
                len(t) > common and t[common] == best_tokens[common] for t, _ in hyps
            ):
                common += 1
            committed = len(best_tokens) if final else min(common, *(f for _, f in hyps))
            history.append((list(best_tokens), committed))
        histories.append(history)
    return histories, crops


def _check_history(result, expected):
    for b, history in enumerate(expected):
        assert len(history) == result.num_chunks[b]
        for k, (tokens, committed) in enumerate(history):
            length = int(result.history_length[k, b])
            assert list(result.history_tokens[k, b, :length]) == tokens, (b, k)
            assert int(result.history_committed[k, b]) == committed, (b, k)


def test_beam_width_one_is_the_greedy_rule_with_the_argmax_check():
    params = _params(7, scale=1.0)
    frames, mask = _frames(8)
    frames = 3 * frames
    result = stream_transcribe(_MODEL, params, frames, mask, chunk_size=2, max_tokens=6,
                               eos_id=_EOS, beam_size=1)  # fmt: skip
    _check_history(result, _reference_stream(params, frames, mask, 2, 2, 6, argmax_only=True))


def test_streaming_beam_search_follows_the_rule_commits_a_prefix_and_is_offline_beam_search():
    params = _params(9, scale=2.0)  # a random model whose beams get cropped (checked below)
    frames, mask = _frames(8)
    frames = 3 * frames
    beams, look_back = 3, 1
    common = dict(chunk_size=2, max_tokens=6, eos_id=_EOS, beam_size=beams, look_back=look_back)
    # A larger first chunk (2 chunks), then one chunk a step.
    result = stream_transcribe(_MODEL, params, frames, mask, extra_first_chunks=1, **common)
    expected, crops = _reference_beam_stream(params, frames, mask, 2, 1, look_back, 6, beams)
    assert crops > 0  # the re-examination does drop tokens
    _check_history(result, expected)
    np.testing.assert_array_equal(result.num_chunks, [3, 2])  # 8 and 6 encoder frames
    np.testing.assert_array_equal(result.chunk_frames, [8, 12, 16])
    for history in expected:  # committed tokens are a prefix of every later transcript
        for k, (tokens, committed) in enumerate(history):
            for later, _ in history[k + 1 :]:
                assert later[:committed] == tokens[:committed]
        assert history[-1][1] == len(history[-1][0])
    # One chunk holding the whole utterance: an offline beam search.
    whole = stream_transcribe(_MODEL, params, frames, mask, extra_first_chunks=3, **common)
    offline, _ = _reference_beam_stream(params, frames, mask, 2, 3, look_back, 6, beams)
    _check_history(whole, offline)


def test_larger_first_chunk_encoder_and_bad_arguments():
    params, frames, mask = _params(), *_frames(0, lengths=(16, 16))
    full, _ = _encode_extra(1)(params, frames, mask)
    # The first chunk is rows 0..3 (2 chunks), bidirectional inside: row 0 hears frame 7.
    moved = frames.copy()
    moved[:, 7] += 5.0
    changed, _ = _encode_extra(1)(params, moved, mask)
    assert np.max(np.abs(changed[:, 0] - full[:, 0])) > 1e-2
    later = frames.copy()
    later[:, 9:] += 5.0  # frames of chunk 2 on (and the stem's lookahead frame of row 3, 8)
    unchanged, _ = _encode_extra(1)(params, later, mask)
    np.testing.assert_allclose(unchanged[:, :4], full[:, :4], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="extra_first_chunks must be an int >= 0"):
        stream_transcribe(_MODEL, params, frames, mask, chunk_size=2, max_tokens=6,
                          eos_id=_EOS, extra_first_chunks=-1)  # fmt: skip
    with pytest.raises(ValueError, match="needs the block-causal encoder"):
        _MODEL.apply({"params": params}, frames, mask, chunk_size=None, extra_first_chunks=1,
                     method="encode")  # fmt: skip
    with pytest.raises(ValueError, match="beam_size must be None"):
        stream_transcribe(_MODEL, params, frames, mask, chunk_size=2, max_tokens=6,
                          eos_id=_EOS, beam_size=15)  # fmt: skip


def test_token_emit_chunks_and_timestamps():
    # One row, 4 steps: [5] -> [5, 7] -> [5, 8, 9] -> [5, 8, 9]; slot 1 first held at step 1,
    # its final token (8) emitted at step 2.
    tokens = np.zeros((4, 1, 4), np.int32)
    for k, row in enumerate(([5], [5, 7], [5, 8, 9], [5, 8, 9])):
        tokens[k, 0, : len(row)] = row
    length = np.array([[1], [2], [3], [3]])
    emit, first_emit = token_emit_chunks(tokens, length)
    np.testing.assert_array_equal(emit, [[0, 2, 2, -1]])
    np.testing.assert_array_equal(first_emit, [[0, 1, 2, -1]])


def test_decoder_kv_cache_gives_the_same_streams():
    params = _params(9, scale=2.0)  # rows that stop early and tokens that get revised
    frames, mask = _frames(8)
    frames = 3 * frames
    common = dict(chunk_size=2, max_tokens=6, eos_id=_EOS)
    plain = stream_transcribe(_MODEL, params, frames, mask, **common)
    cached = stream_transcribe(_MODEL, params, frames, mask, kv_cache=True, **common)
    assert np.any(plain.history_length < 6) and np.any(plain.history_length == 6)
    np.testing.assert_array_equal(cached.history_tokens, plain.history_tokens)
    np.testing.assert_array_equal(cached.history_length, plain.history_length)
    np.testing.assert_array_equal(cached.history_committed, plain.history_committed)
    with pytest.raises(ValueError, match="kv_cache must be True or False"):
        stream_transcribe(_MODEL, params, frames, mask, kv_cache=True, beam_size=2, **common)
