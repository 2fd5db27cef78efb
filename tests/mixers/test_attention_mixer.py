import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.mixers import CrossAttention, MultiHeadAttention, make_mixer
from effformer.nn.position import make_position_encoding
from effformer.ops.masks import AttentionMask

B, L, D = 2, 6, 12

# Compilation is the cost of these tests on CPU. Op-by-op (eager) Flax code compiles one
# small XLA program per primitive and shape (over a hundred per test) and a jitted init
# compiles the truncated-normal sampler (~1 s), so: variables come from jax.eval_shape
# (no compilation) filled by NumPy, inputs from NumPy, and each test runs its module
# calls and reference computations in one jax.jit.


def _x(seed=0, length=L, dim=D, dtype=jnp.float32):
    return np.random.default_rng(seed).normal(size=(B, length, dim)).astype(dtype)


def _variables(module, *args, randomise=True, **kwargs):
    """The variables ``module.init(key, *args, **kwargs)`` makes, with the shapes and dtypes
    of init (from jax.eval_shape) and NumPy values: kernels N(0, 0.02^2) like the default
    init; biases and scales (and T5's small bias table) N(0, 1), since zero/one-initialised
    ones would hide a missing term (with ``randomise=False`` zero and one, as init makes
    them); the decode cache zero, as init makes it."""
    shapes = jax.eval_shape(lambda *a: module.init(jax.random.key(1), *a, **kwargs), *args)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.startswith("['cache']"):
            return np.zeros(leaf.shape, leaf.dtype)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        if "bias" in name or "scale" in name:
            if not randomise:
                return np.full(leaf.shape, float("scale" in name), leaf.dtype)
            return rng.normal(size=leaf.shape).astype(leaf.dtype)
        return (rng.normal(size=leaf.shape) * 0.02).astype(leaf.dtype)

    return jax.device_put(jax.tree_util.tree_map_with_path(fill, shapes))


