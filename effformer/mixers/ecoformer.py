"""EcoFormer (Liu et al., NeurIPS 2022): attention over learned binary codes, linear in length.

Queries and keys share one projection (``q = k``, the official ``to_qk``). Each
head's ``q`` is scaled to unit length and hashed to ``b`` bits by a *kernelised
hash function* (kernelised supervised hashing, KSH):

    phi(q)_r = exp(-||q - a_r||^2 / (2 sigma)) - mu_r          r = 1..m anchors a_r
    h(q)     = sign(W phi(q))  in {-1, +1}^b                   W: [b, m]

Two codes agree in ``b - D_H`` bits (``D_H``: their Hamming distance), and
``<h_i, h_j> = b - 2 D_H``, so the Hamming affinity is

    s_ij = b - D_H(h_i, h_j) = (b + <h_i, h_j>) / 2            (>= 0; s_ii = b)

and attention with it is a product that never forms the ``L x L`` matrix:

    out_i = sum_j s_ij v_j / sum_j s_ij
          = (b sum_j v_j + h_i^T sum_j h_j v_j^T) / (b n + h_i^T sum_j h_j)

over the keys ``j`` query ``i`` sees (``n`` of them): O(L b Dh) instead of
O(L^2 Dh). Causal attention uses prefix sums of the same four quantities;
:func:`hamming_attention` is the fast path, :func:`hamming_attention_reference`
the dense one (an explicit Hamming-distance matrix, masked, normalised).

**How the hash functions are learned** (official ``hashing/ksh.py``,
``performer.py``): not by backpropagation. The anchors, ``W``, ``mu`` and
``sigma`` are fixed during the forward pass and fitted, from a batch of the
model's own normalised queries, by KSH with the attention map as supervision:
each row's ``top_k`` most similar keys (largest ``q_i . q_j``) are "similar"
(+1), its ``top_k`` least similar "dissimilar" (-1); ``W`` is fitted one bit at
a time, greedily, each bit by SGD (Nesterov momentum) on the relaxed objective
``-y^T S y`` with ``y = 2 sigmoid(K w) - 1``, kept only if its sign codes do
better than the previous ``w``, then removed from the residual ``S <- S - y y^T``.
The official code refits every ``k`` epochs on the first batch of the epoch
(its configs: ``k = 300``, so once, at the start of fine-tuning an
MSA-pretrained model). Gradients do reach the shared q/k projection: ``sign``
passes them straight through where ``|W phi| < 1`` (the official
``BinaryQuantizer``); ``W``, anchors and ``mu`` get none.

In effformer the hash functions live in the non-trainable ``"hashing"``
variable collection of each :class:`EcoFormerAttention` (``anchors [H, m, Dh]``,
``projection [H, b, m]``, ``kernel_mean [H, m]``, ``kernel_width [H]``), created
by ``init`` as *random* kernelised hashing (random unit anchors, Gaussian
``W``, no centring, ``sigma = 2``: the mean squared distance of random unit
vectors). :func:`fit_hash_functions` is the pure KSH fit of one layer and
:func:`refit_hashing` refits every layer of a model from the normalised
queries each layer sows (``intermediates``/``hash_inputs``) in an
``apply(..., mutable=["intermediates"])`` call. A training loop calls it every N
steps: effformer's trainer carries the ``"hashing"`` collection and refits it as
``config.model_state.hashing`` asks (:mod:`effformer.train.model_state`), and
``experiments/ecoformer/run.py`` has its own loop that does the same.

Where this differs from the official code, and why:

* ``sigma`` (the RBF width) is the mean squared query-anchor distance *of the
  fitting batch*, stored with the hash functions. The official forward pass
  recomputes it from each batch it is given (per example and head), which
  makes every token's code depend on the other tokens of its sequence, the
  padding and the future; fixed, each code depends on its own token only, so
  causal attention and padding are exact.
* Anchors are drawn from the valid tokens of the whole fitting batch (official:
  from its first example); each head accepts or keeps its new bit on its own
  loss (official: one decision for all heads together).
* The affinity is the paper's ``b - D_H``. The official ``linear_attention_bias``
  uses ``b + 1 + <h_i, h_j>`` in the normaliser but adds ``(b + 1) v_i`` (the
  query's own value) instead of ``(b + 1) sum_j v_j`` to the numerator, which
  does not normalise to a weighted mean of the values; this module follows
  the paper's equation.
* A zero pre-activation hashes to -1 here (``torch.sign`` gives 0), so codes
  are always in {-1, +1} and the Hamming identity above holds exactly.

Mask contract (shared mixer signature): ``mask.causal`` or the mixer's own
``causal`` attribute (True by default: language-model stacks pass
non-attention mixers no causal mask; encoders set it False) makes it causal; segment ids mark padding (0) and packed
sequences, which must be contiguous runs (as packing and padding make them;
padded tokens inside a run, holes, do not split it): each run attends only
within itself, and padded tokens are seen by nothing and
output zero before the output projection. Sliding windows, soft-causal ratios
and explicit mask positions are refused; ``positions`` is unused (tokens are
ordered by index). No attention dropout (there is no probability matrix to
drop from).

Decoding (``decode=True``, causal only): the causal path is a running sum, so
the ``cache`` collection holds the four sums a query reads, per example and
head: ``count`` [B], ``values`` [B, H, Dh], ``codes`` [B, H, b] and ``outer``
[B, H, b, Dh] (the sums of ``v_j``, ``h_j`` and ``h_j v_j^T`` over the tokens
seen; float32 or wider). Each call takes one token ``x [B, 1, D]``, adds it to
the sums and reads them with its own code: the same arithmetic as the causal
parallel pass (whose rounding differs only in the order of the sums). A padded
token (segment id 0) leaves the sums unchanged and outputs zero before the
output projection. State is O(H b Dh) per example, independent of the length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax import lax

from effformer.initializers import trunc_normal
from effformer.ops.masks import AttentionMask, dense_mask

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

HASHING = "hashing"  # the variable collection holding the hash functions
HASH_INPUTS = "hash_inputs"  # what each mixer sows in "intermediates" for refitting


class HashFunctions(NamedTuple):
    """One layer's kernelised hash functions (the ``"hashing"`` variables of a mixer).

    anchors [H, m, Dh]: unit-length anchor points; projection [H, b, m]: ``W``;
    kernel_mean [H, m]: ``mu``, the mean RBF feature of the fitting batch;
    kernel_width [H]: ``sigma``.
    """

    anchors: Array
    projection: Array
    kernel_mean: Array
    kernel_width: Array


def _check_hash_functions(owner: str, functions: HashFunctions, heads: int, head_dim: int):
    anchors = tuple(functions.anchors.shape)
    if len(anchors) != 3 or anchors[0] != heads or anchors[2] != head_dim:
        raise ValueError(
            f"{owner}: anchors must have shape [H={heads}, m, Dh={head_dim}], got {anchors}."
        )
    num_anchors = anchors[1]
    expected = {
        "projection": (heads, None, num_anchors),
        "kernel_mean": (heads, num_anchors),
        "kernel_width": (heads,),
    }
    for name, shape in expected.items():
        got = tuple(getattr(functions, name).shape)
        if len(got) != len(shape) or any(
            e is not None and e != g for e, g in zip(shape, got, strict=True)
        ):
            text = ", ".join("b" if e is None else str(e) for e in shape)
            raise ValueError(f"{owner}: {name} must have shape [{text}], got {got}.")


def init_hash_functions(
    key: Array, num_heads: int, head_dim: int, num_bits: int, num_anchors: int
) -> HashFunctions:
    """Random kernelised hashing (before any fit): random unit anchors, Gaussian ``W``
    (the official initialisation), no centring, ``sigma = 2``."""
    anchor_key, projection_key = jax.random.split(key)
    anchors = jax.random.normal(anchor_key, (num_heads, num_anchors, head_dim))
    anchors = anchors / jnp.linalg.norm(anchors, axis=-1, keepdims=True)
    return HashFunctions(
        anchors=anchors,
        projection=jax.random.normal(projection_key, (num_heads, num_bits, num_anchors)),
        kernel_mean=jnp.zeros((num_heads, num_anchors)),
        kernel_width=jnp.full((num_heads,), 2.0),
    )


def unit_queries(qk: Array) -> Array:
    """[..., Dh] -> the same vectors scaled to unit length, in at least float32."""
    qk = qk.astype(jnp.promote_types(qk.dtype, jnp.float32))
    squared = jnp.sum(qk * qk, axis=-1, keepdims=True)
    return qk * lax.rsqrt(jnp.maximum(squared, jnp.finfo(qk.dtype).tiny))


def _squared_distances(queries: Array, anchors: Array) -> Array:
    """queries [B, L, H, Dh], anchors [H, m, Dh] -> ||q - a||^2 [B, L, H, m]."""
    anchors = anchors.astype(queries.dtype)
    squared = (
        jnp.sum(queries * queries, axis=-1)[..., None]
        + jnp.sum(anchors * anchors, axis=-1)
        - 2.0 * jnp.einsum("blhd,hmd->blhm", queries, anchors)
    )
    return jnp.maximum(squared, 0.0)  # rounding can dip below 0 where q equals an anchor


def kernel_features(queries: Array, functions: HashFunctions) -> Array:
    """queries [B, L, H, Dh] -> centred RBF features phi [B, L, H, m] (module docstring)."""
    squared = _squared_distances(queries, functions.anchors)
    width = functions.kernel_width.astype(queries.dtype)[:, None]
    return jnp.exp(-squared / (2.0 * width)) - functions.kernel_mean.astype(queries.dtype)


@jax.custom_jvp
def binarize(y: Array) -> Array:
    """sign(y) in {-1, +1} (0 -> -1); its gradient passes straight through where |y| < 1."""
    return jnp.where(y > 0, 1.0, -1.0).astype(y.dtype)


@binarize.defjvp
def _binarize_jvp(primals, tangents):
    (y,), (tangent,) = primals, tangents
    return binarize(y), jnp.where(jnp.abs(y) < 1.0, tangent, jnp.zeros_like(tangent))


def hash_codes(queries: Array, functions: HashFunctions) -> Array:
    """queries [B, L, H, Dh] (unit length) -> codes [B, L, H, b] in {-1, +1}.

    The hash functions get no gradient (they are fitted by KSH); the queries get
    the straight-through gradient of :func:`binarize`.
    """
    if queries.ndim != 4:
        raise ValueError(
            f"hash_codes: queries must be [B, L, H, Dh], got shape {tuple(queries.shape)}."
        )
    _check_hash_functions("hash_codes", functions, queries.shape[2], queries.shape[3])
    functions = HashFunctions(*(lax.stop_gradient(f) for f in functions))
    features = kernel_features(queries, functions)
    projection = functions.projection.astype(queries.dtype)
    return binarize(jnp.einsum("blhm,hkm->blhk", features, projection))


# ----------------------------------------------------------------------------- attention


def _check_attention_inputs(owner: str, codes: Array, values: Array, segment_ids) -> None:
    if codes.ndim != 4 or values.ndim != 4 or codes.shape[:3] != values.shape[:3]:
        raise ValueError(
            f"{owner}: codes must be [B, L, H, b] and values [B, L, H, Dh] with the same "
            f"B, L, H, got {tuple(codes.shape)} and {tuple(values.shape)}."
        )
    if segment_ids is not None and tuple(segment_ids.shape) != tuple(codes.shape[:2]):
        raise ValueError(
            f"{owner}: segment_ids must have shape {tuple(codes.shape[:2])}, "
            f"got {tuple(segment_ids.shape)}."
        )


def _segmented_sums(terms: dict[str, Array], segment_ids: Array, causal: bool) -> dict:
    """Sums of each [B, L, ...] term over the tokens of the same contiguous segment run,
    per position: up to and including the token (causal) or over the whole run.

    Runs are runs of the *real* tokens (id != 0): padding inside a run does not split
    it (its terms are zero), so a padded hole is no boundary, as in the mask that
    segment ids define. (Padded positions get sums too; their outputs are zeroed.)
    Both sums are differences of one cumulative sum along the row, ``C[i or run end] -
    C[run start - 1]``: the rounding is that of a cumulative sum over the row, as in
    the causal path without segments; the counts and code sums are integers, exact.
    """
    batch, length = segment_ids.shape
    index = jnp.broadcast_to(jnp.arange(length), (batch, length))
    real = segment_ids != 0

    def neighbour_real_id(reverse: bool) -> Array:
        """Id of the previous (next, if ``reverse``) real token, -1 where there is none."""
        if reverse:  # the first real position after i, or L
            nearest = lax.cummin(jnp.where(real, index, length), axis=1, reverse=True)
            nearest = jnp.pad(nearest[:, 1:], ((0, 0), (0, 1)), constant_values=length)
        else:  # the last real position before i, or -1
            nearest = lax.cummax(jnp.where(real, index, -1), axis=1)
            nearest = jnp.pad(nearest[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
        ids = jnp.take_along_axis(segment_ids, jnp.clip(nearest, 0, length - 1), axis=1)
        return jnp.where((nearest >= 0) & (nearest < length), ids, -1)

    starts = real & (segment_ids != neighbour_real_id(reverse=False))
    ends = real & (segment_ids != neighbour_real_id(reverse=True))
    run_start = lax.cummax(jnp.where(starts, index, 0), axis=1)
    last = index if causal else lax.cummin(jnp.where(ends, index, length - 1), axis=1, reverse=True)
    gather = jax.vmap(lambda row, positions: row[positions])

    def sums(term: Array) -> Array:
        inclusive = jnp.cumsum(term, axis=1)
        return gather(inclusive, last) - gather(inclusive - term, run_start)

    return jax.tree.map(sums, terms)


def hamming_attention(
    codes: Array, values: Array, *, causal: bool = False, segment_ids: Array | None = None
) -> Array:
    """Attention with the Hamming affinity ``(b + <h_i, h_j>) / 2``, in O(L) (module docstring).

    Args:
      codes: [B, L, H, b] hash codes in {-1, +1} (any real values are accepted: the
        function is the same polynomial of them).
      values: [B, L, H, Dh].
      causal: query i sees keys j <= i.
      segment_ids: [B, L] int or None; 0 marks padding (seen by nothing, output 0),
        other ids contiguous runs that attend only within themselves.
    Returns:
      [B, L, H, Dh] in ``values``' dtype (sums in at least float32).

    Cost O(B L H b Dh). Without causality or segments the sums are one [B, H, b, Dh]
    total per row; the causal and segmented paths keep them per position, [B, L, H,
    b, Dh] (linear in L, like the values times b).
    """
    _check_attention_inputs("hamming_attention", codes, values, segment_ids)
    dtype = jnp.promote_types(values.dtype, jnp.float32)
    codes, v = codes.astype(dtype), values.astype(dtype)
    weight = jnp.ones(codes.shape[:2], dtype)
    if segment_ids is not None:
        weight = (segment_ids != 0).astype(dtype)
    codes_w, v_w = codes * weight[..., None, None], v * weight[..., None, None]
    num_bits = codes.shape[-1]
    if segment_ids is None and not causal:
        # One total per row, [B, H, b, Dh]: no per-position array of that size.
        numerator = num_bits * jnp.sum(v_w, axis=1, keepdims=True) + jnp.einsum(
            "blhk,bhkd->blhd", codes, jnp.einsum("blhk,blhd->bhkd", codes_w, v)
        )
        denominator = num_bits * jnp.sum(weight, axis=1)[:, None, None] + jnp.einsum(
            "blhk,bhk->blh", codes, jnp.sum(codes_w, axis=1)
        )
    else:
        terms = {
            "count": weight,  # [B, L]
            "values": v_w,  # [B, L, H, Dh]
            "codes": codes_w,  # [B, L, H, b]
            "outer": jnp.einsum("blhk,blhd->blhkd", codes_w, v),  # [B, L, H, b, Dh]
        }
        if segment_ids is not None:
            sums = _segmented_sums(terms, segment_ids, causal)
        else:
            sums = jax.tree.map(lambda t: jnp.cumsum(t, axis=1), terms)
        return _read_sums(codes, sums, weight).astype(values.dtype)
    return _normalise(numerator, denominator, weight).astype(values.dtype)


def _read_sums(codes: Array, sums: dict[str, Array], weight: Array) -> Array:
    """Each query's output from the sums of the keys it sees.

    codes [B, L, H, b]; sums ``count`` [B, L], ``values`` [B, L, H, Dh], ``codes``
    [B, L, H, b], ``outer`` [B, L, H, b, Dh]; weight [B, L] (0: a padded query).
    """
    num_bits = codes.shape[-1]
    numerator = num_bits * sums["values"] + jnp.einsum("blhk,blhkd->blhd", codes, sums["outer"])
    denominator = num_bits * sums["count"][..., None] + jnp.einsum(
        "blhk,blhk->blh", codes, sums["codes"]
    )
    return _normalise(numerator, denominator, weight)


def _normalise(numerator: Array, denominator: Array, weight: Array) -> Array:
    # A real query sees itself (affinity b > 0); a padded one sees nothing and outputs 0.
    real = weight[..., None] > 0
    out = (numerator / 2) / jnp.where(real, denominator / 2, 1.0)[..., None]
    return jnp.where(real[..., None], out, 0.0)


def hamming_attention_reference(
    codes: Array, values: Array, *, causal: bool = False, segment_ids: Array | None = None
) -> Array:
    """The slow twin of :func:`hamming_attention`, for codes in {-1, +1}: the dense
    affinity ``b - D_H`` with the Hamming distance counted bit by bit, masked by the
    library's dense attention mask, each row divided by its sum. [B, L, H, Dh]."""
    _check_attention_inputs("hamming_attention_reference", codes, values, segment_ids)
    batch, length, heads, num_bits = codes.shape
    distance = jnp.zeros((batch, heads, length, length), jnp.int32)
    for bit in range(num_bits):
        bits = codes[..., bit].transpose(0, 2, 1)  # [B, H, L]
        distance = distance + (bits[..., :, None] != bits[..., None, :]).astype(jnp.int32)
    affinity = (num_bits - distance).astype(jnp.promote_types(values.dtype, jnp.float32))
    mask = AttentionMask(causal=causal, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
    visible = dense_mask(mask, batch, length, length)  # [B, 1, L, L]
    affinity = jnp.where(visible, affinity, 0.0)
    totals = affinity.sum(-1, keepdims=True)
    weights = affinity / jnp.where(totals > 0, totals, 1.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, values.astype(affinity.dtype)).astype(
        values.dtype
    )


# ----------------------------------------------------------------------------- KSH fit


def ksh_supervision(queries: Array, valid: Array, top_k: int) -> Array:
    """The pairwise labels of the fit: S [B, H, L, L] in {-1, 0, +1}.

    Per row of the attention logits ``q_i . q_j`` over valid keys (the softmax keeps
    their order): the ``top_k`` largest +1, the ``top_k`` smallest -1 (-1 wins where
    both, as in the official scatter order), 0 elsewhere and on padded rows/columns.
    """
    logits = jnp.einsum("blhd,bmhd->bhlm", queries, queries)
    pairs = valid[:, None, :, None] & valid[:, None, None, :]
    length = queries.shape[1]

    def selected(scores: Array) -> Array:
        _, index = lax.top_k(jnp.where(pairs, scores, -jnp.inf), top_k)
        return jnp.max(jax.nn.one_hot(index, length, dtype=jnp.int8), axis=-2) > 0

    labels = jnp.where(selected(-logits), -1.0, jnp.where(selected(logits), 1.0, 0.0))
    return jnp.where(pairs, labels, 0.0).astype(queries.dtype)


def hash_agreement(
    queries: Array, functions: HashFunctions, *, valid: Array | None = None, top_k: int = 10
) -> Array:
    """How well the codes fit the KSH labels: per head, ``sum_ij S_ij <h_i, h_j> / b``
    over ``sum_ij |S_ij|``, in [-1, 1] (1: similar pairs share every bit, dissimilar
    pairs differ in every bit; about 0 for codes unrelated to the labels). [H]."""
    valid = jnp.ones(queries.shape[:2], bool) if valid is None else valid.astype(bool)
    codes = hash_codes(queries, functions)
    labels = ksh_supervision(queries, valid, top_k)
    inner = jnp.einsum("blhk,bmhk->bhlm", codes, codes) / codes.shape[-1]
    return jnp.sum(labels * inner, axis=(0, 2, 3)) / jnp.maximum(
        jnp.sum(jnp.abs(labels), axis=(0, 2, 3)), 1.0
    )


@functools.partial(jax.jit, static_argnames=("top_k", "learning_rate", "momentum", "iterations"))
def fit_hash_functions(
    key: Array,
    queries: Array,
    functions: HashFunctions,
    *,
    valid: Array | None = None,
    top_k: int = 10,
    learning_rate: float = 5e-4,
    momentum: float = 0.9,
    iterations: int = 100,
) -> HashFunctions:
    """Fit one layer's hash functions to a batch by KSH (module docstring); pure, jitted
    (one compilation serves every layer of the same shapes).

    Args:
      key: draws the anchors.
      queries: [B, L, H, Dh] the layer's unit-length shared queries/keys (what it sows).
      functions: the current hash functions; their shapes give m and b, and each bit's
        SGD starts from the current ``W`` (the official warm start).
      valid: [B, L] bool, False for padding (None: all valid). Needs at least m valid
        tokens in the batch and, for meaningful labels, more than 2 top_k per sequence.
      top_k, learning_rate, momentum, iterations: the official KSH settings (top-k 10,
        SGD lr 5e-4 with Nesterov momentum 0.9, 100 steps per bit).
    Returns:
      New HashFunctions: anchors drawn from the batch, ``sigma`` and ``mu`` from it, ``W``
      fitted bit by bit.
    """
    owner = "fit_hash_functions"
    if queries.ndim != 4:
        raise ValueError(f"{owner}: queries must be [B, L, H, Dh], got {tuple(queries.shape)}.")
    batch, length, heads, head_dim = queries.shape
    _check_hash_functions(owner, functions, heads, head_dim)
    num_bits, num_anchors = functions.projection.shape[1:]
    if valid is not None and tuple(valid.shape) != (batch, length):
        raise ValueError(
            f"{owner}: valid must have shape {(batch, length)}, got {tuple(valid.shape)}."
        )
    if batch * length < num_anchors:
        raise ValueError(
            f"{owner}: the batch has {batch * length} tokens, fewer than the {num_anchors} anchors."
        )
    if not isinstance(top_k, int) or not 1 <= top_k <= length:
        raise ValueError(f"{owner}: top_k must be an int in [1, L={length}], got {top_k!r}.")
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"{owner}: iterations must be an int >= 0, got {iterations!r}.")
    queries = lax.stop_gradient(queries.astype(jnp.promote_types(queries.dtype, jnp.float32)))
    dtype = queries.dtype
    valid = jnp.ones((batch, length), bool) if valid is None else valid.astype(bool)
    weight = valid.astype(dtype)
    count = jnp.maximum(jnp.sum(weight), 1.0)

    # Anchors: num_anchors distinct valid tokens of the batch, at random.
    noise = jnp.where(valid.reshape(-1), jax.random.uniform(key, (batch * length,)), 2.0)
    chosen = jnp.argsort(noise)[:num_anchors]
    anchors = queries.reshape(batch * length, heads, head_dim)[chosen].transpose(1, 0, 2)

    # sigma and mu from the batch, then the centred features of its valid tokens.
    squared = _squared_distances(queries, anchors)
    width = jnp.einsum("blhm,bl->h", squared, weight) / (count * num_anchors)
    raw = jnp.exp(-squared / (2.0 * width[:, None]))
    mean = jnp.einsum("blhm,bl->hm", raw, weight) / count
    features = ((raw - mean) * weight[..., None, None]).transpose(0, 2, 1, 3)  # [B, H, L, m]

    labels = ksh_supervision(queries, valid, top_k) * num_bits  # the official S * nbits
    scale = 1.0 / (length * num_bits)

    def head_losses(codes: Array, residual: Array) -> Array:
        """-(y^T S y) / (L b) averaged over the batch: [H]."""
        return -jnp.einsum("bhl,bhlm,bhm->h", codes, residual, codes) * scale / batch

    def relaxed_loss(w: Array, residual: Array) -> Array:
        codes = 2.0 * jax.nn.sigmoid(jnp.einsum("bhlm,hm->bhl", features, w)) - 1.0
        return jnp.mean(head_losses(codes, residual))

    def sign_codes(w: Array) -> Array:
        codes = jnp.where(jnp.einsum("bhlm,hm->bhl", features, w) > 0, 1.0, -1.0)
        return codes * weight[:, None, :]

    optimizer = optax.sgd(learning_rate, momentum=momentum, nesterov=True)
    grad_fn = jax.grad(relaxed_loss)

    def fit_bit(carry, bit):
        residual, projection = carry
        previous = projection[:, bit]  # [H, m]

        def sgd_step(state, _):
            w, opt_state = state
            updates, opt_state = optimizer.update(grad_fn(w, residual), opt_state, w)
            return (optax.apply_updates(w, updates), opt_state), None

        (fitted, _), _ = lax.scan(
            sgd_step, (previous, optimizer.init(previous)), None, length=iterations
        )
        old_codes, new_codes = sign_codes(previous), sign_codes(fitted)
        better = head_losses(new_codes, residual) < head_losses(old_codes, residual)  # [H]
        w = jnp.where(better[:, None], fitted, previous)
        codes = jnp.where(better[None, :, None], new_codes, old_codes)
        residual = residual - codes[..., :, None] * codes[..., None, :]
        return (residual, projection.at[:, bit].set(w)), None

    projection = functions.projection.astype(dtype)
    (_, projection), _ = lax.scan(fit_bit, (labels, projection), jnp.arange(num_bits))
    return HashFunctions(anchors, projection, mean, width)


