"""Per-layer mixer patterns and the layer stack shared by every language model.

A language model's layers differ only in their token mixer, so the mixer of
each layer is data: a **layer spec** string, one of

* ``"global"``: softmax attention over every visible key (causal in a decoder,
  bidirectional in an encoder);
* ``"local:W"``: sliding-window attention seeing ``W`` keys. Causal layers see
  the query and the ``W - 1`` keys before it (``window_left = W - 1``);
  bidirectional layers see ``W // 2`` keys on each side (ModernBERT's and
  Ettin's convention: a 128-token window is 64 either way);
* ``"block:B"``: block-local attention (MASFormer's other short span): the
  positions are cut into fixed, non-overlapping blocks ``[kB, (k+1)B)``
  (per sequence in packed rows) and a query sees only keys of its own block,
  causally in a decoder. It is the structural mask's segment ids, one id per
  (sequence, block) run (:func:`block_segment_ids`), so every attention path
  that honours segment ids computes it; KV-cached decoding adds the block ids
  of the cached positions (:class:`BlockLocalAttention`);
* any other mixer name known to :func:`available_mixers` (``"mamba"``, ``"lmu"``; the
  mixers added to ``effformer.mixers.MIXERS`` later), built with the stack's
  ``mixer_kwargs[name]``. A mixer with a ``causal`` field (Combiner, EcoFormer) gets
  the stack's causality: the stack gives non-attention mixers no causal mask.

A **layer pattern** turns specs into one spec per layer
(:func:`expand_layer_pattern`):

* a string of comma-separated specs is a cycle repeated over the layers and
  cut at ``num_layers``: ``"global,local:128,local:128"`` is Ettin's "global
  attention every third layer, starting with the first";
* a list or tuple gives exactly one spec per layer;
* ``overrides`` ``{layer index: spec}`` then replaces single layers:
  MASFormer's "full attention in layers 0 and 1, local elsewhere" is
  ``pattern="local:256", overrides={0: "global", 1: "global"}``.

Unknown mixers, malformed windows or block sizes, wrong lengths and
out-of-range indices raise a ValueError naming what was expected.

**FFN widths** (MatFormer, Devvrit et al., 2023): every layer's FFN is nested,
``W2[:, :m] act(W1[:m] x)`` (``effformer.nn.ffn``), so a call may run each
layer at a hidden width ``m`` no larger than ``ffn_hidden_dim``. ``ffn_widths``
(:func:`resolve_ffn_widths`) is None (full width), one width for every layer,
or one per layer (Mix'n'Match); a width is an int number of hidden units or a
float fraction of ``ffn_hidden_dim``. :func:`mix_n_match_widths` picks
per-layer widths for a budget with the paper's heuristic. Both live in
:mod:`effformer.nn.ffn_widths`, shared with the vision models, and are
re-exported here.

**Layer gates** (TinyFusion's depth pruning, Fang et al., 2024): a call's
``layer_gates`` [num_layers] (one gate per layer) or [B, num_layers] (one per
example) multiplies every residual branch of layer i by its gate,
``x + g_i * branch(x)``, so a gate of 1 runs the layer and a gate of 0 removes it
exactly (the output is then the layer's input). Gates between 0 and 1 are what
a differentiable mask passes gradients through
(``effformer.models.tinyfusion``). Pre-norm stacks only: a post-norm layer
normalises its input even with its branches off. None (the default) runs the
code without gates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effformer.mixers import MIXERS, CrossAttention, MultiHeadAttention
from effformer.mixers.mamba import MambaMixer
from effformer.nn.droppath import DropPath
from effformer.nn.ffn import make_ffn
from effformer.nn.ffn_widths import FfnWidth as FfnWidth
from effformer.nn.ffn_widths import FfnWidths as FfnWidths
from effformer.nn.ffn_widths import mix_n_match_widths as mix_n_match_widths
from effformer.nn.ffn_widths import resolve_ffn_widths as resolve_ffn_widths
from effformer.nn.norms import make_norm
from effformer.nn.position import PositionEncoding, make_position_encoding
from effformer.ops.masks import AttentionMask

Array = jax.Array
Dtype = Any

ATTENTION_SPECS = ("global", "local", "block")
# Spec kinds with a size after a colon: the size's meaning, for error messages.
SIZED_SPECS = {
    "local": "the number of keys each query sees",
    "block": "the number of tokens in each block",
}
# Mixers that only look backwards; a bidirectional stack refuses them rather than
# silently giving an encoder causal layers.
CAUSAL_ONLY_MIXERS = frozenset({"mamba", "lmu"})
ORDERINGS = ("pre_norm", "post_norm")


def check_layer_gates(
    owner: str, layer_gates: Array | None, num_layers: int, batch: int, ordering: str
) -> None:
    """Refuse ``layer_gates`` that are not [num_layers] or [batch, num_layers] floats."""
    if layer_gates is None:
        return
    shape = tuple(getattr(layer_gates, "shape", ()))
    dtype = getattr(layer_gates, "dtype", None)
    floating = dtype is not None and jnp.issubdtype(dtype, jnp.floating)
    if shape not in ((num_layers,), (batch, num_layers)) or not floating:
        raise ValueError(
            f"{owner}: layer_gates must be floats of shape (num_layers,) = ({num_layers},) or "
            f"(batch, num_layers) = ({batch}, {num_layers}), got shape {shape} and dtype {dtype}."
        )
    if ordering != "pre_norm":
        raise ValueError(
            f"{owner}: layer_gates needs ordering='pre_norm' (a post-norm layer normalises its "
            f"input even with its branches gated off, so a gate of 0 would not remove it), got "
            f"ordering={ordering!r}."
        )


def available_mixers() -> dict[str, type[nn.Module]]:
    """Mixer names usable in a layer spec besides ``global`` / ``local:W``."""
    named = {name: cls for name, cls in MIXERS.items() if name != "attention"}
    named.setdefault("mamba", MambaMixer)
    return named


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer's mixer: ``kind`` is ``"global"``, ``"local"``, ``"block"`` or a mixer name.

    ``window``: the local window W or the block size B.
    """

    kind: str
    window: int | None = None

    @property
    def is_attention(self) -> bool:
        return self.kind in ATTENTION_SPECS

    def __str__(self) -> str:
        return f"{self.kind}:{self.window}" if self.kind in SIZED_SPECS else self.kind


