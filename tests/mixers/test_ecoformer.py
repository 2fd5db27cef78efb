"""EcoFormer: the O(L) Hamming attention and the mixer against dense references, the
Hamming identity, padding, packing and causality, the KSH fit, and the errors.

Test data comes from NumPy and variables are filled in from ``eval_shape``, so the
only XLA compilations are the few jitted programs the tests share.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.mixers import make_mixer
from effformer.mixers.ecoformer import (
    HASHING,
    EcoFormerAttention,
    HashFunctions,
    fit_hash_functions,
    hamming_attention,
    hamming_attention_reference,
    hash_agreement,
    hash_codes,
    ksh_supervision,
    refit_hashing,
)
from effformer.ops.masks import AttentionMask, dense_mask

BATCH, LENGTH, DIM, HEADS, BITS, ANCHORS = 2, 9, 8, 2, 6, 5
# Row 0: a sequence of 4, then 5 padded tokens; row 1: left padding, then two packed
# sequences of 4 (all of one length, so one batch runs the three alone).
SEGMENTS = np.array([[1, 1, 1, 1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 2, 2, 2, 2]], np.int32)
SEQUENCES = ((0, 0, 4), (1, 1, 5), (1, 5, 9))  # (row, start, stop)


def _dense_inner_product_attention(codes, values, causal, segment_ids):
    """The affinity (b + <h_i, h_j>) / 2 as a dense matrix (differentiable in the codes)."""
    num_bits = codes.shape[-1]
    affinity = (num_bits + jnp.einsum("bqhk,bphk->bhqp", codes, codes)) / 2
    mask = AttentionMask(causal=causal, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
    visible = dense_mask(mask, codes.shape[0], codes.shape[1], codes.shape[1])
    affinity = jnp.where(visible, affinity, 0.0)
    totals = affinity.sum(-1, keepdims=True)
    return jnp.einsum("bhqp,bphd->bqhd", affinity / jnp.where(totals > 0, totals, 1.0), values)


def test_inner_product_of_codes_is_the_hamming_affinity():
    rng = np.random.default_rng(0)
    codes = rng.choice([-1.0, 1.0], size=(40, 16))
    for i in range(len(codes)):
        for j in range(len(codes)):
            hamming = sum(int(a != b) for a, b in zip(codes[i], codes[j], strict=True))
            assert (16 + codes[i] @ codes[j]) / 2 == 16 - hamming


def test_linear_path_equals_dense_references_forward_and_gradients(x64):
    """hamming_attention against the explicit Hamming matrix (forward) and the dense
    inner-product form (forward and gradients w.r.t. codes and values), with and
    without causality, padding and packing."""
    rng = np.random.default_rng(0)
    codes = rng.choice([-1.0, 1.0], size=(BATCH, LENGTH, HEADS, BITS))
    values, cotangent = rng.normal(size=(2, BATCH, LENGTH, HEADS, 3))
    cases = [(c, s) for c in (False, True) for s in (None, jnp.asarray(SEGMENTS))]

    @jax.jit
    def compare(codes, values):
        results = []
        for causal, segment_ids in cases:

            def loss(function, codes, values, causal=causal, segment_ids=segment_ids):
                out = function(codes, values, causal=causal, segment_ids=segment_ids)
                return jnp.sum(out * cotangent)

            fast = jax.value_and_grad(functools.partial(loss, hamming_attention), (0, 1))
            dense = jax.value_and_grad(
                functools.partial(loss, _dense_inner_product_attention), (0, 1)
            )
            hamming = loss(hamming_attention_reference, codes, values)
            results.append((fast(codes, values), dense(codes, values), hamming))
        return results

    for (fast_value, fast_grads), (dense_value, dense_grads), hamming_value in compare(
        codes, values
    ):
        np.testing.assert_allclose(fast_value, hamming_value, rtol=1e-12)
        np.testing.assert_allclose(dense_value, hamming_value, rtol=1e-12)
        for fast_grad, dense_grad in zip(fast_grads, dense_grads, strict=True):
            np.testing.assert_allclose(fast_grad, dense_grad, rtol=1e-10, atol=1e-12)


def _mixer(**kwargs) -> EcoFormerAttention:
    defaults = dict(num_heads=HEADS, num_bits=BITS, num_anchors=ANCHORS, causal=False)
    return EcoFormerAttention(**{**defaults, **kwargs})


@functools.cache
def _variables():
    """float64 variables of ``_mixer()`` with non-trivial biases, centring and kernel
    widths; large q/k weights, so the codes vary between tokens."""
    shapes = jax.eval_shape(_mixer().init, jax.random.key(0), jnp.zeros((1, LENGTH, DIM)))
    rng = np.random.default_rng(2)
    params = {
        name: {"kernel": scale * rng.normal(size=shapes["params"][name]["kernel"].shape)}
        for name, scale in (("qk", 2.0), ("value", 0.3), ("out", 0.3))
    }
    for name in params:
        params[name]["bias"] = 0.1 * rng.normal(size=shapes["params"][name]["bias"].shape)
    anchors = rng.normal(size=(HEADS, ANCHORS, DIM // HEADS))
    hashing = dict(
        anchors=anchors / np.linalg.norm(anchors, axis=-1, keepdims=True),
        projection=rng.normal(size=(HEADS, BITS, ANCHORS)),
        kernel_mean=0.3 * rng.uniform(size=(HEADS, ANCHORS)),
        kernel_width=np.array([0.5, 1.5]),
    )
    return {"params": params, HASHING: hashing}


def _inputs(seed=3, shape=(BATCH, LENGTH, DIM)):
    return np.random.default_rng(seed).normal(size=shape)


def _reference_mixer(params, hashing, x, causal, segment_ids):
    """The whole mixer from the paper's equations: dense affinity matrix, explicit distances,
    sign with a clipped straight-through gradient, hash functions without gradient."""
    project = lambda name: (  # noqa: E731
        jnp.einsum("bld,dhk->blhk", x, params[name]["kernel"]) + params[name]["bias"]
    )
    qk, values = project("qk"), project("value")
    queries = qk / jnp.linalg.norm(qk, axis=-1, keepdims=True)
    hashing = jax.tree.map(jax.lax.stop_gradient, hashing)
    difference = queries[:, :, :, None, :] - hashing["anchors"][None, None]  # [B, L, H, m, Dh]
    features = (
        jnp.exp(-jnp.sum(difference**2, -1) / (2 * hashing["kernel_width"][:, None]))
        - (hashing["kernel_mean"])
    )
    pre = jnp.einsum("blhm,hkm->blhk", features, hashing["projection"])
    clipped = jnp.clip(pre, -1.0, 1.0)
    codes = clipped + jax.lax.stop_gradient(jnp.where(pre > 0, 1.0, -1.0) - clipped)
    out = _dense_inner_product_attention(codes, values, causal, segment_ids)
    if segment_ids is not None:
        out = jnp.where((segment_ids != 0)[..., None, None], out, 0.0)
    return jnp.einsum("blhk,hkd->bld", out, params["out"]["kernel"]) + params["out"]["bias"], pre


def test_mixer_equals_dense_reference_forward_and_gradients(x64):
    variables, x = _variables(), _inputs()
    segment_ids = jnp.asarray(SEGMENTS)
    mask = AttentionMask(causal=True, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
    cotangent = _inputs(seed=4)

    def fast(params, hashing, x):
        out = _mixer().apply({"params": params, HASHING: hashing}, x, mask=mask)
        return jnp.sum(out * cotangent)

    def slow(params, hashing, x):
        out, pre = _reference_mixer(params, hashing, x, True, segment_ids)
        return jnp.sum(out * cotangent), pre

    @jax.jit
    def both(params, hashing, x):
        return (
            jax.value_and_grad(fast, (0, 1, 2))(params, hashing, x),
            jax.value_and_grad(slow, (0, 2), has_aux=True)(params, hashing, x),
        )

    (fast_value, fast_grads), ((slow_value, pre), slow_grads) = both(
        variables["params"], variables[HASHING], x
    )
    # The straight-through path matters here: some pre-activations lie in (-1, 1).
    assert 0.1 < np.mean(np.abs(pre) < 1.0) < 0.9
    np.testing.assert_allclose(fast_value, slow_value, rtol=1e-10)
    for fast_leaf, slow_leaf in zip(
        jax.tree.leaves((fast_grads[0], fast_grads[2])), jax.tree.leaves(slow_grads), strict=True
    ):
        np.testing.assert_allclose(fast_leaf, slow_leaf, rtol=1e-8, atol=1e-12)
    # The hash functions get no gradient; the queries do, through the straight-through sign.
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(fast_grads[1]))


@functools.cache
def _forward_results() -> dict[str, np.ndarray]:
    """The mixer's outputs that the codes, padding and causality tests read, from one
    float64 program."""
    with jax.enable_x64(True):
        variables, x = _variables(), _inputs()
        segment_ids = jnp.asarray(SEGMENTS)
        noisy = np.where((SEGMENTS == 0)[..., None], 100.0, x)
        alone = np.stack([x[row, start:stop] for row, start, stop in SEQUENCES])
        # Row 0: the first sequence; row j + 1: the same with token j replaced.
        replaced = _inputs(seed=9, shape=(LENGTH, DIM))
        perturbed = np.concatenate(
            [x[:1], np.where(np.eye(LENGTH, dtype=bool)[..., None], replaced, x[0])]
        )
        queries = _inputs(seed=5, shape=(BATCH, LENGTH, HEADS, DIM // HEADS))
        queries = queries / np.linalg.norm(queries, axis=-1, keepdims=True)

        @jax.jit
        def run(variables, x, noisy, alone, perturbed, queries):
            padding = AttentionMask(q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
            functions = HashFunctions(**variables[HASHING])
            zero_projection = functions._replace(projection=jnp.zeros((HEADS, BITS, ANCHORS)))
            return dict(
                padded=_mixer().apply(variables, x, mask=padding),
                noisy=_mixer().apply(variables, noisy, mask=padding),
                alone=_mixer().apply(variables, alone),
                causal_mask=_mixer().apply(variables, perturbed, mask=AttentionMask(causal=True)),
                causal_field=_mixer(causal=True).apply(variables, perturbed),
                bidirectional=_mixer().apply(variables, perturbed),
                codes=hash_codes(queries, functions),
                zero_codes=hash_codes(queries, zero_projection),
            )

        return jax.tree.map(np.asarray, run(variables, x, noisy, alone, perturbed, queries))


def test_codes_are_plus_minus_one_with_b_bits():
    results = _forward_results()
    assert results["codes"].shape == (BATCH, LENGTH, HEADS, BITS)
    assert set(np.unique(results["codes"])) == {-1.0, 1.0}
    # A zero pre-activation is a -1 bit, never 0.
    assert np.all(results["zero_codes"] == -1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_padded_holes_do_not_split_a_sequence(causal):
    """Regression: a padded token inside a sequence (segment ids 1, 1, 0, 1) split it in two
    runs, so its tokens after the hole did not see those before it, unlike the mask the
    segment ids define (and the dense reference, which applies that mask)."""
    rng = np.random.default_rng(3)
    segment_ids = jnp.asarray([[1, 1, 0, 1, 1, 2, 0, 0, 2], [0, 3, 3, 0, 3, 0, 0, 4, 4]])
    codes = jnp.asarray(rng.choice([-1.0, 1.0], size=(2, 9, HEADS, BITS)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(2, 9, HEADS, 3)), jnp.float32)
    fast = hamming_attention(codes, values, causal=causal, segment_ids=segment_ids)
    dense = hamming_attention_reference(codes, values, causal=causal, segment_ids=segment_ids)
    np.testing.assert_allclose(fast, dense, rtol=1e-5, atol=1e-6)


def test_padding_and_packing_are_exact():
    """Each real sequence's outputs equal those of the sequence alone; padded inputs
    change nothing; padded outputs are the output projection's bias."""
    results = _forward_results()
    np.testing.assert_array_equal(results["noisy"], results["padded"])
    bias = _variables()["params"]["out"]["bias"]
    padded = results["padded"][SEGMENTS == 0]
    np.testing.assert_allclose(padded, np.broadcast_to(bias, padded.shape), rtol=1e-12)
    for index, (row, start, stop) in enumerate(SEQUENCES):
        np.testing.assert_allclose(
            results["padded"][row, start:stop], results["alone"][index], rtol=1e-12, atol=1e-14
        )


