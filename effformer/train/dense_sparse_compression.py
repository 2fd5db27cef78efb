"""DSFormer model surgery: a trained language model's kernels replaced by dense-sparse factors.

:func:`compress_lm_params` takes the parameters of a trained
:class:`~effformer.models.transformer_lm.TransformerLM` (the layer stack of
``effformer/models/lm_layers.py``) and factorises the chosen linear layers'
kernels (``effformer.nn.dense_sparse``): the FFN's (``fc1``, ``fc2``, or a gated
FFN's ``w1``, ``w2``, ``w3``) and, optionally, attention's query, key, value and
output projections (self- and cross-attention: every module named
``layer_*_attention``). Any model built on that layer stack is covered the same
way (an ``EncoderDecoderLM``'s encoder and decoder alike). Every factorised
module gets, in place of its ``kernel``, the parameters a
:class:`~effformer.nn.dense_sparse.DenseSparseLinear` has
(``basis`` [p, r], ``coefficients`` [q, r], the dense latent); its bias and every
other parameter are copied unchanged. A ``FactorSpec`` per kernel records the
static facts (the kernel's shape, r, k, the sparse side).

Two ways to run the result:

* **In factored form**: the same LM built with ``ffn_dense_sparse=(rank, k)``
  (FFN factors only) has exactly these parameters, its FFN projections being
  :class:`~effformer.nn.dense_sparse.DenseSparseLinear` layers that compute
  ``(x @ D) @ top_k(C)^T`` per token without forming a kernel (STF's
  straight-through gradient when trained);
* **through the unchanged dense model**: :func:`materialize` rebuilds each kernel
  from its factors (STF's top-k projection with the straight-through gradient,
  or a fixed mask, or none for low rank) for ``model.apply``. Gradients through it
  are those of the factorised model, so fine-tuning (STF, fixed-pattern, low rank)
  trains the factors themselves, as TinyFusion's LoRA does here
  (``effformer/models/tinyfusion.py``). Every step forms the kernels (``p * r * q``
  multiply-adds each, once per step, not per token) and runs them dense: it
  saves parameters, not FLOPs, but serves attention kernels, fixed patterns and
  low rank, which the factored layers do not.

:func:`export_compact` gives the factors in the inference form of
:func:`~effformer.nn.dense_sparse.dense_sparse_apply` (k values and indices per row).

A kernel of more than two axes (attention's ``DenseGeneral``: query, key,
value [D, H, d], output [H, d, D]) is factorised as the matrix of its input axes
by its output axes (the inputs are the leading axes whose product is the model
width, ``effformer.models.tinyfusion.lora_input_axes``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from effformer.models.tinyfusion import lora_input_axes
from effformer.nn.dense_sparse import (
    compact_coefficients,
    dense_sparse_param_count,
    factorize,
    masked_project,
    shapes_for_compression,
    sparse_project,
    sparse_side_for,
    top_k_mask,
)

Array = jax.Array
Path = tuple[str, ...]

FFN_KERNELS = ("fc1", "fc2", "w1", "w2", "w3")
ATTENTION_KERNELS = ("query", "key", "value", "out")
PARTS = ("ffn", "attention")
METHODS = ("dense_sparse", "low_rank")
PROJECTIONS = ("stf", "fixed", "none")


@dataclasses.dataclass(frozen=True)
class FactorSpec:
    """The static description of one factorised kernel.

    Attributes:
      shape: the original kernel's shape; input_axes: how many leading axes are its
      inputs (the matrix is [prod(shape[:input_axes]), prod(shape[input_axes:])]);
      rank: r; nonzeros_per_row: k (= r for low rank); sparse_side: "out" or "in".
    """

    shape: tuple[int, ...]
    input_axes: int
    rank: int
    nonzeros_per_row: int
    sparse_side: str

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (math.prod(self.shape[: self.input_axes]), math.prod(self.shape[self.input_axes :]))

    @property
    def param_count(self) -> int:
        """Stored values: ``p r + q k`` (:func:`~effformer.nn.dense_sparse.dense_sparse_param_count`)."""
        return dense_sparse_param_count(*self.matrix_shape, self.rank, self.nonzeros_per_row)


def target_kernels(params: Mapping[str, Any], parts: Sequence[str] = ("ffn",)) -> dict[Path, Array]:
    """The kernels of ``params`` that :func:`compress_lm_params` factorises, by path.

    parts: any of ``"ffn"`` (modules ``layer_*_ffn``: fc1, fc2, w1, w2, w3) and
    ``"attention"`` (``layer_*_attention``: query, key, value, out).
    """
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise ValueError(f"parts: expected a non-empty subset of {PARTS}, got {list(parts)}.")
    names = {"ffn": FFN_KERNELS, "attention": ATTENTION_KERNELS}
    found = {}
    for path, value in traverse_util.flatten_dict(params).items():
        if path[-1] != "kernel" or len(path) < 3:
            continue
        for part in parts:
            if path[-3].endswith(f"_{part}") and path[-2] in names[part]:
                found[path[:-1]] = value
    return found


def compress_lm_params(
    params: Mapping[str, Any],
    *,
    embed_dim: int,
    compression: float,
    method: str = "dense_sparse",
    density: float = 0.25,
    iters: int = 10,
    parts: Sequence[str] = ("ffn",),
    factor_shape: Callable[[int, int], tuple[int, int]] | None = None,
) -> tuple[dict[str, Any], dict[Path, FactorSpec], dict[Path, float]]:
    """Factorise a trained LM's kernels; returns (params, specs, relative errors).

    params: the LM's ``params`` collection; embed_dim: its width (to read attention
    kernels' input axes); compression: every factorised kernel keeps at most
    ``1 / compression`` of its values (:func:`~effformer.nn.dense_sparse.shapes_for_compression`);
    method: ``"dense_sparse"`` (:func:`~effformer.nn.dense_sparse.factorize`, ``iters``
    alternating steps, rows keeping ``density`` of the rank) or ``"low_rank"`` (the
    truncated SVD at the largest rank within the same budget). The returned params
    have ``basis`` and ``coefficients`` where each target module had ``kernel``;
    ``factor_shape(d_in, d_out) -> (rank, k)``, if given, replaces the budget rule
    (``compression``, ``method`` and ``density`` are then not used); the errors are ``||W - W_hat|| / ||W||`` per kernel.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}.")
    kernels = target_kernels(params, parts)
    if not kernels:
        raise ValueError(f"params: no kernels of the parts {list(parts)} to factorise.")
    flat = traverse_util.flatten_dict(params)
    specs, errors = {}, {}
    for path, kernel in sorted(kernels.items()):
        axes = lora_input_axes(kernel.shape, embed_dim)
        spec_shape = (math.prod(kernel.shape[:axes]), math.prod(kernel.shape[axes:]))
        if factor_shape is None:
            rank, k = shapes_for_compression(*spec_shape, compression, density)[method]
        else:
            rank, k = factor_shape(*spec_shape)
        matrix = jnp.reshape(kernel, spec_shape)
        basis, coefficients, error = factorize(matrix, rank, k, iters if k < rank else 0)
        del flat[(*path, "kernel")]
        flat[(*path, "basis")] = basis.astype(kernel.dtype)
        flat[(*path, "coefficients")] = coefficients.astype(kernel.dtype)
        specs[path] = FactorSpec(tuple(kernel.shape), axes, rank, k, sparse_side_for(*spec_shape))
        errors[path] = float(error[-1])
    return traverse_util.unflatten_dict(flat), specs, errors