def parse_layer_spec(text: str) -> LayerSpec:
    """``"global"`` | ``"local:W"`` | ``"block:B"`` (W, B >= 1) | a mixer name -> LayerSpec."""
    if not isinstance(text, str):
        raise ValueError(f"layer spec must be a string, got {text!r}.")
    spec = text.strip()
    if spec == "global":
        return LayerSpec("global")
    kind, sep, size = spec.partition(":")
    if kind in SIZED_SPECS:
        if not sep or not size.strip().isdigit() or int(size) < 1:
            letter = "W" if kind == "local" else "B"
            raise ValueError(
                f"layer spec {text!r}: a {kind} layer is '{kind}:{letter}' with {letter} a "
                f"positive int ({SIZED_SPECS[kind]})."
            )
        return LayerSpec(kind, int(size))
    mixers = available_mixers()
    if spec not in mixers:
        choices = ["global", "local:W", "block:B", *sorted(mixers)]
        raise ValueError(f"layer spec {text!r}: unknown mixer; expected one of {choices}.")
    return LayerSpec(spec)


def expand_layer_pattern(
    pattern: str | Sequence[str],
    num_layers: int,
    overrides: Mapping[int, str] | None = None,
) -> tuple[LayerSpec, ...]:
    """One :class:`LayerSpec` per layer; see the module docstring for the grammar."""
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}.")
    if isinstance(pattern, str):
        cycle = [parse_layer_spec(part) for part in pattern.split(",")]
        specs = [cycle[i % len(cycle)] for i in range(num_layers)]
    else:
        specs = [parse_layer_spec(part) for part in pattern]
        if len(specs) != num_layers:
            raise ValueError(
                f"layer pattern: a list gives one spec per layer, so it needs num_layers="
                f"{num_layers} entries, got {len(specs)} (use a comma-separated string to "
                "repeat a cycle)."
            )
    for index, spec in (overrides or {}).items():
        layer = int(index)  # config files may give the keys as strings
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"layer overrides: layer index must be in [0, {num_layers}), got {index!r}."
            )
        specs[layer] = parse_layer_spec(spec)
    return tuple(specs)


