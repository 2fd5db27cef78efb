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
from effformer.reducers.tome import bipartite_soft_matching, merge_tokens
from effformer.reducers.zero_tprune import DEFAULT_ITERATIONS, gather_tokens, zero_tprune

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
        token_sizes: Array | None = None,
        merge_r: int = 0,
        num_protected: int = 0,
        proportional_attention: bool = True,
        prune_importance: int = 0,
        prune_similarity: int = 0,
        wpr_iterations: int = DEFAULT_ITERATIONS,
        ffn_width: int | None = None,
    ) -> Array | tuple[Array, Array] | tuple[Array, Array, Array]:
        """x: [B, L, D] -> [B, L, D]; mask / positions / decode go to the mixer.

        ``ffn_width`` (MatFormer): the FFN's hidden width for this call, its
        ``hidden_width`` (the first ``ffn_width`` hidden units); None: the FFN
        is called exactly as without the argument (full width).

        Token merging (ToMe, :mod:`effformer.reducers.tome`) is on when
        ``token_sizes [B, L]`` (how many original tokens each token stands
        for) is given; the mixer must then be a ``MultiHeadAttention``, with no
        mask, positions or decoding. The mixer attends with proportional
        attention (``log(size)`` on the logits; off with
        ``proportional_attention=False``) and returns its keys averaged over
        heads; between the mixer's sub-layer and the FFN's, the ``merge_r``
        most similar token pairs by those keys merge (size-weighted), the first
        ``num_protected`` tokens kept out. Where exactly, per ordering
        (``m`` = merge): pre_norm ``x = m(x + d(mixer(n1(x))))``; post_norm
        ``x = m(n1(x + d(mixer(x))))``; cct ``x = n2(m(x + d(mixer(n1(x)))))``
        (the residual stream is merged before CCT's norm, as in the other two).
        Returns ``(x [B, L - merge_r, D], sizes [B, L - merge_r],
        destination [B, L])``, where ``destination`` maps each input token to
        the output token it became.

        Token pruning (Zero-TPrune, :mod:`effformer.reducers.zero_tprune`) is on
        when ``prune_importance`` or ``prune_similarity`` is > 0 (same mixer
        requirements as merging; not together with ``token_sizes``). The mixer
        returns its attention probabilities and mean keys; at the same place as
        the merge above, the I-stage drops the ``prune_importance`` tokens least
        important by weighted page rank (``wpr_iterations`` steps) over that
        attention graph, then the S-stage drops the ``prune_similarity`` less
        important tokens most similar (mean keys) to a more important one; the
        first ``num_protected`` tokens are kept. Returns ``(x [B, L', D],
        keep [B, L'])`` with ``L' = L - prune_importance - prune_similarity`` and
        ``keep`` the input indices of the kept tokens, ascending.
        """
        if self.ordering not in ORDERINGS:
            raise ValueError(
                f"ResidualBlock: ordering must be one of {ORDERINGS}, got {self.ordering!r}."
            )
        mixer, ffn = self._build_mixer(), self._build_ffn()
        merging = token_sizes is not None
        pruning = prune_importance != 0 or prune_similarity != 0
        if pruning:
            if merging:
                raise ValueError(
                    "ResidualBlock: token pruning (prune_importance / prune_similarity > 0) "
                    "and token merging (token_sizes given) cannot be combined in one block, got "
                    f"prune_importance={prune_importance}, prune_similarity={prune_similarity} "
                    "and token_sizes."
                )
            what = "token pruning (prune_importance / prune_similarity > 0)"
            self._check_reducing(mixer, x, mask, positions, decode, None, what)
        if merging:
            what = "token merging (token_sizes given)"
            self._check_reducing(mixer, x, mask, positions, decode, token_sizes, what)
        elif merge_r != 0:
            raise ValueError(
                f"ResidualBlock: merge_r={merge_r} needs token_sizes [B, L] (token merging), "
                "got None."
            )
        norm1 = make_norm(self.norm, epsilon=self.norm_epsilon, dtype=self.dtype, name="norm1")
        norm2 = make_norm(self.norm, epsilon=self.norm_epsilon, dtype=self.dtype, name="norm2")
        drop_path = DropPath(self.drop_path_rate, name="drop_path")
        drop = lambda y: drop_path(y, deterministic=deterministic, rate=drop_path_rate)
        mean_keys = None  # the merging / pruning metric, set by mix()
        probs = None  # the attention graph of pruning, set by mix()

        def mix(y: Array) -> Array:
            nonlocal mean_keys, probs
            args = dict(mask=mask, positions=positions, deterministic=deterministic, decode=decode)
            if pruning:
                y, mean_keys, probs = mixer(
                    y, **args, return_mean_keys=True, return_attention_probs=True
                )
            elif merging:
                sizes = token_sizes if proportional_attention else None
                y, mean_keys = mixer(y, **args, token_sizes=sizes, return_mean_keys=True)
            else:
                y = mixer(y, **args)
            return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)

        sizes, destination, keep = token_sizes, None, None

        def merge(y: Array) -> Array:
            nonlocal sizes, destination, keep
            if pruning:
                keep = zero_tprune(
                    probs,
                    mean_keys,
                    prune_importance,
                    prune_similarity,
                    num_iterations=wpr_iterations,
                    num_protected=num_protected,
                )
                return gather_tokens(y, keep)
            if not merging:
                return y
            destination = bipartite_soft_matching(mean_keys, merge_r, num_protected=num_protected)
            if merge_r == 0:  # the identity map: nothing to average
                return y
            y, sizes = merge_tokens(y, token_sizes, destination, y.shape[1] - merge_r)
            return y

        if ffn_width is None:  # exactly the call of an FFN without nested widths
            channel = lambda y: ffn(y, deterministic=deterministic)
        else:
            channel = lambda y: ffn(y, deterministic=deterministic, hidden_width=ffn_width)
        if self.ordering == "pre_norm":
            x = merge(x + drop(mix(norm1(x))))
            out = x + drop(channel(norm2(x)))
        elif self.ordering == "post_norm":
            x = merge(norm1(x + drop(mix(x))))
            out = norm2(x + drop(channel(x)))
        else:
            x = norm2(merge(x + drop(mix(norm1(x)))))
            out = x + drop(channel(x))
        if pruning:
            return out, keep
        return (out, sizes, destination) if merging else out

    def _check_reducing(self, mixer, x, mask, positions, decode, token_sizes, what: str) -> None:
        """Checks shared by token merging and token pruning; ``what`` names the one in use."""
        from effformer.mixers import MultiHeadAttention  # mixers import nn; import lazily.

        if not isinstance(mixer, MultiHeadAttention):
            raise ValueError(
                f"ResidualBlock: {what} needs a MultiHeadAttention mixer (its keys are the "
                f"similarity metric), got {type(mixer).__name__}."
            )
        if mask is not None or positions is not None or decode:
            raise ValueError(
                f"ResidualBlock: {what} needs mask=None, positions=None and decode=False (a "
                "merged or pruned sequence has no contiguous positions, so causal, windowed or "
                f"segment masks are undefined), got mask={mask}, "
                f"positions={'None' if positions is None else tuple(positions.shape)}, "
                f"decode={decode}."
            )
        if token_sizes is not None and tuple(token_sizes.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"ResidualBlock: token_sizes must have shape {tuple(x.shape[:2])} (x's [B, L]), "
                f"got {tuple(token_sizes.shape)}."
            )
