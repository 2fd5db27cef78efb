"""The one attention op: softmax attention with a structural mask.

``dot_product_attention`` computes, per head,
``softmax(scale * q k^T + bias, over visible keys) * w  @ v`` where the visible
keys and the post-softmax weight ``w`` (iLLaMA's soft-causal multiplier) come
from an :class:`~effformer.ops.masks.AttentionMask`, and ``w`` also carries
dropout's ``keep / p_keep`` (``p_keep`` is ``1 - rate`` to 2^-16). Implementations:

``"reference"``
    Dense ``[B, 1, Lq, Lk]`` mask from ``masks.dense_mask``, kv heads repeated,
    plain softmax, computed in the input dtype (float64 works). The slow twin.
``"xla"``
    Scores materialised and left for XLA to fuse; the mask is computed by
    broadcasting positions and segment ids, GQA by a grouped einsum (no
    repeat). Computes in float32 (float64 for float64 inputs). Its backward
    pass is written out (:mod:`effformer.ops.attention_xla`).
``"xla_blockwise"``
    :mod:`effformer.ops.attention_blockwise`: online softmax over blocks,
    memory linear in length forward and backward, fully hidden blocks skipped.
``"cudnn"``
    GPU only: ``jax.nn.dot_product_attention(implementation="cudnn")``, for
    float16/bfloat16 with no mask, causal, or causal sliding window, with
    ``Lq == Lk`` and default positions (cuDNN aligns causal masks top-left), and a
    head dim that is a multiple of 8, at most 128 (256 from Hopper on).
``"pallas"``
    A Pallas flash-attention kernel (forward and backward) for every mask
    here, soft-causal included: :mod:`effformer.kernels.flash_attention`
    (Triton) on GPU, :mod:`effformer.kernels.flash_attention_tpu` (Mosaic) on
    TPU. On CPU the GPU kernel runs in Pallas's interpreter (correct but slow:
    for tests); on other backends the XLA path is used instead. Both are
    logged once. No bias, no dropout; ``scale`` must be a Python number; the
    soft-causal ratio gets a zero gradient.

``implementation=None`` picks cuDNN on GPU where it applies (and there is no
dropout and no bias), else, on GPU, ``"pallas"`` for 16-bit inputs with head dim
<= 128, at least ``PALLAS_MIN_AUTO_QUERIES`` queries and no bias or dropout, on a
single device (where it was measured faster than ``"xla"``, on an H200:
experiments/benchmarks/README.md); otherwise ``"xla"`` when
``Lq * Lk <= XLA_MAX_SCORES``, else ``"xla_blockwise"``.

A query that sees no key (a padding query) outputs exactly zero, with finite
gradients, in every implementation.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from effformer.kernels import flash_attention as pallas_flash
from effformer.kernels import flash_attention_tpu as pallas_flash_tpu
from effformer.ops import kernel_sharding, masks
from effformer.ops.attention_blockwise import (
    DEFAULT_BLOCK_K,
    DEFAULT_BLOCK_Q,
    blockwise_attention,
    dropout_keep,
    dropout_keep_probability,
    grouped_bias,
)
from effformer.ops.attention_xla import masked_softmax, materialised_attention
from effformer.ops.masks import AttentionMask

Array = jax.Array

IMPLEMENTATIONS = ("reference", "xla", "xla_blockwise", "cudnn", "pallas")

# Above this many scores per (batch, head) the automatic choice is the blockwise
# path. On the 2-core development CPU the two are on par up to 512 x 512 (where
# the blockwise path is a single block), and from 1K x 1K on the blockwise path
# is ~3x faster forward and ~2-20x faster forward + backward, since its blocks
# stay in cache (experiments/benchmarks/README.md, "Attention"). Below it the
# XLA path is preferred: plain autodiff, and it compiles faster.
XLA_MAX_SCORES = 512 * 512

_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)

logger = logging.getLogger(__name__)
_logged_fallbacks: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged_fallbacks:
        _logged_fallbacks.add(message)
        logger.info(message)


def _reference(q, k, v, mask, bias, scale, keep) -> Array:
    """Dense mask, repeated kv heads, input dtype. ``keep`` is a [B, H, Lq, Lk] dropout mask."""
    batch, q_len, num_heads, _ = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    k = jnp.repeat(k, num_heads // num_kv_heads, axis=2)
    v = jnp.repeat(v, num_heads // num_kv_heads, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(scale, q.dtype)
    if bias is not None:
        logits = logits + bias.astype(q.dtype)
    visible = masks.dense_mask(mask, batch, q_len, kv_len)
    probs = masked_softmax(logits, visible)
    if mask.soft_causal_ratio is not None:
        q_pos, kv_pos = masks.resolve_positions(mask, batch, q_len, kv_len)
        ratio = jnp.asarray(mask.soft_causal_ratio, q.dtype)
        tril = (kv_pos[:, None, None, :] <= q_pos[:, None, :, None]).astype(q.dtype)
        probs = probs * (ratio + (1 - ratio) * tril)
    if keep is not None:
        probs = probs * keep
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(q.dtype)


def _xla(q, k, v, mask, bias, scale, keep) -> Array:
    """Materialised scores [B, Hkv, G, Lq, Lk], mask by broadcasting positions.

    The backward pass is :mod:`effformer.ops.attention_xla`'s, not autodiff's.
    """
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    qg = (q.astype(dtype) * jnp.asarray(scale, dtype)).reshape(
        batch, q_len, num_kv_heads, groups, head_dim
    )
    if bias is not None:
        bias = grouped_bias(bias.astype(dtype), num_heads, num_kv_heads)
    visible = None
    q_pos, kv_pos = masks.resolve_positions(mask, batch, q_len, kv_len)
    q_pos, kv_pos = q_pos[:, None, None, :, None], kv_pos[:, None, None, None, :]
    if not mask.is_trivial:
        q_seg = kv_seg = None
        if mask.q_segment_ids is not None:
            q_seg = jnp.broadcast_to(mask.q_segment_ids, (batch, q_len))[:, None, None, :, None]
            kv_seg = jnp.broadcast_to(mask.kv_segment_ids, (batch, kv_len))[:, None, None, None, :]
        visible = masks.visibility(mask, q_pos, kv_pos, q_seg, kv_seg)
    multiplier = None
    if mask.soft_causal_ratio is not None:
        ratio = jnp.asarray(mask.soft_causal_ratio, dtype)
        multiplier = ratio + (1 - ratio) * (kv_pos <= q_pos).astype(dtype)
    if keep is not None:
        keep = keep.reshape(batch, num_kv_heads, groups, q_len, kv_len)
        multiplier = keep if multiplier is None else multiplier * keep
    out = materialised_attention(qg, k.astype(dtype), v.astype(dtype), bias, visible, multiplier)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


def _cudnn_max_head_dim() -> int:
    """cuDNN flash attention's largest head dim: 256 from Hopper (compute capability 9) on, else 128.

    The limits of jax's own check (``check_is_flash_attention`` in
    jax/_src/cudnn/fused_attention_stablehlo.py), which raises NotImplementedError past them.
    """
    try:
        major = int(str(jax.devices()[0].compute_capability).split(".")[0])
    except (AttributeError, ValueError):  # not a CUDA device
        return 128
    return 256 if major >= 9 else 128


def _cudnn_unsupported_reason(q, k, mask, dropout_rate) -> str | None:
    """Why cuDNN cannot compute this call exactly, or None if it can."""
    if q.dtype not in _CUDNN_DTYPES:
        return f"cuDNN attention needs float16 or bfloat16 inputs, got {q.dtype}"
    if dropout_rate > 0.0:
        return "cuDNN attention is not used with dropout"
    # Past these jax's cuDNN call raises NotImplementedError; implementation=None must
    # pick another path instead.
    head_dim, max_head_dim = q.shape[-1], _cudnn_max_head_dim()
    if head_dim % 8 or head_dim > max_head_dim:
        return f"cuDNN attention needs a head dim <= {max_head_dim} and a multiple of 8, got {head_dim}"
    if mask is None:
        return None
    if mask.q_segment_ids is not None:
        return "cuDNN attention here does not take segment ids"
    if mask.soft_causal_ratio is not None:
        return "cuDNN attention cannot apply a soft-causal ratio"
    if mask.q_positions is not None or mask.kv_positions is not None:
        return "cuDNN attention here takes only default positions"
    is_local = mask.window_left is not None or mask.window_right is not None
    if (mask.causal or is_local) and q.shape[1] != k.shape[1]:
        return "cuDNN aligns causal/window masks top-left, which differs from ours when Lq != Lk"
    if not mask.causal and is_local and mask.window_right != 0:
        return "cuDNN sliding windows must be causal (window_right=0)"
    return None


def cudnn_arguments(mask: AttentionMask | None) -> dict:
    """Keyword arguments of ``jax.nn.dot_product_attention`` expressing a supported mask."""
    if mask is None or mask.is_trivial:
        return {}
    is_causal = mask.causal or mask.window_right == 0
    arguments = {"is_causal": is_causal}
    if mask.window_left is not None:
        arguments["local_window_size"] = (mask.window_left, 0)
    return arguments


def _cudnn(q, k, v, mask, bias, scale) -> Array:
    if bias is not None:  # jax wants a 4-d bias in the inputs' dtype
        bias = jnp.reshape(bias, (1,) * (4 - bias.ndim) + bias.shape).astype(q.dtype)
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, scale=scale, implementation="cudnn", **cudnn_arguments(mask)
    )


def _pallas_or_fallback(q, k, bias, dropout_rate) -> str:
    """'pallas' where a kernel runs (GPU, TPU; CPU interpreted), else an XLA path; logged once."""
    if bias is not None:
        raise ValueError(
            "dot_product_attention: implementation='pallas' takes no bias, "
            f"got bias of shape {jnp.shape(bias)}."
        )
    if dropout_rate > 0.0:
        raise ValueError(
            "dot_product_attention: implementation='pallas' has no dropout, "
            f"got dropout_rate={dropout_rate}."
        )
    backend = jax.default_backend()
    if backend in ("gpu", "tpu"):
        return "pallas"
    if backend == "cpu":
        _log_once("dot_product_attention: 'pallas' runs in Pallas interpret mode on CPU (slow).")
        return "pallas"
    fallback = "xla" if q.shape[1] * k.shape[1] <= XLA_MAX_SCORES else "xla_blockwise"
    _log_once(
        f"dot_product_attention: the 'pallas' kernel has no {backend!r} lowering "
        f"(it has GPU Triton and TPU Mosaic versions); using {fallback!r}."
    )
    return fallback


def _pallas(q, k, v, mask, scale, block_sizes) -> Array:
    """The backend's kernel: Mosaic on TPU, Triton on GPU, the Triton one interpreted on CPU.

    Under a mesh each device runs it on its own examples (ops.kernel_sharding).
    """
    mask = AttentionMask() if mask is None else mask
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]

    def rows(x, length):  # [B, L] (or [1, L]) per-example rows, split with the batch
        return None if x is None else jnp.broadcast_to(jnp.asarray(x), (batch, length))

    backend = jax.default_backend()

    def kernel(q, k, v, q_seg, kv_seg, q_pos, kv_pos, ratio):
        arguments = dict(
            causal=mask.causal,
            window_left=mask.window_left,
            window_right=mask.window_right,
            q_segment_ids=q_seg,
            kv_segment_ids=kv_seg,
            q_positions=q_pos,
            kv_positions=kv_pos,
            soft_causal_ratio=ratio,
            scale=scale,
            block_sizes=block_sizes,
        )
        if backend == "tpu":
            return pallas_flash_tpu.flash_attention_tpu(q, k, v, **arguments, interpret=False)
        return pallas_flash.flash_attention(q, k, v, **arguments, interpret=backend == "cpu")

    batched = (
        q, k, v,
        rows(mask.q_segment_ids, q_len), rows(mask.kv_segment_ids, kv_len),
        rows(mask.q_positions, q_len), rows(mask.kv_positions, kv_len),
    )  # fmt: skip
    placement = kernel_sharding.kernel_placement(batch)
    return kernel_sharding.call_over_batch(
        kernel, batched, (mask.soft_causal_ratio,), placement.batch_axes
    )


def _validate(q, k, v, mask, bias, implementation, dropout_rate, dropout_rng) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"dot_product_attention: {name} must have rank 4 [batch, length, heads, head_dim], "
                f"got shape {jnp.shape(x)}."
            )
    batch, _, num_heads, head_dim = q.shape
    for name, x in (("k", k), ("v", v)):
        if x.shape[0] != batch:
            raise ValueError(
                f"dot_product_attention: {name} batch must equal q's batch {batch}, "
                f"got {name}.shape={x.shape}."
            )
        if x.shape[3] != head_dim:
            raise ValueError(
                f"dot_product_attention: {name} head_dim must equal q's head_dim {head_dim}, "
                f"got {name}.shape={x.shape}."
            )
    if v.shape[1:3] != k.shape[1:3]:
        raise ValueError(
            "dot_product_attention: v must have k's length and heads "
            f"{k.shape[1:3]}, got v.shape={v.shape}."
        )
    num_kv_heads = k.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"dot_product_attention: q heads ({num_heads}) must be a multiple of k/v heads, "
            f"got {num_kv_heads} k/v heads."
        )
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(
            "dot_product_attention: q, k, v must share one floating dtype, "
            f"got {q.dtype}, {k.dtype}, {v.dtype}."
        )
    if bias is not None:
        target = (batch, num_heads, q.shape[1], k.shape[1])
        ok = jnp.ndim(bias) <= 4
        if ok:
            padded = (1,) * (4 - jnp.ndim(bias)) + tuple(jnp.shape(bias))
            ok = all(b in (1, t) for b, t in zip(padded, target, strict=True))
        if not ok:
            raise ValueError(
                f"dot_product_attention: bias must be broadcastable to {target} "
                f"[batch, heads, q_len, kv_len], got shape {jnp.shape(bias)}."
            )
    if mask is not None:
        if not isinstance(mask, AttentionMask):
            raise ValueError(
                f"dot_product_attention: mask must be an AttentionMask or None, got {type(mask)}."
            )
        masks.validate_mask(mask, batch, q.shape[1], k.shape[1])
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"dot_product_attention: implementation must be one of {IMPLEMENTATIONS} or None, "
            f"got {implementation!r}."
        )
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(
            f"dot_product_attention: dropout_rate must be in [0, 1), got {dropout_rate}."
        )
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(
            f"dot_product_attention: dropout_rate={dropout_rate} needs a dropout_rng, got None."
        )


# The shortest query length at which implementation=None picks the GPU flash kernel.
PALLAS_MIN_AUTO_QUERIES = 1024


def _pallas_not_chosen_reason(q, bias, dropout_rate, scale) -> str | None:
    """Why ``implementation=None`` does not pick the GPU flash kernel, or None if it does.

    It is picked where it was measured faster than "xla" (an H200, 16-bit inputs, head
    dims 64 and 128, 1024 and 4096 queries, causal and soft-causal masks: 2.4-10.9x;
    experiments/benchmarks/README.md) and can compute the call. Short query blocks
    (decode steps with one query) are left to XLA: a kernel program per (batch, head)
    walking the whole cache was not timed there. So is any call the kernel cannot be
    placed for on several devices (:func:`effformer.ops.kernel_sharding.kernel_placement`:
    no mesh, or a batch that does not split over it).
    """
    if bias is not None:
        return "it takes no bias"
    if dropout_rate > 0.0:
        return "it has no dropout"
    if not isinstance(scale, int | float):
        return "it compiles the scale in, and the scale is traced"
    if jnp.dtype(q.dtype).itemsize != 2:
        return f"it was measured faster for 16-bit inputs only, got {jnp.dtype(q.dtype).name}"
    if q.shape[-1] > 128:
        return f"it was measured up to head dim 128, got {q.shape[-1]}"
    if q.shape[1] < PALLAS_MIN_AUTO_QUERIES:
        return f"it was measured for >= {PALLAS_MIN_AUTO_QUERIES} queries, got {q.shape[1]}"
    return kernel_sharding.kernel_placement(q.shape[0]).reason


def _choose_implementation(q, k, mask, bias, dropout_rate, scale=1.0) -> str:
    if jax.default_backend() == "gpu":
        reason = _cudnn_unsupported_reason(q, k, mask, dropout_rate)
        if reason is None and bias is not None:
            reason = "cuDNN attention is not chosen automatically with a bias"
        if reason is None:
            return "cudnn"
        kernel_reason = _pallas_not_chosen_reason(q, bias, dropout_rate, scale)
        if kernel_reason is None:
            fallback = "pallas"
        else:
            fallback = "xla" if q.shape[1] * k.shape[1] <= XLA_MAX_SCORES else "xla_blockwise"
            reason += f"; not the Pallas kernel: {kernel_reason}"
        _log_once(f"dot_product_attention: using {fallback!r} instead of 'cudnn': {reason}.")
        return fallback
    return "xla" if q.shape[1] * k.shape[1] <= XLA_MAX_SCORES else "xla_blockwise"


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: AttentionMask | None = None,
    bias: Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: str | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    pallas_block_sizes: pallas_flash.BlockSizes | pallas_flash_tpu.BlockSizes | None = None,
) -> Array:
    """Softmax attention with a structural mask.

    Args:
      q: [B, Lq, H, Dh] queries.
      k, v: [B, Lk, Hkv, Dh] keys and values; ``H % Hkv == 0`` (grouped-query
        attention: query head ``h`` uses kv head ``h // (H // Hkv)``).
      mask: which keys each query sees, and the soft-causal ratio; see
        :mod:`effformer.ops.masks`. Default positions align the last query with
        the last key (Lq=1 against a full cache); pass positions explicitly
        for a partially filled cache.
      bias: added to the logits, broadcastable to [B, H, Lq, Lk] (ALiBi, T5).
      scale: logit scale, default ``1 / sqrt(Dh)``.
      dropout_rate: dropout on the attention probabilities (scaled by
        ``1 / p_keep``, ``p_keep = 1 - rate`` rounded to 2^-16); needs ``dropout_rng``. Not available with cuDNN.
      implementation: one of ``IMPLEMENTATIONS`` or None (see module docstring).
      block_q, block_k: block sizes of ``"xla_blockwise"`` (any positive size;
        lengths need not be multiples).
      pallas_block_sizes: block sizes of ``"pallas"``, the running kernel's
        ``BlockSizes``: ``flash_attention.BlockSizes`` on GPU and CPU,
        ``flash_attention_tpu.BlockSizes`` on TPU (default: the kernel's).
    Returns:
      [B, Lq, H, Dh] in q's dtype.
    """
    _validate(q, k, v, mask, bias, implementation, dropout_rate, dropout_rng)
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"dot_product_attention: {name} must be a positive int, got {size!r}.")
    if scale is None:
        scale = 1.0 / float(q.shape[-1]) ** 0.5
    if implementation is None:
        implementation = _choose_implementation(q, k, mask, bias, dropout_rate, scale)
    if implementation == "cudnn":
        backend = jax.default_backend()
        if backend != "gpu":
            raise ValueError(
                f"dot_product_attention: implementation='cudnn' needs a GPU backend, got {backend!r}."
            )
        reason = _cudnn_unsupported_reason(q, k, mask, dropout_rate)
        if reason is not None:
            raise ValueError(
                f"dot_product_attention: implementation='cudnn' unsupported: {reason}."
            )
        return _cudnn(q, k, v, mask, bias, scale)

    if implementation == "pallas":
        implementation = _pallas_or_fallback(q, k, bias, dropout_rate)
        if implementation == "pallas":
            return _pallas(q, k, v, mask, scale, pallas_block_sizes)

    if mask is None:
        mask = AttentionMask()
    if implementation == "xla_blockwise":
        return blockwise_attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            scale=scale,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
            block_q=block_q,
            block_k=block_k,
        )
    keep = None
    if dropout_rate > 0.0:
        batch, q_len, num_heads, _ = q.shape
        shape = (batch, num_heads, q_len, k.shape[1])
        dtype = (
            q.dtype if implementation == "reference" else jnp.promote_types(q.dtype, jnp.float32)
        )
        keep = dropout_keep(dropout_rng, 0, dropout_rate, shape).astype(
            dtype
        ) / dropout_keep_probability(dropout_rate)
    if implementation == "reference":
        return _reference(q, k, v, mask, bias, scale, keep)
    return _xla(q, k, v, mask, bias, scale, keep)