def _manual(
    params,
    x,
    context=None,
    *,
    num_heads,
    num_kv_heads=None,
    visible=None,
    bias=None,
    rotate=None,
    qk_norm_eps=None,
):
    """Straight einsum attention with repeated kv heads and a dense boolean mask [B, Lq, Lk]."""
    context = x if context is None else context
    num_kv_heads = num_kv_heads or num_heads

    def proj(name, inp):
        out = jnp.einsum("bld,dhk->blhk", inp, params[name]["kernel"])
        return out + params[name]["bias"] if "bias" in params[name] else out

    q, k, v = proj("query", x), proj("key", context), proj("value", context)
    if qk_norm_eps is not None:
        rms = lambda t, s: t / jnp.sqrt(jnp.mean(t**2, -1, keepdims=True) + qk_norm_eps) * s
        q = rms(q, params["query_norm"]["scale"])
        k = rms(k, params["key_norm"]["scale"])
    if rotate is not None:
        q, k = rotate(q, k)
    k = jnp.repeat(k, num_heads // num_kv_heads, axis=2)
    v = jnp.repeat(v, num_heads // num_kv_heads, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    if visible is not None:
        logits = jnp.where(visible[:, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    if visible is not None:
        probs = jnp.where(visible[:, None].any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    y = jnp.einsum("bqhd,hdo->bqo", out, params["out"]["kernel"])
    return y + params["out"]["bias"] if "bias" in params["out"] else y


def _causal(length=L):
    return np.broadcast_to(np.tril(np.ones((length, length), bool)), (B, length, length))


@pytest.mark.parametrize(
    "implementation, causal",
    # The op's own tests compare its implementations; here two suffice to check the mixer.
    [(None, False), ("xla_blockwise", True)],
)
def test_mixer_matches_manual_einsum(x64, implementation, causal):
    x = _x(dtype=jnp.float64)
    module = MultiHeadAttention(num_heads=3, implementation=implementation, param_dtype=jnp.float64)
    variables = _variables(module, x)
    mask = AttentionMask(causal=True) if causal else None
    visible = _causal() if causal else None

    def loss(params, x):
        return jnp.sum(jnp.sin(module.apply({"params": params}, x, mask=mask)))

    def manual_loss(params, x):
        return jnp.sum(jnp.sin(_manual(params, x, num_heads=3, visible=visible)))

    @jax.jit  # one compilation for both forward passes and both gradients
    def run(params, x):
        forward = module.apply({"params": params}, x, mask=mask)
        manual = _manual(params, x, num_heads=3, visible=visible)
        grads = jax.grad(loss, argnums=(0, 1))(params, x)
        return forward, manual, grads, jax.grad(manual_loss, argnums=(0, 1))(params, x)

    forward, manual, grads, manual_grads = run(variables["params"], x)
    np.testing.assert_allclose(forward, manual, atol=1e-10)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-9), grads, manual_grads)


def test_projection_flags_and_shapes():
    x = _x()
    shapes = lambda module: jax.eval_shape(module.init_with_output, jax.random.key(0), x)
    cct = MultiHeadAttention(num_heads=2, qkv_bias=False, out_bias=True)
    params = shapes(cct)[1]["params"]
    assert "bias" not in params["query"] and "bias" in params["out"]
    assert params["query"]["kernel"].shape == (D, 2, 6)
    gqa = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=5, out_features=7)
    out, variables = shapes(gqa)
    params = variables["params"]
    assert params["key"]["kernel"].shape == (D, 2, 5) and params["query"]["kernel"].shape == (
        D,
        4,
        5,
    )
    assert out.shape == (B, L, 7)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gqa_matches_repeated_kv_heads(num_kv_heads):
    x = _x()
    module = MultiHeadAttention(num_heads=4, num_kv_heads=num_kv_heads)

    variables = _variables(module, x)

    @jax.jit
    def run(variables, x):
        want = _manual(
            variables["params"], x, num_heads=4, num_kv_heads=num_kv_heads, visible=_causal()
        )
        return module.apply(variables, x, mask=AttentionMask(causal=True)), want

    got, want = run(variables, x)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_qk_norm():
    x = _x()
    module = MultiHeadAttention(num_heads=2, qk_norm=True)

    variables = _variables(module, x)
    run = jax.jit(
        lambda variables, x: (
            module.apply(variables, x),
            _manual(variables["params"], x, num_heads=2, qk_norm_eps=1e-6),
        )
    )
    got, want = run(variables, x)
    assert variables["params"]["query_norm"]["scale"].shape == (6,)
    np.testing.assert_allclose(got, want, atol=1e-5)


def _positions(length=L, offset=0):
    return np.broadcast_to(np.arange(offset, offset + length, dtype=np.int32), (B, length))


@pytest.mark.parametrize("name", ["rope", "alibi", "t5"])
def test_position_encoding_hooks(name):
    x = _x()
    encoding = make_position_encoding(name)
    module = MultiHeadAttention(num_heads=3, position_encoding=encoding)
    positions = _positions(offset=3)

    variables = _variables(module, x, positions=positions)

    @jax.jit
    def run(variables, x, positions):
        pe_vars = {"params": variables["params"].get("position_encoding", {})}
        rotate = bias = None
        if name == "rope":
            rotate = lambda q, k: encoding.apply({}, q, k, positions, positions, method="rotate")
        else:
            bias = encoding.apply(pe_vars, positions, positions, 3, method="attention_bias")
        want = _manual(variables["params"], x, num_heads=3, rotate=rotate, bias=bias)
        got = module.apply(variables, x, positions=positions)
        return got, want, _manual(variables["params"], x, num_heads=3)

    got, want, plain = run(variables, x, positions)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The encoding really acts: without it the output differs.
    assert not np.allclose(got, plain, atol=1e-4)


def test_rope2d_needs_grid_positions():
    module = MultiHeadAttention(num_heads=3, position_encoding=make_position_encoding("rope2d"))
    with pytest.raises(ValueError, match=r"positions \[B, L, 2\] are required.*got None"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), _x()))
    grid = np.stack(np.meshgrid(np.arange(2), np.arange(3), indexing="ij"), -1).reshape(1, 6, 2)
    grid = np.broadcast_to(grid, (B, L, 2))
    variables = _variables(module, _x(), positions=grid)
    out = jax.jit(lambda v, x, grid: module.apply(v, x, positions=grid))(variables, _x(), grid)
    assert out.shape == (B, L, D) and np.isfinite(out).all()


