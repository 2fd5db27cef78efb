"""The dense attention distribution a Combiner factorisation implies (tests and inspection).

Written straight from the definitions (see ``effformer.mixers.combiner``),
independently of the fast path: Python loops list, for every query, the
tokens it attends directly and the regions it attends through an abstraction;
then

    A[i, j] = w_direct[i, j] + sum_Omega w[i, Omega] * p_Omega(j)

with ``w`` ONE softmax over all of the query's direct and abstraction logits.
This builds ``L x L`` (and ``L x #regions``) arrays: for small L only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CombinerStructure:
    """Which tokens each query reaches, and how.

    direct [L, L] bool: query i attends token j directly.
    regions [R, L] bool: the tokens of each abstraction region (never empty).
    visible [L, R] bool: query i attends region r through its abstraction.
    query_token [R] int: -1 = the region's query and key are max-pooled over
      it; otherwise (axial) the grid slot whose query defines the region's
      distribution (>= L: a padded slot, whose query is zero) and whose key is
      given by ``row_key_fn``.
    """

    direct: np.ndarray
    regions: np.ndarray
    visible: np.ndarray
    query_token: np.ndarray


def combiner_structure(
    variant: str, length: int, segment_length: int, causal: bool
) -> CombinerStructure:
    """The support structure of ``variant`` for ``length`` tokens, from the definitions."""
    L, c = length, segment_length
    direct = np.zeros((L, L), bool)
    regions: list[set[int]] = []
    visible: list[list[int]] = [[] for _ in range(L)]
    query_token: list[int] = []
    index_of: dict = {}

    def region(name, tokens, token=-1) -> int | None:
        tokens = {j for j in tokens if 0 <= j < L}
        if not tokens:
            return None
        if name not in index_of:
            index_of[name] = len(regions)
            regions.append(tokens)
            query_token.append(token)
        return index_of[name]

    def attend(i, r):
        if r is not None:
            visible[i].append(r)

    if variant == "logsparse":
        for i in range(L):
            direct[i, i] = True
            for level in range(max(L - 1, 0).bit_length()):
                if (i >> level) & 1:
                    start = ((i >> level) - 1) << level
                    attend(i, region(("block", level, start), range(start, start + 2**level)))
    else:
        S = -(-L // c)
        row = [i // c for i in range(L)]
        col = [i % c for i in range(L)]

        def cell(t, b):
            return t * c + b

        def other(t, s):
            return t < s if causal else t != s

        for i in range(L):
            s, a = row[i], col[i]
            for j in range(L):
                same_row_direct = row[j] == s and (col[j] <= a or not causal)
                if variant in ("fixed", "axial"):
                    direct[i, j] = same_row_direct
                else:  # mixture: own row, and own column in the other rows
                    direct[i, j] = same_row_direct or (col[j] == a and other(row[j], s))
            for t in range(S):
                if not other(t, s):
                    continue
                if variant == "fixed":
                    attend(i, region(("segment", t), [cell(t, b) for b in range(c)]))
                elif variant == "axial":
                    row_tokens = [cell(t, b) for b in range(c)]
                    attend(i, region(("row", t, a), row_tokens, token=cell(t, a)))
                else:
                    left = [cell(t, b) for b in range(a)]
                    right = [cell(t, b) for b in range(a + 1, c)]
                    attend(i, region(("left", t, a), left))
                    attend(i, region(("right", t, a), right))
            if variant == "mixture":
                for b in range(c):
                    if b == a:
                        continue
                    above = [cell(t, b) for t in range(s)]
                    attend(i, region(("above", s, b), above))
                    if not causal:
                        below = [cell(t, b) for t in range(s + 1, S)]
                        attend(i, region(("below", s, b), below))

    region_array = np.zeros((len(regions), L), bool)
    for r, tokens in enumerate(regions):
        region_array[r, sorted(tokens)] = True
    visible_array = np.zeros((L, len(regions)), bool)
    for i, rs in enumerate(visible):
        visible_array[i, rs] = True
    return CombinerStructure(direct, region_array, visible_array, np.array(query_token, int))


def implied_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    variant: str,
    causal: bool,
    segment_length: int = 0,
    row_key_fn: Callable[[Array], Array] | None = None,
) -> Array:
    """The dense implied attention distribution.

    Args:
      q, k, v: [B, L, H, Dh], q pre-scaled.
      variant, causal, segment_length: as for ``combiner_attention`` (segment_length
        already resolved; ignored by logsparse).
      row_key_fn: axial only: row-attention outputs on the zero-padded grid
        [B, S * c, H, Dh] -> abstraction keys of the same shape.
    Returns:
      A [B, H, L, L]: row i is query i's distribution over the tokens.
    """
    batch, L, H, Dh = q.shape
    st = combiner_structure(variant, L, segment_length, causal)
    regions = jnp.asarray(st.regions)  # [R, L]
    inside = regions[None, :, :, None, None]
    if variant == "axial":
        num_slots = -(-L // segment_length) * segment_length
        q_padded = jnp.pad(q, [(0, 0), (0, num_slots - L), (0, 0), (0, 0)])
        region_query = q_padded[:, st.query_token]  # [B, R, H, Dh]
    else:
        region_query = jnp.max(jnp.where(inside, q[:, None], -jnp.inf), axis=2)
    region_logits = jnp.einsum("brhd,bjhd->bhrj", region_query, k)
    region_probs = jax.nn.softmax(jnp.where(regions[None, None], region_logits, -jnp.inf), -1)
    if variant == "axial":
        slots = jnp.zeros((batch, num_slots, H, Dh), v.dtype)
        row_out = jnp.einsum("bhrj,bjhd->brhd", region_probs, v)
        slots = slots.at[:, st.query_token].set(row_out)
        # row_key_fn works token by token, so unused slots may stay zero.
        region_key = row_key_fn(slots)[:, st.query_token]
    else:
        region_key = jnp.max(jnp.where(inside, k[:, None], -jnp.inf), axis=2)
    direct_logits = jnp.einsum("bihd,bjhd->bhij", q, k)
    abstraction_logits = jnp.einsum("bihd,brhd->bhir", q, region_key)
    logits = jnp.concatenate(
        [
            jnp.where(jnp.asarray(st.direct)[None, None], direct_logits, -jnp.inf),
            jnp.where(jnp.asarray(st.visible)[None, None], abstraction_logits, -jnp.inf),
        ],
        axis=-1,
    )
    weights = jax.nn.softmax(logits, axis=-1)
    w_direct, w_abstraction = weights[..., :L], weights[..., L:]
    return w_direct + jnp.einsum("bhir,bhrj->bhij", w_abstraction, region_probs)


def combiner_reference(
    q: Array,
    k: Array,
    v: Array,
    *,
    variant: str,
    causal: bool,
    segment_length: int = 0,
    row_key_fn: Callable[[Array], Array] | None = None,
) -> Array:
    """Combiner attention through its dense implied distribution: [B, L, H, Dh]."""
    weights = implied_attention(
        q,
        k,
        v,
        variant=variant,
        causal=causal,
        segment_length=segment_length,
        row_key_fn=row_key_fn,
    )
    return jnp.einsum("bhij,bjhd->bihd", weights, v)