def support_masks(params: Mapping[str, Any], specs: Mapping[Path, FactorSpec]) -> dict[Path, Array]:
    """The top-k pattern of every factorised kernel's coefficients now, by path (bool [q, r])."""
    flat = traverse_util.flatten_dict(params)
    return {
        path: top_k_mask(flat[(*path, "coefficients")], spec.nonzeros_per_row)
        for path, spec in specs.items()
    }


def materialize(
    params: Mapping[str, Any],
    specs: Mapping[Path, FactorSpec],
    *,
    projection: str = "stf",
    masks: Mapping[Path, Array] | None = None,
) -> dict[str, Any]:
    """The LM's parameters with every factorised module's ``kernel`` rebuilt from its factors.

    projection: ``"stf"`` (top-k of the latent per row, straight-through gradient:
    the pattern may change as the latent trains), ``"fixed"`` (the pattern of
    ``masks``, from :func:`support_masks` at the start; gradient only on it) or
    ``"none"`` (the coefficients as they are: low rank, k = r).
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection: expected one of {PROJECTIONS}, got {projection!r}.")
    if projection == "fixed" and masks is None:
        raise ValueError("masks: projection='fixed' needs the masks of support_masks(...).")
    flat = traverse_util.flatten_dict(params)
    for path, spec in specs.items():
        basis = flat.pop((*path, "basis"), None)
        coefficients = flat.pop((*path, "coefficients"), None)
        if basis is None or coefficients is None:
            raise ValueError(f"params: no basis and coefficients at {'/'.join(path)}.")
        if projection == "stf":
            coefficients = sparse_project(coefficients, spec.nonzeros_per_row)
        elif projection == "fixed":
            coefficients = masked_project(coefficients, masks[path])
        matrix = basis @ coefficients.T if spec.sparse_side == "out" else coefficients @ basis.T
        flat[(*path, "kernel")] = matrix.reshape(spec.shape)
    return traverse_util.unflatten_dict(flat)


def compressed_param_count(params: Mapping[str, Any], specs: Mapping[Path, FactorSpec]) -> int:
    """Stored values of a compressed parameter tree.

    Every leaf counts in full except a factorised kernel's coefficients, which count
    their k kept entries per row (their indices are not counted).
    """
    total = 0
    for path, value in traverse_util.flatten_dict(params).items():
        if path[-1] == "coefficients" and path[:-1] in specs:
            total += value.shape[0] * specs[path[:-1]].nonzeros_per_row
        else:
            total += int(np.prod(value.shape))
    return total


def export_compact(
    params: Mapping[str, Any], specs: Mapping[Path, FactorSpec]
) -> dict[Path, dict[str, Array]]:
    """The inference form of every factorised kernel: {path: {basis, values, indices}}.

    values, indices [q, k] as :func:`~effformer.nn.dense_sparse.compact_coefficients`;
    with ``dense_sparse_apply(x.reshape(-1, p or q), ...)`` they compute the kernel's
    product without forming it.
    """
    flat = traverse_util.flatten_dict(params)
    compact = {}
    for path, spec in specs.items():
        values, indices = compact_coefficients(flat[(*path, "coefficients")], spec.nonzeros_per_row)
        compact[path] = dict(basis=flat[(*path, "basis")], values=values, indices=indices)
    return compact
