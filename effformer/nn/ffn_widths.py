"""MatFormer's FFN widths (Devvrit et al., 2023), shared by every model family.

Every FFN of ``effformer.nn.ffn`` is nested, ``W2[:, :m] act(W1[:m] x)``, so a
call may run each layer's FFN at a hidden width ``m`` no larger than its
``ffn_hidden_dim``. A model's call argument ``ffn_widths`` says which
(:func:`resolve_ffn_widths`): None (full width), one width for every layer,
or one per layer (Mix'n'Match); a width is an int number of hidden units or
a float fraction of ``ffn_hidden_dim``. ``ffn_granularities`` (several
``ffn_widths`` values; :func:`granularity_runs`) runs the model once at each
on the same inputs, for MatFormer's joint training. :func:`mix_n_match_widths`
picks per-layer widths for a budget with the paper's heuristic.

The language models (``effformer.models.lm_layers``, which re-exports these
names) and the vision classifiers (``effformer.models.vit``) use this one
implementation, so widths mean the same and fail with the same messages in both.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

# A call's FFN widths: None, one width for every layer, or one per layer (see resolve_ffn_widths).
FfnWidth = int | float
FfnWidths = FfnWidth | Sequence[FfnWidth] | None


def _resolve_ffn_width(where: str, width: Any, ffn_hidden_dim: int) -> int:
    """One width -> hidden units: an int in [1, ffn_hidden_dim], or a float fraction in (0, 1]."""
    expected = (
        f"an int in [1, ffn_hidden_dim={ffn_hidden_dim}] (hidden units) or a float in (0, 1] "
        f"(a fraction of ffn_hidden_dim) whose product with {ffn_hidden_dim} is a whole number"
    )
    # bool is an int subclass, but True is surely not meant as "1 hidden unit".
    if isinstance(width, bool) or not isinstance(width, numbers.Real):
        raise ValueError(
            f"{where} must be {expected}; got {width!r} of type {type(width).__name__} (widths "
            "set shapes, so they are Python numbers, not arrays)."
        )
    if isinstance(width, numbers.Integral):
        units = int(width)
    else:
        scaled = float(width) * ffn_hidden_dim
        units = round(scaled)
        if not 0.0 < float(width) <= 1.0 or abs(scaled - units) > 1e-6:
            raise ValueError(f"{where} must be {expected}; got {width!r}.")
    if not 1 <= units <= ffn_hidden_dim:
        raise ValueError(f"{where} must be {expected}; got {width!r}.")
    return units


def resolve_ffn_widths(
    ffn_widths: FfnWidths, num_layers: int, ffn_hidden_dim: int
) -> tuple[int | None, ...]:
    """One FFN hidden width per layer from a call's ``ffn_widths`` (None: the full width).

    ffn_widths: None (every layer at full width: the FFNs run exactly as without
    this argument); one width for every layer; or a sequence of ``num_layers``
    widths, layer 0 first (Mix'n'Match). A width is an int number of hidden
    units in ``[1, ffn_hidden_dim]`` or a float fraction in ``(0, 1]`` of
    ``ffn_hidden_dim`` that gives a whole number of units (``0.25`` of 256 is 64).
    Raises ValueError naming the bad entry otherwise.
    """
    if ffn_widths is None:
        return (None,) * num_layers
    if isinstance(ffn_widths, Sequence) and not isinstance(ffn_widths, str):
        if len(ffn_widths) != num_layers:
            raise ValueError(
                f"ffn_widths: a sequence gives one width per layer, so it needs num_layers="
                f"{num_layers} entries, got {len(ffn_widths)} ({tuple(ffn_widths)!r}); give one "
                "number for the same width in every layer."
            )
        return tuple(
            _resolve_ffn_width(f"ffn_widths[{index}]", width, ffn_hidden_dim)
            for index, width in enumerate(ffn_widths)
        )
    return (_resolve_ffn_width("ffn_widths", ffn_widths, ffn_hidden_dim),) * num_layers


def mix_n_match_widths(
    granularities: Sequence[int], num_layers: int, budget: int
) -> tuple[int, ...]:
    """Per-layer FFN widths within ``budget`` by MatFormer's Mix'n'Match heuristic.

    The paper extracts sub-models between its trained granularities by giving
    layers different widths, and finds best those whose granularity changes
    least across layers and does not decrease with depth. With trained widths
    ``g_1 < ... < g_k`` this returns widths that use two neighbouring
    granularities ``g_i < g_(i+1)``: the first layers at ``g_i`` and the last
    ``n`` at ``g_(i+1)``, ``n`` as large as the budget allows.

    budget: the sum of the layers' FFN hidden widths (an FFN's parameters and
    its FLOPs per token are proportional to its hidden width), at least
    ``num_layers * g_1``; a budget of ``num_layers * g_k`` or more gives the
    full model. Returns ``num_layers`` non-decreasing widths whose sum is at
    most ``budget`` and above ``budget - (g_(i+1) - g_i)``.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(
            f"mix_n_match_widths: num_layers must be a positive int, got {num_layers!r}."
        )
    sizes = sorted(set(granularities))
    if not sizes or any(
        isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1
        for size in sizes
    ):
        raise ValueError(
            "mix_n_match_widths: granularities must be one or more positive int widths, got "
            f"{tuple(granularities)!r}."
        )
    smallest = num_layers * sizes[0]
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < smallest:
        raise ValueError(
            f"mix_n_match_widths: budget must be an int >= num_layers * smallest granularity = "
            f"{num_layers} * {sizes[0]} = {smallest} (the sum of the layers' widths), got "
            f"{budget!r}."
        )
    if budget >= num_layers * sizes[-1]:
        return (int(sizes[-1]),) * num_layers
    # The largest granularity that fits in every layer, then its next size up in as many
    # of the last layers as the rest of the budget pays for.
    lower = max(index for index, size in enumerate(sizes) if num_layers * size <= budget)
    small, large = int(sizes[lower]), int(sizes[lower + 1])
    num_large = (budget - num_layers * small) // (large - small)
    return (small,) * (num_layers - num_large) + (large,) * num_large


