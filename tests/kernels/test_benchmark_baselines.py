"""The libraries' attention the kernel benchmarks time the flash kernel against computes
what the benchmark tables say it does (experiments/benchmarks/kernel_baselines.py).

A benchmark that compared the kernel with a baseline computing other work (an unscaled
or wrongly masked splash attention) would report a meaningless ratio. Splash attention
(the TPU baseline) runs here in Pallas's TPU interpreter; cuDNN needs a GPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effformer.ops.attention import dot_product_attention
from effformer.ops.masks import AttentionMask

_PATH = Path(__file__).parents[2] / "experiments" / "benchmarks" / "kernel_baselines.py"
_SPEC = importlib.util.spec_from_file_location("kernel_baselines", _PATH)
kernel_baselines = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(kernel_baselines)

# float32 kernel against a float64 reference: softmax sums over 256 keys round to a few
# 1e-7 of the largest value (measured 3e-7); a wrong mask or scale moves outputs by 1e-2.
TOLERANCE = 1e-5


def _relative_errors(actual, expected) -> list[float]:
    return [
        float(np.abs(np.asarray(a, np.float64) - np.asarray(b)).max() / np.abs(b).max())
        for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    ]


@pytest.mark.parametrize("causal", [True, False])
def test_splash_baseline_matches_reference_forward_and_gradients(causal):
    batch, length, heads, head_dim = 2, 256, 2, 32  # two 128-blocks: causal skips one
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, d_out = (
        jax.random.normal(key, (batch, length, heads, head_dim), jnp.float32) for key in keys
    )
    splash = kernel_baselines.library_attention("tpu", causal, length, heads, interpret=True)
    out, pullback = jax.vjp(splash, q, k, v)
    got = (out, pullback(d_out))

    with kernel_baselines.reference_device():
        upcast = [np.asarray(x, np.float64) for x in (q, k, v, d_out)]

        def reference(q, k, v):
            mask = AttentionMask(causal=causal)
            return dot_product_attention(q, k, v, mask=mask, implementation="reference")

        out64, pullback64 = jax.vjp(reference, *upcast[:3])
        expected = (out64, pullback64(upcast[3]))
        assert out64.dtype == jnp.float64 and out64.devices() == {jax.devices("cpu")[0]}
    assert max(_relative_errors(got, expected)) < TOLERANCE


def test_splash_baseline_rejects_the_wrong_shape():
    splash = kernel_baselines.library_attention("tpu", True, 256, 2, interpret=True)
    x = jnp.zeros((1, 128, 2, 32), jnp.float32)
    with pytest.raises(ValueError, match=r"built for \[B, 256, 2, D\]; q has shape \(1, 128"):
        splash(x, x, x)


def test_library_attention_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="backend must be 'gpu' or 'tpu', got 'cpu'"):
        kernel_baselines.library_attention("cpu", True, 128, 1)


def test_accelerator_is_none_on_cpu():
    assert jax.default_backend() != "cpu" or kernel_baselines.accelerator() is None
