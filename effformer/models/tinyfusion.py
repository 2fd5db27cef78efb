"""TinyFusion's learnable depth pruning for the language models: the search model.

Fang et al., 2024, "TinyFusion: Diffusion Transformers Learned Shallow" prune a
pre-trained Transformer's depth by learning which layers to keep. The ``L``
layers are cut into ``L / M`` groups of ``M`` consecutive layers, and each group
keeps ``N`` of them (N:M layer sparsity). A group has learnable logits over its
``C(M, N)`` candidate keep-masks (:func:`candidate_masks`); a training step
draws one candidate per group with the Gumbel-softmax straight-through
estimator (:func:`gumbel_softmax_straight_through`: the forward pass gets an
exact one-hot choice, the backward pass the gradient of the relaxed sample)
and runs the model with the dropped layers' residual branches gated off
(``layer_gates`` of :class:`~effformer.models.transformer_lm.TransformerLM`).
Jointly, a weight update is trained so that the mask distribution learns which
shallow model *recovers* best once fine-tuned, not which is best right after
pruning. At the end, the most probable candidate of each group is kept
(:func:`select_layers`) and the kept layers of the original model are copied
into a shallower one (``effformer.train.depth_pruning.prune_lm_params``), which
is then fine-tuned normally.

The paper prunes diffusion transformers (DiT, MAR, SiT); nothing in the method
is specific to diffusion, and this library has no diffusion transformer, so
here it is applied to the language models (:class:`TransformerLM`, pre-norm):
a transfer to LMs that the paper does not test.

Details taken from the official training script (``prune_by_learning.py`` of
VainF/TinyFusion; its model file was not available to read):

* the logits enter the Gumbel-softmax multiplied by a constant "scaling" (1e2
  by default), and are trained with AdamW at 10x the learning rate of the
  weights, without weight decay. Adam's step does not depend on the scale of
  the gradient, so a learning rate ``k`` times larger is the same as a scale
  ``k`` times larger: here the logits are ``logit_scale * gate_logits`` with
  one learning rate for everything, and ``logit_scale = 1e3`` (the default)
  reproduces the script's defaults;
* the Gumbel temperature falls linearly from 4 to 0.1 over the search: the
  model's ``gumbel_temperature`` call argument, which the trainer schedules
  (``config.model_schedules.gumbel_temperature``);
* the weight update ("recoverability estimation") is LoRA on every linear
  layer (flags ``--delta-w --lora``; rank 8, alpha = 2 * rank; the paper's
  Table 6 runs "LoRA-1:2"), a full update of every weight (``--delta-w``), or
  none (the flags' defaults); the paper's Table 4 finds LoRA and full updates
  about equal at 2:4 (FID 34.2 and 34.4) and no update worse (37.8).
  ``weight_update`` picks ``"lora"``, ``"full"`` or ``"frozen"``;
* the final choice is read from an EMA of the parameters (decay 0.999): the
  trainer's ``config.ema_decay`` does the same here;
* after the search the script reloads the original weights and keeps the
  selected layers: the weight update only serves to estimate recoverability.

Two choices the script does not show come from a third-party port of the
method to ViTs (in the search store): the logits start equal (every candidate
equally likely; here at 0), and a mask is drawn per example (the logits
repeated over the batch). ``per_example_masks=True`` (the default) does the
same, so one batch scores ``B`` sub-networks; ``False`` draws one mask per step.

LoRA here is a reparametrisation of the parameter tree, not new modules:
every parameter named ``kernel`` with two or more dimensions (not in a module
whose name contains ``conv``) gets ``W + (alpha / rank) * A @ B`` with ``A``
[inputs, rank] (uniform in +-1/sqrt(inputs), as torchtune's LoRALinear) and
``B`` [rank, outputs] (zeros, so the search starts from the dense model). A
kernel of more than two dimensions (attention's ``DenseGeneral``) maps its
leading axes to its trailing ones: the inputs are the leading axes whose
product is the model width (query/key/value ``[D, H, d]`` -> 1 axis; the output
projection ``[H, d, D]`` -> 2), else all axes but the last (:func:`lora_input_axes`).
With ``"lora"`` and ``"frozen"`` the dense weights get no gradient; train with
weight decay 0 (as the script does): AdamW's decoupled decay would still shrink
them.

:class:`TinyFusionLM` is not a linen module but a pure wrapper with linen's
``init`` / ``apply`` / ``dummy_inputs`` over one, so the trainer treats it as
any model: its parameters are the language model's, unchanged and at the same
paths, plus one top-level entry ``"tinyfusion"`` (``gate_logits`` [groups, C]
and the LoRA factors). A search therefore starts from a dense run with
``config.init_from.workdir=<dense run>`` and ``config.init_from.reinit="tinyfusion"``.
Evaluation (``train=False``) runs the most probable mask of every group, with
the weight update: the loss of the currently selected shallow model.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from effformer.models.registry import create, register
from effformer.models.transformer_lm import TransformerLM

Array = jax.Array

SEARCH_KEY = "tinyfusion"  # the top-level parameter entry of the search's own parameters
WEIGHT_UPDATES = ("lora", "full", "frozen")
# Folded into the 'dropout' key to draw the Gumbel noise, apart from the model's dropout.
_GUMBEL_STREAM = 0x7F1


def check_layer_groups(num_layers: int, keep: int, group_size: int) -> int:
    """The number of N:M groups of ``num_layers`` layers; refuses impossible schemes.

    keep: N, the layers kept in each group, 1 <= N < M; group_size: M, which must
    divide ``num_layers``.
    """
    for name, value in (("num_layers", num_layers), ("keep", keep), ("group_size", group_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"TinyFusion: {name} must be a positive int, got {value!r}.")
    if not keep < group_size:
        raise ValueError(
            f"TinyFusion: keep (N) must be smaller than group_size (M) to prune anything, "
            f"got keep={keep}, group_size={group_size}."
        )
    if num_layers % group_size:
        raise ValueError(
            f"TinyFusion: group_size (M) must divide num_layers={num_layers} into groups of "
            f"consecutive layers, got group_size={group_size}."
        )
    return num_layers // group_size


def candidate_masks(keep: int, group_size: int) -> np.ndarray:
    """The C(M, N) keep-masks of one N:M group: [C, M] float32, N ones per row.

    Rows follow ``itertools.combinations(range(M), N)``: 2:4 gives (0, 1), (0, 2),
    ..., (2, 3).
    """
    check_layer_groups(group_size, keep, group_size)
    combos = list(itertools.combinations(range(group_size), keep))
    masks = np.zeros((len(combos), group_size), np.float32)
    for row, kept in enumerate(combos):
        masks[row, list(kept)] = 1.0
    return masks


def gumbel_softmax_straight_through(key: Array, logits: Array, temperature: Array | float) -> Array:
    """One-hot samples [..., C] of softmax(logits), with the relaxed sample's gradient.

    logits [..., C]; temperature > 0 (scalar). With ``g ~ Gumbel(0, 1)`` i.i.d. of
    logits' shape, the forward value is exactly ``one_hot(argmax(logits + g))`` and
    the gradient is that of ``softmax((logits + g) / temperature)`` (Jang et al.,
    2017, straight-through). Written ``hard + (soft - stop_gradient(soft))`` so
    the forward value is the one-hot vector to the bit.
    """
    # Sampled in float32 at least, whatever the compute dtype: bfloat16 Gumbel noise ties
    # in ~2% of draws (argmax then takes the first candidate) and tops out near 4.8, which
    # skews the choice. The one-hot value is exact in any dtype, so the result is cast back.
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    perturbed = logits.astype(dtype) + jax.random.gumbel(key, logits.shape, dtype)
    soft = jax.nn.softmax(perturbed / temperature, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(perturbed, axis=-1), logits.shape[-1], dtype=soft.dtype)
    return (hard + (soft - jax.lax.stop_gradient(soft))).astype(logits.dtype)


def _check_logits(logits: Array, candidates: Array) -> None:
    if logits.ndim != 2 or logits.shape[1] != candidates.shape[0]:
        raise ValueError(
            f"TinyFusion: gate logits must be [groups, C] with C = {candidates.shape[0]} "
            f"candidates per group, got shape {tuple(logits.shape)}."
        )


def sample_layer_gates(
    key: Array,
    logits: Array,
    candidates: Array,
    temperature: Array | float,
    batch_size: int | None = None,
) -> Array:
    """Sampled layer gates: [G * M] (one mask), or [batch_size, G * M] (one per example).

    logits [G, C] (already scaled); candidates [C, M] (:func:`candidate_masks`).
    Each group's candidate is drawn with :func:`gumbel_softmax_straight_through`;
    the gates are the chosen candidates' masks, exactly 0 or 1 in the forward pass.
    """
    _check_logits(logits, candidates)
    if batch_size is not None:
        logits = jnp.broadcast_to(logits, (batch_size, *logits.shape))
    choices = gumbel_softmax_straight_through(key, logits, temperature)  # [..., G, C]
    gates = choices @ jnp.asarray(candidates, choices.dtype)  # [..., G, M]
    return gates.reshape(*gates.shape[:-2], -1)


def argmax_layer_gates(logits: Array, candidates: Array) -> Array:
    """Gates [G * M] of every group's most probable candidate (logits [G, C])."""
    _check_logits(logits, candidates)
    return jnp.asarray(candidates)[jnp.argmax(logits, axis=-1)].reshape(-1)


