"""Properties the existing hypothesis tests (test_analysis_properties.py) leave out: filter PCA on random and
degenerate weights, per-head target attention, and the scale invariance of the position similarity.

Distances within the grid diagonal, row-stochastic rollout and cosines in [-1, 1] are already covered there.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_analysis_properties import layouts, random_attention
from vitlens.analysis import cls_attention_per_head, filter_pca, position_similarity

SETTINGS = settings(max_examples=30, deadline=None)


@SETTINGS
@given(
    d=st.integers(1, 12),
    c=st.sampled_from([1, 3]),
    ph=st.integers(1, 5),
    pw=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    constant=st.booleans(),
)
def test_filter_pca_is_finite_sorted_and_sums_to_at_most_one(d, c, ph, pw, seed, constant):
    g = torch.Generator().manual_seed(seed)
    if constant:  # every filter the same: zero variance, a 0/0 the analysis must not produce
        weight = torch.randn(1, c, ph, pw, generator=g, dtype=torch.float64).expand(d, c, ph, pw).clone()
    else:
        weight = torch.randn(d, c, ph, pw, generator=g, dtype=torch.float64)
    out = filter_pca(weight)
    ratio = out.explained_variance_ratio
    assert np.all(np.isfinite(ratio)) and np.all(np.isfinite(out.components))
    assert np.all(ratio >= 0) and ratio.sum() <= 1 + 1e-9
    assert np.all(np.diff(ratio) <= 1e-12) and np.all(np.diff(out.singular_values) <= 1e-9)
    if constant or d == 1:
        assert np.all(ratio == 0)
    np.testing.assert_allclose(out.mean_filter, weight.mean(0).numpy(), atol=1e-12)


@SETTINGS
@given(layout=layouts(), seed=st.integers(0, 2**31 - 1))
def test_target_attention_per_head_is_a_sub_distribution(layout, seed):
    attn = random_attention(layout, seed, b=2, heads=3)
    targets = ["mean-patch", *(["cls"] if layout.has_class_token else [])]
    for target in targets:
        maps = cls_attention_per_head(attn, layout, target=target)
        assert maps.shape == (2, 3, *layout.grid_size)
        # Weights on patches only: a share of a row that sums to 1 (prefix tokens take the rest).
        assert np.all(maps >= 0) and np.all(maps.sum(axis=(2, 3)) <= 1 + 1e-9)


@SETTINGS
@given(
    layout=layouts(),
    seed=st.integers(0, 2**31 - 1),
    dim=st.integers(1, 8),
    scale=st.floats(1e-3, 1e3),
)
def test_position_similarity_ignores_the_scale_of_each_embedding(layout, seed, dim, scale):
    if layout.num_patches < 2:
        return  # a 1x1 grid is an error (tested in test_analysis_pos_sim.py and through the CLI)
    g = torch.Generator().manual_seed(seed)
    rows = layout.pos_embed_patch_slice().stop
    pe = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    per_row = scale * (0.5 + torch.rand(rows, 1, generator=g, dtype=torch.float64))  # positive, row by row
    a, b = position_similarity(pe, layout), position_similarity(pe * per_row, layout)
    np.testing.assert_allclose(a.similarity, b.similarity, atol=1e-9)
    assert np.all(np.isfinite(a.similarity_by_distance))