def block_segment_ids(positions: Array, block_size: int, segment_ids: Array | None = None) -> Array:
    """Segment ids [B, L] that keep attention inside blocks of ``block_size`` positions.

    positions [B, L] (per sequence when packed); segment_ids [B, L] (0 =
    padding) or None. Each run of tokens sharing a sequence and a block
    ``position // block_size`` gets its own id 1, 2, ... along the row;
    padding keeps 0. A run is contiguous because a sequence's positions
    increase along the row, so tokens of one block are neighbours.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_segment_ids: block_size must be an int >= 1, got {block_size!r}.")
    blocks = positions // block_size
    changed = blocks[:, 1:] != blocks[:, :-1]
    if segment_ids is not None:
        changed |= segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = jnp.concatenate([jnp.ones_like(changed[:, :1]), changed], axis=1)
    ids = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
    return ids if segment_ids is None else jnp.where(segment_ids != 0, ids, 0)


class BlockLocalAttention(MultiHeadAttention):
    """Attention kept inside blocks of ``block_size`` positions, also when decoding.

    A full-sequence call gets the blocks in its mask (the stack's segment ids
    from :func:`block_segment_ids`). A KV-cached decode step sees one sequence
    per row, whose cache records each key's position, so the step adds segment
    ids ``position // block_size + 1`` for its queries and the cached keys to
    the causal decode mask.
    """

    block_size: int = 1

    def _decode_visibility(
        self, decode_mask: AttentionMask, positions: Array, cached_positions: Array
    ) -> AttentionMask:
        # Blocks follow the tokens' positions, not the mask positions (which differ in a
        # prefix LM), as block_segment_ids does for a whole sequence.
        return dataclasses.replace(
            decode_mask,
            q_segment_ids=positions // self.block_size + 1,
            kv_segment_ids=cached_positions // self.block_size + 1,
        )


def attention_window(spec: LayerSpec, causal: bool) -> tuple[int | None, int | None]:
    """(window_left, window_right) of an attention layer spec."""
    if spec.kind != "local":
        return None, None
    if causal:
        return spec.window - 1, 0
    return spec.window // 2, spec.window // 2


def layer_attention_mask(
    spec: LayerSpec,
    *,
    causal: bool,
    positions: Array,
    segment_ids: Array | None = None,
    mask_positions: Array | None = None,
) -> AttentionMask:
    """The structural mask of an attention layer over a whole sequence (not decoding).

    positions [B, L]: per-sequence positions (they place the blocks of a
    ``block:B`` layer); segment_ids [B, L] (0 = padding) or None;
    mask_positions [B, L]: positions that order the causal mask and windows
    when they differ from ``positions`` (the prefix LM's), else None.
    """
    if not spec.is_attention:
        raise ValueError(f"layer_attention_mask: spec must be an attention spec, got {spec}.")
    left, right = attention_window(spec, causal)
    fields: dict[str, Any] = dict(causal=causal, window_left=left, window_right=right)
    if spec.kind == "block":
        segment_ids = block_segment_ids(positions, spec.window, segment_ids)
    if segment_ids is not None:
        fields.update(q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
    if mask_positions is not None:
        fields.update(q_positions=mask_positions, kv_positions=mask_positions)
    return AttentionMask(**fields)


class LMLayer(nn.Module):
    """Mixer, optional cross-attention, FFN; each a residual branch with its own norm.

    ``pre_norm``: ``x += d(f(norm(x)))`` per branch; ``post_norm``:
    ``x = norm(x + d(f(x)))`` (original Transformer). ``d`` is dropout then
    DropPath. Norms are built with ``norm_kwargs`` (``use_bias=False`` gives
    Ettin's bias-free LayerNorm).
    """

    mixer: nn.Module
    ffn: nn.Module
    cross_attention: nn.Module | None = None
    norm: str = "layer_norm"
    norm_kwargs: Mapping[str, Any] | None = None
    ordering: str = "pre_norm"
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        mask: AttentionMask | None,
        positions: Array | None,
        deterministic: bool,
        decode: bool,
        context: Array | None = None,
        context_mask: Array | None = None,
        ffn_width: int | None = None,
        gate: Array | None = None,
    ) -> Array:
        """x: [B, L, D]; context: [B, Lc, D] (with cross-attention) -> [B, L, D].

        ffn_width: the FFN's hidden width for this call (MatFormer); None: full width.
        gate: [] or [B, 1, 1] multiplying every residual branch (pre-norm only; see the
        module docstring); None: no gate.
        """
        if self.ordering not in ORDERINGS:
            raise ValueError(
                f"LMLayer: ordering must be one of {ORDERINGS}, got {self.ordering!r}."
            )
        norm_kwargs = dict(self.norm_kwargs or {})
        drop_path = DropPath(self.drop_path_rate, name="drop_path")

        def residual(x: Array, branch, name: str) -> Array:
            norm = make_norm(self.norm, dtype=self.dtype, name=f"{name}_norm", **norm_kwargs)
            y = branch(norm(x) if self.ordering == "pre_norm" else x)
            y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
            y = drop_path(y, deterministic=deterministic)
            if gate is not None:
                y = gate.astype(y.dtype) * y
            return x + y if self.ordering == "pre_norm" else norm(x + y)

        x = residual(
            x,
            lambda y: self.mixer(
                y, mask=mask, positions=positions, deterministic=deterministic, decode=decode
            ),
            "mixer",
        )
        if self.cross_attention is not None:
            if context is None:
                raise ValueError("LMLayer: a layer with cross-attention needs context, got None.")
            x = residual(
                x,
                lambda y: self.cross_attention(
                    y, context, context_mask=context_mask, deterministic=deterministic
                ),
                "cross",
            )
        if ffn_width is None:  # exactly the call of an FFN without nested widths
            return residual(x, lambda y: self.ffn(y, deterministic=deterministic), "ffn")
        return residual(
            x, lambda y: self.ffn(y, deterministic=deterministic, hidden_width=ffn_width), "ffn"
        )


def _layer_gate(layer_gates: Array | None, index: int) -> Array | None:
    """Layer ``index``'s gate from [num_layers] (a scalar) or [B, num_layers] (-> [B, 1, 1])."""
    if layer_gates is None:
        return None
    if layer_gates.ndim == 1:
        return layer_gates[index]
    return layer_gates[:, index, None, None]


def segment_positions(segment_ids: Array) -> Array:
    """Per-segment positions [B, L]: 0, 1, ... restarting where the segment id changes."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    starts = jnp.concatenate(
        [
            jnp.ones_like(segment_ids[:, :1], dtype=bool),
            segment_ids[:, 1:] != segment_ids[:, :-1],
        ],
        axis=1,
    )
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - start_index


class LayerStack(nn.Module):
    """Position encoding, ``num_layers`` :class:`LMLayer` s with per-layer mixers, final norm.

    The input is the token embeddings; the stack adds the absolute position
    encoding (the ``embed`` hook) and shares one position-encoding module
    between its attention layers (their ``rotate`` / ``attention_bias`` hooks).

    Attributes:
      num_layers, layer_pattern, layer_overrides: see the module docstring.
      causal: causal (decoder) or bidirectional (encoder) attention.
      cross_attention: add a cross-attention branch to every layer (encoder-decoder).
      num_heads, num_kv_heads, head_dim, qk_norm: attention shape (GQA when
        ``num_kv_heads < num_heads``).
      ffn, ffn_hidden_dim: FFN name for ``make_ffn`` and its width.
      ffn_dense_sparse: ``(rank, nonzeros_per_row)``: every FFN projection is a
        DSFormer dense-sparse factorisation (``effformer.nn.ffn``); None: dense.
      use_bias: biases in attention, FFN and norms.
      norm, norm_epsilon, ordering: the layers' norms.
      position_encoding, position_kwargs: name for ``make_position_encoding``.
      mixer_kwargs: ``{mixer name: kwargs}`` for non-attention mixers.
      attention_implementation: passed to ``dot_product_attention``.
      max_decode_length: KV-cache length (the generation code sets it).
      prefix_lm: the causal order is given by ``mask_positions`` also when
        decoding: the attention layers' KV caches record each key's mask position
        (``MultiHeadAttention.decode_mask_positions``), so a prefix decoded in one
        call stays bidirectional and windows are measured as in a full pass.
    """

    num_layers: int
    layer_pattern: str | Sequence[str] = "global"
    layer_overrides: Mapping[int, str] | None = None
    causal: bool = True
    cross_attention: bool = False
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    qk_norm: bool = False
    ffn: str = "gelu"
    ffn_hidden_dim: int = 1024
    ffn_dense_sparse: tuple[int, int] | None = None
    use_bias: bool = True
    norm: str = "layer_norm"
    norm_epsilon: float = 1e-5
    ordering: str = "pre_norm"
    position_encoding: str = "rope"
    position_kwargs: Mapping[str, Any] | None = None
    mixer_kwargs: Mapping[str, Mapping[str, Any]] | None = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_implementation: str | None = None
    max_decode_length: int | None = None
    prefix_lm: bool = False
    dtype: Dtype | None = None

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        specs = expand_layer_pattern(self.layer_pattern, self.num_layers, self.layer_overrides)
        if not self.causal:
            for index, spec in enumerate(specs):
                if spec.kind in CAUSAL_ONLY_MIXERS:
                    raise ValueError(
                        f"layer {index} is {spec.kind!r}, a causal-only mixer, in a "
                        "bidirectional stack; use it in a decoder."
                    )
        return specs

    def _position_encoding(self) -> PositionEncoding:
        kwargs = dict(self.position_kwargs or {})
        if self.position_encoding == "t5":
            kwargs.setdefault("bidirectional", not self.causal)
        return make_position_encoding(self.position_encoding, name="position_encoding", **kwargs)

    def _mixer(self, spec: LayerSpec, encoding: PositionEncoding, dim: int, index: int):
        if spec.is_attention:
            block = {"block_size": spec.window} if spec.kind == "block" else {}
            return (BlockLocalAttention if block else MultiHeadAttention)(
                **block,
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                qkv_bias=self.use_bias,
                out_bias=self.use_bias,
                qk_norm=self.qk_norm,
                position_encoding=encoding,
                attention_dropout_rate=self.attention_dropout_rate,
                implementation=self.attention_implementation,
                max_decode_length=self.max_decode_length,
                decode_mask_positions=self.prefix_lm,
                dtype=self.dtype,
                name=f"layer_{index}_attention",
            )
        cls = available_mixers()[spec.kind]
        kwargs = dict((self.mixer_kwargs or {}).get(spec.kind, {}))
        field_names = {field.name for field in dataclasses.fields(cls)}
        if "d_model" in field_names:
            kwargs.setdefault("d_model", dim)
        if "dtype" in field_names:
            kwargs.setdefault("dtype", self.dtype)
        if "causal" in field_names:
            # Non-attention mixers get no causal mask from the stack (_masks), and those with
            # a `causal` field default to True: without this an encoder's Combiner or
            # EcoFormer layers would silently be causal.
            kwargs.setdefault("causal", self.causal)
            if self.causal and not kwargs["causal"]:
                raise ValueError(
                    f"LayerStack: layer {index} ({spec.kind!r}) has causal=False in mixer_kwargs "
                    "inside a causal stack, where it would see later tokens; leave it unset."
                )
        return cls(name=f"layer_{index}_{spec.kind}", **kwargs)

    def _masks(self, specs, positions, segment_ids, mask_positions, decode):
        """One AttentionMask (or None) per layer."""
        layer_masks = []
        for spec in specs:
            if not spec.is_attention:
                layer_masks.append(
                    None
                    if segment_ids is None
                    else AttentionMask(q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
                )
                continue
            left, right = attention_window(spec, self.causal)
            if decode:  # the KV cache supplies key positions; segments are refused earlier
                query_order = None
                if self.prefix_lm:
                    query_order = positions if mask_positions is None else mask_positions
                layer_masks.append(
                    AttentionMask(causal=True, window_left=left, q_positions=query_order)
                )
                continue
            layer_masks.append(
                layer_attention_mask(
                    spec,
                    causal=self.causal,
                    positions=positions,
                    segment_ids=segment_ids,
                    mask_positions=mask_positions,
                )
            )
        return layer_masks

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        positions: Array,
        segment_ids: Array | None = None,
        mask_positions: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        context: Array | None = None,
        context_mask: Array | None = None,
        ffn_widths: FfnWidths = None,
        layer_gates: Array | None = None,
    ) -> Array:
        """x: [B, L, D] token embeddings -> [B, L, D] normalised hidden states.

        positions [B, L] (per segment when packed); segment_ids [B, L] (0 =
        padding); mask_positions [B, L]: positions that order the causal mask
        when they differ from ``positions`` (the prefix LM's); context [B, Lc, D]
        and context_mask [B, Lc] bool for cross-attention; ffn_widths: the FFNs'
        hidden widths (:func:`resolve_ffn_widths`; None: full width); layer_gates
        [num_layers] or [B, num_layers]: multiply each layer's residual branches (see
        the module docstring; None: no gates).
        """
        specs = self.layer_specs
        widths = resolve_ffn_widths(ffn_widths, len(specs), self.ffn_hidden_dim)
        check_layer_gates("LayerStack", layer_gates, len(specs), x.shape[0], self.ordering)
        if decode and segment_ids is not None:
            raise ValueError(
                "LayerStack: decode=True does not take segment_ids (the KV cache holds one "
                "sequence per row); got segment_ids."
            )
        if decode and mask_positions is not None and not self.prefix_lm:
            raise ValueError(
                "LayerStack: decode=True with mask_positions needs prefix_lm=True (the KV "
                "cache must record the keys' mask positions); got prefix_lm=False."
            )
        dim = x.shape[-1]
        encoding = self._position_encoding()
        x = encoding.embed(x, positions)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        layer_masks = self._masks(specs, positions, segment_ids, mask_positions, decode)
        norm_kwargs = {"epsilon": self.norm_epsilon}
        if self.norm == "layer_norm":
            norm_kwargs["use_bias"] = self.use_bias
        for index, spec in enumerate(specs):
            layer = LMLayer(
                mixer=self._mixer(spec, encoding, dim, index),
                ffn=make_ffn(
                    self.ffn,
                    self.ffn_hidden_dim,
                    use_bias=self.use_bias,
                    dropout_rate=self.dropout_rate,
                    dense_sparse=self.ffn_dense_sparse,
                    dtype=self.dtype,
                    name=f"layer_{index}_ffn",
                ),
                cross_attention=(
                    CrossAttention(
                        num_heads=self.num_heads,
                        num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_dim,
                        qkv_bias=self.use_bias,
                        out_bias=self.use_bias,
                        attention_dropout_rate=self.attention_dropout_rate,
                        implementation=self.attention_implementation,
                        dtype=self.dtype,
                        name=f"layer_{index}_cross_attention",
                    )
                    if self.cross_attention
                    else None
                ),
                norm=self.norm,
                norm_kwargs=norm_kwargs,
                ordering=self.ordering,
                dropout_rate=self.dropout_rate,
                drop_path_rate=self.drop_path_rate,
                dtype=self.dtype,
                name=f"layer_{index}",
            )
            x = layer(
                x,
                mask=layer_masks[index],
                positions=positions,
                deterministic=deterministic,
                decode=decode,
                context=context,
                context_mask=context_mask,
                ffn_width=widths[index],
                gate=_layer_gate(layer_gates, index),
            )
        if self.ordering == "pre_norm":
            x = make_norm(self.norm, dtype=self.dtype, name="final_norm", **norm_kwargs)(x)
        return x
