"""Softmax attention mixers: multi-head self-attention (with KV cache) and cross-attention.

Every token mixer in effformer has the call signature of
:class:`MultiHeadAttention`::

    __call__(x [B, L, D], *, mask: AttentionMask | None = None,
             positions: [B, L] | None = None, deterministic: bool = True,
             decode: bool = False) -> [B, L, D]

so blocks and architectures can swap mixers by name. The attention itself is
:func:`effformer.ops.attention.dot_product_attention` (reference / XLA /
blockwise / cuDNN by ``implementation``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.initializers import trunc_normal
from effformer.nn.norms import RMSNorm
from effformer.nn.position import PositionEncoding
from effformer.ops.attention import dot_product_attention
from effformer.ops.decode_attention import decode_attention
from effformer.ops.masks import AttentionMask
from effformer.reducers.tome import proportional_attention_bias

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


class _AttentionProjections(nn.Module):
    """Fields and q/k/v/out projections shared by self- and cross-attention."""

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_features: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    qk_norm: bool = False
    qk_norm_epsilon: float = 1e-6
    scale: float | None = None
    attention_dropout_rate: float = 0.0
    implementation: str | None = None
    kernel_init: Initializer = trunc_normal(0.02)
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _head_shape(self, dim: int) -> tuple[int, int, int]:
        """(heads, kv heads, head dim) for model width ``dim``, validated."""
        owner = type(self).__name__
        if self.num_heads < 1:
            raise ValueError(f"{owner}: num_heads must be >= 1, got {self.num_heads}.")
        num_kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % num_kv_heads:
            raise ValueError(
                f"{owner}: num_kv_heads must divide num_heads={self.num_heads}, "
                f"got num_kv_heads={num_kv_heads}."
            )
        # 0 would silently have meant the default, D // num_heads.
        if self.head_dim is not None and not self.head_dim >= 1:
            raise ValueError(
                f"{owner}: head_dim must be a positive int or None (D // num_heads), "
                f"got {self.head_dim!r}."
            )
        if self.head_dim is None and dim % self.num_heads:
            raise ValueError(
                f"{owner}: num_heads must divide the model width {dim} (or give head_dim), "
                f"got num_heads={self.num_heads}."
            )
        return self.num_heads, num_kv_heads, self.head_dim or dim // self.num_heads

    def _dense(self, features, name: str, axis=-1, use_bias: bool = True) -> nn.Module:
        return nn.DenseGeneral(
            features,
            axis=axis,
            use_bias=use_bias,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _project_qkv(self, x: Array, context: Array) -> tuple[Array, Array, Array]:
        """x: [B, Lq, D], context: [B, Lk, Dc] -> q [B, Lq, H, Dh], k, v [B, Lk, Hkv, Dh]."""
        heads, kv_heads, head_dim = self._head_shape(x.shape[-1])
        q = self._dense((heads, head_dim), "query", use_bias=self.qkv_bias)(x)
        k = self._dense((kv_heads, head_dim), "key", use_bias=self.qkv_bias)(context)
        v = self._dense((kv_heads, head_dim), "value", use_bias=self.qkv_bias)(context)
        if self.qk_norm:
            # One RMSNorm over each head's channels, shared by the heads (as in ViT-22B).
            q = RMSNorm(self.qk_norm_epsilon, param_dtype=self.param_dtype, name="query_norm")(q)
            k = RMSNorm(self.qk_norm_epsilon, param_dtype=self.param_dtype, name="key_norm")(k)
        return q, k, v

    def _attend(self, q, k, v, mask, bias, deterministic: bool, out_dim: int) -> Array:
        use_dropout = not deterministic and self.attention_dropout_rate > 0.0
        out = dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            scale=self.scale,
            dropout_rate=self.attention_dropout_rate if use_dropout else 0.0,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            implementation=self.implementation,
        )
        return self._dense(
            self.out_features or out_dim, "out", axis=(-2, -1), use_bias=self.out_bias
        )(out)


def _explicit_attention(q, k, v, mask, bias, scale) -> tuple[Array, Array]:
    """Softmax attention that also returns its probabilities (token pruning needs them):
    q [B, L, H, Dh], k, v [B, L, Hkv, Dh] -> (out [B, L, H, Dh] in q's dtype,
    probs [B, H, L, L] in at least float32). Callers pass mask=None (checked)."""
    if mask is not None:
        raise ValueError(f"return_attention_probs needs mask=None, got {mask}.")
    heads, kv_heads = q.shape[2], k.shape[2]
    k = jnp.repeat(k, heads // kv_heads, axis=2)
    v = jnp.repeat(v, heads // kv_heads, axis=2)
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    scale = 1.0 / float(q.shape[-1]) ** 0.5 if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dtype), k.astype(dtype)) * scale
    if bias is not None:
        logits = logits + bias.astype(dtype)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(dtype)).astype(q.dtype)
    return out, probs


def _check_input(owner: str, name: str, x: Array) -> None:
    if x.ndim != 3:
        raise ValueError(f"{owner}: {name} must be [B, L, D], got shape {tuple(x.shape)}.")


class MultiHeadAttention(_AttentionProjections):
    """Multi-head (grouped-query when ``num_kv_heads < num_heads``) self-attention.

    Attributes (besides the projection options of every attention mixer):
      num_heads, num_kv_heads: query heads and key/value heads (GQA / MQA).
      head_dim: per-head width; default ``D // num_heads``.
      qkv_bias, out_bias: biases of the q/k/v and of the output projection
        (CCT: no qkv bias, out bias; iLLaMA: both).
      qk_norm: RMSNorm on each head's queries and keys before the rotation.
      position_encoding: a module from :mod:`effformer.nn.position` used through
        its ``rotate`` and ``attention_bias`` hooks (``embed`` is the model's).
      attention_dropout_rate: dropout on the attention probabilities.
      implementation: passed to ``dot_product_attention``.
      max_decode_length: length of the KV cache; default the length of the
        input given to ``init`` with ``decode=True`` (Flax's convention).
      decode_mask_positions: decoding orders the causal mask by the queries'
        ``mask.q_positions`` instead of their cache slots, and the cache
        records every key's mask position (the prefix LM's
        ``max(position, prefix_length - 1)``); every decode call must then
        give ``mask.q_positions``.

    Decoding: ``init(..., decode=True)`` creates the ``cache`` collection
    (``cached_key``/``cached_value [B, max_length, Hkv, Dh]``, the positions of
    the cached keys, ``cache_index``, and with ``decode_mask_positions`` the
    keys' mask positions plus one, 0 marking an empty slot). Each
    ``apply(..., decode=True, mutable=["cache"])`` call writes its L new keys at
    ``cache_index`` (keys are stored already rotated) and attends causally over
    the cache; unfilled slots lie after every query and so are masked. A step
    that would run past ``max_length`` returns NaN (the index is traced, so it
    cannot raise).

    A one-token decode step whose visible keys are exactly the slots up to its
    own (no window, block, bias, dropout, mask positions, or explicit
    ``implementation``) runs the split-K :func:`~effformer.ops.decode_attention`
    over the cache instead of the general masked attention: the same function.
    """

    position_encoding: PositionEncoding | None = None
    max_decode_length: int | None = None
    decode_mask_positions: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        mask: AttentionMask | None = None,
        positions: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        token_sizes: Array | None = None,
        return_mean_keys: bool = False,
        return_attention_probs: bool = False,
    ) -> Array | tuple[Array, ...]:
        """x: [B, L, D] -> [B, L, out_features or D]. positions: [B, L] ([B, L, 2] for rope2d).

        Token merging (:mod:`effformer.reducers.tome`), both off by default:
        ``token_sizes [B, L]`` adds ``log(size)`` of each key to the logits
        (ToMe's proportional attention: a token of size s weighs as s copies);
        ``return_mean_keys`` returns ``(y, keys)`` with the keys averaged over
        the kv heads, ``[B, L, head_dim]`` (ToMe's similarity metric; after
        ``qk_norm``, before any rotation). Neither works with ``decode`` or a
        ``position_encoding`` (merged tokens have no single position).

        ``return_attention_probs`` (token pruning, :mod:`effformer.reducers.zero_tprune`,
        off by default) computes the attention explicitly (softmax in at least
        float32, no dropout) and appends its probabilities ``[B, H, L, L]`` to what
        is returned: ``(y, probs)`` or, with ``return_mean_keys``, ``(y, keys, probs)``.
        It needs ``decode=False`` and no ``position_encoding`` (as merging does), and
        no attention dropout when ``deterministic=False``.
        """
        owner = type(self).__name__
        _check_input(owner, "x", x)
        batch, length, dim = x.shape
        if token_sizes is not None or return_mean_keys or return_attention_probs:
            self._check_token_merging(token_sizes, batch, length, decode)
        if return_attention_probs and not deterministic and self.attention_dropout_rate > 0.0:
            raise ValueError(
                f"{owner}: return_attention_probs (token pruning) has no attention dropout; "
                f"needs deterministic=True or attention_dropout_rate=0, got "
                f"attention_dropout_rate={self.attention_dropout_rate}."
            )
        encoding = self.position_encoding
        position_axes = 1 if encoding is None else encoding.position_axes
        if positions is None:
            if position_axes != 1:
                raise ValueError(
                    f"{owner}: positions [B, L, {position_axes}] are required by "
                    f"{type(encoding).__name__}, got None."
                )
        else:
            expected = (batch, length) + ((position_axes,) if position_axes > 1 else ())
            shape = tuple(positions.shape)
            if (
                len(shape) != len(expected)
                or shape[1:] != expected[1:]
                or shape[0] not in (1, batch)
            ):
                raise ValueError(
                    f"{owner}: positions must have shape {expected} (or batch 1), got {shape}."
                )
            positions = jnp.broadcast_to(positions, expected)
        q, k, v = self._project_qkv(x, x)

        if decode and self.has_variable("cache", "cached_key"):
            q, k, v, mask, bias, overflow = self._decode_step(q, k, v, mask, positions)
            if self._takes_split_k_path(q, k, mask, bias, deterministic):
                # The visible keys are slots 0..index (causal over slot numbers), so the
                # cache length is index + 1; clipped at a full cache, where the output is
                # NaN below anyway (a concrete over-long length would raise instead).
                cache_lengths = jnp.minimum(mask.q_positions[:, 0] + 1, k.shape[1])
                out = decode_attention(q, k, v, cache_lengths, scale=self.scale)
                y = self._dense(
                    self.out_features or dim, "out", axis=(-2, -1), use_bias=self.out_bias
                )(out)
            else:
                y = self._attend(q, k, v, mask, bias, deterministic, dim)
            # The cache index is traced, so a full cache cannot raise; dynamic_update_slice
            # would silently overwrite the last slots. NaN makes the mistake visible.
            return jnp.where(overflow, jnp.asarray(jnp.nan, y.dtype), y)

        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if decode:
            self._cache_variables(k, positions)
        bias = None
        if encoding is not None:
            q, k = encoding.rotate(q, k, positions, positions)
            bias = encoding.attention_bias(positions, positions, q.shape[2])
        if mask is not None and positions.ndim == 2 and mask.q_positions is None:
            # The explicit positions order the tokens for causal / window masks
            # (packed rows restart at 0 in each segment).
            mask = dataclasses.replace(mask, q_positions=positions, kv_positions=positions)
        if token_sizes is not None:
            bias = proportional_attention_bias(token_sizes)
        if not return_attention_probs:
            y = self._attend(q, k, v, mask, bias, deterministic, dim)
            return (y, jnp.mean(k, axis=2)) if return_mean_keys else y
        out, probs = _explicit_attention(q, k, v, mask, bias, self.scale)
        y = self._dense(self.out_features or dim, "out", axis=(-2, -1), use_bias=self.out_bias)(out)
        return (y, jnp.mean(k, axis=2), probs) if return_mean_keys else (y, probs)

    def _check_token_merging(self, token_sizes: Array | None, batch: int, length: int, decode):
        owner = type(self).__name__
        if decode:
            raise ValueError(
                f"{owner}: token_sizes / return_mean_keys (token merging) and "
                "return_attention_probs (token pruning) need decode=False, got decode=True."
            )
        if self.position_encoding is not None:
            raise ValueError(
                f"{owner}: token_sizes / return_mean_keys (token merging) and "
                "return_attention_probs (token pruning) need position_encoding=None (merged "
                "or pruned tokens no longer have their positions), got "
                f"{type(self.position_encoding).__name__}."
            )
        if token_sizes is not None and tuple(token_sizes.shape) != (batch, length):
            raise ValueError(
                f"{owner}: token_sizes must have shape {(batch, length)} (x's [B, L]), "
                f"got {tuple(token_sizes.shape)}."
            )

    def _takes_split_k_path(self, q, k, mask: AttentionMask, bias, deterministic: bool) -> bool:
        """Whether a decode step may use ``decode_attention``: only where it is the same
        function as ``_attend`` (one query seeing exactly the cache slots up to its own)."""
        return (
            q.shape[1] == 1
            and not self.decode_mask_positions  # slots ordered by mask positions, not numbers
            and mask.q_segment_ids is None  # block-local decoding
            and mask.window_left is None
            and mask.soft_causal_ratio is None
            and bias is None
            and self.implementation is None
            and (deterministic or self.attention_dropout_rate == 0.0)
            and (self.scale is None or isinstance(self.scale, int | float))
            and q.dtype == k.dtype
        )

    def _cache_variables(self, k: Array, positions: Array):
        batch, length, kv_heads, head_dim = k.shape
        max_length = self.max_decode_length or length
        cached_mask_positions = None
        if self.decode_mask_positions:
            cached_mask_positions = self.variable(
                "cache", "cached_mask_positions", jnp.zeros, (batch, max_length), jnp.int32
            )
        cached_key = self.variable(
            "cache", "cached_key", jnp.zeros, (batch, max_length, kv_heads, head_dim), k.dtype
        )
        cached_value = self.variable(
            "cache", "cached_value", jnp.zeros, (batch, max_length, kv_heads, head_dim), k.dtype
        )
        cached_positions = self.variable(
            "cache",
            "cached_positions",
            jnp.zeros,
            (batch, max_length, *positions.shape[2:]),
            jnp.int32,
        )
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        return cached_key, cached_value, cached_positions, cached_mask_positions, cache_index

    def _decode_step(self, q, k, v, mask, positions):
        owner = type(self).__name__
        batch, length = q.shape[:2]
        position_shape = (batch, length) if positions is None else positions.shape
        cached_key, cached_value, cached_positions, cached_mask_positions, cache_index = (
            self._cache_variables(k, jnp.zeros(position_shape, jnp.int32))
        )
        max_length = cached_key.value.shape[1]
        if cached_key.value.shape[0] != batch or cached_key.value.shape[2:] != k.shape[2:]:
            raise ValueError(
                f"{owner}: decode keys must fit the cache [B, max_length, Hkv, Dh] = "
                f"{tuple(cached_key.value.shape)}, got keys {tuple(k.shape)}."
            )
        if length > max_length:
            raise ValueError(
                f"{owner}: decode step length must be <= max_length={max_length}, got {length}."
            )
        if mask is not None and (
            not mask.causal
            or mask.q_segment_ids is not None
            or (mask.q_positions is not None and not self.decode_mask_positions)
            or mask.kv_positions is not None
        ):
            raise ValueError(
                f"{owner}: decode=True needs mask None or a causal AttentionMask without "
                f"segment ids or positions (the cache supplies them), got {mask}."
            )
        if self.decode_mask_positions:
            mask_positions = None if mask is None else mask.q_positions
            if mask_positions is None or tuple(mask_positions.shape) not in (
                (batch, length),
                (1, length),
            ):
                raise ValueError(
                    f"{owner}: with decode_mask_positions, decode=True needs the queries' mask "
                    f"positions in mask.q_positions [B={batch}, L={length}], got "
                    f"{None if mask_positions is None else tuple(mask_positions.shape)}."
                )
        index = cache_index.value
        overflow = index + length > max_length
        slots = jnp.broadcast_to(index + jnp.arange(length, dtype=jnp.int32), (batch, length))
        if positions is None:
            positions = slots
        encoding = self.position_encoding
        if encoding is not None:
            q, k = encoding.rotate(q, k, positions, positions)
        # Index arrays of one dtype (Python zeros would be int64 under jax_enable_x64).
        zero = jnp.zeros_like(index)
        start = (zero, index) + (zero,) * (k.ndim - 2)
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, k.astype(cached_key.value.dtype), start
        )
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, v.astype(cached_value.value.dtype), start
        )
        cached_positions.value = jax.lax.dynamic_update_slice(
            cached_positions.value,
            positions.astype(jnp.int32),
            (zero, index) + (zero,) * (positions.ndim - 2),
        )
        cache_index.value = index + length
        bias = None
        if encoding is not None:
            bias = encoding.attention_bias(positions, cached_positions.value, q.shape[2])
        if self.decode_mask_positions:
            q_mask_positions = jnp.broadcast_to(mask.q_positions, (batch, length)).astype(jnp.int32)
            cached_mask_positions.value = jax.lax.dynamic_update_slice(
                cached_mask_positions.value, q_mask_positions + 1, (zero, index)
            )
            # 0 marks a slot never written: placed after every query, so the causal mask hides it.
            stored = cached_mask_positions.value
            kv_mask_positions = jnp.where(stored == 0, jnp.iinfo(jnp.int32).max, stored - 1)
        else:
            q_mask_positions = slots
            kv_mask_positions = jnp.broadcast_to(
                jnp.arange(max_length, dtype=jnp.int32), (batch, max_length)
            )
        decode_mask = AttentionMask(
            causal=True,
            window_left=None if mask is None else mask.window_left,
            q_positions=q_mask_positions,
            kv_positions=kv_mask_positions,
        )
        decode_mask = self._decode_visibility(decode_mask, positions, cached_positions.value)
        return q, cached_key.value, cached_value.value, decode_mask, bias, overflow

    def _decode_visibility(
        self, decode_mask: AttentionMask, positions: Array, cached_positions: Array
    ) -> AttentionMask:
        """Hook for subclasses restricting a decode step's mask further (block-local layers).

        positions: [B, L] the new tokens' positions; cached_positions: [B, max_length]
        every cached key's position, after this step's write.
        """
        return decode_mask


class CrossAttention(_AttentionProjections):
    """Queries from ``x``, keys and values from ``context`` (encoder-decoder, FIT read/write).

    Same projection options as :class:`MultiHeadAttention`; no position
    encoding (the caller embeds positions into ``x`` and ``context``).
    """

    @nn.compact
    def __call__(
        self,
        x: Array,
        context: Array,
        *,
        context_mask: Array | None = None,
        mask: AttentionMask | None = None,
        deterministic: bool = True,
    ) -> Array:
        """x: [B, Lq, D], context: [B, Lk, Dc], context_mask: [B, Lk] bool (True = real
        token) -> [B, Lq, out_features or D]. A query with no visible key outputs the
        output projection's bias."""
        owner = type(self).__name__
        _check_input(owner, "x", x)
        _check_input(owner, "context", context)
        if context.shape[0] != x.shape[0]:
            raise ValueError(
                f"{owner}: context batch must equal x batch {x.shape[0]}, got {context.shape[0]}."
            )
        if context_mask is not None:
            if tuple(context_mask.shape) != tuple(context.shape[:2]):
                raise ValueError(
                    f"{owner}: context_mask must have shape {tuple(context.shape[:2])}, "
                    f"got {tuple(context_mask.shape)}."
                )
            if mask is not None and mask.q_segment_ids is not None:
                raise ValueError(
                    f"{owner}: give context_mask or segment ids in mask, not both "
                    "(context_mask becomes the key segment ids)."
                )
            segments = dict(
                q_segment_ids=jnp.ones(x.shape[:2], jnp.int32),
                kv_segment_ids=context_mask.astype(jnp.int32),
            )
            mask = (
                AttentionMask(**segments) if mask is None else dataclasses.replace(mask, **segments)
            )
        q, k, v = self._project_qkv(x, context)
        return self._attend(q, k, v, mask, None, deterministic, x.shape[-1])
