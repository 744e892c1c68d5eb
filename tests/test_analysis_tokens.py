"""Token norms, outliers and sinks on tiny fixtures: a planted high-norm token is found at its layer and position,
a plain model has none, the norm statistics equal a plain computation from timm's ``forward_intermediates``,
sink shares equal a plain computation from captured attention, the neighbour similarity of the input patches
equals a plain loop over the grid, and nothing depends on the batch size."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.conftest import make_vit
from vitlens.analysis.tokens import (
    AUTO_MIN_GAP_DECADES,
    auto_threshold,
    histogram_quantile,
    norm_bin_edges,
    token_image_maps,
)
from vitlens.capture import attention_capture
from vitlens.data import open_dataset
from vitlens.definitions.tokens import tokens
from vitlens.errors import ParameterError
from vitlens.layout import Preprocess, TokenLayout
from vitlens.models.vit import ViT

NUM_IMAGES = 6
PLANT_LAYER, PLANT_POS = 1, (2, 1)  # block 1 writes a large vector into patch row 2, column 1
BIG = 1000.0


def _vit(name: str, *, planted: bool = False, depth: int = 3) -> ViT:
    torch.manual_seed(0)
    model = make_vit(name)
    while len(model.blocks) < depth:  # the fixtures have 2 blocks: a third shows the outlier staying
        model.blocks.append(copy.deepcopy(model.blocks[-1]))
    vit = ViT(model, Preprocess(img_size=tuple(model.patch_embed.img_size)))
    if planted:
        layout = vit.layout
        index = layout.patch_slice.start + PLANT_POS[0] * layout.grid_size[1] + PLANT_POS[1]
        big = torch.zeros(model.embed_dim)
        big[0] = BIG

        def plant(_module, _inputs, output):
            output = output.clone()
            output[:, index] = output[:, index] + big
            return output

        model.blocks[PLANT_LAYER].register_forward_hook(plant)
    return vit


def _data(vit: ViT, n: int = NUM_IMAGES):
    return open_dataset("digits", vit.preprocess, num_images=n)


def _images(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


@pytest.mark.parametrize("name", ["reg", "distilled", "gap", "nonsquare"])
def test_planted_outlier_is_found_at_its_layer_and_position(name):
    vit = _vit(name, planted=True)
    result = tokens(vit, _data(vit), batch_size=4).norms
    h, w = vit.layout.grid_size
    assert result.threshold_auto and np.isfinite(result.threshold) and 10 < result.threshold < BIG
    expected = np.zeros(3)
    expected[PLANT_LAYER:] = 1 / (h * w)  # the token keeps its norm in the residual stream after block 1
    np.testing.assert_allclose(result.outlier_fraction, expected)
    np.testing.assert_allclose(result.images_with_outliers, (expected > 0).astype(float))
    grid = np.zeros((3, h, w))
    grid[PLANT_LAYER:, PLANT_POS[0], PLANT_POS[1]] = 1.0
    np.testing.assert_array_equal(result.outlier_map, grid)


@pytest.mark.parametrize("name", ["cls", "reg", "gap"])
def test_a_model_without_outliers_reports_none(name):
    vit = _vit(name)
    result = tokens(vit, _data(vit)).norms
    assert result.threshold == float("inf") and result.threshold_auto
    assert not result.outlier_fraction.any() and not result.images_with_outliers.any()
    assert not result.outlier_map.any()
    assert not np.nan_to_num(result.sink_shares("cls")["outliers"]).any()


@pytest.mark.parametrize("name", ["reg", "distilled", "gap"])
def test_norm_statistics_equal_forward_intermediates(name):
    vit = _vit(name, planted=True)
    data = _data(vit)
    result = tokens(vit, data, norm_threshold=50.0).norms
    with torch.no_grad():
        out = vit.model.forward_intermediates(
            _images(data), indices=[0, 1, 2], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
    edges = norm_bin_edges()
    layout = vit.layout
    for r, item in enumerate(out):
        patches, prefix = item if isinstance(item, tuple) else (item, None)
        groups = {"patch": patches.norm(dim=-1).double().numpy().ravel()}
        for kind in set(layout.prefix_kinds):
            idx = [i for i, k in enumerate(layout.prefix_kinds) if k == kind]
            groups[kind] = prefix[:, idx].norm(dim=-1).double().numpy().ravel()
        assert set(groups) == set(result.kinds)
        for kind, values in groups.items():
            k = result.kind(kind)
            counts = np.histogram(values, bins=edges)[0]
            np.testing.assert_array_equal(result.histograms[k, r], counts)
            assert result.histograms[k, r].sum() == result.num_tokens[k] == values.size  # adds up to the tokens
            np.testing.assert_allclose(result.norm_mean[k, r], values.mean(), rtol=1e-5)
            np.testing.assert_allclose(result.norm_quantiles[k, r, 3], values.max(), rtol=1e-5)
            # quantiles from 64 bins per decade: within one bin (3.7 %) of numpy's
            exact = np.quantile(values, [0.5, 0.9, 0.99])
            np.testing.assert_allclose(result.norm_quantiles[k, r, :3], exact, rtol=10 ** (1 / 64) - 1)
        frac = (groups["patch"] > 50.0).mean()
        assert result.outlier_fraction[r] == pytest.approx(frac)


@pytest.mark.parametrize("name", ["reg", "distilled"])
def test_sink_shares_equal_the_captured_attention(name):
    vit = _vit(name, planted=True)
    data = _data(vit)
    result = tokens(vit, data, norm_threshold=50.0, batch_size=5).norms
    layout = vit.layout
    maps: dict[int, torch.Tensor] = {}
    with torch.no_grad(), attention_capture(vit, lambda layer, a: maps.__setitem__(layer, a.clone())):
        out = vit.model.forward_intermediates(
            _images(data), indices=[0, 1, 2], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
    cls_index = layout.token_index("cls")
    regs = [i for i, k in enumerate(layout.prefix_kinds) if k == "reg"]
    for r in range(3):
        attn = maps[r].double().mean(dim=1)  # [B, N, N] head mean
        outlier = torch.zeros(attn.shape[-1], dtype=torch.bool).repeat(attn.shape[0], 1)
        outlier[:, layout.patch_slice] = out[r][0].norm(dim=-1) > 50.0  # (patches, prefix) per block
        cls_q = attn[:, cls_index]  # [B, N]
        patch_q = attn[:, layout.patch_slice].mean(dim=1)  # [B, N]
        for query, row in (("cls", cls_q), ("patch", patch_q)):
            shares = result.sink_shares(query)
            assert shares["outliers"][r] == pytest.approx(float((row * outlier).sum(1).mean()), abs=1e-9)
            assert shares["cls"][r] == pytest.approx(float(row[:, cls_index].mean()), abs=1e-9)
            assert shares["registers"][r] == pytest.approx(float(row[:, regs].sum(1).mean()), abs=1e-9)
        if regs:  # registers fixture: registers + class token + patches = 1 for the mean patch query
            patches = float(patch_q[:, layout.patch_slice].sum(1).mean())
            total = result.patch_attention_prefix[r].sum() + patches
            assert total == pytest.approx(1.0, abs=1e-6)
            np.testing.assert_allclose(result.patch_attention_prefix[r, regs], patch_q[:, regs].mean(0), atol=1e-9)
    assert result.sink_shares("cls")["outliers"][PLANT_LAYER] > 0


def _plain_neighbour_similarity(embeddings: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, H*W]: loop over the patches, torch's cosine similarity to each 4-neighbour on the grid, their mean."""
    out = torch.zeros(embeddings.shape[:2], dtype=torch.float64)
    e = embeddings.double()
    for i in range(h):
        for j in range(w):
            near = [(i + di, j + dj) for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))]
            near = [(a, b) for a, b in near if 0 <= a < h and 0 <= b < w]
            sims = [torch.nn.functional.cosine_similarity(e[:, i * w + j], e[:, a * w + b], dim=-1) for a, b in near]
            out[:, i * w + j] = torch.stack(sims).mean(dim=0)
    return out


