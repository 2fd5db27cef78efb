"""The Mosaic TPU split-K decode-attention kernel: TPU interpret mode, Mosaic lowering, dispatch.

No TPU is needed. Pallas's TPU interpreter runs the kernel on CPU and
simulates its DMAs and semaphores (a copy's data arrives only when it is
waited on), fills unwritten memory with NaN (so a partial slot read without
being written would show up) and, with two simulated TensorCores, splits the
"parallel" grid between them and reports data races. The lowering test runs
Pallas's Mosaic lowering rules from the CPU host; Mosaic's own passes and
libtpu's compiler never see the kernel here, and it has never run on a TPU.
"""

import functools
import importlib
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Private module: where the interpreter records whether its race detector found a race
# (the public InterpretParams docstring names `races.races_found`).
from jax._src.pallas.mosaic.interpret import interpret_pallas_call
from jax.experimental.pallas import tpu as pltpu

from effformer.kernels import decode_attention_tpu as tpu_kernel
from effformer.ops.decode_attention import decode_attention

decode_module = importlib.import_module("effformer.ops.decode_attention")

MAX_LEN, HEAD_DIM, BLOCK_K = 40, 128, 16
# Two simulated TensorCores share the grid; the race detector watches every buffer.
INTERPRET = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)


def _inputs(seed, heads, kv_heads, dtype=np.float32, batch=4):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, HEAD_DIM)).astype(dtype)
    k = rng.standard_normal((batch, MAX_LEN, kv_heads, HEAD_DIM)).astype(dtype)
    v = rng.standard_normal((batch, MAX_LEN, kv_heads, HEAD_DIM)).astype(dtype)
    return q, k, v


def _reference(q, k, v, lengths):
    """The op's dense reference, in float64: [B, H, Dh]."""
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v))
        out = decode_attention(q[:, None], k, v, jnp.asarray(lengths), implementation="reference")
        return np.asarray(out[:, 0])


# Cases: 16-key tiles over a 40-slot cache (lengths 40 and 23 end in partial tiles, read as
# the window ending at max_len). The tile line and its cut into programs:
#   GQA (1, 0, 40, 23), 4 programs of 2 tiles: program 0 takes sequence 0's only tile and
#     sequence 2's first (stepping over the empty sequence 1), program 1 the rest of
#     sequence 2, program 2 sequence 3, program 3 nothing.
#   MHA (40, 0, 1, 33), 5 programs of 2 tiles: program 1 spans sequences 0 and 2 (over the
#     empty 1), sequence 3 is split over programs 2 and 3, program 4 is idle.
# Tolerances from the measured max abs errors against float64: 3.1e-7 and 1.4e-7 in
# float32; 3.2e-3 in bfloat16, exactly the error of rounding the float64 reference to
# bfloat16 (outputs up to 3.1 in size; the op's "xla" path has the same error).
@pytest.mark.parametrize(
    "heads, kv_heads, lengths, num_programs, dtype, atol",
    [
        (4, 2, (1, 0, 40, 23), 4, np.float32, 1e-6),
        (2, 2, (40, 0, 1, 33), 5, np.float32, 1e-6),
        (4, 2, (1, 0, 40, 23), 4, jnp.bfloat16, 8e-3),
    ],
    ids=["gqa-f32", "mha-f32", "gqa-bf16"],
)
def test_interpret_mode_matches_the_reference(heads, kv_heads, lengths, num_programs, dtype, atol):
    q, k, v = _inputs(seed=heads + num_programs, heads=heads, kv_heads=kv_heads, dtype=dtype)
    out = tpu_kernel.split_k_decode_attention_tpu(
        q,
        k,
        v,
        jnp.asarray(lengths, jnp.int32),
        scale=HEAD_DIM**-0.5,
        num_programs=num_programs,
        block_k=BLOCK_K,
        interpret=INTERPRET,
    )
    out = jax.block_until_ready(out)  # the interpreter runs asynchronously
    assert not interpret_pallas_call.races.races_found
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out, np.float64)
    np.testing.assert_allclose(out, _reference(q, k, v, lengths), atol=atol, rtol=0)
    assert np.all(out[np.asarray(lengths) == 0] == 0.0)  # exactly zero, not NaN


def test_lowers_to_mosaic_for_tpu():
    """Pallas's Mosaic lowering accepts the kernel at a realistic decode size (bf16, batch 4,
    8192 slots, 32 query heads on 8 kv heads, head_dim 128, the default tile). This proves
    the Pallas-to-Mosaic lowering only: not Mosaic's layout passes, not libtpu's compiler."""
    batch, max_len, heads, kv_heads, head_dim = 4, 8192, 32, 8, 128
    block_k = tpu_kernel.default_block_k(kv_heads, max_len)
    assert block_k * kv_heads == tpu_kernel.DEFAULT_TILE_ROWS
    call = jax.jit(
        functools.partial(
            tpu_kernel.split_k_decode_attention_tpu,
            scale=head_dim**-0.5,
            num_programs=2,
            block_k=block_k,
        )
    )
    cache = jax.ShapeDtypeStruct((batch, max_len, kv_heads, head_dim), jnp.bfloat16)
    arguments = (
        jax.ShapeDtypeStruct((batch, heads, head_dim), jnp.bfloat16),
        cache,
        cache,
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    )
    lowered = call.trace(*arguments).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