def select_layers(logits: Array | np.ndarray, keep: int, group_size: int) -> tuple[int, ...]:
    """The kept layer indices, increasing: each group's most probable candidate.

    logits [G, C(group_size, keep)], e.g. ``params["tinyfusion"]["gate_logits"]``
    (scaling them does not change the choice). Ties go to the first candidate.
    """
    logits = np.asarray(logits)
    candidates = candidate_masks(keep, group_size)
    _check_logits(logits, candidates)
    kept = []
    for group, choice in enumerate(np.argmax(logits, axis=-1)):
        kept += [group * group_size + int(i) for i in np.flatnonzero(candidates[choice])]
    return tuple(kept)


# ---------------------------------------------------------------------------- LoRA


def lora_input_axes(shape: Sequence[int], embed_dim: int) -> int:
    """How many leading axes of a kernel of ``shape`` are its inputs (see the module docstring)."""
    if len(shape) == 2:
        return 1
    for axes in range(1, len(shape)):
        if math.prod(shape[:axes]) == embed_dim:
            return axes
    return len(shape) - 1


def _lora_targets(params: Any) -> dict[tuple[str, ...], Array]:
    flat = traverse_util.flatten_dict(params)
    return {
        path: value
        for path, value in flat.items()
        if path[-1] == "kernel"
        and jnp.ndim(value) >= 2
        and not any("conv" in str(part) for part in path[:-1])
    }