def _sown_hash_inputs(
    flat_inputs: Mapping[tuple[str, ...], Any], layer: tuple[str, ...]
) -> tuple[Array, Array]:
    """One layer's sown (queries, valid), concatenated over the calls that sowed them."""
    entries = flat_inputs.get(layer + (HASH_INPUTS,))
    if entries is None:
        raise ValueError(
            f"no {HASH_INPUTS!r} in intermediates for EcoFormer layer {'/'.join(layer)}; apply "
            "the model on the fitting batch with mutable=['intermediates'] and pass what it "
            "returns."
        )
    queries = jnp.concatenate([queries for queries, _ in entries], axis=0)
    valid = jnp.concatenate([valid for _, valid in entries], axis=0)
    return queries, valid


def _layers(hashing: Mapping[str, Any]) -> tuple[dict, list[tuple[str, ...]]]:
    flat_hashing = traverse_util.flatten_dict(dict(hashing))
    return flat_hashing, sorted({path[:-1] for path in flat_hashing})


def hashing_agreement(
    hashing: Mapping[str, Any], intermediates: Mapping[str, Any], *, top_k: int = 10
) -> Array:
    """:func:`hash_agreement` of every EcoFormer layer of a model, averaged over layers and
    heads: a scalar in [-1, 1] (``hashing`` and ``intermediates`` as for
    :func:`refit_hashing`)."""
    flat_hashing, layers = _layers(hashing)
    flat_inputs = traverse_util.flatten_dict(dict(intermediates))
    values = []
    for layer in layers:
        queries, valid = _sown_hash_inputs(flat_inputs, layer)
        functions = HashFunctions(*(flat_hashing[layer + (n,)] for n in HashFunctions._fields))
        values.append(hash_agreement(queries, functions, valid=valid, top_k=top_k))
    return jnp.mean(jnp.stack(values))