def test_op_runs_the_tpu_kernel_on_tpu(monkeypatch, caplog):
    """On backend "tpu" the op calls the Mosaic kernel (interpret=False) with the TPU
    defaults; here the entry is replaced by one that records the call and runs the kernel
    in interpret mode. Gradients go through the XLA path."""
    calls = []
    real_entry = tpu_kernel.split_k_decode_attention_tpu

    def recording_entry(*args, interpret, **kwargs):
        calls.append(dict(kwargs, interpret=interpret))
        return real_entry(*args, interpret=True, **kwargs)

    monkeypatch.setattr(decode_module.jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(tpu_kernel, "split_k_decode_attention_tpu", recording_entry)
    q, k, v = _inputs(seed=11, heads=4, kv_heads=2)
    lengths = (5, 40, 0, 17)
    decode_module._logged.clear()
    with caplog.at_level(logging.INFO, logger=decode_module.__name__):
        out = decode_attention(q[:, None], k, v, jnp.asarray(lengths), implementation="pallas")
        split_out = decode_attention(
            q[:, None], k, v, jnp.asarray(lengths), implementation="pallas", num_splits=2
        )
    assert caplog.text == ""  # no fallback, no interpret-mode note
    default_block = tpu_kernel.default_block_k(2, MAX_LEN)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    assert calls == [
        dict(scale=scale, num_programs=1, block_k=default_block, interpret=False),
        dict(scale=scale, num_programs=2 * 4, block_k=default_block, interpret=False),
    ]
    expected = _reference(q, k, v, lengths)
    for result in (out, split_out):
        np.testing.assert_allclose(np.asarray(result[:, 0]), expected, atol=2e-6, rtol=0)

    def loss(implementation):
        def f(q):
            out = decode_attention(q, k, v, jnp.asarray(lengths), implementation=implementation)
            return jnp.sum(out * np.cos(np.arange(HEAD_DIM)))

        return f

    calls.clear()
    grad = jax.grad(loss("pallas"))(q[:, None])
    assert len(calls) == 1  # the forward only: the backward is the XLA path's
    expected_grad = jax.grad(loss("reference"))(q[:, None])
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), atol=2e-6, rtol=0)


def test_op_falls_back_to_xla_where_the_tpu_kernel_does_not_apply(monkeypatch, caplog):
    reason = decode_module._pallas_unsupported_reason
    assert reason(jnp.zeros((1, 1, 2, 128), jnp.bfloat16), "tpu") is None
    assert reason(jnp.zeros((1, 1, 2, 256), jnp.float32), "tpu") is None
    assert "multiple of 128" in reason(jnp.zeros((1, 1, 2, 64), jnp.bfloat16), "tpu")
    assert "bfloat16 or float32" in reason(jnp.zeros((1, 1, 2, 128), jnp.float16), "tpu")
    assert "no 'metal' version" in reason(jnp.zeros((1, 1, 2, 128), jnp.float32), "metal")

    monkeypatch.setattr(decode_module.jax, "default_backend", lambda: "metal")
    q, k, v = _inputs(seed=12, heads=2, kv_heads=1, batch=2)
    lengths = jnp.asarray((7, 40))
    decode_module._logged.clear()
    with caplog.at_level(logging.INFO, logger=decode_module.__name__):
        for _ in range(2):
            out = decode_attention(q[:, None], k, v, lengths, implementation="pallas")
    assert caplog.text.count("using 'xla' instead of 'pallas'") == 1
    np.testing.assert_allclose(
        np.asarray(out[:, 0]), _reference(q, k, v, (7, 40)), atol=2e-6, rtol=0
    )


@pytest.mark.parametrize(
    "arrays, keywords, message",
    [
        ({}, dict(block_k=24), "block_k must be a power of two"),
        ({}, dict(num_programs=0), "num_programs must be >= 1"),
        (dict(k_cache=np.zeros((4, MAX_LEN, 2, 64), np.float32)), {}, "k_cache must be"),
        (dict(v_cache=np.zeros((4, 8, 2, HEAD_DIM), np.float32)), {}, "v_cache must have"),
        (
            dict(
                k_cache=np.zeros((4, MAX_LEN, 3, HEAD_DIM), np.float32),
                v_cache=np.zeros((4, MAX_LEN, 3, HEAD_DIM), np.float32),
            ),
            {},
            "multiple of kv_heads",
        ),
        (dict(cache_lengths=np.zeros((3,), np.int32)), {}, "cache_lengths must have shape"),
    ],
)
def test_bad_arguments_are_rejected(arrays, keywords, message):
    q, k, v = _inputs(seed=13, heads=4, kv_heads=2)
    values = dict(q=q, k_cache=k, v_cache=v, cache_lengths=np.zeros((4,), np.int32))
    values.update(arrays)
    settings = dict(scale=1.0, num_programs=2, block_k=BLOCK_K)
    settings.update(keywords)
    with pytest.raises(ValueError, match=message):
        tpu_kernel.split_k_decode_attention_tpu(**values, **settings)
