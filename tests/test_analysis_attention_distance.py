"""Mean attention distance (ViT paper App. D.7) on hand-built attention with known answers and plain loops."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vitlens.analysis import (
    AttentionDistanceAccumulator,
    attention_distance_per_image,
    mean_attention_distance,
    patch_distances_px,
)
from vitlens.errors import ParameterError, VitlensError
from vitlens.layout import TokenLayout

# Non-square grid (3 rows, 5 columns) of non-square patches (16 px tall, 8 px wide), class token + 2 registers.
LAYOUT = TokenLayout(grid_size=(3, 5), patch_size=(16, 8), prefix_kinds=("cls", "reg", "reg"))
P, HW, N = 3, 15, 18


def centre(layout: TokenLayout, k: int) -> tuple[float, float]:
    r, c = divmod(k, layout.grid_size[1])
    return (r + 0.5) * layout.patch_size[0], (c + 0.5) * layout.patch_size[1]


def pixel_distance(layout: TokenLayout, i: int, j: int) -> float:
    (y1, x1), (y2, x2) = centre(layout, i), centre(layout, j)
    return math.hypot(y1 - y2, x1 - x2)


def plain_distance(attn: np.ndarray, layout: TokenLayout, renormalize: bool) -> tuple[float, float]:
    """One image, one head: (mean over patch queries of sum_j a_ij d_ij, mean prefix mass), with loops."""
    p, hw = layout.num_prefix_tokens, layout.num_patches
    total, mass = 0.0, 0.0
    for i in range(hw):
        row = attn[p + i]
        patch_weight = sum(row[p + j] for j in range(hw))
        d = sum(row[p + j] * pixel_distance(layout, i, j) for j in range(hw))
        total += d / patch_weight if renormalize else d
        mass += sum(row[:p])
    return total / hw, mass / hw


def random_attention(b: int, heads: int, n: int, seed: int, sink: float = 0.0) -> torch.Tensor:
    """Row-stochastic [B, heads, N, N]; ``sink`` adds logit to key 0 (an attention sink)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, heads, n, n, generator=g, dtype=torch.float64) * 2
    logits[..., 0] += sink
    return logits.softmax(-1)


def test_patch_distances_px():
    d = patch_distances_px(LAYOUT)
    assert d.shape == (HW, HW) and d.dtype == torch.float64
    assert d[0, 1] == 8.0  # one column: the patch width
    assert d[0, 5] == 16.0  # one row: the patch height
    assert d[0, 14] == pytest.approx(math.hypot(2 * 16, 4 * 8))


def test_identity_attention_is_zero():
    attn = torch.eye(N, dtype=torch.float64).expand(2, 4, N, N)
    for renormalize in (True, False):
        dist, mass = attention_distance_per_image(attn, LAYOUT, renormalize=renormalize)
        assert dist.shape == (2, 4)
        assert torch.all(dist == 0) and torch.all(mass == 0)


def test_uniform_over_patches_is_the_analytic_uniform_distance():
    expected = sum(pixel_distance(LAYOUT, i, j) for i in range(HW) for j in range(HW)) / HW**2
    attn = torch.zeros(1, 2, N, N, dtype=torch.float64)
    attn[..., P:] = 1.0 / HW  # every row (prefix rows included, they are ignored) uniform over the patches
    out = mean_attention_distance([attn], LAYOUT)
    np.testing.assert_allclose(out.distance_px, expected, rtol=1e-12)
    assert out.uniform_px == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(out.prefix_mass, 0.0)


def four_neighbour_attention(layout: TokenLayout) -> torch.Tensor:
    """[1, 1, N, N]: each patch query splits its mass evenly over its 4 (fewer at borders) grid neighbours."""
    (h, w), p = layout.grid_size, layout.num_prefix_tokens
    attn = torch.zeros(1, 1, layout.num_tokens, layout.num_tokens, dtype=torch.float64)
    attn[0, 0, :p, 0] = 1.0
    for r in range(h):
        for c in range(w):
            nbrs = [
                (r + dr, c + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)) if 0 <= r + dr < h and 0 <= c + dc < w
            ]
            for rr, cc in nbrs:
                attn[0, 0, p + r * w + c, p + rr * w + cc] = 1.0 / len(nbrs)
    return attn


def test_four_neighbours_non_square():
    (h, w), (ph, pw) = LAYOUT.grid_size, LAYOUT.patch_size
    # By hand: a neighbour above/below is ph away, left/right pw away; average over each query's neighbours.
    expected = 0.0
    for r in range(h):
        for c in range(w):
            steps = [ph for rr in (r - 1, r + 1) if 0 <= rr < h] + [pw for cc in (c - 1, c + 1) if 0 <= cc < w]
            expected += sum(steps) / len(steps)
    expected /= h * w
    dist, _ = attention_distance_per_image(four_neighbour_attention(LAYOUT), LAYOUT)
    assert dist.item() == pytest.approx(expected, rel=1e-12)
    # An interior query's distance is the mean of the patch height and width: check query (1, 2) alone.
    only_interior = torch.zeros(1, 1, N, N, dtype=torch.float64)
    q = P + 1 * w + 2
    only_interior[0, 0, q] = four_neighbour_attention(LAYOUT)[0, 0, q]
    # the other queries have no weight, so with renormalize=False they add 0 to the mean over the HW queries
    alone, _ = attention_distance_per_image(only_interior, LAYOUT, renormalize=False)
    assert alone.item() * HW == pytest.approx((ph + pw) / 2, rel=1e-12)


