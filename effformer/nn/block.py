"""The generic residual block: a token mixer and a channel mixer (FFN) with norms.

Orderings (``d`` = DropPath, ``n1``/``n2`` = the two norms):

* ``"pre_norm"`` (ViT, LLaMA, iLLaMA): ``x += d(mixer(n1(x))); x += d(ffn(n2(x)))``.
* ``"post_norm"`` (original Transformer, BERT): ``x = n1(x + d(mixer(x)));
  x = n2(x + d(ffn(x)))``.
* ``"cct"`` (Compact-Transformers' encoder layer): ``x += d(mixer(n1(x)));
  x = n2(x)`` (the residual stream itself is normalised); ``x += d(ffn(x))``.

The FFN applies its own dropouts (after the activation and after W2), which
is exactly CCT's ``dropout(W2(dropout(GELU(W1 x))))``; ``dropout_rate`` here is
the dropout on the mixer's output (CCT's projection dropout).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from effformer.nn.droppath import DropPath
from effformer.nn.ffn import make_ffn
from effformer.nn.norms import make_norm
from effformer.ops.masks import AttentionMask

Array = jax.Array
Dtype = Any

ORDERINGS = ("pre_norm", "post_norm", "cct")


class ResidualBlock(nn.Module):
    """One Transformer-style block with a pluggable mixer and FFN.

    Attributes:
      mixer: a token-mixer module (the shared mixer signature), or a name for
        ``effformer.mixers.make_mixer`` built with ``mixer_kwargs``.
      ffn: an FFN module taking ``(x, deterministic=...)``, or a name for
        :func:`effformer.nn.ffn.make_ffn` built with ``ffn_hidden_dim`` and ``ffn_kwargs``.
      norm: ``"layer_norm"`` or ``"rms_norm"``; ``norm_epsilon`` its epsilon.
      ordering: ``"pre_norm"``, ``"post_norm"`` or ``"cct"``.
      drop_path_rate: stochastic depth of both branches (overridable per call).
      dropout_rate: dropout on the mixer output.
    """

    mixer: nn.Module | str
    ffn: nn.Module | str
    ffn_hidden_dim: int | None = None
    mixer_kwargs: dict[str, Any] | None = None
    ffn_kwargs: dict[str, Any] | None = None
    norm: str = "layer_norm"
    norm_epsilon: float = 1e-5
    ordering: str = "pre_norm"
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    dtype: Dtype | None = None

    def _build_mixer(self) -> nn.Module:
        if not isinstance(self.mixer, str):
            return self.mixer
        from effformer.mixers import make_mixer  # mixers import nn; build lazily.

        return make_mixer(self.mixer, name="mixer", **(self.mixer_kwargs or {}))

    def _build_ffn(self) -> nn.Module:
        if not isinstance(self.ffn, str):
            return self.ffn
        if self.ffn_hidden_dim is None:
            raise ValueError(
                f"ResidualBlock: ffn_hidden_dim is required when ffn is a name ({self.ffn!r}), "
                "got None."
            )
        return make_ffn(self.ffn, self.ffn_hidden_dim, name="ffn", **(self.ffn_kwargs or {}))

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        mask: AttentionMask | None = None,
        positions: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        drop_path_rate: float | Array | None = None,
    ) -> Array:
        """x: [B, L, D] -> [B, L, D]; mask / positions / decode go to the mixer."""
        if self.ordering not in ORDERINGS:
            raise ValueError(
                f"ResidualBlock: ordering must be one of {ORDERINGS}, got {self.ordering!r}."
            )
        mixer, ffn = self._build_mixer(), self._build_ffn()
        norm1 = make_norm(self.norm, epsilon=self.norm_epsilon, dtype=self.dtype, name="norm1")
        norm2 = make_norm(self.norm, epsilon=self.norm_epsilon, dtype=self.dtype, name="norm2")
        drop_path = DropPath(self.drop_path_rate, name="drop_path")
        drop = lambda y: drop_path(y, deterministic=deterministic, rate=drop_path_rate)

        def mix(y: Array) -> Array:
            y = mixer(y, mask=mask, positions=positions, deterministic=deterministic, decode=decode)
            return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)

        channel = lambda y: ffn(y, deterministic=deterministic)
        if self.ordering == "pre_norm":
            x = x + drop(mix(norm1(x)))
            return x + drop(channel(norm2(x)))
        if self.ordering == "post_norm":
            x = norm1(x + drop(mix(x)))
            return norm2(x + drop(channel(x)))
        x = norm2(x + drop(mix(norm1(x))))
        return x + drop(channel(x))
