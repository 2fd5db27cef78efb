"""Decode attention: one new query per sequence against a KV cache with per-sequence lengths.

``decode_attention(q [B, 1, H, Dh], k_cache, v_cache [B, max_len, Hkv, Dh],
cache_lengths [B])`` computes, for every sequence ``b`` and query head ``h``,
``softmax(scale * q k^T over keys 0 .. cache_lengths[b] - 1) @ v`` with kv head
``h // (H // Hkv)`` (grouped-query attention). Keys at or after a sequence's
length are invisible, whatever finite values their slots hold (NaN or inf
there would reach the output through ``0 * v``); a sequence of length 0
outputs zeros. The layout is the
one of :func:`effformer.ops.attention.dot_product_attention` and of the KV
cache of :class:`effformer.mixers.attention.MultiHeadAttention`
(``cached_key``/``cached_value``).

Split-K (Flash-Decoding): with a single query there is no query axis to
parallelise over, so the keys are split and each part yields a partial result
(running max ``m``, normaliser ``l = sum exp(s - m)``, unnormalised output
``o = sum exp(s - m) v``); partials combine exactly, by their log-sum-exp:
``M = max m_i``, ``out = sum_i exp(m_i - M) o_i / sum_i exp(m_i - M) l_i``.

Implementations:

``"reference"``
    Dense softmax over the whole cache with invisible keys masked, kv heads
    repeated, in the input dtype (float64 works). The slow twin.
``"xla"``
    The split-K math in jnp: the cache is cut into ``num_splits`` equal blocks
    of keys (the last padded), each block's partial is computed and the
    partials are combined by their log-sum-exp. Float32 (float64 for float64
    inputs). Differentiable.
``"pallas"``
    :mod:`effformer.kernels.decode_attention`: the kernel walks only the tiles
    of ``block_k`` keys that hold valid keys, and spreads them evenly over
    ``num_splits * B * Hkv`` programs regardless of head and sequence
    boundaries (Lean Attention's stream-K schedule, described there), then
    combines the partials in XLA. GPU through the Triton lowering; on CPU it
    runs with ``interpret=True`` (logged once). On TPU,
    :mod:`effformer.kernels.decode_attention_tpu`: the same schedule with the
    cache left in HBM and copied tile by tile (double-buffered DMA), a tile
    holding ``block_k`` keys of all kv heads of one sequence, spread over
    ``num_splits * B`` programs (default: one per TensorCore); it has been
    checked in TPU interpret mode and by lowering to Mosaic, never run on a
    TPU. Elsewhere, on a GPU for shapes the Triton lowering cannot take
    (head_dim not a power of two), on a TPU for head_dim not a multiple of 128
    or float16, and for float64 (the kernels accumulate in float32) it falls
    back to ``"xla"`` and logs why once. Inference only: gradients are those
    of the ``"xla"`` path (a ``custom_vjp`` recomputes it), which computes the
    same function.
``"pallas_mosaic_gpu"``
    :mod:`effformer.kernels.decode_attention_mosaic_gpu`: the same schedule and
    combination as a Mosaic GPU kernel (TMA copies, WGMMA products), the port away
    from Pallas's Triton backend (deprecated from jax 0.11). GPU; on CPU it runs in
    Mosaic GPU's interpreter (logged once). It takes float16 / bfloat16 caches, at
    most 64 query heads per kv head and ``block_k`` a multiple of 64; otherwise, and
    on other backends, it falls back to ``"xla"`` and logs why once. Checked in the
    interpreter and by lowering for CUDA, not yet run on a GPU; never chosen by
    ``implementation=None``. Gradients as ``"pallas"``.

``implementation=None`` (:func:`default_implementation`) picks ``"pallas"`` on GPU
for float16 / bfloat16 caches the Triton kernel takes, else ``"xla"``. On an H200
(experiments/benchmarks/README.md, "Pallas kernels on an NVIDIA H200: second
session"; bfloat16, head dim 128) the kernel took 0.05-1.05 ms against the ``"xla"`` path's 0.05-1.22 ms over
caches of 17 MB to 4.3 GB, reading the largest at the full measured bandwidth, and
0.05 / 0.18 ms against 0.11 / 1.03 ms on ragged GQA caches (it reads only the valid
tiles): as fast or faster everywhere timed (one row within noise: 0.063 against 0.06
ms). Float32 caches were not timed and stay on ``"xla"``; so does every other backend
(the TPU version has not run on a TPU), and several devices unless each can run the
kernel on its own sequences (a mesh the batch splits over: ``ops.kernel_sharding``;
jit's sharding cannot split a kernel's custom call).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from effformer.kernels import decode_attention as kernel
from effformer.kernels import decode_attention_mosaic_gpu as mosaic_kernel
from effformer.kernels import decode_attention_tpu as tpu_kernel
from effformer.ops import kernel_sharding

Array = jax.Array

IMPLEMENTATIONS = ("reference", "xla", "pallas", "pallas_mosaic_gpu")

# Keys per block of the "xla" path when num_splits is not given. Not tuned: on the shared
# 2-core CPU the split count made no difference beyond the noise (and splitting did not
# beat the dense reference there); it bounds the [B, H, splits, split] score blocks for
# long caches. Untested on GPU (experiments/benchmarks/README.md, "Decode attention").
XLA_KEYS_PER_SPLIT = 2048

_PALLAS_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def _reference(q: Array, k: Array, v: Array, lengths: Array, scale: float) -> Array:
    """q [B, H, Dh], k/v [B, L, Hkv, Dh] -> [B, H, Dh], dense, in the input dtype."""
    num_heads, num_kv_heads = q.shape[1], k.shape[2]
    k = jnp.repeat(k, num_heads // num_kv_heads, axis=2)
    v = jnp.repeat(v, num_heads // num_kv_heads, axis=2)
    logits = jnp.einsum("bhd,blhd->bhl", q, k) * jnp.asarray(scale, q.dtype)
    visible = jnp.arange(k.shape[1])[None, None, :] < lengths[:, None, None]
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnormalised = jnp.exp(logits - row_max)
    total = unnormalised.sum(axis=-1, keepdims=True)
    probs = unnormalised / jnp.where(total == 0.0, 1.0, total)
    return jnp.einsum("bhl,blhd->bhd", probs, v)


def _xla(q: Array, k: Array, v: Array, lengths: Array, scale: float, num_splits: int) -> Array:
    """Split-K in jnp: per-block partials (m, l, o), combined by their log-sum-exp."""
    batch, num_heads, head_dim = q.shape
    max_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    split_len = math.ceil(max_len / num_splits)
    padding = split_len * num_splits - max_len
    if padding:
        k = jnp.pad(k, ((0, 0), (0, padding), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, padding), (0, 0), (0, 0)))
    k = k.reshape(batch, num_splits, split_len, num_kv_heads, head_dim)
    v = v.reshape(batch, num_splits, split_len, num_kv_heads, head_dim)
    qg = q.astype(dtype).reshape(batch, num_kv_heads, group, head_dim)
    # Scores keep the cache's [split, key, head] order, so XLA reads K and V in place
    # (the [B, H, L] order was ~20% slower on CPU: it transposes the cache).
    s = jnp.einsum("bhgd,bsjhd->bsjhg", qg, k.astype(dtype)) * jnp.asarray(scale, dtype)
    key_index = jnp.arange(num_splits * split_len).reshape(num_splits, split_len)
    visible = key_index[None] < lengths[:, None, None]  # [B, splits, split_len]
    s = jnp.where(visible[..., None, None], s, -jnp.inf)
    # The maxima only shift exponents (they cancel in the ratio), so they carry no gradient.
    m = jax.lax.stop_gradient(s.max(axis=2))  # [B, splits, Hkv, G]
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)[:, :, None])
    norm = p.sum(axis=2)  # the partials' l
    o = jnp.einsum("bsjhg,bsjhd->bshgd", p, v.astype(dtype))
    head_max = m.max(axis=1, keepdims=True)
    weight = jnp.exp(m - jnp.where(jnp.isfinite(head_max), head_max, 0.0))  # 0 for empty blocks
    total = (norm * weight).sum(axis=1)
    out = (o * weight[..., None]).sum(axis=1) / jnp.where(total == 0.0, 1.0, total)[..., None]
    return out.reshape(batch, num_heads, head_dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _pallas(q, k, v, lengths, scale, num_programs, block_k, backend, mosaic_gpu):
    """The kernel for `backend`: Mosaic on "tpu", Triton (or, with ``mosaic_gpu``, Mosaic
    GPU) on "gpu", interpreted on "cpu"."""
    if mosaic_gpu:
        return mosaic_kernel.split_k_decode_attention(
            q,
            k,
            v,
            lengths,
            scale=scale,
            num_programs=num_programs,
            block_k=block_k,
            interpret=backend == "cpu",
        )
    if backend == "tpu":
        return tpu_kernel.split_k_decode_attention_tpu(
            q,
            k,
            v,
            lengths,
            scale=scale,
            num_programs=num_programs,
            block_k=block_k,
            interpret=False,
        )
    return kernel.split_k_decode_attention(
        q,
        k,
        v,
        lengths,
        scale=scale,
        num_programs=num_programs,
        block_k=block_k,
        interpret=backend == "cpu",
    )


def _pallas_forward(q, k, v, lengths, scale, num_programs, block_k, backend, mosaic_gpu):
    out = _pallas(q, k, v, lengths, scale, num_programs, block_k, backend, mosaic_gpu)
    return out, (q, k, v, lengths)


@functools.partial(jax.jit, static_argnames=("scale",))
def _xla_vjp(q, k, v, lengths, cotangent, *, scale):
    splits = max(1, math.ceil(k.shape[1] / XLA_KEYS_PER_SPLIT))
    _, vjp = jax.vjp(lambda q, k, v: _xla(q, k, v, lengths, scale, splits).astype(q.dtype), q, k, v)
    return vjp(cotangent)


def _pallas_backward(scale, num_programs, block_k, backend, mosaic_gpu, residuals, cotangent):
    # The kernel has no backward pass: differentiate the XLA split-K path, the same function.
    q, k, v, lengths = residuals
    dq, dk, dv = _xla_vjp(q, k, v, lengths, cotangent, scale=scale)
    return dq, dk, dv, np.zeros(lengths.shape, jax.dtypes.float0)


_pallas.defvjp(_pallas_forward, _pallas_backward)


def _mosaic_gpu_unsupported_reason(q: Array, k_cache: Array, block_k: int, backend: str):
    if backend not in ("gpu", "cpu"):
        return f"the Mosaic GPU kernel runs on a GPU (or interpreted on CPU), not {backend!r}"
    if k_cache.dtype not in (jnp.float16, jnp.bfloat16):
        return f"the Mosaic GPU kernel takes float16 or bfloat16 caches, got {k_cache.dtype}"
    group = q.shape[2] // k_cache.shape[2]
    if group > mosaic_kernel.ROWS:
        return f"the Mosaic GPU kernel takes at most {mosaic_kernel.ROWS} query heads per kv head, got {group}"
    if block_k % mosaic_kernel.ROWS:
        return (
            f"the Mosaic GPU kernel needs block_k a multiple of {mosaic_kernel.ROWS}, got {block_k}"
        )
    return None


def _pallas_unsupported_reason(q: Array, backend: str) -> str | None:
    if q.dtype not in _PALLAS_DTYPES:
        return (
            "the kernel takes float16, bfloat16 or float32 (it accumulates in float32), "
            f"got {q.dtype}"
        )
    if backend == "cpu":
        return None
    head_dim = q.shape[-1]
    if backend == "tpu":
        if q.dtype == jnp.float16:
            return "the 'tpu' (Mosaic) kernel takes bfloat16 or float32, got float16"
        if head_dim % tpu_kernel.LANES:
            # Lane-aligned tiles only: the case whose lowering was checked (see the kernel).
            return f"the 'tpu' (Mosaic) kernel needs head_dim a multiple of 128, got {head_dim}"
        return None
    if backend != "gpu":
        return (
            f"the Pallas decode-attention kernel has no {backend!r} version "
            "(GPU Triton and TPU Mosaic only)"
        )
    if head_dim < kernel.MIN_BLOCK or head_dim & (head_dim - 1):
        return f"the Triton kernel needs head_dim a power of two >= 16, got {head_dim}"
    return None


def default_implementation(q: Array) -> str:
    """What ``implementation=None`` runs for queries ``q``: see the module docstring.

    ``"pallas"`` on GPU for 16-bit ``q`` that the Triton kernel takes (what was timed
    faster than ``"xla"``) where each device can run it on its own sequences
    (:func:`effformer.ops.kernel_sharding.kernel_placement`: one device, or a mesh the
    batch splits over), else ``"xla"``.
    """
    backend = _backend()
    if (
        backend == "gpu"
        and kernel_sharding.kernel_placement(q.shape[0]).reason is None
        and q.dtype in (jnp.float16, jnp.bfloat16)
        and _pallas_unsupported_reason(q, backend) is None
    ):
        return "pallas"
    return "xla"


def _backend() -> str:
    """The backend :func:`default_implementation` decides for (patched in tests)."""
    return jax.default_backend()


def _validate(q, k_cache, v_cache, cache_lengths, scale, num_splits, implementation, block_k):
    name = "decode_attention"
    if jnp.ndim(q) != 4 or q.shape[1] != 1:
        raise ValueError(
            f"{name}: q must be [batch, 1, heads, head_dim] (one query per sequence), "
            f"got shape {jnp.shape(q)}."
        )
    batch, _, num_heads, head_dim = q.shape
    if jnp.ndim(k_cache) != 4:
        raise ValueError(
            f"{name}: k_cache must be [batch, max_len, kv_heads, head_dim], "
            f"got shape {jnp.shape(k_cache)}."
        )
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"{name}: k_cache must have q's batch {batch} and head_dim {head_dim}, "
            f"got k_cache.shape={k_cache.shape}."
        )
    if jnp.shape(v_cache) != k_cache.shape:
        raise ValueError(
            f"{name}: v_cache must have k_cache's shape {k_cache.shape}, got {jnp.shape(v_cache)}."
        )
    max_len, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if max_len < 1:
        raise ValueError(f"{name}: k_cache must hold at least one slot, got max_len={max_len}.")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"{name}: q heads ({num_heads}) must be a multiple of the cache's kv heads, "
            f"got {num_kv_heads} kv heads."
        )
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(
            f"{name}: q, k_cache, v_cache must share one floating dtype, "
            f"got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}."
        )
    if jnp.shape(cache_lengths) != (batch,) or not jnp.issubdtype(
        jnp.result_type(cache_lengths), jnp.integer
    ):
        raise ValueError(
            f"{name}: cache_lengths must be an integer array of shape ({batch},), got "
            f"shape {jnp.shape(cache_lengths)} and dtype {jnp.result_type(cache_lengths)}."
        )
    if not isinstance(cache_lengths, jax.core.Tracer):
        # Concrete lengths are checked here; traced ones are clipped to [0, max_len].
        lengths = np.asarray(cache_lengths)
        if lengths.min() < 0 or lengths.max() > max_len:
            raise ValueError(
                f"{name}: cache_lengths must lie in [0, max_len={max_len}], got {lengths.tolist()}."
            )
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"{name}: scale must be a Python float or None, got {scale!r}.")
    if num_splits is not None and (
        not isinstance(num_splits, int)
        or isinstance(num_splits, bool)
        or not 1 <= num_splits <= max_len
    ):
        raise ValueError(
            f"{name}: num_splits must be an int in [1, max_len={max_len}] or None, "
            f"got {num_splits!r}."
        )
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{name}: implementation must be one of {IMPLEMENTATIONS} or None, "
            f"got {implementation!r}."
        )
    if block_k is not None and (
        not isinstance(block_k, int) or block_k < kernel.MIN_BLOCK or block_k & (block_k - 1)
    ):
        raise ValueError(
            f"{name}: block_k must be a power of two >= {kernel.MIN_BLOCK} or None, "
            f"got {block_k!r}."
        )


def decode_attention(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    cache_lengths: Array,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    implementation: str | None = None,
    block_k: int | None = None,
) -> Array:
    """One query per sequence attending over the first ``cache_lengths[b]`` cached keys.

    Args:
      q: [B, 1, H, Dh] the new token's queries.
      k_cache, v_cache: [B, max_len, Hkv, Dh] the cache (``H % Hkv == 0``; query
        head ``h`` reads kv head ``h // (H // Hkv)``).
      cache_lengths: [B] int, valid keys of each sequence (slots ``0 .. length - 1``),
        in [0, max_len]; checked when concrete, clipped when traced.
      scale: logit scale, default ``1 / sqrt(Dh)``.
      num_splits: ``"xla"``: blocks each cache is split into (default
        ``ceil(max_len / XLA_KEYS_PER_SPLIT)``). ``"pallas"``: the valid tiles are
        spread over ``num_splits * B * Hkv`` programs, i.e. each (sequence, kv head)
        is split ``num_splits`` ways on average (default: two programs per GPU
        core, at least one per (sequence, kv head)); on TPU over
        ``num_splits * B`` programs, a tile covering all kv heads (default: one
        program per TensorCore). Ignored by ``"reference"``.
      implementation: one of ``IMPLEMENTATIONS`` or None (:func:`default_implementation`:
        the kernel on GPU for 16-bit caches, so ``num_splits`` then means the
        kernel's split; else ``"xla"``).
      block_k: ``"pallas"`` keys per tile, a power of two >= 16 (default 128; on
        TPU ``tpu_kernel.default_block_k``: 1024 key rows over all kv heads).
    Returns:
      [B, 1, H, Dh] in q's dtype; zeros for a sequence of length 0.
    """
    _validate(q, k_cache, v_cache, cache_lengths, scale, num_splits, implementation, block_k)
    batch, _, num_heads, head_dim = q.shape
    max_len, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    lengths = jnp.clip(jnp.asarray(cache_lengths, jnp.int32), 0, max_len)
    query = q[:, 0]
    if implementation is None:
        implementation = default_implementation(q)
    if implementation == "pallas":
        backend = jax.default_backend()
        reason = _pallas_unsupported_reason(q, backend)
        if reason is not None:
            _log_once(f"decode_attention: using 'xla' instead of 'pallas': {reason}.")
            implementation = "xla"
    mosaic_gpu = implementation == "pallas_mosaic_gpu"
    if mosaic_gpu:
        backend = jax.default_backend()
        reason = _mosaic_gpu_unsupported_reason(
            q, k_cache, block_k or kernel.DEFAULT_BLOCK_K, backend
        )
        if reason is not None:
            _log_once(f"decode_attention: using 'xla' instead of 'pallas_mosaic_gpu': {reason}.")
            implementation = "xla"
            mosaic_gpu = False
    if implementation == "reference":
        out = _reference(query, k_cache, v_cache, lengths, scale)
    elif implementation == "xla":
        splits = num_splits or max(1, math.ceil(max_len / XLA_KEYS_PER_SPLIT))
        out = _xla(query, k_cache, v_cache, lengths, scale, splits)
    else:
        backend = jax.default_backend()
        if backend == "cpu":
            _log_once("decode_attention: no GPU; running the Pallas kernel with interpret=True.")
        # Under a mesh each device runs the kernel on its own sequences (ops.kernel_sharding),
        # so its grid is sized for that device's share of the batch.
        placement = kernel_sharding.kernel_placement(batch)
        local_batch = batch // placement.shards
        if backend == "tpu":
            block = block_k or tpu_kernel.default_block_k(num_kv_heads, max_len)
            if num_splits is None:
                programs = tpu_kernel.default_num_programs()
            else:
                programs = num_splits * local_batch
        else:
            block = block_k or kernel.DEFAULT_BLOCK_K
            if num_splits is None:
                programs = kernel.default_num_programs(local_batch, num_kv_heads, max_len, block)
            else:
                programs = num_splits * local_batch * num_kv_heads

        def run(query, k_cache, v_cache, lengths):
            return _pallas(
                query, k_cache, v_cache, lengths, scale, programs, block, backend, mosaic_gpu
            )

        out = kernel_sharding.call_over_batch(
            run, (query, k_cache, v_cache, lengths), (), placement.batch_axes
        )
    return out.astype(q.dtype)[:, None]
