"""What the kernel benchmarks need to know about the accelerator they run on.

The flash-attention kernel is timed against the attention the platform's
library already ships for the masks it does cover: cuDNN on a GPU (through
``jax.nn.dot_product_attention``) and splash attention on a TPU (JAX's Pallas
TPU kernel, ``jax.experimental.pallas.ops.tpu.splash_attention``). Both take
the causal mask and no mask (the unmasked call is the same work as
soft-causal attention with 0 < r < 1, which sees every key); neither takes
iLLaMA's soft-causal weights, which is why the kernel exists.

Float64 references run on the host CPU (``reference_device``): a TPU has no
float64 arithmetic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

Attention = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# The column name of each platform's library attention in the benchmark tables.
LIBRARY_NAMES = {"gpu": "cudnn", "tpu": "splash"}


def accelerator() -> str | None:
    """'gpu' or 'tpu' when JAX's default backend is one, else None (CPU: nothing is timed)."""
    backend = jax.default_backend()
    return backend if backend in LIBRARY_NAMES else None


def library_attention(
    backend: str, causal: bool, length: int, heads: int, interpret: bool = False
) -> Attention:
    """The platform library's attention over [B, L, H, D] q, k, v (self-attention, H kv heads).

    Args:
      backend: "gpu" (cuDNN) or "tpu" (splash attention).
      causal: the causal mask, else every query sees every key.
      length: the sequence length (splash builds its block mask for it ahead of time).
      heads: query heads = kv heads (splash's multi-head mask has one mask per head).
      interpret: run splash attention in Pallas's TPU interpreter (for the tests, on CPU).
    Returns:
      attend(q, k, v) -> [B, L, H, D], scale 1/sqrt(D), differentiable.
    """
    if backend == "gpu":
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"
        )
    if backend != "tpu":
        raise ValueError(f"library_attention: backend must be 'gpu' or 'tpu', got {backend!r}.")
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (length, length)
    head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    kernel = splash.make_splash_mha_single_device(
        splash.MultiHeadMask([head_mask] * heads), interpret=interpret
    )

    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.shape[1:3] != (length, heads):
                raise ValueError(
                    f"splash attention was built for [B, {length}, {heads}, D]; "
                    f"{name} has shape {x.shape}."
                )
        heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # splash takes one example [H, L, D]
        # Splash does not scale the logits: scale the queries as the other paths do.
        scaled_q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
        out = jax.vmap(kernel)(heads_major(scaled_q), heads_major(k), heads_major(v))
        return heads_major(out)

    return attend


@contextlib.contextmanager
def reference_device() -> Iterator[None]:
    """Float64 on the host CPU for the references (TPUs have no float64; GPUs do, slowly)."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError as error:
        raise RuntimeError(
            "The benchmarks' float64 references run on the host CPU, but JAX has no CPU "
            f"backend here ({error}): add cpu to JAX_PLATFORMS, e.g. JAX_PLATFORMS=tpu,cpu."
        ) from error
    with jax.enable_x64(True), jax.default_device(cpu):
        yield


def failure(error: Exception) -> str:
    """A table cell for a case that raised: on a first run on new hardware one case that the
    compiler rejects should be reported in its row, not end the table (and the stage)."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"failed: {type(error).__name__}: {first_line[:120]}"