def test_no_output_depends_on_a_later_token_when_causal():
    results = _forward_results()
    for name in ("causal_mask", "causal_field", "bidirectional"):
        out = results[name]
        for token in range(LENGTH):
            changed = np.any(out[token + 1] != out[0], axis=-1)  # which outputs moved
            if name == "bidirectional":
                assert np.all(changed)
            else:
                assert not np.any(changed[:token]) and changed[token], (name, token)


def test_decode_token_by_token_equals_the_causal_parallel_pass(x64):
    """Recurrent = parallel: the cached sums give the causal outputs, right padding included."""
    variables, x = _variables(), _inputs()
    segments = (np.arange(LENGTH)[None, :] < np.array([[LENGTH], [6]])).astype(np.int32)
    padding = AttentionMask(q_segment_ids=segments, kv_segment_ids=segments)
    mixer = _mixer(causal=True)
    parallel = mixer.apply(variables, x, mask=padding)
    cache = jax.tree.map(
        jnp.zeros_like,
        jax.eval_shape(lambda: mixer.init(jax.random.key(0), x[:, :1], decode=True))["cache"],
    )

    @jax.jit
    def step(cache, token, segment):
        one = AttentionMask(q_segment_ids=segment, kv_segment_ids=segment)
        out, mutated = mixer.apply(
            {**variables, "cache": cache}, token, mask=one, decode=True, mutable=["cache"]
        )
        return out, mutated["cache"]

    outputs = []
    for t in range(LENGTH):
        out, cache = step(cache, x[:, t : t + 1], segments[:, t : t + 1])
        outputs.append(out)
    np.testing.assert_allclose(np.concatenate(outputs, 1), parallel, rtol=1e-10, atol=1e-12)
    # The padded tokens of row 1 left its sums as they were after its 6 real tokens.
    assert float(cache["count"][1]) == 6.0 and float(cache["count"][0]) == LENGTH