def refit_hashing(
    key: Array, hashing: Mapping[str, Any], intermediates: Mapping[str, Any], **fit_kwargs: Any
) -> dict[str, Any]:
    """Refit every EcoFormer layer of a model: the new ``"hashing"`` collection.

    Args:
      key: split over the layers (anchor draws).
      hashing: the model's current ``"hashing"`` collection.
      intermediates: the ``"intermediates"`` of ``model.apply(variables, ...,
        mutable=["intermediates"])`` on the fitting batch, where every
        :class:`EcoFormerAttention` sowed its unit queries and valid mask.
      fit_kwargs: passed to :func:`fit_hash_functions` (top_k, learning_rate, ...).
    """
    flat_hashing, layers = _layers(hashing)
    flat_inputs = traverse_util.flatten_dict(dict(intermediates))
    new = {}
    for index, layer in enumerate(layers):
        queries, valid = _sown_hash_inputs(flat_inputs, layer)
        current = HashFunctions(*(flat_hashing[layer + (name,)] for name in HashFunctions._fields))
        fitted = fit_hash_functions(
            jax.random.fold_in(key, index), queries, current, valid=valid, **fit_kwargs
        )
        for name, value in fitted._asdict().items():
            new[layer + (name,)] = value.astype(flat_hashing[layer + (name,)].dtype)
    return traverse_util.unflatten_dict(new)