def granularity_runs(
    owner: str,
    ffn_widths: FfnWidths,
    ffn_granularities: Sequence[FfnWidths] | None,
    num_layers: int,
    ffn_hidden_dim: int,
) -> list[FfnWidths]:
    """The ``ffn_widths`` of each run of a model call: [one] for a plain call, one per granularity.

    owner: the model's name, for the messages. ffn_widths: the call's widths
    (None: full width); ffn_granularities: None (one run at ``ffn_widths``)
    or a non-empty sequence of G ``ffn_widths`` values, each explicit (not
    None), given without ``ffn_widths``. Every entry is checked here against
    ``num_layers`` layers of width ``ffn_hidden_dim`` (:func:`resolve_ffn_widths`),
    so a bad width fails before anything runs, naming where it came from.
    """
    if ffn_granularities is None:
        resolve_ffn_widths(ffn_widths, num_layers, ffn_hidden_dim)
        return [ffn_widths]
    if ffn_widths is not None:
        raise ValueError(
            f"{owner}: give ffn_widths (one run) or ffn_granularities (one run per "
            f"granularity), not both; got ffn_widths={ffn_widths!r} and "
            f"ffn_granularities={ffn_granularities!r}."
        )
    if (
        not isinstance(ffn_granularities, Sequence)
        or isinstance(ffn_granularities, str)
        or not ffn_granularities
    ):
        raise ValueError(
            f"{owner}: ffn_granularities must be a non-empty sequence of ffn_widths values "
            f"(a width, or one per layer), got {ffn_granularities!r}."
        )
    for index, widths in enumerate(ffn_granularities):
        if widths is None:
            raise ValueError(
                f"{owner}: ffn_granularities[{index}] is None; name the full width "
                f"({ffn_hidden_dim} or 1.0) so that every granularity is explicit."
            )
        try:
            resolve_ffn_widths(widths, num_layers, ffn_hidden_dim)
        except ValueError as error:
            raise ValueError(f"{owner}: ffn_granularities[{index}]: {error}") from None
    return list(ffn_granularities)
