"""effformer.reducers: token reduction inside and between blocks.

:mod:`effformer.reducers.tome` is token merging (ToMe): bipartite soft
matching, size-weighted merging and proportional attention, used by the
vision Transformers of :mod:`effformer.models.vit` through ``tome_r``.
:mod:`effformer.reducers.zero_tprune` is zero-shot token pruning
(Zero-TPrune): weighted page rank over the attention graph, importance- and
similarity-based pruning, used through ``zero_tprune_importance`` /
``zero_tprune_similarity``.
:mod:`effformer.reducers.ia_red` is IA-RED²: multi-head interpreters that drop
patch tokens before groups of blocks, trained by REINFORCE, used through
``ia_red_stages`` / ``ia_red_top_k``.
"""

from effformer.reducers.ia_red import (
    MultiHeadInterpreter,
    decision_log_prob,
    reinforce_loss,
    sample_decisions,
    threshold_decisions,
    top_k_keep,
)
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
from effformer.reducers.zero_tprune import (
    aggregate_heads,
    gather_tokens,
    importance_stage,
    max_similarity_pruned,
    prune_schedule,
    similarity_stage,
    token_importance,
    weighted_page_rank,
    wpr_iterations,
    zero_tprune,
)

__all__ = [
    "MultiHeadInterpreter",
    "decision_log_prob",
    "reinforce_loss",
    "sample_decisions",
    "threshold_decisions",
    "top_k_keep",
    "SizeWeightedSeqPool",
    "aggregate_heads",
    "gather_tokens",
    "importance_stage",
    "max_similarity_pruned",
    "prune_schedule",
    "similarity_stage",
    "token_importance",
    "weighted_page_rank",
    "wpr_iterations",
    "zero_tprune",
    "bipartite_soft_matching",
    "compose_token_map",
    "max_merges",
    "merge_schedule",
    "merge_tokens",
    "proportional_attention_bias",
    "size_weighted_mean",
    "unmerge_tokens",
]