# ----------------------------------------------------------------------------- the KSH fit

FIT = dict(top_k=4, learning_rate=0.05, iterations=30)
FIT_VALID = np.arange(24)[None, :] < np.array([[24], [18]])  # the second row padded


class _TwoLayers(nn.Module):
    """Two EcoFormer layers of one head of width 8: queries [2, 24, 1, 8]."""

    @nn.compact
    def __call__(self, x, mask):
        kwargs = dict(num_heads=1, num_bits=8, num_anchors=6)
        first = _mixer(name="first", **kwargs)(x, mask=mask)
        return _mixer(name="second", **kwargs)(first, mask=mask)


@functools.cache
def _fit_results():
    """Refit both layers of ``_TwoLayers`` from one batch. The first layer's q/k
    projection is the identity, so the queries it hashes are the inputs scaled to unit
    length: points near 4 cluster centres, a structure codes can capture."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8))[rng.integers(0, 4, size=(2, 24))]
    x = (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
    segment_ids = jnp.asarray(FIT_VALID.astype(np.int32))
    mask = AttentionMask(q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
    model = _TwoLayers()
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, mask)
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    variables["params"]["first"]["qk"] = {"kernel": np.eye(8, dtype=np.float32)[:, None, :]}
    variables["params"]["first"]["qk"]["bias"] = np.zeros((1, 8), np.float32)
    for layer in ("first", "second"):  # random hashing, as init makes it
        anchors = variables[HASHING][layer]["anchors"]
        variables[HASHING][layer]["anchors"] /= np.linalg.norm(anchors, axis=-1, keepdims=True)
        variables[HASHING][layer]["kernel_mean"] *= 0.0
        variables[HASHING][layer]["kernel_width"] = np.full((1,), 2.0, np.float32)
    apply = functools.partial(model.apply, mutable=["intermediates"])
    _, state = jax.jit(apply)(variables, x, mask)
    fitted = refit_hashing(jax.random.key(2), variables[HASHING], state["intermediates"], **FIT)
    queries = state["intermediates"]["first"]["hash_inputs"][0][0]

    @jax.jit
    def measure(queries, before, after):
        agreement = [
            hash_agreement(queries, HashFunctions(**f), valid=FIT_VALID, top_k=4)
            for f in (before, after)
        ]
        return agreement, ksh_supervision(queries, jnp.asarray(FIT_VALID), 4)

    agreement, labels = measure(queries, variables[HASHING]["first"], fitted["first"])
    return dict(
        x=x, variables=variables, queries=np.asarray(queries), fitted=fitted,
        agreement=np.asarray(agreement), labels=np.asarray(labels),
    )  # fmt: skip


def test_supervision_labels_top_and_bottom_k_of_valid_keys():
    results = _fit_results()
    queries, labels = results["queries"], results["labels"]
    np.testing.assert_allclose(
        queries[..., 0, :],
        results["x"] / np.linalg.norm(results["x"], axis=-1, keepdims=True),
        rtol=1e-6,
    )
    assert labels.shape == (2, 1, 24, 24)
    assert np.all(labels[1, :, 18:] == 0) and np.all(labels[1, :, :, 18:] == 0)
    logits = np.einsum("blhd,bmhd->bhlm", queries, queries)
    for row, n in ((0, 24), (1, 18)):
        for i in range(n):
            order = np.argsort(logits[row, 0, i, :n])
            assert set(np.flatnonzero(labels[row, 0, i] == 1)) == set(order[-4:])
            assert set(np.flatnonzero(labels[row, 0, i] == -1)) == set(order[:4])


def test_ksh_fit_raises_agreement_with_the_attention_labels():
    results = _fit_results()
    anchors = np.asarray(results["fitted"]["first"]["anchors"][0])
    # The anchors are valid tokens of the batch.
    tokens = results["queries"][FIT_VALID][:, 0]
    distances = np.linalg.norm(tokens[:, None] - anchors[None], axis=-1)
    assert np.all(distances.min(axis=0) < 1e-6)
    before, after = results["agreement"][:, 0]
    assert after > before + 0.3 and after > 0.5, (before, after)


def test_refit_hashing_updates_every_layer_of_a_model():
    results = _fit_results()
    hashing, fitted = results["variables"][HASHING], results["fitted"]
    assert jax.tree.structure(fitted) == jax.tree.structure(hashing)
    for layer in ("first", "second"):
        for name, value in fitted[layer].items():
            assert value.shape == hashing[layer][name].shape
            assert not np.allclose(value, hashing[layer][name]), (layer, name)
    for value in jax.tree.leaves(fitted):
        assert np.all(np.isfinite(value))
    with pytest.raises(
        ValueError, match="no 'hash_inputs' in intermediates for EcoFormer layer first"
    ):
        refit_hashing(jax.random.key(2), hashing, {})


# ----------------------------------------------------------------------------- errors


def test_make_mixer_builds_it():
    mixer = make_mixer("ecoformer", num_heads=2, num_bits=4)
    assert isinstance(mixer, EcoFormerAttention) and mixer.num_bits == 4


@pytest.mark.parametrize(
    ("module_kwargs", "call_kwargs", "message"),
    [
        ({}, dict(x=jnp.zeros((2, 8))), r"x must be \[B, L, D\], got shape \(2, 8\)"),
        ({"causal": True}, dict(decode=True), r"decode=True advances one token per call"),
        ({}, dict(x=jnp.zeros((2, 1, 8)), decode=True), "decode=True needs causal attention"),
        ({"num_bits": 0}, {}, "num_bits must be a positive int, got 0"),
        ({"num_heads": 3}, {}, "num_heads must divide the model width 8"),
        # Regression: head_dim=0 silently meant D // num_heads.
        ({"head_dim": 0}, {}, r"head_dim must be a positive int or None .*got 0"),
        ({}, dict(mask=AttentionMask(window_left=2)), "may only carry causal and segment ids"),
        (
            {},
            dict(
                mask=AttentionMask(q_segment_ids=jnp.ones((2, 5)), kv_segment_ids=jnp.ones((2, 5)))
            ),
            r"mask.q_segment_ids must have shape \(2, 9\) \(or batch 1\), got \(2, 5\)",
        ),
    ],
)
def test_bad_calls_fail_clearly(module_kwargs, call_kwargs, message):
    kwargs = {"x": jnp.zeros((2, LENGTH, DIM)), **call_kwargs}
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: _mixer(**module_kwargs).init(jax.random.key(0), **kwargs))


def test_missing_or_mismatched_hash_functions_fail_clearly():
    x = jnp.zeros((1, LENGTH, DIM))
    variables = jax.eval_shape(lambda: _mixer().init(jax.random.key(0), x))
    with pytest.raises(ValueError, match="the 'hashing' variable collection is missing"):
        jax.eval_shape(lambda v: _mixer().apply({"params": v["params"]}, x), variables)
    with pytest.raises(ValueError, match="holds hash functions with num_bits=6, but the mixer"):
        jax.eval_shape(lambda v: _mixer(num_bits=4).apply(v, x), variables)
    codes, values = jnp.ones((BATCH, LENGTH, HEADS, BITS)), jnp.ones((BATCH, LENGTH, HEADS, 3))
    with pytest.raises(ValueError, match="codes must be .* with the same B, L, H"):
        hamming_attention(codes, values[:, :4])
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(2, 9\), got \(2, 4\)"):
        hamming_attention(codes, values, segment_ids=jnp.ones((2, 4), jnp.int32))
    functions = HashFunctions(
        jnp.zeros((HEADS, ANCHORS, 4)),
        jnp.zeros((HEADS, BITS, ANCHORS)),
        jnp.zeros((HEADS, ANCHORS)),
        jnp.ones(HEADS),
    )
    queries = jnp.ones((1, LENGTH, HEADS, DIM // HEADS))
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, L=9\], got 10"):
        fit_hash_functions(jax.random.key(0), queries, functions, top_k=10)
    with pytest.raises(ValueError, match=r"kernel_mean must have shape \[2, 5\], got \(2, 4\)"):
        hash_codes(queries, functions._replace(kernel_mean=jnp.zeros((2, 4))))


# ----------------------------------------------------------------------------- experiment


def _experiment_module(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "experiments" / "ecoformer" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"ecoformer_experiment_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experiment_arms_build_and_the_softmax_model_carries_over():
    """Every arm validates; the EcoFormer arms have the hashing collection the trainer
    refuses (hence run.py); run.py's conversion of a trained softmax CCT gives exactly
    the EcoFormer model's parameter tree."""
    from effformer import models
    from effformer.train import validate_config

    digits, run = _experiment_module("digits"), _experiment_module("run")
    configs = {arm: digits.get_config(arm) for arm in digits.ARMS}
    for config in configs.values():
        validate_config(config)
    kwargs = [configs[arm].model.kwargs.to_dict() for arm in digits.ARMS[1:]]
    assert all(k == kwargs[0] for k in kwargs)  # one EcoFormer model for every EcoFormer arm
    shapes = {}
    for arm in ("softmax", "ecoformer"):
        model = models.create(
            configs[arm].model.name,
            **configs[arm].model.kwargs.to_dict(),
            num_classes=10,
            image_size=16,
            num_channels=1,
        )
        shapes[arm] = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), **m.dummy_inputs(1)))
    assert set(shapes["softmax"]) == {"params"}
    assert set(shapes["ecoformer"]) == {"params", HASHING}
    converted = run.to_ecoformer(shapes["softmax"]["params"])
    assert jax.tree.map(lambda s: s.shape, converted) == jax.tree.map(
        lambda s: s.shape, shapes["ecoformer"]["params"]
    )
    with pytest.raises(ValueError, match="ARG must be one of"):
        digits.get_config("performer")
