"""Figures of the weight analyses (filter PCA, position similarity): layout, scaling, big grids, no global state."""

from __future__ import annotations

import io

import matplotlib as mpl
import numpy as np
import pytest
import torch
from PIL import Image

from vitlens.analysis import filter_pca, position_similarity
from vitlens.layout import TokenLayout
from vitlens.plotting.filters import (
    component_grid,
    component_image,
    components_mosaic,
    filters_figure,
    plot_explained_variance,
    plot_filter_components,
)
from vitlens.plotting.pos_sim import plot_position_similarity, pos_sim_figure, similarity_mosaic
from vitlens.plotting.style import new_figure, save_figure, vitlens_style


def _pca(k: int = 28, c: int = 3, p: int = 4, d: int = 64):
    w = torch.randn(d, c, p, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return filter_pca(w, num_components=k)


def sincos_2d(h: int, w: int, dim: int = 64) -> torch.Tensor:
    """2-D sin-cos position embedding [H*W, dim] (half for the row, half for the column), row-major."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)  # [dim/4]
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    parts = []
    for coord in (rows.ravel(), cols.ravel()):
        angle = coord[:, None] * omega  # [H*W, dim/4]
        parts += [np.sin(angle), np.cos(angle)]
    return torch.from_numpy(np.concatenate(parts, axis=1))


def _png(fig) -> Image.Image:
    buf = io.BytesIO()
    with vitlens_style():
        fig.savefig(buf, format="png")
    return Image.open(io.BytesIO(buf.getvalue()))


# ------------------------------------------------------------------------------------------- filters
def test_component_grid_is_the_papers_4x7_and_tight_otherwise():
    assert component_grid(28) == (4, 7)
    assert component_grid(1) == (1, 1)
    for k in range(1, 300):
        rows, cols = component_grid(k)
        assert rows * cols >= k and (rows - 1) * cols < k, k  # every component fits, no empty row
        assert cols >= rows or k < 4, k  # wide like the paper's figure


def test_component_image_scales_each_on_its_own_and_sign_inverts():
    comp = np.random.default_rng(0).normal(size=(3, 5, 5)) * 7 + 3
    img, cmap = component_image(comp)
    assert img.shape == (5, 5, 3) and cmap is None
    assert img.min() == 0.0 and img.max() == 1.0
    np.testing.assert_allclose(img, (comp.transpose(1, 2, 0) - comp.min()) / (comp.max() - comp.min()))
    flipped, _ = component_image(-comp)  # the other sign of the same component: the inverted picture
    np.testing.assert_allclose(flipped, 1.0 - img, atol=1e-12)

    grey, cmap = component_image(comp[:1])
    assert grey.shape == (5, 5) and cmap == "gray" and grey.min() == 0.0 and grey.max() == 1.0
    flat, _ = component_image(np.zeros((1, 3, 3)))
    np.testing.assert_array_equal(flat, np.full((3, 3), 0.5))


def test_components_mosaic_places_every_component():
    result = _pca(k=9, p=4)
    assert component_grid(9) == (3, 4)  # 12 slots, 3 empty
    mosaic = components_mosaic(result, hgap=1, vgap=2)
    assert mosaic.shape == (3 * 6 - 2, 4 * 5 - 1, 4)
    for i in range(9):
        top, left = (i // 4) * 6, (i % 4) * 5
        tile = mosaic[top : top + 4, left : left + 4]
        np.testing.assert_allclose(tile[..., :3], component_image(result.components[i])[0])
        assert np.all(tile[..., 3] == 1.0)
    assert mosaic[..., 3].sum() == 9 * 16  # gaps and the empty slots are transparent


def test_plot_filter_components_labels_each_with_its_variance():
    result = _pca(k=7)
    with vitlens_style():
        ax = new_figure(5, 2).add_subplot()
    assert plot_filter_components(result, ax=ax) is ax
    assert len(ax.images) == 1
    labels = [t.get_text() for t in ax.texts]
    assert labels == [f"{100 * r:.1f}%" if r >= 0.0095 else f"{100 * r:.2f}%" for r in result.explained_variance_ratio]
    assert len(labels) == 7


def test_explained_variance_curve():
    result = _pca(k=5, c=1, p=3, d=20)  # 9 components exist
    ax = plot_explained_variance(result)
    full, kept = ax.lines[0], ax.lines[1]
    assert len(full.get_xdata()) == 9 and full.get_ydata()[-1] == pytest.approx(100.0)
    assert list(kept.get_xdata()) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(kept.get_ydata(), 100 * np.cumsum(result.explained_variance_ratio))


@pytest.mark.parametrize(("k", "c", "p"), [(28, 3, 16), (6, 1, 4), (1, 3, 2), (100, 3, 8)])
def test_filters_figure_renders(k, c, p):
    result = _pca(k=k, c=c, p=p, d=128)
    fig = filters_figure(result)
    assert len(fig.axes) == 2  # the component mosaic and the curve, whatever K
    img = _png(fig)
    assert img.size == fig.canvas.get_width_height()
    assert np.asarray(img.convert("L")).std() > 10


# ------------------------------------------------------------------------------------- position sim
def test_similarity_mosaic_puts_tile_ij_at_its_place():
    h, w = 3, 4
    result = position_similarity(torch.randn(h * w, 16, dtype=torch.float64), TokenLayout((h, w), (8, 8), ()))
    mosaic = similarity_mosaic(result)
    assert mosaic.shape == (h * h + h - 1, w * w + w - 1)
    for i in range(h):
        for j in range(w):
            top, left = i * (h + 1), j * (w + 1)
            np.testing.assert_array_equal(mosaic[top : top + h, left : left + w], result.similarity[i, j])
            assert mosaic[top + i, left + j] == pytest.approx(1.0)  # a position is itself
    assert np.isnan(mosaic).sum() == mosaic.size - h * w * h * w  # the one-cell gaps


def test_37x37_grid_is_one_image_with_whole_pixels_per_cell():
    # DINOv2 at 518 px: 37 x 37 patches. One image and one colour bar, not 1,369 axes.
    result = position_similarity(sincos_2d(37, 37), TokenLayout((37, 37), (14, 14), ()))
    fig = pos_sim_figure(result)
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    assert len(ax.images) == 1 and ax.images[0].get_clim() == (-1.0, 1.0)
    cells = 37 * 37 + 36
    box = ax.get_window_extent()
    assert round(box.width) == cells and round(box.height) == cells  # one pixel per cell: gaps stay visible
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(0, 37, 5)]
    assert ax.get_xlabel() == "Input patch column" and ax.get_ylabel() == "Input patch row"
    img = _png(fig)
    assert img.size == fig.canvas.get_width_height() and img.size[0] > cells


def test_small_grid_cells_get_many_pixels():
    result = position_similarity(sincos_2d(4, 4), TokenLayout((4, 4), (16, 16), ()))
    fig = pos_sim_figure(result)
    box = fig.axes[0].get_window_extent()
    per_cell = box.width / (4 * 4 + 3)
    assert per_cell == int(per_cell) and per_cell >= 20
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "1", "2", "3"]


def test_plot_position_similarity_on_a_given_axes():
    result = position_similarity(sincos_2d(5, 3), TokenLayout((5, 3), (16, 16), ()))
    with vitlens_style():
        fig = new_figure(4, 4)
        ax = fig.add_subplot()
    assert plot_position_similarity(result, ax=ax) is ax
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "Cosine similarity"  # one shared colour bar
    with vitlens_style():
        bare = new_figure(4, 4).add_subplot()
    plot_position_similarity(result, ax=bare, colorbar=False, vmin=0.0, vmax=1.0)
    assert len(bare.figure.axes) == 1 and bare.images[0].get_clim() == (0.0, 1.0)
    assert _png(fig).size == fig.canvas.get_width_height()
    assert (
        plot_position_similarity(result).figure.canvas.get_width_height()
        == pos_sim_figure(result).canvas.get_width_height()
    )


def test_figures_leave_global_state_alone(tmp_path):
    before = dict(mpl.rcParams)
    save_figure(filters_figure(_pca()), tmp_path / "f.png")
    save_figure(
        pos_sim_figure(position_similarity(sincos_2d(4, 4), TokenLayout((4, 4), (16, 16), ()))), tmp_path / "p.png"
    )
    assert dict(mpl.rcParams) == before  # and pyplot is never imported: test_imports.py