def init_lora(key: Array, params: Any, rank: int, embed_dim: int) -> dict:
    """LoRA factors for every target kernel of ``params``: a tree of {"a", "b"} at their paths.

    a [inputs, rank] uniform in +-1/sqrt(inputs); b [rank, outputs] zeros.
    """
    factors = {}
    for index, (path, kernel) in enumerate(sorted(_lora_targets(params).items())):
        axes = lora_input_axes(kernel.shape, embed_dim)
        inputs, outputs = math.prod(kernel.shape[:axes]), math.prod(kernel.shape[axes:])
        bound = 1.0 / math.sqrt(inputs)
        a = jax.random.uniform(
            jax.random.fold_in(key, index), (inputs, rank), kernel.dtype, -bound, bound
        )
        factors[(*path, "a")] = a
        factors[(*path, "b")] = jnp.zeros((rank, outputs), kernel.dtype)
    return traverse_util.unflatten_dict(factors)


def merge_lora(params: Any, lora: Mapping, scale: float) -> Any:
    """``params`` with every kernel that has LoRA factors replaced by ``W + scale * A @ B``."""
    flat = traverse_util.flatten_dict(params)
    factors = traverse_util.flatten_dict(lora)
    paths = {path[:-1] for path in factors}
    missing = sorted("/".join(path) for path in paths if path not in flat)
    if missing:
        raise ValueError(
            f"TinyFusion: LoRA factors for parameters the model does not have: {missing}."
        )
    for path in paths:
        kernel = flat[path]
        delta = factors[(*path, "a")] @ factors[(*path, "b")]
        flat[path] = kernel + (scale * delta).reshape(kernel.shape).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------- the search model