def test_four_neighbours_square_patches_is_exactly_patch_size():
    layout = TokenLayout(grid_size=(4, 6), patch_size=(14, 14), prefix_kinds=("cls",))
    dist, _ = attention_distance_per_image(four_neighbour_attention(layout), layout)
    assert dist.item() == pytest.approx(14.0, rel=1e-12)


def test_prefix_mass_and_renormalize():
    # Every patch query gives 0.6 to the prefix (0.2 each) and 0.4 uniformly to the patches.
    attn = torch.zeros(1, 1, N, N, dtype=torch.float64)
    attn[..., :P] = 0.6 / P
    attn[..., P:] = 0.4 / HW
    uniform = sum(pixel_distance(LAYOUT, i, j) for i in range(HW) for j in range(HW)) / HW**2
    on = mean_attention_distance([attn], LAYOUT, renormalize=True)
    off = mean_attention_distance([attn], LAYOUT, renormalize=False)
    assert on.distance_px.item() == pytest.approx(uniform, rel=1e-12)
    assert off.distance_px.item() == pytest.approx(0.4 * uniform, rel=1e-12)
    assert on.prefix_mass.item() == pytest.approx(0.6) and off.prefix_mass.item() == pytest.approx(0.6)
    assert on.renormalized and not off.renormalized


@pytest.mark.parametrize("renormalize", [True, False])
# The reduction walks the 2 x 3 query blocks in chunks: all at once, one by one, and 4 then 2 (an uneven split).
@pytest.mark.parametrize("chunk_bytes", [None, 1, 4 * HW * N * 8 + 7])
def test_random_attention_matches_plain_loops(renormalize, chunk_bytes):
    attn = random_attention(2, 3, N, seed=3, sink=2.0)
    dist, mass = attention_distance_per_image(attn, LAYOUT, renormalize=renormalize, chunk_bytes=chunk_bytes)
    for b in range(2):
        for h in range(3):
            d, m = plain_distance(attn[b, h].numpy(), LAYOUT, renormalize)
            assert dist[b, h].item() == pytest.approx(d, rel=1e-12)
            assert mass[b, h].item() == pytest.approx(m, rel=1e-12)


def test_batches_of_one_equal_all_at_once():
    layers = [random_attention(6, 4, N, seed=10 + layer, sink=1.0) for layer in range(3)]
    together = mean_attention_distance(layers, LAYOUT)
    acc = AttentionDistanceAccumulator(LAYOUT, depth=3, num_heads=4)
    for b in range(6):
        for layer in range(3):
            acc.update(layer, layers[layer][b : b + 1])
    one_by_one = acc.result()
    assert together.num_images == one_by_one.num_images == 6
    np.testing.assert_allclose(one_by_one.distance_px, together.distance_px, rtol=1e-12)
    np.testing.assert_allclose(one_by_one.std_px, together.std_px, rtol=1e-9)
    np.testing.assert_allclose(one_by_one.prefix_mass, together.prefix_mass, rtol=1e-12)
    # std is the population std over images of the per-image distance
    per_image = np.stack([attention_distance_per_image(a, LAYOUT)[0].numpy() for a in layers])  # [L, B, heads]
    np.testing.assert_allclose(together.std_px, per_image.std(axis=1), rtol=1e-9)
    np.testing.assert_allclose(together.distance_px, per_image.mean(axis=1), rtol=1e-12)


def test_state_size_does_not_grow_with_images():
    acc = AttentionDistanceAccumulator(LAYOUT, depth=2, num_heads=3)
    assert acc.state() == {} and acc.num_images == 0
    attn = random_attention(2, 3, N, seed=4)
    for layer in range(2):
        acc.update(layer, attn)
    sizes_after_2 = {k: tuple(v.shape) for k, v in acc.state().items()}
    for _ in range(99):
        for layer in range(2):
            acc.update(layer, attn)
    assert acc.num_images == 200
    assert {k: tuple(v.shape) for k, v in acc.state().items()} == sizes_after_2
    assert sum(v.numel() for v in acc.state().values()) == 3 * 2 * 3 + 2


def test_result_fields_and_json():
    out = mean_attention_distance([random_attention(2, 3, N, seed=5)], LAYOUT)
    assert out.distance_px.shape == out.std_px.shape == out.prefix_mass.shape == (1, 3)
    assert out.patch_size == (16, 8) and out.grid_size == (3, 5)
    d = json.loads(json.dumps(out.to_dict()))
    assert d["num_images"] == 2 and d["renormalized"] is True


def test_low_precision_input():
    attn = random_attention(2, 3, N, seed=6)
    full = mean_attention_distance([attn], LAYOUT)
    half = mean_attention_distance([attn.to(torch.bfloat16)], LAYOUT)
    np.testing.assert_allclose(half.distance_px, full.distance_px, rtol=2e-2)


def test_errors():
    acc = AttentionDistanceAccumulator(LAYOUT, depth=2, num_heads=3)
    with pytest.raises(VitlensError, match="no attention"):
        acc.result()
    with pytest.raises(VitlensError, match=r"\[B, heads, 18, 18\]"):
        acc.update(0, torch.rand(1, 3, 17, 17))
    with pytest.raises(VitlensError, match="heads"):
        acc.update(0, random_attention(1, 4, N, seed=0))
    with pytest.raises(VitlensError, match="layer 2"):
        acc.update(2, random_attention(1, 3, N, seed=0))
    acc.update(0, random_attention(1, 3, N, seed=0))
    with pytest.raises(VitlensError, match="different numbers"):
        acc.result()
    with pytest.raises(ParameterError, match="^depth must be positive, not 0") as info:
        AttentionDistanceAccumulator(LAYOUT, depth=0, num_heads=3)
    assert info.value.param == "depth"
    with pytest.raises(VitlensError, match="no attention"):
        mean_attention_distance([], LAYOUT)
