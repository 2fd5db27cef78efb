"""decode_attention: every implementation against attention over each sequence's valid keys.

Compilation dominates on CPU, so every implementation runs on one set of
shapes (batch 4, cache 40 slots, 4 query heads on 2 kv heads, head_dim 8) and
several length vectors go through the same compiled program. The Pallas
kernel runs in interpret mode with block_k=16, so 40 slots are two full tiles
and a partial one, and the lengths (0, 1, 40, not multiples of 16, ...) cut
tiles, heads and programs in different places.
"""

import importlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from effformer.ops.decode_attention import decode_attention

# The module itself (effformer.ops re-exports the function under the module's name).
decode_module = importlib.import_module("effformer.ops.decode_attention")

BATCH, MAX_LEN, HEADS, KV_HEADS, HEAD_DIM = 4, 40, 4, 2, 8
BLOCK_K = 16
LENGTH_SETS = (
    (0, 1, 40, 23),  # empty, one key, full cache, a partial last tile
    (40, 40, 40, 40),  # equal lengths: the programs split heads evenly
    (17, 16, 33, 2),  # one key past a tile boundary, exactly one tile, ...
    (0, 0, 0, 0),  # no work at all: every program is empty
)


def _inputs(seed=0, batch=BATCH, max_len=MAX_LEN, heads=HEADS, kv_heads=KV_HEADS, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, 1, heads, HEAD_DIM)).astype(dtype)
    k = rng.standard_normal((batch, max_len, kv_heads, HEAD_DIM)).astype(dtype)
    v = rng.standard_normal((batch, max_len, kv_heads, HEAD_DIM)).astype(dtype)
    return q, k, v


