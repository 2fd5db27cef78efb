"""effformer.reducers: token reduction inside and between blocks.

:mod:`effformer.reducers.tome` is token merging (ToMe): bipartite soft
matching, size-weighted merging and proportional attention, used by the
vision Transformers of :mod:`effformer.models.vit` through ``tome_r``.
"""

from effformer.reducers.tome import (
    SizeWeightedSeqPool,
    bipartite_soft_matching,
    compose_token_map,
    max_merges,
    merge_schedule,
    merge_tokens,
    proportional_attention_bias,
    size_weighted_mean,
    unmerge_tokens,
)

__all__ = [
    "SizeWeightedSeqPool",
    "bipartite_soft_matching",
    "compose_token_map",
    "max_merges",
    "merge_schedule",
    "merge_tokens",
    "proportional_attention_bias",
    "size_weighted_mean",
    "unmerge_tokens",
]
