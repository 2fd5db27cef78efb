"""LMUFormer's Legendre Memory Unit token mixer (Liu et al. 2024), with recurrent decoding.

The non-spiking LMU block of LMUFormer (its ``LMUFFTCell`` with the output
projection), on a sequence ``x [batch, L, D]``:

    u   = relu(W_u x + b_u)                         D -> memory_channels (LMUFormer: 1)
    m   = legendre_memory(u; order, theta)          [batch, L, memory_channels * order]
    h   = relu(W_h [m; x] + b_h)                    -> hidden_dim (LMUFormer: D)
    out = W_o h + b_o                               -> D (LMUFormer's 1x1 conv)

Initialisation as LMUFormer's (its ``ConvLMU._init_weights``, applied to every
``nn.Linear``, the cell's ``W_u`` and ``W_h`` among them): W_u and W_h truncated
N(0, 0.02) with zero biases; the output projection, a 1x1 ``Conv1d`` there, keeps
PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.

The memory is the LMU's linear, time-invariant system (effformer.ops.legendre_memory):
computed for the whole sequence by FFT in training, and one step at a time when
decoding, the two being equal. LMUFormer follows the projection with BatchNorm;
here the residual block's own norms (pre- or post-norm) take that place, as for
every other mixer, so no batch statistics are kept.

Padding: the mask's segment ids (0 = padding) give a per-token mask. A padded
token is no step of the memory (the parallel pass runs it over each row's real
tokens only; a decode step leaves the state unchanged) and outputs zero, so any
padding (left, right or holes) gives the outputs of the sequences run unpadded,
in both paths. Segment ids only mark padding (no packing: a second segment would
see the first one's memory).
The mixer is causal by construction; ``positions`` is accepted for the shared
mixer signature and unused.

Decoding (``decode=True``): the ``cache`` collection holds ``memory_state``
[batch, memory_channels, order] (float32); each call takes one token
``x [batch, 1, D]`` and advances it by ``m = Abar m + Bbar u``. A padded token leaves
it unchanged and outputs zero. The parallel pass sows the state it ends in
(``intermediates``/``memory_state``) for checking and prefilling.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.initializers import trunc_normal
from effformer.mixers.mamba import symmetric_uniform, torch_default_init
from effformer.ops.legendre_memory import (
    IMPLEMENTATIONS,
    discretised_state_space,
    legendre_memory,
    legendre_step,
)
from effformer.ops.masks import AttentionMask
from effformer.ops.masks import token_mask as padding_token_mask

Array = jax.Array

# LMUFormer's init of its nn.Linear layers (timm's trunc_normal_(std=.02), zero bias).
linear_init = trunc_normal(0.02)


class LMUMixer(nn.Module):
    """Legendre Memory Unit mixer: [batch, L, d_model] -> [batch, L, d_model].

    Attributes:
      d_model: model width D.
      order: Legendre coefficients per memory channel (LMUFormer: D).
      theta: the window, in steps, the memory represents (LMUFormer: 128, its
        sequence length).
      memory_channels: channels of ``u`` written into the memory (LMUFormer: 1).
      hidden_dim: width of ``h`` (None: d_model, as LMUFormer).
      implementation: ``"fft"`` (default), ``"scan"`` or ``"reference"`` for the
        parallel pass (``legendre_memory``).
      dtype: computation dtype of the projections (None: that of the input); the
        memory is computed in float32 at least.
    """

    d_model: int
    order: int = 64
    theta: float = 128.0
    memory_channels: int = 1
    hidden_dim: int | None = None
    implementation: str = "fft"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

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
        del positions, deterministic  # causal by construction; no dropout inside
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"LMUMixer: x must have shape [batch, L, d_model={self.d_model}], "
                f"got {tuple(x.shape)}."
            )
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"LMUMixer: implementation must be one of {IMPLEMENTATIONS}, "
                f"got {self.implementation!r}."
            )
        if not isinstance(self.memory_channels, int) or self.memory_channels < 1:
            raise ValueError(
                f"LMUMixer: memory_channels must be a positive int, got {self.memory_channels!r}."
            )
        hidden_dim = self.hidden_dim
        if hidden_dim is not None and (
            not isinstance(hidden_dim, int) or isinstance(hidden_dim, bool) or hidden_dim < 1
        ):  # 0 would silently have meant d_model
            raise ValueError(
                f"LMUMixer: hidden_dim must be a positive int or None (d_model), got {hidden_dim!r}."
            )
        batch, length, _ = x.shape
        if decode and length != 1:
            raise ValueError(
                f"LMUMixer: decode=True advances one token per call; x must have shape "
                f"[batch, 1, {self.d_model}], got {tuple(x.shape)}."
            )
        token_mask = padding_token_mask(mask, batch, length)

        dtype = x.dtype if self.dtype is None else self.dtype
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, dtype=dtype, param_dtype=self.param_dtype, kernel_init=linear_init, name=name
        )
        u = nn.relu(dense(self.memory_channels, "memory_input")(x))  # [batch, L, channels]
        if token_mask is not None:
            u = jnp.where(token_mask[..., None], u, 0)

        if decode:
            memory = self._step(u[:, 0], None if token_mask is None else token_mask[:, 0])
            memory = memory[:, None]  # [batch, 1, channels, order]
        else:
            memory = self._parallel_memory(u, token_mask)
            self.sow("intermediates", "memory_state", memory[:, -1])
        memory = memory.reshape(batch, length, self.memory_channels * self.order)

        hidden = nn.relu(
            dense(self.hidden_dim or self.d_model, "hidden")(
                jnp.concatenate([memory.astype(dtype), x], axis=-1)
            )
        )
        hidden_dim = hidden.shape[-1]
        out = nn.Dense(  # LMUFormer's 1x1 Conv1d, with PyTorch's default init
            self.d_model,
            dtype=dtype,
            param_dtype=self.param_dtype,
            kernel_init=torch_default_init,
            bias_init=symmetric_uniform(hidden_dim**-0.5),
            name="out_proj",
        )(hidden)
        if token_mask is not None:
            out = jnp.where(token_mask[..., None], out, 0)
        return out

    def _parallel_memory(self, u: Array, token_mask: Array | None) -> Array:
        """The memory after every position: u [batch, L, channels] -> [batch, L, channels, order].

        A padded token is no step at all, as in decoding: the memory runs over each
        row's real tokens only, in order, and a position reads the state after the last
        real token up to it (zero before the first). Feeding padding in as ``u = 0``
        would still advance time (``m = Abar m``), so a padded hole, or the right
        padding whose last state is sown, would differ from decoding.
        """
        run = lambda u: legendre_memory(  # noqa: E731
            u, order=self.order, theta=self.theta, implementation=self.implementation
        )
        if token_mask is None:
            return run(u)
        # Real tokens first, in their order (u is already zero at the padding behind them).
        order = jnp.argsort(~token_mask, axis=1, stable=True)
        memory = run(jnp.take_along_axis(u, order[..., None], axis=1))
        last_real = jnp.cumsum(token_mask, axis=1) - 1  # [batch, L], -1 before the first
        index = jnp.maximum(last_real, 0)[..., None, None]
        memory = jnp.take_along_axis(memory, index, axis=1)
        return jnp.where((last_real >= 0)[..., None, None], memory, 0)

    def _step(self, u_t: Array, token_mask: Array | None) -> Array:
        """One recurrent step: u_t [batch, channels] -> the new memory [batch, channels, order]."""
        batch = u_t.shape[0]
        f32 = jnp.promote_types(u_t.dtype, jnp.float32)
        state = self.variable(
            "cache", "memory_state", jnp.zeros, (batch, self.memory_channels, self.order), f32
        )
        Abar, Bbar = (jnp.asarray(a, f32) for a in discretised_state_space(self.order, self.theta))
        new_state = legendre_step(state.value, u_t.astype(f32), Abar, Bbar)
        if token_mask is not None:
            new_state = jnp.where(token_mask[:, None, None], new_state, state.value)
        if not self.is_initializing():
            state.value = new_state
        return new_state
