"""Channel mixers (feed-forward networks): MLP and gated MLP (SwiGLU, GeGLU).

Both take an optional call-time ``hidden_width``: only the first
``hidden_width`` hidden units are used (MatFormer's nested FFN,
``W2[:m] act(W1[:, :m] x)``). The parameters always have the full width, so
one set of weights serves every granularity and call sites that do not ask
for a width are unchanged.

Both also take ``dense_sparse=(rank, nonzeros_per_row)``: every projection is
then DSFormer's :class:`~effformer.nn.dense_sparse.DenseSparseLinear` (a dense
basis times a top-k-per-row sparse coefficient matrix, computed in factored
form, never forming the kernel) instead of a dense kernel, with the parameter
names (``basis``, ``coefficients``, ``bias``) that
:func:`effformer.train.dense_sparse_compression.compress_lm_params` gives a
trained model's FFN kernels, so a compressed model runs and fine-tunes in the
factored form.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.initializers import trunc_normal
from effformer.nn.dense_sparse import DenseSparseLinear

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # Exact erf GELU is PyTorch's default, which CCT uses.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

default_kernel_init = trunc_normal(0.02)


def get_activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation: unknown name {name!r}; expected one of {sorted(ACTIVATIONS)}."
        )
    return ACTIVATIONS[name]


def llama_hidden_dim(dim: int, multiple_of: int = 256) -> int:
    """LLaMA / iLLaMA SwiGLU width: ``int(8 * dim / 3)`` rounded up to ``multiple_of``."""
    return multiple_of * math.ceil(int(8 * dim / 3) / multiple_of)


class PrefixDense(nn.Module):
    """A Dense layer whose input and output can be restricted to a prefix of its units.

    The kernel is ``[in_features, features]``; an input with ``m < in_features``
    channels uses the first ``m`` rows, and ``out_width`` keeps the first
    columns. Parameter names match ``nn.Dense`` (``kernel``, ``bias``).
    """

    features: int
    in_features: int
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, out_width: int | None = None) -> Array:
        """x: [..., m] with m <= in_features -> [..., out_width or features]."""
        if x.shape[-1] > self.in_features:
            raise ValueError(
                f"PrefixDense: input channels must be <= in_features={self.in_features}, "
                f"got x.shape[-1]={x.shape[-1]}."
            )
        kernel = self.param(
            "kernel", self.kernel_init, (self.in_features, self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        kernel = kernel[: x.shape[-1], :out_width]
        if bias is not None:
            bias = bias[:out_width]
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.dot(x, kernel)
        return y if bias is None else y + bias


def _check_hidden_width(owner: str, hidden_width: int | None, hidden_dim: int) -> None:
    if hidden_width is not None and not 1 <= hidden_width <= hidden_dim:
        raise ValueError(
            f"{owner}: hidden_width must be in [1, hidden_dim={hidden_dim}], got {hidden_width}."
        )


def check_dense_sparse(owner: str, dense_sparse: Any, hidden_width: int | None) -> None:
    """Refuse a ``dense_sparse`` that is not ``None`` or two positive ints, or one with a width."""
    if dense_sparse is None:
        return
    pair = isinstance(dense_sparse, tuple | list) and len(dense_sparse) == 2
    if not pair or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in dense_sparse
    ):
        raise ValueError(
            f"{owner}: dense_sparse must be None or (rank, nonzeros_per_row), two positive ints, "
            f"got {dense_sparse!r}."
        )
    if hidden_width is not None:
        raise ValueError(
            f"{owner}: hidden_width (MatFormer's nested widths) needs dense kernels; got "
            f"hidden_width={hidden_width} with dense_sparse={tuple(dense_sparse)}."
        )


def _projection(ffn: nn.Module, features: int, in_features: int, name: str) -> Callable:
    """One of an FFN's projections, ``x [..., m] -> [..., features]``.

    A :class:`PrefixDense` (called with ``out_width``), or a
    :class:`~effformer.nn.dense_sparse.DenseSparseLinear` when ``ffn.dense_sparse``
    is set (the FFN has refused a ``hidden_width`` by then, so ``out_width`` is None).
    """
    if ffn.dense_sparse is None:
        return PrefixDense(
            features,
            in_features,
            use_bias=ffn.use_bias,
            kernel_init=ffn.kernel_init,
            bias_init=ffn.bias_init,
            dtype=ffn.dtype,
            param_dtype=ffn.param_dtype,
            name=name,
        )
    rank, nonzeros_per_row = ffn.dense_sparse
    layer = DenseSparseLinear(
        features,
        rank,
        nonzeros_per_row,
        use_bias=ffn.use_bias,
        bias_init=ffn.bias_init,
        dtype=ffn.dtype,
        param_dtype=ffn.param_dtype,
        name=name,
    )
    return lambda x, out_width=None: layer(x)


class MLP(nn.Module):
    """``dropout(W2 dropout(act(W1 x)))``, the ViT / CCT feed-forward network.

    Attributes:
      hidden_dim: width of the hidden layer.
      out_dim: output width; ``None`` means the input width.
      activation: ``"gelu"`` (exact), ``"gelu_tanh"``, ``"relu"`` or ``"silu"``.
      use_bias: biases on both layers.
      dropout_rate: dropout after the activation and after W2 (CCT's placement).
      dense_sparse: ``(rank, nonzeros_per_row)``: W1 and W2 are DSFormer
        dense-sparse factorisations (module docstring); None: dense kernels.
    """

    hidden_dim: int
    out_dim: int | None = None
    activation: str = "gelu"
    use_bias: bool = True
    dropout_rate: float = 0.0
    dense_sparse: tuple[int, int] | None = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, *, deterministic: bool = True, hidden_width: int | None = None
    ) -> Array:
        """x: [..., D] -> [..., out_dim or D]; ``hidden_width`` uses the first m hidden units."""
        _check_hidden_width("MLP", hidden_width, self.hidden_dim)
        check_dense_sparse("MLP", self.dense_sparse, hidden_width)
        act = get_activation(self.activation)
        dense = functools.partial(_projection, self)
        out_dim = self.out_dim or x.shape[-1]
        h = act(dense(self.hidden_dim, x.shape[-1], "fc1")(x, out_width=hidden_width))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        y = dense(out_dim, self.hidden_dim, "fc2")(h)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class GatedMLP(nn.Module):
    """``dropout(W2 dropout(act(W1 x) * W3 x))``: SwiGLU (silu) or GeGLU (gelu).

    Attributes:
      hidden_dim: width of the gated hidden layer (see :func:`llama_hidden_dim`).
      out_dim: output width; ``None`` means the input width.
      activation: the gate's activation, a name as for :class:`MLP`.
      use_bias: biases on W1, W2, W3 (iLLaMA / LLaMA use none).
      dropout_rate: dropout after the gating product and after W2.
      dense_sparse: ``(rank, nonzeros_per_row)``: W1, W2 and W3 are DSFormer
        dense-sparse factorisations (module docstring); None: dense kernels.
    """

    hidden_dim: int
    out_dim: int | None = None
    activation: str = "silu"
    use_bias: bool = False
    dropout_rate: float = 0.0
    dense_sparse: tuple[int, int] | None = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, *, deterministic: bool = True, hidden_width: int | None = None
    ) -> Array:
        """x: [..., D] -> [..., out_dim or D]; ``hidden_width`` uses the first m hidden units."""
        _check_hidden_width("GatedMLP", hidden_width, self.hidden_dim)
        check_dense_sparse("GatedMLP", self.dense_sparse, hidden_width)
        act = get_activation(self.activation)
        dense = functools.partial(_projection, self)
        out_dim = self.out_dim or x.shape[-1]
        gate = act(dense(self.hidden_dim, x.shape[-1], "w1")(x, out_width=hidden_width))
        up = dense(self.hidden_dim, x.shape[-1], "w3")(x, out_width=hidden_width)
        h = nn.Dropout(self.dropout_rate)(gate * up, deterministic=deterministic)
        y = dense(out_dim, self.hidden_dim, "w2")(h)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


# name -> (class, activation)
FFNS: dict[str, tuple[type[nn.Module], str]] = {
    "gelu": (MLP, "gelu"),
    "gelu_tanh": (MLP, "gelu_tanh"),
    "relu": (MLP, "relu"),
    "silu": (MLP, "silu"),
    "swiglu": (GatedMLP, "silu"),
    "geglu": (GatedMLP, "gelu"),
}


def make_ffn(name: str, hidden_dim: int, /, **kwargs: Any) -> nn.Module:
    """Build an FFN by name.

    ``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"silu"`` give an :class:`MLP` with
    that activation; ``"swiglu"`` (silu gate) and ``"geglu"`` (exact gelu gate)
    give a :class:`GatedMLP`. Other kwargs go to the class.
    """
    if name not in FFNS:
        raise ValueError(f"make_ffn: unknown name {name!r}; expected one of {sorted(FFNS)}.")
    cls, activation = FFNS[name]
    return cls(hidden_dim=hidden_dim, activation=activation, **kwargs)