# ----------------------------------------------------------------------------- the mixer


class EcoFormerAttention(nn.Module):
    """EcoFormer self-attention with the shared mixer signature (module docstring).

    Attributes:
      num_heads: heads; head_dim: per-head width (default D // num_heads).
      num_bits: code length b (the paper's 16).
      num_anchors: kernel anchors m (official configs: 25 for PVTv2, 25-30 for Twins).
      causal: causal attention also without a causal mask. True by default, as
        Combiner's: a layer stack passes non-attention mixers no causal mask, so a
        decoder must not depend on one; encoders set False (the ViT family does). A
        causal mask makes it causal either way.
      qkv_bias: biases on the shared q/k and the value projections; out_bias: on the
        output projection.
    """

    num_heads: int = 8
    head_dim: int | None = None
    num_bits: int = 16
    num_anchors: int = 25
    causal: bool = True
    qkv_bias: bool = True
    out_bias: bool = True
    kernel_init: Initializer = trunc_normal(0.02)
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _dense(self, features, name: str, use_bias: bool, axis=-1) -> nn.Module:
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

    def _validate(self, x: Array, mask: AttentionMask | None, decode: bool):
        """-> (head_dim, causal, segment ids [B, L] or None)."""
        owner = type(self).__name__
        if x.ndim != 3:
            raise ValueError(f"{owner}: x must be [B, L, D], got shape {tuple(x.shape)}.")
        for name in ("num_heads", "num_bits", "num_anchors"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}.")
        # 0 would silently have meant the default, D // num_heads.
        if self.head_dim is not None and not self.head_dim >= 1:
            raise ValueError(
                f"{owner}: head_dim must be a positive int or None (D // num_heads), "
                f"got {self.head_dim!r}."
            )
        if self.head_dim is None and x.shape[-1] % self.num_heads:
            raise ValueError(
                f"{owner}: num_heads must divide the model width {x.shape[-1]} (or give "
                f"head_dim), got num_heads={self.num_heads}."
            )
        if decode and x.shape[1] != 1:
            raise ValueError(
                f"{owner}: decode=True advances one token per call; x must have shape "
                f"[batch, 1, {x.shape[-1]}], got {tuple(x.shape)}."
            )
        if decode and not (self.causal or (mask is not None and mask.causal)):
            raise ValueError(
                f"{owner}: decode=True needs causal attention (causal=True or a causal "
                "mask); a bidirectional layer has no recurrent form."
            )
        head_dim = self.head_dim or x.shape[-1] // self.num_heads
        if mask is None:
            return head_dim, self.causal, None
        if (
            mask.window_left is not None
            or mask.window_right is not None
            or mask.soft_causal_ratio is not None
            or mask.q_positions is not None
            or mask.kv_positions is not None
        ):
            raise ValueError(
                f"{owner}: the mask may only carry causal and segment ids (padding, packing); "
                f"windows, soft-causal ratios and explicit positions are not supported, "
                f"got {mask}."
            )
        causal = self.causal or mask.causal
        if mask.q_segment_ids is None:
            return head_dim, causal, None
        batch, length = x.shape[:2]
        for name in ("q_segment_ids", "kv_segment_ids"):
            ids = getattr(mask, name)
            if ids.ndim != 2 or ids.shape[1] != length or ids.shape[0] not in (1, batch):
                raise ValueError(
                    f"{owner}: mask.{name} must have shape {(batch, length)} (or batch 1), "
                    f"got {tuple(ids.shape)}."
                )
        return head_dim, causal, jnp.broadcast_to(mask.q_segment_ids, (batch, length))

    def _hash_functions(self, head_dim: int) -> HashFunctions:
        owner = type(self).__name__
        if not self.is_mutable_collection(HASHING) and not self.has_variable(HASHING, "projection"):
            raise ValueError(
                f"{owner}: the {HASHING!r} variable collection is missing; apply the model "
                f"with the variables init returned ({{'params': ..., {HASHING!r}: ...}})."
            )
        shape = dict(num_heads=self.num_heads, head_dim=head_dim)
        initial: dict[str, Any] = {}

        def initialised(name: str) -> Array:
            if not initial:
                initial.update(
                    init_hash_functions(
                        self.make_rng("params"),
                        **shape,
                        num_bits=self.num_bits,
                        num_anchors=self.num_anchors,
                    )._asdict()
                )
            return initial[name].astype(self.param_dtype)

        functions = HashFunctions(
            *(
                self.variable(HASHING, name, initialised, name).value
                for name in HashFunctions._fields
            )
        )
        _check_hash_functions(owner, functions, self.num_heads, head_dim)
        held = dict(num_bits=functions.projection.shape[1], num_anchors=functions.anchors.shape[1])
        for name, value in held.items():
            if value != getattr(self, name):
                raise ValueError(
                    f"{owner}: the {HASHING!r} collection holds hash functions with "
                    f"{name}={value}, but the mixer has {name}={getattr(self, name)}."
                )
        return functions

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
        """x [B, L, D] -> [B, L, D].

        Sows ``(unit queries [B, L, H, Dh], valid [B, L])`` as
        ``intermediates/hash_inputs`` for :func:`refit_hashing`. ``positions`` and
        ``deterministic`` are unused (tokens ordered by index; no dropout).
        """
        del positions, deterministic
        head_dim, causal, segment_ids = self._validate(x, mask, decode)
        shape = (self.num_heads, head_dim)
        qk = self._dense(shape, "qk", self.qkv_bias)(x)
        values = self._dense(shape, "value", self.qkv_bias)(x)
        queries = unit_queries(qk)
        valid = jnp.ones(x.shape[:2], bool) if segment_ids is None else segment_ids != 0
        codes = hash_codes(queries, self._hash_functions(head_dim))
        if decode:
            out = self._decode_step(codes.astype(values.dtype), values, valid)
        else:
            self.sow("intermediates", HASH_INPUTS, (queries, valid))
            out = hamming_attention(
                codes.astype(values.dtype), values, causal=causal, segment_ids=segment_ids
            )
        return self._dense(x.shape[-1], "out", self.out_bias, axis=(-2, -1))(out)

    def _decode_step(self, codes: Array, values: Array, valid: Array) -> Array:
        """One token's output [B, 1, H, Dh] from the cached sums, which it then joins.

        codes [B, 1, H, b]; values [B, 1, H, Dh]; valid [B, 1] (False: padding).
        """
        batch, _, heads, num_bits = codes.shape
        head_dim = values.shape[-1]
        dtype = jnp.promote_types(values.dtype, jnp.float32)
        shapes = {
            "count": (batch,),
            "values": (batch, heads, head_dim),
            "codes": (batch, heads, num_bits),
            "outer": (batch, heads, num_bits, head_dim),
        }
        cache = {
            name: self.variable("cache", name, jnp.zeros, shape, dtype)
            for name, shape in shapes.items()
        }
        weight = valid.astype(dtype)  # [B, 1]
        h, v = codes[:, 0].astype(dtype), values[:, 0].astype(dtype)
        w = weight[:, 0]
        token = {
            "count": w,
            "values": v * w[:, None, None],
            "codes": h * w[:, None, None],
            "outer": jnp.einsum("bhk,bhd->bhkd", h * w[:, None, None], v),
        }
        sums = {name: cache[name].value + token[name] for name in shapes}
        if not self.is_initializing():
            for name in shapes:
                cache[name].value = sums[name]
        out = _read_sums(codes.astype(dtype), {k: s[:, None] for k, s in sums.items()}, weight)
        return out.astype(values.dtype)