def _attention_over_valid_keys(q, k, v, lengths, scale=None):
    """float64 loop: each sequence's plain softmax attention over its first `length` keys."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, _, heads, head_dim = q.shape
    group = heads // k.shape[2]
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    out = np.zeros(q.shape)
    for b, length in enumerate(lengths):
        for h in range(heads):
            keys, values = k[b, :length, h // group], v[b, :length, h // group]
            if length == 0:
                continue  # no visible key: zero output
            logits = keys @ q[b, 0, h] * scale
            weights = np.exp(logits - logits.max())
            out[b, 0, h] = weights @ values / weights.sum()
    return out


# One compiled program per static configuration; the lengths are traced, so every length
# vector reuses it.
_jitted = jax.jit(
    decode_attention, static_argnames=("scale", "num_splits", "implementation", "block_k")
)


def _attend(q, k, v, lengths, **kwargs):
    """The op, jitted; the Pallas path eagerly (its kernel is jitted on its own, so the
    interpreted kernel compiles once per configuration whoever calls it)."""
    run = decode_attention if kwargs.get("implementation") == "pallas" else _jitted
    return run(q, k, v, jnp.asarray(lengths, jnp.int32), **kwargs)


def _check_all_length_sets(q, k, v, **kwargs):
    for lengths in LENGTH_SETS:
        out = _attend(q, k, v, lengths, **kwargs)
        assert out.shape == q.shape and out.dtype == q.dtype
        expected = _attention_over_valid_keys(q, k, v, lengths)
        np.testing.assert_allclose(np.asarray(out), expected, atol=2e-6, rtol=2e-5)
        empty = np.asarray(lengths) == 0
        assert np.all(np.asarray(out)[empty] == 0.0)  # exactly zero, not NaN


@pytest.mark.parametrize(
    "implementation, num_splits, block_k",
    [
        ("reference", None, None),
        ("xla", 1, None),
        ("xla", 3, None),  # 40 keys in blocks of 14: the last block padded
        # 8 programs on 16-key tiles: ranges cross head boundaries, heads span programs.
        ("pallas", 1, BLOCK_K),
        # 24 programs on 64-key tiles: the 40-slot cache is shorter than a tile (padded),
        # one tile per head, more programs than tiles (many do nothing).
        ("pallas", 3, 64),
    ],
)
def test_matches_attention_over_valid_keys(implementation, num_splits, block_k):
    q, k, v = _inputs()
    _check_all_length_sets(
        q, k, v, implementation=implementation, num_splits=num_splits, block_k=block_k
    )


def test_xla_multi_query_and_multi_head():
    lengths = (3, 0, 40, 29)
    for seed, kv_heads in ((2, 1), (3, HEADS)):
        q, k, v = _inputs(seed=seed, kv_heads=kv_heads)
        out = _attend(q, k, v, lengths, implementation="xla", num_splits=3)
        np.testing.assert_allclose(
            np.asarray(out), _attention_over_valid_keys(q, k, v, lengths), atol=2e-6, rtol=2e-5
        )


def test_default_implementation_and_scale():
    q, k, v = _inputs(seed=3)
    lengths = (5, 40, 0, 12)
    out = _attend(q, k, v, lengths, scale=0.7)
    expected = _attention_over_valid_keys(q, k, v, lengths, scale=0.7)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize(
    ("backend", "devices", "dtype", "head_dim", "expected"),
    [
        ("gpu", 1, jnp.bfloat16, 128, "pallas"),  # what was timed faster on the H200
        ("gpu", 1, jnp.float16, 64, "pallas"),
        ("gpu", 1, jnp.float32, 128, "xla"),  # untimed
        ("gpu", 1, jnp.bfloat16, 96, "xla"),  # the Triton kernel cannot take it
        ("gpu", 8, jnp.bfloat16, 128, "xla"),  # jit would not split the custom call
        ("cpu", 1, jnp.bfloat16, 128, "xla"),  # interpret mode is for tests
        ("tpu", 1, jnp.bfloat16, 128, "xla"),  # never run on a TPU
    ],
)
def test_default_implementation_is_the_kernel_only_where_it_was_timed_faster(
    monkeypatch, backend, devices, dtype, head_dim, expected
):
    monkeypatch.setattr(decode_module, "_backend", lambda: backend)
    monkeypatch.setattr(decode_module.jax, "device_count", lambda: devices)
    q = jax.ShapeDtypeStruct((2, 1, 4, head_dim), dtype)
    assert decode_module.default_implementation(q) == expected


def test_keys_past_the_length_are_invisible():
    """Whatever finite values sit in the unfilled slots, the output does not change."""
    q, k, v = _inputs(seed=4)
    lengths = LENGTH_SETS[0]
    slot = np.arange(MAX_LEN)[None, :, None, None]
    stale = slot >= np.asarray(lengths)[:, None, None, None]
    k_stale, v_stale = np.where(stale, 1e4, k), np.where(stale, -1e4, v)
    for implementation, splits in (("reference", None), ("xla", 3), ("pallas", 1)):
        block = BLOCK_K if implementation == "pallas" else None
        kwargs = dict(implementation=implementation, num_splits=splits, block_k=block)
        np.testing.assert_allclose(
            np.asarray(_attend(q, k_stale, v_stale, lengths, **kwargs)),
            np.asarray(_attend(q, k, v, lengths, **kwargs)),
            atol=1e-6,
        )


def test_traced_lengths_are_clipped_to_the_cache():
    q, k, v = _inputs(seed=5)
    np.testing.assert_array_equal(
        np.asarray(_attend(q, k, v, (-3, 41, 500, 40), implementation="xla", num_splits=3)),
        np.asarray(_attend(q, k, v, (0, 40, 40, 40), implementation="xla", num_splits=3)),
    )


def test_xla_gradients_numerically(x64):
    """The split-K path's gradients (which the Pallas path also uses) by finite differences."""
    q, k, v = _inputs(seed=6, max_len=12, dtype=np.float64)
    lengths = jnp.asarray((0, 5, 12, 7))

    @jax.jit
    def attend(q, k, v):
        return decode_attention(q, k, v, lengths, implementation="xla", num_splits=5)

    check_grads(attend, (q, k, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def _attention_gradients(q, k, v, lengths, cotangent):
    """float64 loop: d(sum(out * cotangent)) / d(q, k, v) from the softmax-attention formulas."""
    q, k, v, cotangent = (np.asarray(x, np.float64) for x in (q, k, v, cotangent))
    group = q.shape[2] // k.shape[2]
    scale = 1.0 / np.sqrt(q.shape[-1])
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b, length in enumerate(lengths):
        for h in range(q.shape[2]):
            if length == 0:
                continue
            keys, values = k[b, :length, h // group], v[b, :length, h // group]
            logits = keys @ q[b, 0, h] * scale
            p = np.exp(logits - logits.max())
            p /= p.sum()
            g = cotangent[b, 0, h]
            dp = values @ g
            ds = p * (dp - p @ dp)  # softmax Jacobian
            dq[b, 0, h] = scale * ds @ keys
            dk[b, :length, h // group] += scale * np.outer(ds, q[b, 0, h])
            dv[b, :length, h // group] += np.outer(p, g)
    return dq, dk, dv


@pytest.mark.parametrize("implementation, num_splits", [("reference", None), ("pallas", 1)])
def test_gradients_match_the_attention_formulas(implementation, num_splits):
    """The Pallas path differentiates through the XLA path (whose gradients are also checked
    numerically above); the reference by plain autodiff."""
    q, k, v = _inputs(seed=7)
    lengths = LENGTH_SETS[0]
    cotangent = np.random.default_rng(8).standard_normal(q.shape).astype(np.float32)
    block = BLOCK_K if implementation == "pallas" else None

    def loss(q, k, v):
        out = decode_attention(
            q,
            k,
            v,
            jnp.asarray(lengths),
            implementation=implementation,
            num_splits=num_splits,
            block_k=block,
        )
        return jnp.sum(out * cotangent)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    # The Pallas path runs eagerly: its kernel and its backward are jitted on their own.
    got = (grad if implementation == "pallas" else jax.jit(grad))(q, k, v)
    expected = _attention_gradients(q, k, v, lengths, cotangent)
    for name, got_grad, want in zip("qkv", got, expected, strict=True):
        np.testing.assert_allclose(
            np.asarray(got_grad), want, atol=2e-6, rtol=2e-5, err_msg=f"d{name}"
        )


def test_pallas_logs_interpret_mode_on_cpu(caplog):
    q, k, v = _inputs()
    decode_module._logged.clear()
    with caplog.at_level(logging.INFO, logger=decode_module.__name__):
        decode_attention(
            q,
            k,
            v,
            jnp.asarray(LENGTH_SETS[0]),
            implementation="pallas",
            num_splits=1,
            block_k=BLOCK_K,
        )
    assert "interpret=True" in caplog.text


def test_pallas_falls_back_to_xla_where_it_cannot_run(caplog, monkeypatch):
    q, k, v = _inputs(seed=9)
    lengths = (5, 40, 0, 12)
    monkeypatch.setattr(decode_module.jax, "default_backend", lambda: "tpu")
    decode_module._logged.clear()
    with caplog.at_level(logging.INFO, logger=decode_module.__name__):
        # A fresh jit, so the choice is traced under the patched backend.
        out = jax.jit(
            lambda q, k, v, lengths: decode_attention(
                q, k, v, lengths, implementation="pallas", num_splits=3
            )
        )(q, k, v, jnp.asarray(lengths))
    monkeypatch.undo()
    assert "using 'xla' instead of 'pallas'" in caplog.text and "'tpu'" in caplog.text
    np.testing.assert_allclose(
        np.asarray(out), _attention_over_valid_keys(q, k, v, lengths), atol=2e-6, rtol=2e-5
    )
    gpu_reason = decode_module._pallas_unsupported_reason
    assert "power of two" in gpu_reason(jnp.zeros((1, 1, 2, 96), jnp.bfloat16), "gpu")
    assert "float16, bfloat16 or float32" in gpu_reason(np.zeros((1, 1, 2, 64)), "cpu")
    assert gpu_reason(jnp.zeros((1, 1, 2, 128), jnp.bfloat16), "gpu") is None


def _bad(**changes):
    q, k, v = _inputs()
    arguments = dict(q=q, k_cache=k, v_cache=v, cache_lengths=np.full((BATCH,), 3, np.int32))
    arguments.update(changes)
    return arguments


@pytest.mark.parametrize(
    "arguments, message",
    [
        (_bad(q=np.zeros((BATCH, HEADS, HEAD_DIM), np.float32)), "q must be"),
        (_bad(q=np.zeros((BATCH, 2, HEADS, HEAD_DIM), np.float32)), "one query per sequence"),
        (_bad(k_cache=np.zeros((BATCH, MAX_LEN, HEAD_DIM), np.float32)), "k_cache must be"),
        (_bad(k_cache=np.zeros((3, MAX_LEN, KV_HEADS, HEAD_DIM), np.float32)), "q's batch"),
        (_bad(k_cache=np.zeros((BATCH, MAX_LEN, KV_HEADS, 4), np.float32)), "head_dim"),
        (_bad(v_cache=np.zeros((BATCH, 8, KV_HEADS, HEAD_DIM), np.float32)), "v_cache must"),
        (
            _bad(
                k_cache=np.zeros((BATCH, MAX_LEN, 3, HEAD_DIM), np.float32),
                v_cache=np.zeros((BATCH, MAX_LEN, 3, HEAD_DIM), np.float32),
            ),
            "multiple of the cache's kv heads",
        ),
        (_bad(v_cache=np.zeros((BATCH, MAX_LEN, KV_HEADS, HEAD_DIM), np.float16)), "dtype"),
        (_bad(cache_lengths=np.zeros((BATCH, 1), np.int32)), "cache_lengths must be"),
        (_bad(cache_lengths=np.zeros((BATCH,), np.float32)), "integer array"),
        (_bad(cache_lengths=np.asarray([0, 3, 41, 2])), r"\[0, max_len=40\]"),
        (_bad(cache_lengths=np.asarray([0, -1, 4, 2])), r"\[0, max_len=40\]"),
        (_bad(num_splits=0), "num_splits must be"),
        (_bad(num_splits=MAX_LEN + 1), "num_splits must be"),
        (_bad(num_splits=True), "num_splits must be"),
        (_bad(implementation="cudnn"), "implementation must be"),
        (_bad(block_k=24), "block_k must be"),
        (_bad(block_k=8), "block_k must be"),
    ],
)
def test_bad_input_is_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        decode_attention(**arguments)


def test_mosaic_gpu_kernel_through_the_op_matches_and_differentiates(caplog):
    # "pallas_mosaic_gpu" runs the Mosaic GPU kernel (interpreted here) on float16 caches
    # (64-key tiles: the 40-slot cache is shorter than one); its gradient is the "xla"
    # path's, as for "pallas".
    q, k, v = _inputs(seed=3, dtype=np.float16)
    lengths = jnp.asarray((0, 1, 40, 23), jnp.int32)
    decode_module._logged.clear()
    with caplog.at_level(logging.INFO, logger=decode_module.__name__):
        out = decode_attention(q, k, v, lengths, implementation="pallas_mosaic_gpu", block_k=64)
    assert "instead of" not in caplog.text
    expected = _attention_over_valid_keys(q, k, v, (0, 1, 40, 23))
    # float16 probabilities and output: 3e-3 of the largest output.
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=3e-3, rtol=0)
    grads = jax.grad(
        lambda q: (
            decode_attention(q, k, v, lengths, implementation="pallas_mosaic_gpu", block_k=64)
            .astype(jnp.float32)
            .sum()
        )
    )(q)
    xla_grads = jax.grad(
        lambda q: decode_attention(q, k, v, lengths, implementation="xla").astype(jnp.float32).sum()
    )(q)
    np.testing.assert_array_equal(np.asarray(grads), np.asarray(xla_grads))


def test_mosaic_gpu_kernel_falls_back_to_xla_where_it_cannot_run(caplog):
    q, k, v = _inputs(seed=4)  # float32 caches: no WGMMA operands
    lengths = (5, 40, 0, 12)
    decode_module._logged.clear()
    with caplog.at_level(logging.INFO, logger=decode_module.__name__):
        out = decode_attention(q, k, v, jnp.asarray(lengths), implementation="pallas_mosaic_gpu")
    assert "instead of 'pallas_mosaic_gpu'" in caplog.text and "float32" in caplog.text
    np.testing.assert_allclose(
        np.asarray(out), _attention_over_valid_keys(q, k, v, lengths), atol=2e-6, rtol=2e-5
    )
    reason = decode_module._mosaic_gpu_unsupported_reason
    half = jnp.zeros((1, 8, 2, 64), jnp.float16)
    assert "not 'tpu'" in reason(jnp.zeros((1, 1, 4, 64)), half, 128, "tpu")
    assert "multiple of 64" in reason(jnp.zeros((1, 1, 4, 64)), half, 32, "gpu")
    assert reason(jnp.zeros((1, 1, 4, 64)), half, 128, "gpu") is None