@pytest.mark.parametrize("name", ["nonsquare", "reg"])
def test_neighbour_similarity_equals_a_plain_loop(name):
    vit = _vit(name, planted=True)
    data = _data(vit)
    result = tokens(vit, data, norm_threshold=50.0, batch_size=4).norms
    h, w = vit.layout.grid_size
    images = _images(data)
    with torch.no_grad():
        embeddings = vit.model.patch_embed(images)  # [B, H*W, D] before position embeddings
        out = vit.model.forward_intermediates(
            images, indices=[0, 1, 2], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
    sim = _plain_neighbour_similarity(embeddings, h, w)
    for r, (patches, _prefix) in enumerate(out):
        outlier = patches.norm(dim=-1) > 50.0  # [B, H*W]
        expected_normal = float(sim[~outlier].mean())
        assert result.neighbour_similarity_normal[r] == pytest.approx(expected_normal, abs=1e-9)
        if outlier.any():
            expected = float(sim[outlier].mean())
            assert result.neighbour_similarity_outliers[r] == pytest.approx(expected, abs=1e-9)
        else:
            assert np.isnan(result.neighbour_similarity_outliers[r])
    assert not np.isnan(result.neighbour_similarity_outliers[PLANT_LAYER])


@pytest.mark.parametrize("name", ["reg", "gap"])
def test_planted_outlier_has_finite_neighbour_similarities(name):
    vit = _vit(name, planted=True)
    result = tokens(vit, _data(vit)).norms  # auto: the second pass measures the similarity
    assert np.isfinite(result.neighbour_similarity_outliers[PLANT_LAYER:]).all()
    assert np.isfinite(result.neighbour_similarity_normal).all()
    assert np.isnan(result.neighbour_similarity_outliers[:PLANT_LAYER]).all()  # no outlier before the plant
    assert (np.abs(result.neighbour_similarity_normal) <= 1).all()


def test_results_do_not_depend_on_the_batch_size():
    vit = _vit("reg", planted=True)
    data = _data(vit, 7)
    a, b = tokens(vit, data, batch_size=1).norms, tokens(vit, data, batch_size=7).norms
    np.testing.assert_array_equal(a.histograms, b.histograms)
    np.testing.assert_array_equal(a.outlier_map, b.outlier_map)
    np.testing.assert_allclose(a.norm_mean, b.norm_mean, rtol=1e-6)
    np.testing.assert_allclose(a.patch_attention_prefix, b.patch_attention_prefix, rtol=1e-5)
    np.testing.assert_allclose(a.cls_attention_outliers, b.cls_attention_outliers, rtol=1e-5)
    np.testing.assert_allclose(a.neighbour_similarity_outliers, b.neighbour_similarity_outliers, rtol=1e-6)
    np.testing.assert_allclose(a.neighbour_similarity_normal, b.neighbour_similarity_normal, rtol=1e-6)
    assert a.threshold == b.threshold


def test_chosen_layers_only():
    vit = _vit("cls", planted=True)
    result = tokens(vit, _data(vit), layers=[-1, 0]).norms
    assert result.layers.tolist() == [0, 2]
    assert result.outlier_fraction[0] == 0 and result.outlier_fraction[1] > 0


def test_auto_threshold_and_histogram_quantile():
    edges = norm_bin_edges()
    normal = np.random.default_rng(0).uniform(1, 3, 1000)
    counts = np.histogram(normal, bins=edges)[0]
    assert auto_threshold(counts, edges) == float("inf")
    gap = 10 ** (AUTO_MIN_GAP_DECADES + 0.1)
    two = np.histogram(np.concatenate([normal, [3 * gap]]), bins=edges)[0]
    assert 3 < auto_threshold(two, edges) < 3 * gap
    narrow = np.histogram(np.concatenate([normal, [3 * 10 ** (AUTO_MIN_GAP_DECADES - 0.2)]]), bins=edges)[0]
    assert auto_threshold(narrow, edges) == float("inf")
    assert histogram_quantile(counts, edges, 0.5) == pytest.approx(np.median(normal), rel=0.04)


@pytest.mark.parametrize("bad", ["nope", -1.0, 0, float("nan")])
def test_bad_threshold_names_its_parameter(bad):
    vit = _vit("cls")
    with pytest.raises(ParameterError) as info:
        tokens(vit, _data(vit), norm_threshold=bad)
    assert info.value.param == "norm_threshold"


def _plain_query_attention(vit: ViT, x: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The last block's query attention on the patches, head mean, written out from its weights: LayerNorm, qkv,
    q k^T / sqrt(d) with the ``removed`` keys' logits at -inf, softmax. The query is the class token, or each patch
    query's row averaged for models without one. ``x [B, N, D]`` is the block's input."""
    layout, block = vit.layout, vit.model.blocks[-1]
    b, n, _ = x.shape
    heads = block.attn.num_heads
    qkv = block.attn.qkv(block.norm1(x)).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, heads, N, hd]
    q, k = block.attn.q_norm(qkv[0]), block.attn.k_norm(qkv[1])
    logits = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5  # [B, heads, N, N]
    logits = logits.masked_fill(removed[:, None, None, :], float("-inf"))
    attn = logits.double().softmax(dim=-1)
    rows = attn[:, :, [layout.token_index("cls")]] if layout.has_class_token else attn[:, :, layout.patch_slice]
    return rows.mean(dim=(1, 2))[:, layout.patch_slice]  # [B, HW]


@pytest.mark.parametrize("name", ["reg", "distilled", "gap", "nonsquare"])
def test_per_image_maps_equal_a_plain_recomputation(name):
    vit = _vit(name, planted=True)
    data = _data(vit, 4)
    result = tokens(vit, data, norm_threshold=50.0, images=data, batch_size=3)
    maps, layout = result.image_maps, vit.layout
    h, w = layout.grid_size
    assert result.images == tuple(data.names) and maps.layer == 2
    assert maps.query == ("cls" if layout.has_class_token else "mean-patch")
    with torch.no_grad():
        out = vit.model.forward_intermediates(
            _images(data), indices=[1, 2], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        inp, outp = (item if isinstance(item, tuple) else (item, None) for item in out)  # (patches, prefix)
        (patches_in, prefix_in), (patches_out, _) = inp, outp  # block 2's input (block 1's output), its output
        x = torch.cat([prefix_in, patches_in], dim=1) if prefix_in is not None else patches_in  # prefix first
        norms = patches_out.double().norm(dim=-1)  # [B, HW]
        outliers = norms > 50.0
        removed = torch.zeros(x.shape[:2], dtype=torch.bool)
        removed[:, layout.patch_slice] = outliers
        plain = _plain_query_attention(vit, x, torch.zeros_like(removed))
        plain_without = _plain_query_attention(vit, x, removed).masked_fill(outliers, float("nan"))
    expected_outliers = np.zeros((4, h, w), dtype=bool)
    expected_outliers[:, PLANT_POS[0], PLANT_POS[1]] = True  # the planted token, in every image
    np.testing.assert_array_equal(maps.outliers, expected_outliers)
    np.testing.assert_allclose(maps.norms, norms.reshape(4, h, w).numpy(), rtol=1e-5)
    np.testing.assert_allclose(maps.attention, plain.reshape(4, h, w).numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(maps.attention_without_outliers, plain_without.reshape(4, h, w).numpy(), rtol=1e-4)
    assert not np.allclose(np.nan_to_num(maps.attention_without_outliers), maps.attention)  # removing keys matters
    one_by_one = tokens(vit, data, norm_threshold=50.0, images=data, batch_size=1).image_maps
    for field in ("norms", "outliers", "attention", "attention_without_outliers"):
        np.testing.assert_array_equal(getattr(one_by_one, field), getattr(maps, field))


def test_per_image_maps_without_outliers_keep_the_attention():
    vit = _vit("cls")
    data = _data(vit, 2)
    maps = tokens(vit, data, images=data, image_layer=0).image_maps
    assert maps.layer == 0 and not maps.outliers.any()
    np.testing.assert_allclose(maps.attention_without_outliers, maps.attention, rtol=1e-6)  # float32 rows sum to 1


def test_outlier_keys_are_removed_per_head_before_the_head_mean():
    # Hand-built: 1 x 3 grid behind a class token; patch 0 is an outlier. Head 0 gives the class query half on the
    # outlier and half on patch 1; head 1 everything on patch 2. Without the outlier each head renormalises its own
    # row (what masking its logit to -inf gives): patch 1 -> 1 in head 0, patch 2 -> 1 in head 1, so 0.5 and 0.5
    # after the head mean (renormalising the head mean instead would give 1/3 and 2/3).
    layout = TokenLayout((1, 3), (8, 8), ("cls",))
    attn = torch.full((1, 2, 4, 4), 0.25)
    attn[0, 0, 0] = torch.tensor([0.0, 0.5, 0.5, 0.0])  # [cls, p0, p1, p2]
    attn[0, 1, 0] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    tokens_out = torch.ones(1, 4, 2)
    tokens_out[0, 1] = 100.0  # patch 0: norm 141 > 10
    maps = token_image_maps(tokens_out, attn, layout, threshold=10.0, layer=5)
    assert maps.layer == 5 and maps.query == "cls"
    np.testing.assert_array_equal(maps.outliers, [[[True, False, False]]])
    np.testing.assert_allclose(maps.attention, [[[0.25, 0.25, 0.5]]])
    np.testing.assert_allclose(maps.attention_without_outliers, [[[np.nan, 0.5, 0.5]]])
    np.testing.assert_allclose(maps.norms, [[[100 * 2**0.5, 2**0.5, 2**0.5]]])
