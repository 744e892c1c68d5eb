"""Position-embedding similarity (ViT paper Fig. 7 centre) on 2-D sin-cos embeddings and a plain numpy reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vitlens.analysis import position_similarity
from vitlens.errors import VitlensError
from vitlens.layout import TokenLayout


def sincos_2d(h: int, w: int, dim: int = 64) -> np.ndarray:
    """2-D sin-cos embedding [H*W, dim], row-major: the first half encodes the row, the second the column.

    For a coordinate p and k = 0 .. dim/4 - 1 with omega_k = 1 / 10000 ** (k / (dim / 4)), one coordinate's
    half is [sin(p * omega_0), ..., sin(p * omega_{dim/4-1}), cos(p * omega_0), ..., cos(p * omega_{dim/4-1})].
    """
    quarter = dim // 4
    out = np.zeros((h * w, dim))
    for r in range(h):
        for c in range(w):
            row = []
            for p in (r, c):
                omegas = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
                row += [math.sin(p * o) for o in omegas] + [math.cos(p * o) for o in omegas]
            out[r * w + c] = row
    return out


def plain_cosine(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
    return out


def with_prefix(patch_rows: np.ndarray, num_prefix: int, seed: int = 0) -> torch.Tensor:
    """Garbage prefix rows (large, random) stacked above the patch rows."""
    garbage = np.random.default_rng(seed).normal(scale=100.0, size=(num_prefix, patch_rows.shape[1]))
    return torch.from_numpy(np.concatenate([garbage, patch_rows]))


def test_sincos_similarity_falls_with_distance():
    layout = TokenLayout(grid_size=(8, 8), patch_size=(16, 16))
    pe = sincos_2d(8, 8)
    out = position_similarity(with_prefix(pe, 1), layout)
    assert out.similarity.shape == (8, 8, 8, 8)
    assert list(out.distances[:4]) == [1, 2, 3, 4]
    assert np.all(np.diff(out.similarity_by_distance[:4]) < 0)
    assert out.row_col_score > 0  # sin-cos is additive in row and column: same row/column shares half the vector
    assert out.neighbour_minus_far > 0


def test_matches_plain_cosine_and_is_symmetric():
    layout = TokenLayout(grid_size=(4, 5), patch_size=(16, 8))
    pe = np.random.default_rng(1).normal(size=(20, 12))
    out = position_similarity(with_prefix(pe, 1), layout)
    flat = out.similarity.reshape(20, 20)
    np.testing.assert_allclose(flat, plain_cosine(pe), atol=1e-12)
    np.testing.assert_allclose(flat, flat.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(flat), np.ones(20), atol=1e-12)
    assert out.similarity[1, 3, 2, 0] == pytest.approx(flat[1 * 5 + 3, 2 * 5 + 0])


def test_summaries_match_plain_loops():
    h, w = 4, 5
    layout = TokenLayout(grid_size=(h, w), patch_size=(16, 16), prefix_kinds=())
    pe = np.random.default_rng(2).normal(size=(h * w, 8))
    cos = plain_cosine(pe)
    by_d: dict[int, list[float]] = {}
    line, rest = [], []
    for i in range(h * w):
        for j in range(h * w):
            if i == j:
                continue
            (r1, c1), (r2, c2) = divmod(i, w), divmod(j, w)
            by_d.setdefault(round(math.hypot(r1 - r2, c1 - c2)), []).append(cos[i, j])
            (line if r1 == r2 or c1 == c2 else rest).append(cos[i, j])
    out = position_similarity(torch.from_numpy(pe), layout)
    assert list(out.distances) == sorted(by_d)
    np.testing.assert_allclose(out.similarity_by_distance, [np.mean(by_d[d]) for d in sorted(by_d)], atol=1e-12)
    assert list(out.pairs_by_distance) == [len(by_d[d]) for d in sorted(by_d)]
    assert out.row_col_score == pytest.approx(np.mean(line) - np.mean(rest), abs=1e-12)
    d_max = max(by_d)
    assert out.neighbour_minus_far == pytest.approx(np.mean(by_d[1]) - np.mean(by_d[d_max]), abs=1e-12)
    json.dumps(out.to_dict())


@pytest.mark.parametrize(
    ("layout", "num_garbage_rows"),
    [
        (TokenLayout(grid_size=(3, 5), patch_size=(16, 8), prefix_kinds=("cls",)), 1),
        (TokenLayout(grid_size=(3, 5), patch_size=(16, 16), prefix_kinds=("cls", "reg", "reg", "reg", "reg")), 5),
        (TokenLayout(grid_size=(5, 3), patch_size=(16, 16), prefix_kinds=("cls", "dist")), 2),
        (TokenLayout(grid_size=(3, 5), patch_size=(16, 16), prefix_kinds=()), 0),
        # no_embed_class: the model has prefix tokens but pos_embed has rows for the patches only
        (
            TokenLayout(
                grid_size=(3, 5), patch_size=(16, 16), prefix_kinds=("cls", "reg"), pos_embed_includes_prefix=False
            ),
            0,
        ),
    ],
)
def test_prefix_rows_are_dropped(layout, num_garbage_rows):
    h, w = layout.grid_size
    pe = sincos_2d(h, w, dim=16)
    out = position_similarity(with_prefix(pe, num_garbage_rows), layout)
    np.testing.assert_allclose(out.similarity.reshape(h * w, h * w), plain_cosine(pe), atol=1e-12)


def test_leading_batch_axis_and_float32():
    layout = TokenLayout(grid_size=(3, 3), patch_size=(16, 16))
    pe = with_prefix(sincos_2d(3, 3, dim=16), 1)
    out = position_similarity(pe[None].float(), layout)
    np.testing.assert_allclose(out.similarity.reshape(9, 9), plain_cosine(sincos_2d(3, 3, dim=16)), atol=1e-6)


def test_single_row_has_no_row_col_score():
    layout = TokenLayout(grid_size=(1, 4), patch_size=(16, 16), prefix_kinds=())
    out = position_similarity(torch.from_numpy(sincos_2d(1, 4, dim=16)), layout)
    assert out.row_col_score is None
    assert list(out.distances) == [1, 2, 3]
    assert out.to_dict()["row_col_score"] is None


def test_two_by_two_has_no_far_pairs():
    layout = TokenLayout(grid_size=(2, 2), patch_size=(16, 16), prefix_kinds=())
    out = position_similarity(torch.from_numpy(sincos_2d(2, 2, dim=16)), layout)
    assert list(out.distances) == [1]  # sqrt(2) rounds to 1
    assert out.neighbour_minus_far is None


def test_one_by_one_grid_is_an_error():
    layout = TokenLayout(grid_size=(1, 1), patch_size=(16, 16))
    with pytest.raises(VitlensError, match="1x1"):
        position_similarity(torch.randn(2, 8), layout)


def test_wrong_row_count_is_an_error():
    layout = TokenLayout(grid_size=(3, 3), patch_size=(16, 16))
    with pytest.raises(VitlensError, match="10 rows"):
        position_similarity(torch.randn(9, 8), layout)


def test_model_without_pos_embed_is_an_error():
    layout = TokenLayout(grid_size=(3, 3), patch_size=(16, 16), has_pos_embed=False)
    with pytest.raises(VitlensError, match="no learned"):
        position_similarity(torch.randn(10, 8), layout)
