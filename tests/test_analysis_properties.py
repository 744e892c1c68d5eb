"""Properties of the analyses on random inputs of random shapes (hypothesis), and the package's import hygiene."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitlens.analysis import (
    RolloutAccumulator,
    attention_distance_per_image,
    attention_rollout,
    cls_attention_per_head,
    filter_pca,
    mean_attention_distance,
    position_similarity,
)
from vitlens.layout import TokenLayout

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def layouts(draw) -> TokenLayout:
    grid = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    patch = (draw(st.integers(1, 32)), draw(st.integers(1, 32)))
    num_prefix = draw(st.integers(0, 5))
    if num_prefix == 0:
        kinds: tuple = ()
    else:
        first = draw(st.sampled_from(["cls", "reg"]))
        second = draw(st.sampled_from(["dist", "reg"])) if first == "cls" else "reg"
        kinds = (first, *([second] if num_prefix > 1 else []), *(["reg"] * (num_prefix - 2)))
    return TokenLayout(grid_size=grid, patch_size=patch, prefix_kinds=kinds)


def random_attention(layout: TokenLayout, seed: int, b: int = 2, heads: int = 2) -> torch.Tensor:
    """Row-stochastic [B, heads, N, N], peaked or flat depending on the seed's temperature."""
    g = torch.Generator().manual_seed(seed)
    n = layout.num_tokens
    temperature = 0.1 + 5 * torch.rand(1, generator=g, dtype=torch.float64)
    return (torch.randn(b, heads, n, n, generator=g, dtype=torch.float64) * temperature).softmax(-1)


@SETTINGS
@given(layout=layouts(), seed=st.integers(0, 2**31 - 1), renormalize=st.booleans())
def test_distance_within_grid_diagonal(layout, seed, renormalize):
    (h, w), (ph, pw) = layout.grid_size, layout.patch_size
    diagonal = math.hypot((h - 1) * ph, (w - 1) * pw)  # farthest pair of patch centres
    dist, mass = attention_distance_per_image(random_attention(layout, seed), layout, renormalize=renormalize)
    assert torch.all(dist >= 0) and torch.all(dist <= diagonal * (1 + 1e-12))
    assert torch.all(mass >= 0) and torch.all(mass <= 1 + 1e-12)
    if layout.num_prefix_tokens == 0:
        assert torch.all(mass == 0)
    out = mean_attention_distance([random_attention(layout, seed)], layout, renormalize=renormalize)
    assert 0 <= out.uniform_px <= diagonal * (1 + 1e-12)


@SETTINGS
@given(
    layout=layouts(),
    seed=st.integers(0, 2**31 - 1),
    head_fusion=st.sampled_from(["mean", "max", "min"]),
    discard_ratio=st.sampled_from([0.0, 0.3, 0.9]),
    depth=st.integers(1, 4),
)
def test_rollout_rows_stochastic_and_maps_in_unit_range(layout, seed, head_fusion, discard_ratio, depth):
    acc = RolloutAccumulator(layout, head_fusion=head_fusion, discard_ratio=discard_ratio)
    for layer in range(depth):
        acc.update(layer, random_attention(layout, seed + layer))
    np.testing.assert_allclose(acc.running.sum(-1).numpy(), 1.0, atol=1e-10)
    targets = ["mean-patch", *(["cls"] if layout.has_class_token else [])]
    for target in targets:
        maps = acc.result(target=target).maps
        assert maps.shape == (2, *layout.grid_size)
        assert np.all(maps >= 0) and np.all(maps <= 1 + 1e-12)


@SETTINGS
@given(layout=layouts(), seed=st.integers(0, 2**31 - 1), dim=st.integers(1, 16))
def test_position_similarity_is_a_cosine(layout, seed, dim):
    if layout.num_patches < 2:
        return  # a 1x1 grid is an error, tested in test_analysis_pos_sim.py
    rows = layout.pos_embed_patch_slice().stop
    pe = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = position_similarity(pe, layout)
    assert np.all(np.abs(out.similarity) <= 1 + 1e-12)
    assert np.all(np.abs(out.similarity_by_distance) <= 1 + 1e-12)
    assert out.pairs_by_distance.sum() == layout.num_patches * (layout.num_patches - 1)


ACCELERATORS = [d for d, ok in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())) if ok]


@pytest.mark.skipif(not ACCELERATORS, reason="no CUDA or MPS device")
@pytest.mark.parametrize("device", ACCELERATORS)
def test_accelerator_matches_cpu(device):
    layout = TokenLayout(grid_size=(3, 5), patch_size=(16, 8), prefix_kinds=("cls", "reg"))
    layers = [random_attention(layout, seed, b=3, heads=4).float() for seed in range(3)]
    on_device = [a.to(device) for a in layers]
    pe = torch.randn(layout.num_tokens, 16)
    weight = torch.randn(32, 3, 16, 8)
    pairs = [
        (mean_attention_distance(layers, layout).distance_px, mean_attention_distance(on_device, layout).distance_px),
        (
            attention_rollout(layers, layout, discard_ratio=0.5).maps,
            attention_rollout(on_device, layout, discard_ratio=0.5).maps,
        ),
        (cls_attention_per_head(layers[0], layout), cls_attention_per_head(on_device[0], layout)),
        (position_similarity(pe, layout).similarity, position_similarity(pe.to(device), layout).similarity),
        (
            filter_pca(weight, num_components=8).explained_variance_ratio,
            filter_pca(weight.to(device), num_components=8).explained_variance_ratio,
        ),
    ]
    for cpu, dev in pairs:
        assert isinstance(dev, np.ndarray)
        np.testing.assert_allclose(dev, cpu, rtol=1e-4, atol=1e-5)