def _decode_all(module, variables, x, chunks, max_length=None):
    """Run x through the cache in the given chunk lengths; concatenate the outputs."""
    cache = _variables(module, np.zeros((B, max_length or x.shape[1], D)), decode=True)["cache"]

    @jax.jit  # one compilation per chunk length instead of op-by-op dispatch
    def step(cache, chunk):
        return module.apply(
            {"params": variables["params"], "cache": cache},
            chunk,
            decode=True,
            mask=AttentionMask(causal=True),
            mutable=["cache"],
        )

    outs, start = [], 0
    for size in chunks:
        out, mutated = step(cache, x[:, start : start + size])
        cache = mutated["cache"]
        outs.append(out)
        start += size
    assert int(cache["cache_index"]) == start
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("name", ["rope", "alibi", "t5"])
def test_kv_cached_decoding_equals_full_causal(name):
    x = _x(length=L)
    kwargs = {"t5": {"bidirectional": False}, "alibi": {"causal": True}}.get(name, {})
    encoding = make_position_encoding(name, **kwargs)
    module = MultiHeadAttention(num_heads=4, num_kv_heads=2, position_encoding=encoding)
    variables = _variables(module, x)
    full = jax.jit(lambda v, x: module.apply(v, x, mask=AttentionMask(causal=True)))(variables, x)
    steps = _decode_all(module, variables, x, [1] * L)
    np.testing.assert_allclose(steps, full, atol=1e-5)
    # A prompt of several tokens, then single steps, in a longer cache, agrees too.
    chunked = _decode_all(module, variables, x, [3, 1, 1, 1], max_length=L + 4)
    np.testing.assert_allclose(chunked, full, atol=1e-5)


def test_cache_layout_and_decode_errors():
    module = MultiHeadAttention(num_heads=4, num_kv_heads=2, max_decode_length=9)
    variables = _variables(module, _x(), decode=True)
    shapes = jax.tree.map(jnp.shape, variables["cache"])
    assert shapes["cached_key"] == shapes["cached_value"] == (B, 9, 2, 3)
    assert shapes["cache_index"] == ()
    # (eval_shape: the errors are raised while tracing; nothing needs compiling.)
    with pytest.raises(ValueError, match="decode=True needs mask None or a causal AttentionMask"):
        jax.eval_shape(
            lambda: module.apply(
                variables, _x(length=1), decode=True, mask=AttentionMask(), mutable=["cache"]
            )
        )
    with pytest.raises(ValueError, match="decode step length must be <= max_length=9, got 10"):
        jax.eval_shape(
            lambda: module.apply(variables, _x(length=10), decode=True, mutable=["cache"])
        )

    # Running past the end of the cache gives NaN instead of overwriting the last slots.
    @jax.jit
    def fill(variables, eight, two):
        fits, mutated = module.apply(variables, eight, decode=True, mutable=["cache"])
        past, _ = module.apply({**variables, **mutated}, two, decode=True, mutable=["cache"])
        return fits, past

    fits, past = fill(variables, _x(length=8), _x(length=2))
    assert np.isfinite(fits).all() and np.isnan(past).all()


def test_packed_sequences_equal_separate_runs():
    """Two sequences packed in one row (segment ids, positions restarting) == run alone."""
    module = MultiHeadAttention(num_heads=3, position_encoding=make_position_encoding("rope"))
    x = _x()
    segments = jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 2, 2, 0]])
    positions = jnp.array([[0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 0]])

    variables = _variables(module, x)

    @jax.jit
    def run(variables, x, segments, positions):
        mask = AttentionMask(causal=True, q_segment_ids=segments, kv_segment_ids=segments)
        packed = module.apply(variables, x, mask=mask, positions=positions)
        causal = AttentionMask(causal=True)
        # The three length-3 sequences run alone as one batch, the length-2 one on its own.
        threes = jnp.stack([x[0, :3], x[0, 3:], x[1, :3]])
        alone3 = module.apply(variables, threes, mask=causal)
        alone2 = module.apply(variables, x[1:, 3:5], mask=causal)
        return packed, alone3, alone2

    packed, alone3, alone2 = run(variables, x, segments, positions)
    np.testing.assert_allclose(packed[0, :3], alone3[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 3:], alone3[1], atol=1e-5)
    np.testing.assert_allclose(packed[1, :3], alone3[2], atol=1e-5)
    np.testing.assert_allclose(packed[1, 3:5], alone2[0], atol=1e-5)
    # The padding token sees nothing: its attention output is zero, so y = out bias.
    np.testing.assert_allclose(packed[1, 5], variables["params"]["out"]["bias"], atol=1e-6)


def test_attention_dropout():
    x = _x()
    module = MultiHeadAttention(num_heads=3, attention_dropout_rate=0.5)

    variables = _variables(module, x, randomise=False)

    @jax.jit
    def run(variables, x):
        det = module.apply(variables, x)
        plain = MultiHeadAttention(num_heads=3).apply(variables, x)
        a = module.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
        b = module.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
        return det, plain, a, b

    det, plain, a, b = run(variables, x)
    np.testing.assert_allclose(det, plain)
    assert not np.allclose(a, b)


