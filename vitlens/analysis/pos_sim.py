"""Cosine similarity of learned position embeddings: Fig. 7 (centre) of the ViT paper (Dosovitskiy et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from vitlens.analysis._common import as_f64, json_float, to_numpy
from vitlens.errors import VitlensError
from vitlens.layout import TokenLayout


@dataclass(frozen=True)
class PositionSimilarity:
    """How similar each patch position's embedding is to every other's, and summaries of the 2-D structure."""

    similarity: np.ndarray  # [H, W, H, W] cosine similarity of position (h1, w1) with position (h2, w2)
    distances: np.ndarray  # [M] int, the rounded grid distances d >= 1 that occur on this grid, ascending
    similarity_by_distance: np.ndarray  # [M] mean similarity over ordered pairs at distance distances[m]
    pairs_by_distance: np.ndarray  # [M] int, how many ordered pairs that mean is over
    row_col_score: float | None  # mean sim. to same row/column minus mean sim. to the rest; None on a 1-row/column grid
    neighbour_minus_far: float | None  # mean sim. at d = 1 minus at the largest d; None when the largest d is 1
    grid_size: tuple[int, int]

    def to_dict(self) -> dict:
        return {
            "grid_size": list(self.grid_size),
            "similarity": self.similarity.tolist(),
            "similarity_by_distance": {
                "distance": self.distances.tolist(),
                "mean_similarity": self.similarity_by_distance.tolist(),
                "num_pairs": self.pairs_by_distance.tolist(),
            },
            "row_col_score": None if self.row_col_score is None else json_float(self.row_col_score),
            "neighbour_minus_far": None if self.neighbour_minus_far is None else json_float(self.neighbour_minus_far),
        }


def position_similarity(pos_embed: torch.Tensor, layout: TokenLayout) -> PositionSimilarity:
    """Cosine similarity of every patch position embedding with every other.

    Distances between positions are Euclidean in patch units (one step along a row or column is 1, whatever the
    patch's pixel shape), rounded to the nearest integer: d = 1 holds the 8 surrounding positions (the diagonal
    sqrt 2 rounds to 1), d = 2 starts two steps away along a row or column.

    Args:
        pos_embed: the model's ``pos_embed[0]``, ``[N_pos, D]`` (a leading batch axis of 1 is accepted); prefix rows,
            if ``layout`` says there are any, are skipped.
        layout: the model's token layout.

    Raises:
        VitlensError: the model has no position embedding, the shape does not fit ``layout``, or the grid is 1x1.
    """
    if not layout.has_pos_embed:
        raise VitlensError("model has no learned absolute position embedding to compare")
    if pos_embed.ndim == 3 and pos_embed.shape[0] == 1:
        pos_embed = pos_embed[0]
    rows = layout.pos_embed_patch_slice()
    if pos_embed.ndim != 2 or pos_embed.shape[0] != rows.stop:
        raise VitlensError(
            f"expected a position embedding of {rows.stop} rows ({layout.num_patches} patches"
            f"{f' + {rows.start} prefix' if rows.start else ''}) by D, got shape {list(pos_embed.shape)}"
        )
    h, w = layout.grid_size
    if h * w < 2:
        raise VitlensError("a 1x1 patch grid has one position: there is nothing to compare it with")

    pe = as_f64(pos_embed)[rows]  # [HW, D], on the CPU for MPS (no float64)
    unit = F.normalize(pe, dim=-1)
    cos = unit @ unit.T  # [HW, HW]

    # Integer grid coordinates of each patch in row-major order, and rounded Euclidean distances between them.
    rr, cc = torch.meshgrid(
        torch.arange(h, device=cos.device, dtype=torch.float64),
        torch.arange(w, device=cos.device, dtype=torch.float64),
        indexing="ij",
    )
    coords = rearrange(torch.stack([rr, cc], dim=-1), "h w two -> (h w) two")  # [HW, 2]
    dist = torch.cdist(coords, coords).round().long()  # [HW, HW]
    same_line = (coords[:, None, 0] == coords[None, :, 0]) | (coords[:, None, 1] == coords[None, :, 1])  # [HW, HW]
    off_diag = ~torch.eye(h * w, dtype=torch.bool, device=cos.device)

    dist_np = to_numpy(dist).astype(np.int64)
    cos_np = to_numpy(cos)
    distances = np.unique(dist_np[dist_np > 0])
    by_dist = np.array([cos_np[dist_np == d].mean() for d in distances])
    counts = np.array([int((dist_np == d).sum()) for d in distances], dtype=np.int64)

    line_pairs = same_line & off_diag
    rest = ~same_line
    row_col = None
    if rest.any():  # a single row or column has every position on one line
        row_col = float(cos[line_pairs].mean() - cos[rest].mean())
    near_far = None if distances[-1] < 2 else float(by_dist[0] - by_dist[-1])

    return PositionSimilarity(
        similarity=rearrange(cos_np, "(h1 w1) (h2 w2) -> h1 w1 h2 w2", h1=h, h2=h),  # [H, W, H, W]
        distances=distances.astype(np.int64),
        similarity_by_distance=by_dist.astype(np.float64),
        pairs_by_distance=counts,
        row_col_score=row_col,
        neighbour_minus_far=near_far,
        grid_size=(h, w),
    )
