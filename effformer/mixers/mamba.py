"""Mamba's selective state-space token mixer (Gu & Dao, 2023), with recurrent decoding.

Transcribes the original block (state-spaces/mamba, ``mamba_ssm/modules/mamba_simple.py``)
with its defaults and initialisation:

    x, z   = split(in_proj(h))                     D -> 2E, no bias
    x      = silu(causal_depthwise_conv(x))        kernel d_conv, with bias
    dt, B, C = split(x_proj(x))                    E -> dt_rank + 2n, no bias
    dt     = dt @ dt_proj.kernel                   dt_rank -> E (bias given to the scan)
    y      = selective_scan(x, dt, -exp(A_log), B, C, D, z,
                            delta_bias=dt_proj.bias, delta_softplus=True)
    out    = out_proj(y)                           E -> D, no bias

Parameters named ``A_log`` and ``D`` (the S4D-real state matrix and the skip
connection) must get no weight decay, as in the original: the trainer's
weight-decay mask excludes parameters with exactly these names.

Padding: the mask's segment ids (0 = padding) give a per-token mask. A padded
token is no step at all, as in decoding: the convolution runs over each row's
real tokens only, in order (so a real token's window holds the real tokens
before it, or the conv's own zero padding), the SSM state passes through it
unchanged, and it outputs zero; any padding (left, right or holes) therefore
equals its sequences run unpadded, in both paths. Segment ids only mark
padding: tokens of different non-zero segments in one row are not separated
(no packing). Causality is inherent; ``positions``
is accepted for the shared mixer signature and unused.

Decoding (``decode=True``): the ``cache`` collection holds ``conv_state``
[batch, E, d_conv] (the last d_conv conv inputs, oldest first) and
``ssm_state`` [batch, E, n]; each call takes one token ``x`` [batch, 1, D] and
advances them as the original's ``step``. A padded token (segment id 0) leaves
both states unchanged and outputs zero.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.ops.masks import AttentionMask
from effformer.ops.masks import token_mask as padding_token_mask
from effformer.ops.selective_scan import DEFAULT_CHUNK_SIZE, selective_scan

Array = jax.Array

# PyTorch's default nn.Linear / nn.Conv1d init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
# which the original keeps for in_proj, x_proj, out_proj and the conv.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def symmetric_uniform(limit: float):
    """U(-limit, limit)."""

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def dt_bias_init(dt_min: float, dt_max: float, dt_init_floor: float):
    """Inverse softplus of dt ~ log-uniform[dt_min, dt_max], floored at dt_init_floor."""

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        log_dt = jax.random.uniform(key, shape, minval=math.log(dt_min), maxval=math.log(dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), dt_init_floor)
        # softplus^-1(dt) = dt + log(1 - exp(-dt)), written with expm1 for small dt.
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def a_log_init(key: Array, shape: tuple[int, int], dtype=jnp.float32) -> Array:
    """S4D-real: A = -(1, 2, ..., n) for every channel, stored as log(1..n)."""
    del key
    channels, d_state = shape
    return jnp.broadcast_to(jnp.log(jnp.arange(1, d_state + 1, dtype=dtype)), (channels, d_state))


class MambaMixer(nn.Module):
    """Mamba block: [batch, L, d_model] -> [batch, L, d_model].

    Attributes:
      d_model: model width D.
      d_state: SSM state size n.
      d_conv: causal depthwise conv kernel size.
      expand: inner width E = expand * d_model.
      dt_rank: rank of the dt projection; None means ceil(d_model / 16).
      dt_min, dt_max, dt_init_floor, dt_scale: the dt initialisation of the original.
      conv_bias, bias: biases of the conv and of in/out projections (original: True, False).
      implementation, chunk_size: passed to ``selective_scan``.
      dtype: computation dtype of the projections and conv (None: that of the input);
        the scan always computes in float32.
    """

    d_model: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    conv_bias: bool = True
    bias: bool = False
    implementation: str | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank is None else self.dt_rank

    def _check_config(self) -> None:
        """Fail at once on sizes or a dt range that would build a broken block (a zero
        size gave a ZeroDivisionError inside an initialiser, d_state=0 a block with no
        state at all, and dt_min > dt_max a silently swapped range)."""
        for name in ("d_model", "d_state", "d_conv", "expand", "dt_rank"):
            value = getattr(self, name)
            if name == "dt_rank" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MambaMixer: {name} must be a positive int, got {value!r}.")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(
                "MambaMixer: the dt range must satisfy 0 < dt_min <= dt_max, got "
                f"dt_min={self.dt_min!r}, dt_max={self.dt_max!r}."
            )
        if not self.dt_init_floor >= 0 or not self.dt_scale >= 0:
            raise ValueError(
                "MambaMixer: dt_init_floor and dt_scale must be >= 0, got "
                f"dt_init_floor={self.dt_init_floor!r}, dt_scale={self.dt_scale!r}."
            )

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        mask: AttentionMask | None = None,
        positions: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """x: [batch, L, d_model] (L = 1 when decoding) -> [batch, L, d_model]."""
        del positions, deterministic  # causal by construction; no dropout in the block
        self._check_config()
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"MambaMixer: x must have shape [batch, L, d_model={self.d_model}], "
                f"got {tuple(x.shape)}."
            )
        batch, length, _ = x.shape
        if decode and length != 1:
            raise ValueError(
                f"MambaMixer: decode=True advances one token per call; x must have shape "
                f"[batch, 1, {self.d_model}], got {tuple(x.shape)}."
            )
        token_mask = padding_token_mask(mask, batch, length)

        E, n, R = self.d_inner, self.d_state, self.resolved_dt_rank
        dtype = x.dtype if self.dtype is None else self.dtype
        dense = lambda features, use_bias, name: nn.Dense(
            features, use_bias=use_bias, dtype=dtype, param_dtype=self.param_dtype,
            kernel_init=torch_default_init, bias_init=nn.initializers.zeros, name=name,
        )  # fmt: skip

        xz = dense(2 * E, self.bias, "in_proj")(x)
        x_in, z = jnp.split(xz, 2, axis=-1)  # [batch, L, E] each
        if token_mask is not None:
            x_in = jnp.where(token_mask[..., None], x_in, 0)

        # Depthwise conv kernel [d_conv, E]: tap k multiplies the input k - (d_conv - 1)
        # steps back (PyTorch's Conv1d with padding d_conv - 1, cut to L). fan_in = d_conv.
        conv_init = symmetric_uniform(1 / math.sqrt(self.d_conv))
        conv_kernel = self.param("conv_kernel", conv_init, (self.d_conv, E), self.param_dtype)
        conv_bias = (
            self.param("conv_bias", conv_init, (E,), self.param_dtype) if self.conv_bias else None
        )
        x_proj = dense(R + 2 * n, False, "x_proj")
        dt_kernel = self.param(
            "dt_proj_kernel",
            symmetric_uniform(R**-0.5 * self.dt_scale),
            (R, E),
            self.param_dtype,
        )
        dt_bias = self.param(
            "dt_proj_bias",
            dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor),
            (E,),
            self.param_dtype,
        )
        A_log = self.param("A_log", a_log_init, (E, n), self.param_dtype)
        D = self.param("D", nn.initializers.ones, (E,), self.param_dtype)
        out_proj = dense(self.d_model, self.bias, "out_proj")
        f32 = jnp.promote_types(dtype, jnp.float32)  # the scan's compute dtype
        A = -jnp.exp(A_log.astype(f32))

        if decode:
            y = self._step(x_in[:, 0], z[:, 0], conv_kernel, conv_bias, x_proj, dt_kernel,
                           dt_bias, A, D, None if token_mask is None else token_mask[:, 0])  # fmt: skip
            return out_proj(y[:, None, :].astype(dtype))

        # Causal depthwise conv as d_conv shifted multiply-adds (the same sum as the step).
        front = ((0, 0), (self.d_conv - 1, 0), (0, 0))
        padded = jnp.pad(x_in, front)
        conv_input = padded
        if token_mask is not None:
            # A padded token is no step of the conv, as in decoding (where it leaves the conv
            # state unchanged): convolve each row's real tokens moved to its front, in order
            # (the zeroed padding behind them), then give every real token its output back.
            # Zeroing padding in place would put a zero inside the window after a hole.
            order = jnp.argsort(~token_mask, axis=1, stable=True)
            conv_input = jnp.pad(jnp.take_along_axis(x_in, order[..., None], axis=1), front)
        conv = sum(
            conv_input[:, k : k + length] * conv_kernel[k].astype(dtype) for k in range(self.d_conv)
        )
        if token_mask is not None:
            # Real token t is real token number cumsum - 1; a padded position gets some real
            # token's output, which the scan ignores (dt = 0 there) and its output masks.
            real_index = jnp.maximum(jnp.cumsum(token_mask, axis=1) - 1, 0)
            conv = jnp.take_along_axis(conv, real_index[..., None], axis=1)
        if conv_bias is not None:
            conv = conv + conv_bias.astype(dtype)
        x_conv = nn.silu(conv)

        dt, B, C = jnp.split(x_proj(x_conv), [R, R + n], axis=-1)
        dt = dt @ dt_kernel.astype(dtype)  # [batch, L, E]; the bias goes to the scan
        channels_first = lambda a: jnp.swapaxes(a, 1, 2)
        y, ssm_state = selective_scan(
            channels_first(x_conv), channels_first(dt), A, channels_first(B), channels_first(C),
            D.astype(f32), channels_first(z), delta_bias=dt_bias.astype(f32),
            delta_softplus=True, return_last_state=True, mask=token_mask,
            implementation=self.implementation, chunk_size=self.chunk_size,
        )  # fmt: skip
        # The states decoding would have after this sequence (when "intermediates" is
        # mutable): for checking decode against the parallel path, and for prefilling.
        self.sow("intermediates", "ssm_state", ssm_state)
        self.sow("intermediates", "conv_state", self._final_conv_state(padded, token_mask))
        return out_proj(channels_first(y))

    def _final_conv_state(self, padded: Array, token_mask: Array | None) -> Array:
        """The conv state decoding reaches: the last d_conv *real* conv inputs, oldest first.

        padded: [batch, d_conv - 1 + L, E] (zero front padding, padded tokens zeroed);
        token_mask: [batch, L] or None. A padded token leaves the decode conv state
        unchanged, so after right padding the state holds the last real tokens, not
        the trailing (zeroed) padding: slot ``d_conv - 1 - (#real tokens after t)``
        takes real token t.
        """
        if token_mask is None:
            return jnp.swapaxes(padded[:, -self.d_conv :], 1, 2)
        x_in = padded[:, self.d_conv - 1 :]  # [batch, L, E]
        real_after = jnp.sum(token_mask, axis=1, keepdims=True) - jnp.cumsum(token_mask, axis=1)
        slot = self.d_conv - 1 - real_after  # [batch, L]
        picks = token_mask[..., None] & (slot[..., None] == jnp.arange(self.d_conv))
        # Each slot receives at most one token, so the sum is exact (a selection).
        return jnp.einsum("blk,ble->bek", picks.astype(x_in.dtype), x_in)

    def _step(self, x_in, z, conv_kernel, conv_bias, x_proj, dt_kernel, dt_bias, A, D, token_mask):
        """One recurrent step. x_in, z: [batch, E]; returns y [batch, E] (before out_proj)."""
        batch, E = x_in.shape
        dtype = x_in.dtype
        f32 = jnp.promote_types(dtype, jnp.float32)  # the scan's compute dtype
        conv_state = self.variable("cache", "conv_state", jnp.zeros, (batch, E, self.d_conv), f32)
        ssm_state = self.variable("cache", "ssm_state", jnp.zeros, (batch, E, self.d_state), f32)
        new_conv_state = jnp.concatenate(
            [conv_state.value[:, :, 1:], x_in[:, :, None].astype(f32)], axis=-1
        )
        conv = jnp.sum(new_conv_state * conv_kernel.T.astype(f32), axis=-1)
        if conv_bias is not None:
            conv = conv + conv_bias.astype(f32)
        x_conv = nn.silu(conv.astype(dtype))

        R, n = self.resolved_dt_rank, self.d_state
        dt, B, C = jnp.split(x_proj(x_conv).astype(f32), [R, R + n], axis=-1)
        dt = jax.nn.softplus(dt @ dt_kernel.astype(f32) + dt_bias.astype(f32))
        x32 = x_conv.astype(f32)
        new_ssm_state = (
            ssm_state.value * jnp.exp(dt[..., None] * A) + (dt * x32)[..., None] * B[:, None, :]
        )
        y = jnp.sum(new_ssm_state * C[:, None, :], axis=-1) + D.astype(f32) * x32
        y = y * nn.silu(z.astype(f32))
        if token_mask is not None:
            keep = token_mask[:, None, None]
            new_conv_state = jnp.where(keep, new_conv_state, conv_state.value)
            new_ssm_state = jnp.where(keep, new_ssm_state, ssm_state.value)
            y = jnp.where(token_mask[:, None], y, 0)
        if not self.is_initializing():
            conv_state.value = new_conv_state
            ssm_state.value = new_ssm_state
        return y.astype(dtype)