def test_cross_attention_matches_manual_with_context_mask():
    x, context = _x(), _x(seed=3, length=4, dim=5)
    module = CrossAttention(num_heads=3)
    context_mask = jnp.array([[True, True, False, True], [False] * 4])

    variables = _variables(module, x, context)

    @jax.jit
    def run(variables, x, context, context_mask):
        visible = jnp.broadcast_to(context_mask[:, None, :], (B, L, 4))
        want = _manual(variables["params"], x, context, num_heads=3, visible=visible)
        got = module.apply(variables, x, context, context_mask=context_mask)
        return got, want

    got, want = run(variables, x, context, context_mask)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # No visible key: the attention output is zero, only the output bias remains.
    np.testing.assert_allclose(got[1], jnp.broadcast_to(variables["params"]["out"]["bias"], (L, D)))
    with pytest.raises(ValueError, match=r"context_mask must have shape \(2, 4\), got \(2, 3\)"):
        jax.eval_shape(
            lambda: module.apply(variables, x, context, context_mask=context_mask[:, :3])
        )


def test_bad_configuration_errors():
    x = _x()
    with pytest.raises(
        ValueError, match="num_heads must divide the model width 12.*got num_heads=5"
    ):
        MultiHeadAttention(num_heads=5).init(jax.random.key(0), x)
    with pytest.raises(
        ValueError, match="num_kv_heads must divide num_heads=4, got num_kv_heads=3"
    ):
        MultiHeadAttention(num_heads=4, num_kv_heads=3).init(jax.random.key(0), x)
    with pytest.raises(
        ValueError, match=r"positions must have shape \(2, 6\) \(or batch 1\), got \(2, 5\)"
    ):
        MultiHeadAttention(num_heads=3).init(jax.random.key(0), x, positions=_positions(5))
    with pytest.raises(ValueError, match=r"x must be \[B, L, D\], got shape \(6, 12\)"):
        MultiHeadAttention(num_heads=3).init(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match="make_mixer: unknown name 'lstm'"):
        make_mixer("lstm")
    # Regression: head_dim=0 silently meant D // num_heads.
    with pytest.raises(ValueError, match=r"head_dim must be a positive int or None .*got 0"):
        MultiHeadAttention(num_heads=3, head_dim=0).init(jax.random.key(0), x)


def test_mask_takes_explicit_positions():
    """A causal mask orders tokens by the given positions, not by array index."""
    x = _x()
    module = MultiHeadAttention(num_heads=3)
    reversed_positions = _positions()[:, ::-1]

    variables = _variables(module, x, randomise=False)

    @jax.jit
    def run(variables, x, reversed_positions):
        causal = AttentionMask(causal=True)
        got = module.apply(variables, x, mask=causal, positions=reversed_positions)
        return got, module.apply(variables, x[:, ::-1], mask=causal)[:, ::-1]

    got, want = run(variables, x, reversed_positions)
    np.testing.assert_allclose(got, want, atol=1e-5)
    explicit = dataclasses.replace(AttentionMask(causal=True))
    assert explicit.q_positions is None  # the caller's mask is not modified


def test_make_mixer_by_name():
    assert isinstance(make_mixer("attention", num_heads=2), MultiHeadAttention)
    assert type(make_mixer("mamba", d_model=8)).__name__ == "MambaMixer"


def test_bfloat16_compute_with_float32_params():
    x = _x()
    module = MultiHeadAttention(
        num_heads=3,
        qk_norm=True,
        dtype=jnp.bfloat16,
        position_encoding=make_position_encoding("rope"),
    )
    reference = MultiHeadAttention(
        num_heads=3, qk_norm=True, position_encoding=make_position_encoding("rope")
    )

    variables = _variables(module, x, randomise=False)

    @jax.jit
    def run(variables, x):
        got = module.apply(variables, x, mask=AttentionMask(causal=True))
        return got, reference.apply(variables, x, mask=AttentionMask(causal=True))

    got, want = run(variables, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    assert got.dtype == jnp.bfloat16
    # bf16 keeps 8 bits of mantissa through a few matmuls: agree to a few percent.
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2, rtol=5e-2)
    cache = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, decode=True), x)["cache"]
    assert cache["cached_key"].dtype == jnp.bfloat16
