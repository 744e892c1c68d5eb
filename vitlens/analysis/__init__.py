"""Pure analyses of a ViT (tensors in, frozen dataclasses out), after §4.5 and App. D of Dosovitskiy et al. 2020."""

from vitlens.analysis.attention_distance import (
    AttentionDistance,
    AttentionDistanceAccumulator,
    attention_distance_per_image,
    mean_attention_distance,
    patch_centres_px,
    patch_distances_px,
    uniform_attention_distance_px,
)
from vitlens.analysis.filters import PAPER_NUM_COMPONENTS, FilterPCA, filter_pca
from vitlens.analysis.pos_sim import PositionSimilarity, position_similarity
from vitlens.analysis.rollout import (
    HeadFusion,
    Rollout,
    RolloutAccumulator,
    RolloutTarget,
    attention_rollout,
    cls_attention_per_head,
    fuse_heads,
    resolve_target,
    rollout_layer_matrix,
)

__all__ = [
    "PAPER_NUM_COMPONENTS",
    "AttentionDistance",
    "AttentionDistanceAccumulator",
    "FilterPCA",
    "HeadFusion",
    "PositionSimilarity",
    "Rollout",
    "RolloutAccumulator",
    "RolloutTarget",
    "attention_distance_per_image",
    "attention_rollout",
    "cls_attention_per_head",
    "filter_pca",
    "fuse_heads",
    "mean_attention_distance",
    "patch_centres_px",
    "patch_distances_px",
    "position_similarity",
    "resolve_target",
    "rollout_layer_matrix",
    "uniform_attention_distance_px",
]
