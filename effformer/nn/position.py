"""Position encodings behind one interface, selectable by name.

Every encoding is a linen module with three hooks; each defaults to "do
nothing", so a model calls all three and the chosen encoding acts where it
belongs:

* ``embed(x, positions) -> x``: absolute encodings add to the token
  embeddings (``"learned"``, ``"sinusoidal"``).
* ``rotate(q, k, q_positions, k_positions) -> (q, k)``: rotary encodings
  rotate queries and keys (``"rope"``, ``"rope2d"``); q, k are ``[B, L, H, Dh]``.
* ``attention_bias(q_positions, k_positions, num_heads) -> [B, H, Lq, Lk] | None``:
  relative encodings add a bias to the attention logits (``"alibi"``, ``"t5"``).

Positions are explicit int arrays ``[B, L]`` (``[B, L, 2]`` of (row, column)
for ``"rope2d"``), never implied by the array index, so packed sequences (that
restart at 0 inside a row) and decoding (one token at position t) work.
``make_position_encoding(name, **kwargs)`` builds one by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effformer.initializers import trunc_normal

Array = jax.Array
Dtype = Any


def _check_positions(owner: str, name: str, positions: Array, batch: int, length: int, axes: int):
    expected = (batch, length) if axes == 1 else (batch, length, axes)
    shape = tuple(positions.shape)
    if len(shape) != len(expected) or shape[1:] != expected[1:] or shape[0] not in (1, batch):
        raise ValueError(f"{owner}: {name} must have shape {expected} (or batch 1), got {shape}.")


def _check_base(owner: str, base: float) -> None:
    # base ** (-2i / d) is inf or NaN for base <= 0: every angle would be NaN, silently.
    if isinstance(base, bool) or not isinstance(base, int | float | np.number) or not base > 0:
        raise ValueError(f"{owner}: base must be a positive number, got {base!r}.")


def _check_bias_positions(owner: str, q_positions: Array, k_positions: Array, num_heads: int):
    """q_positions [B, Lq] and k_positions [B, Lk] (either batch may be 1); num_heads >= 1."""
    q_shape, k_shape = tuple(jnp.shape(q_positions)), tuple(jnp.shape(k_positions))
    if (
        len(q_shape) != 2
        or len(k_shape) != 2
        or (q_shape[0] != k_shape[0] and 1 not in (q_shape[0], k_shape[0]))
    ):
        raise ValueError(
            f"{owner}: q_positions and k_positions must have shapes [B, Lq] and [B, Lk] (or batch "
            f"1), got {q_shape} and {k_shape}."
        )
    if isinstance(num_heads, bool) or not isinstance(num_heads, int | np.integer) or num_heads < 1:
        raise ValueError(f"{owner}: num_heads must be an int >= 1, got {num_heads!r}.")


class PositionEncoding(nn.Module):
    """NoPE, and the base of every encoding: all three hooks are identities / None.

    ``position_axes`` is 1 for positions ``[B, L]`` and 2 for ``[B, L, 2]``.
    """

    position_axes: ClassVar[int] = 1

    def embed(self, x: Array, positions: Array) -> Array:
        """x: [B, L, D], positions: [B, L] -> [B, L, D]."""
        del positions
        return x

    def rotate(
        self, q: Array, k: Array, q_positions: Array, k_positions: Array
    ) -> tuple[Array, Array]:
        """q: [B, Lq, H, Dh], k: [B, Lk, Hkv, Dh] -> the same shapes."""
        del q_positions, k_positions
        return q, k

    def attention_bias(
        self, q_positions: Array, k_positions: Array, num_heads: int
    ) -> Array | None:
        """-> [B, H, Lq, Lk] float32 logit bias, or None."""
        del q_positions, k_positions, num_heads
        return None


class NoPositionEncoding(PositionEncoding):
    """NoPE: no position information at all ("none")."""


# ---------------------------------------------------------------------------- absolute


class LearnedPositionEmbedding(PositionEncoding):
    """A learned table ``[max_length, D]`` added to the tokens ("learned").

    Attributes:
      max_length: number of positions in the table.
      init_std: std of the truncated-normal init (CCT uses 0.2, ViT 0.02), cut at
        +-2 in absolute value as PyTorch's ``trunc_normal_(std=init_std)`` in the
        papers' code does (flax's default cut at +-2 std would shrink the std to
        0.88 * init_std).
      param_dtype: dtype of the table.

    A position outside ``[0, max_length)`` gives NaN rather than a silently
    clamped row, so the mistake shows in the loss.
    """

    max_length: int = 512
    init_std: float = 0.02
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def embed(self, x: Array, positions: Array) -> Array:
        _check_positions("LearnedPositionEmbedding", "positions", positions, *x.shape[:2], 1)
        length = self.max_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(
                f"LearnedPositionEmbedding: max_length must be an int >= 1, got {self.max_length!r}."
            )
        if not self.init_std > 0:
            raise ValueError(
                f"LearnedPositionEmbedding: init_std must be positive, got {self.init_std!r}."
            )
        table = self.param(
            "embedding",
            trunc_normal(self.init_std),
            (self.max_length, x.shape[-1]),
            self.param_dtype,
        )
        # jnp.take wraps negative indices NumPy-style even with mode="fill" (-1 would read
        # the last row); send them past the end so they fill with NaN like the others.
        positions = jnp.where(positions < 0, self.max_length, positions)
        rows = jnp.take(table, positions, axis=0, mode="fill", fill_value=jnp.nan)
        return x + rows.astype(x.dtype)


def sinusoidal_table(
    positions: Array, dim: int, *, base: float = 10000.0, interleaved: bool = False
):
    """Fixed sinusoidal encodings of ``positions [...]`` -> ``[..., dim]`` float32.

    Channel pair i has frequency ``base^(-2i/dim)``. ``interleaved=False`` lays
    out ``[sin(all), cos(all)]`` (the common layout); ``interleaved=True`` puts
    sin at even and cos at odd channels (Vaswani et al., CCT's ``sine`` option).
    """
    if dim % 2:
        raise ValueError(f"sinusoidal encoding: dim must be even, got {dim}.")
    _check_base("sinusoidal encoding", base)
    inv_freq = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    if interleaved:
        return jnp.stack([sin, cos], axis=-1).reshape(*angles.shape[:-1], dim)
    return jnp.concatenate([sin, cos], axis=-1)


class SinusoidalPositionEncoding(PositionEncoding):
    """Fixed sin/cos encodings added to the tokens ("sinusoidal"); no parameters.

    Attributes:
      base: wavelength scale (10000).
      interleaved: sin/cos interleaved per channel pair (CCT's sine variant) or
        concatenated halves.
      scale: the table's amplitude (1: entries in [-1, 1], RMS 1/sqrt(2)). Token
        embeddings initialised at a small std (the LMs' 0.02) are swamped by an
        amplitude-1 table; ``scale = sqrt(2) * std`` gives both the same RMS.
    """

    base: float = 10000.0
    interleaved: bool = False
    scale: float = 1.0

    def embed(self, x: Array, positions: Array) -> Array:
        _check_positions("SinusoidalPositionEncoding", "positions", positions, *x.shape[:2], 1)
        if not self.scale > 0:
            raise ValueError(
                f"SinusoidalPositionEncoding: scale must be a positive number, got {self.scale!r}."
            )
        table = sinusoidal_table(
            positions, x.shape[-1], base=self.base, interleaved=self.interleaved
        )
        return x + (self.scale * table).astype(x.dtype)


# ---------------------------------------------------------------------------- rotary


def _rotate_pairs(x: Array, angles: Array) -> Array:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [..., 2n] by angles [..., n]."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def _rotary_inv_freq(rotary_dim: int, base: float) -> Array:
    _check_base("rotary encoding", base)
    return base ** (-jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)


class RotaryPositionEncoding(PositionEncoding):
    """RoPE over 1-D positions ("rope"), pairs of adjacent channels as in LLaMA / iLLaMA.

    Channel pair (2i, 2i+1) of a query/key at position p is rotated by
    ``p * base^(-2i/d_rot)``, so ``<R(m) q, R(n) k>`` depends on n - m only.

    Attributes:
      base: 10000.
      rotary_fraction: fraction of the head dim rotated (the first channels;
        the rest pass through). Rounded down to an even number of channels.
    """

    base: float = 10000.0
    rotary_fraction: float = 1.0

    def _rotary_dim(self, head_dim: int, multiple: int) -> int:
        rotary_dim = int(head_dim * self.rotary_fraction) // multiple * multiple
        if not 0.0 < self.rotary_fraction <= 1.0 or rotary_dim == 0:
            raise ValueError(
                f"{type(self).__name__}: rotary_fraction * head_dim must give at least {multiple} "
                f"channels with rotary_fraction in (0, 1]; got rotary_fraction="
                f"{self.rotary_fraction}, head_dim={head_dim}."
            )
        return rotary_dim

    def _angles(self, positions: Array, rotary_dim: int) -> Array:
        # [B, L] -> [B, L, 1, rotary_dim / 2], broadcast over heads.
        return (positions.astype(jnp.float32)[..., None] * _rotary_inv_freq(rotary_dim, self.base))[
            :, :, None, :
        ]

    def _apply(self, x: Array, positions: Array, name: str) -> Array:
        _check_positions(type(self).__name__, name, positions, x.shape[0], x.shape[1], 1)
        rotary_dim = self._rotary_dim(x.shape[-1], 2)
        rotated = _rotate_pairs(x[..., :rotary_dim], self._angles(positions, rotary_dim))
        return jnp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)

    def rotate(self, q, k, q_positions, k_positions):
        return self._apply(q, q_positions, "q_positions"), self._apply(
            k, k_positions, "k_positions"
        )


class Rotary2DPositionEncoding(RotaryPositionEncoding):
    """Axial 2-D RoPE for image grids ("rope2d"): positions ``[B, L, 2]`` (row, column).

    The first half of the rotary channels is rotated by the row, the second
    half by the column, each half as 1-D RoPE of its own width, so scores
    depend only on the (row, column) offset between tokens. The rotated
    channels, ``rotary_fraction * head_dim``, are rounded down to a multiple of
    4 (two halves of channel pairs); the rest pass through.
    """

    position_axes: ClassVar[int] = 2

    def _apply(self, x: Array, positions: Array, name: str) -> Array:
        _check_positions(type(self).__name__, name, positions, x.shape[0], x.shape[1], 2)
        rotary_dim = self._rotary_dim(x.shape[-1], 4)
        half = rotary_dim // 2
        rows = _rotate_pairs(x[..., :half], self._angles(positions[..., 0], half))
        cols = _rotate_pairs(x[..., half:rotary_dim], self._angles(positions[..., 1], half))
        return jnp.concatenate([rows, cols, x[..., rotary_dim:]], axis=-1)


# ---------------------------------------------------------------------------- relative biases


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes (Press et al.; their reference ``get_slopes``).

    For H a power of two: ``(2^(-8/H))^(1..H)``. Otherwise the slopes of the
    closest smaller power of two P, followed by every other slope of 2P
    (the interleaved construction), first H - P of them.
    """
    if num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be >= 1, got {num_heads}.")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_two(num_heads), np.float64)
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = alibi_slopes(2 * closest)[0::2][: num_heads - closest]
    return np.concatenate([power_of_two(closest), extra])


class ALiBi(PositionEncoding):
    """Attention with linear biases ("alibi"): ``-slope_h * distance`` added to logits.

    Attributes:
      causal: False gives ``-slope * |i - j|`` (bidirectional form); True gives
        ``-slope * max(i - j, 0)``, the causal form, meant to be used with a
        causal mask (future keys get no bias because they are masked).
    """

    causal: bool = False

    def attention_bias(self, q_positions, k_positions, num_heads):
        _check_bias_positions("ALiBi", q_positions, k_positions, num_heads)
        distance = (q_positions[:, None, :, None] - k_positions[:, None, None, :]).astype(
            jnp.float32
        )
        distance = jnp.maximum(distance, 0.0) if self.causal else jnp.abs(distance)
        slopes = jnp.asarray(alibi_slopes(num_heads), jnp.float32)[None, :, None, None]
        return -slopes * distance


def t5_relative_position_bucket(
    relative_position: Array,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Array:
    """T5's bucket of ``relative_position = key_position - query_position`` (int32).

    Half the buckets (all of them if causal) are exact offsets 0..max_exact-1;
    the rest grow logarithmically up to ``max_distance``, beyond which all
    offsets share the last bucket. Bidirectional uses separate halves for keys
    after the query. Causal maps keys after the query to bucket 0.
    """
    # Each direction needs max_exact = buckets // 2 >= 1 exact buckets and a log range
    # max_distance / max_exact > 1; otherwise the log scale divides by zero (a Python
    # error) or by log(<= 1), giving negative "buckets" that a table lookup wraps silently.
    valid_int = isinstance(num_buckets, int) and not isinstance(num_buckets, bool)
    per_direction = (num_buckets // 2 if bidirectional else num_buckets) if valid_int else 0
    if per_direction < 2:
        raise ValueError(
            f"t5_relative_position_bucket: num_buckets must be an int >= "
            f"{4 if bidirectional else 2} (bidirectional={bidirectional}), got {num_buckets!r}."
        )
    if not max_distance > per_direction // 2:
        raise ValueError(
            f"t5_relative_position_bucket: max_distance must exceed the exact buckets per "
            f"direction ({per_direction // 2} for num_buckets={num_buckets}, "
            f"bidirectional={bidirectional}), got {max_distance!r}."
        )
    n = -relative_position.astype(jnp.int32)
    bucket = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # max(n, 1) keeps log finite where the small-offset branch is taken anyway.
    log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, n, large)


class T5RelativeBias(PositionEncoding):
    """T5's learned relative bias ("t5"): one scalar per head and log-spaced offset bucket.

    Attributes:
      num_buckets: 32. max_distance: 128.
      bidirectional: separate buckets for keys before and after the query
        (encoders); False for causal decoders.
      init_std: normal init std of the ``[num_buckets, num_heads]`` table.
    """

    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    init_std: float = 0.02
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def attention_bias(self, q_positions, k_positions, num_heads):
        _check_bias_positions("T5RelativeBias", q_positions, k_positions, num_heads)
        table = self.param(
            "relative_attention_bias",
            nn.initializers.normal(stddev=self.init_std),
            (self.num_buckets, num_heads),
            self.param_dtype,
        )
        buckets = t5_relative_position_bucket(
            k_positions[:, None, :] - q_positions[:, :, None],
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )  # [B, Lq, Lk]
        return jnp.moveaxis(table[buckets].astype(jnp.float32), -1, 1)


POSITION_ENCODINGS: dict[str, Callable[..., PositionEncoding]] = {
    "learned": LearnedPositionEmbedding,
    "sinusoidal": SinusoidalPositionEncoding,
    "rope": RotaryPositionEncoding,
    "rope2d": Rotary2DPositionEncoding,
    "alibi": ALiBi,
    "t5": T5RelativeBias,
    "none": NoPositionEncoding,
}


def make_position_encoding(name: str, /, **kwargs: Any) -> PositionEncoding:
    """Build a position encoding by name (see ``POSITION_ENCODINGS``); kwargs go to its class."""
    if name not in POSITION_ENCODINGS:
        raise ValueError(
            f"make_position_encoding: unknown name {name!r}; expected one of "
            f"{sorted(POSITION_ENCODINGS)}."
        )
    return POSITION_ENCODINGS[name](**kwargs)