@dataclasses.dataclass(frozen=True)
class TinyFusionLM:
    """A :class:`TransformerLM` whose layers are gated by learned N:M masks (module docstring).

    Attributes:
      lm: the language model being pruned (pre-norm; ``num_layers`` divisible by ``group_size``).
      keep, group_size: N and M of the N:M scheme (2:4 keeps 2 layers of every 4).
      weight_update: ``"lora"``, ``"full"`` or ``"frozen"``: the recoverability update.
      lora_rank, lora_alpha: LoRA's rank and alpha (scale alpha / rank); alpha None: 2 * rank.
      logit_scale: the logits are ``logit_scale * gate_logits``.
      per_example_masks: draw a mask per example (True) or per step (False).
    """

    lm: TransformerLM
    keep: int = 2
    group_size: int = 4
    weight_update: str = "lora"
    lora_rank: int = 8
    lora_alpha: float | None = None
    logit_scale: float = 1e3
    per_example_masks: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.lm, TransformerLM):
            raise ValueError(f"TinyFusionLM: lm must be a TransformerLM, got {type(self.lm)}.")
        if self.lm.ordering != "pre_norm":
            raise ValueError(
                f"TinyFusionLM: lm must be pre-norm (a gate of 0 removes a pre-norm layer "
                f"exactly), got ordering={self.lm.ordering!r}."
            )
        check_layer_groups(self.lm.num_layers, self.keep, self.group_size)
        if self.weight_update not in WEIGHT_UPDATES:
            raise ValueError(
                f"TinyFusionLM: weight_update must be one of {WEIGHT_UPDATES}, got "
                f"{self.weight_update!r}."
            )
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int):
            raise ValueError(f"TinyFusionLM: lora_rank must be an int, got {self.lora_rank!r}.")
        if self.lora_rank < 1:
            raise ValueError(f"TinyFusionLM: lora_rank must be >= 1, got {self.lora_rank}.")
        if not self.logit_scale > 0:
            raise ValueError(f"TinyFusionLM: logit_scale must be > 0, got {self.logit_scale!r}.")

    @property
    def num_groups(self) -> int:
        return self.lm.num_layers // self.group_size

    @property
    def candidates(self) -> np.ndarray:
        """[C, M] keep-masks of one group (:func:`candidate_masks`)."""
        return candidate_masks(self.keep, self.group_size)

    @property
    def lora_scale(self) -> float:
        alpha = 2.0 * self.lora_rank if self.lora_alpha is None else float(self.lora_alpha)
        return alpha / self.lora_rank

    def dummy_inputs(self, batch_size: int) -> dict[str, Array]:
        return self.lm.dummy_inputs(batch_size)

    def init(self, rngs: Array | Mapping[str, Array], *args: Any, **inputs: Any) -> dict:
        """The language model's variables plus ``params["tinyfusion"]``.

        The language model's parameters are exactly ``lm.init(rngs, ...)``'s; the gate
        logits start at 0 (all candidates equally likely), LoRA's B at 0.
        """
        variables = dict(self.lm.init(rngs, *args, **inputs))
        params = dict(variables["params"])
        if SEARCH_KEY in params:
            raise ValueError(f"TinyFusionLM: the language model has a parameter {SEARCH_KEY!r}.")
        params_key = rngs["params"] if isinstance(rngs, Mapping) else rngs
        search: dict[str, Any] = {
            "gate_logits": jnp.zeros((self.num_groups, len(self.candidates)), jnp.float32)
        }
        if self.weight_update == "lora":
            search["lora"] = init_lora(
                jax.random.fold_in(params_key, 1), params, self.lora_rank, self.lm.embed_dim
            )
        params[SEARCH_KEY] = search
        variables["params"] = params
        return variables

    def scaled_logits(self, params: Mapping) -> Array:
        """[G, C]: the logits the Gumbel-softmax samples from (``logit_scale * gate_logits``)."""
        return self.logit_scale * self._search(params)["gate_logits"]

    def probabilities(self, params: Mapping) -> Array:
        """[G, C]: each group's candidate probabilities."""
        return jax.nn.softmax(self.scaled_logits(params), axis=-1)

    def selected_layers(self, params: Mapping) -> tuple[int, ...]:
        """The layers the search keeps now (:func:`select_layers`)."""
        return select_layers(self._search(params)["gate_logits"], self.keep, self.group_size)

    def _search(self, params: Mapping) -> Mapping:
        if SEARCH_KEY not in params:
            raise ValueError(
                f"TinyFusionLM: params have no {SEARCH_KEY!r} entry (top level: {sorted(params)}); "
                "build them with TinyFusionLM.init, or start from a dense run with "
                f"config.init_from.reinit={SEARCH_KEY!r}."
            )
        return params[SEARCH_KEY]

    def language_model_params(self, params: Mapping) -> dict:
        """The parameters the gated language model runs with (the weight update applied)."""
        search = self._search(params)
        base = {name: value for name, value in params.items() if name != SEARCH_KEY}
        if self.weight_update == "full":
            return base
        base = jax.lax.stop_gradient(base)
        if self.weight_update == "frozen":
            return base
        return merge_lora(base, search["lora"], self.lora_scale)

    def apply(
        self,
        variables: Mapping[str, Any],
        *args: Any,
        train: bool = False,
        rngs: Mapping[str, Array] | None = None,
        gumbel_temperature: Array | float = 1.0,
        **inputs: Any,
    ) -> Array:
        """The gated language model's output (logits [B, L, vocab] for a decoder).

        train=True draws the masks (from the ``dropout`` RNG stream, at
        ``gumbel_temperature``); train=False runs every group's most probable mask.
        Other arguments go to the language model.
        """
        params = variables["params"]
        logits = self.scaled_logits(params)
        if train:
            if rngs is None or "dropout" not in rngs:
                raise ValueError(
                    "TinyFusionLM: train=True draws layer masks from the 'dropout' RNG stream; "
                    "pass rngs={'dropout': key}."
                )
            tokens = args[0] if args else inputs["inputs"]
            gates = sample_layer_gates(
                jax.random.fold_in(rngs["dropout"], _GUMBEL_STREAM),
                logits,
                self.candidates,
                gumbel_temperature,
                tokens.shape[0] if self.per_example_masks else None,
            )
        else:
            gates = argmax_layer_gates(jax.lax.stop_gradient(logits), self.candidates)
        lm_variables = {**variables, "params": self.language_model_params(params)}
        return self.lm.apply(
            lm_variables, *args, train=train, rngs=rngs, layer_gates=gates, **inputs
        )


_TINY = dict(vocab_size=64, embed_dim=32, num_heads=4, num_kv_heads=2, ffn_hidden_dim=64)


@register(
    "tinyfusion_lm",
    tiny=dict(num_layers=2, keep=1, group_size=2, lora_rank=2, max_length=64, **_TINY),
)
def tinyfusion_lm(
    keep: int = 2,
    group_size: int = 4,
    weight_update: str = "lora",
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    logit_scale: float = 1e3,
    per_example_masks: bool = True,
    base: str = "lm_decoder",
    **lm_overrides: Any,
) -> TinyFusionLM:
    """TinyFusion depth-pruning search over a registered language model (default lm_decoder)."""
    return TinyFusionLM(
        create(base, **lm_overrides),
        keep=keep,
        group_size=group_size,
        weight_update=weight_update,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        logit_scale=logit_scale,
        per_example_masks=per_example_masks,
    )
