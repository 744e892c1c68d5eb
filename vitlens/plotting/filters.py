"""Figures for the patch-embedding filter PCA: Fig. 7 (left) of the ViT paper (Dosovitskiy et al. 2020).

The sign of a principal component is arbitrary (``v`` and ``-v`` explain the same variance): a component drawn with
inverted colours is the same component. :func:`vitlens.analysis.filter_pca` fixes the sign so that pictures are
reproducible, not because one sign is meaningful.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from vitlens.plotting.style import new_figure, vitlens_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vitlens.analysis.filters import FilterPCA

# ViT paper, Fig. 7 (left): 28 components in 4 rows of 7.
PAPER_GRID_ASPECT = 7 / 4
TILE_INCHES = 0.62  # one component image
LABEL_INCHES = 0.24  # above each row of images, for the explained-variance labels
GAP_INCHES = 0.1  # between columns of images
CURVE_WIDTH_INCHES = 3.4


def component_grid(k: int) -> tuple[int, int]:
    """Rows and columns for ``k`` component images: the paper's 4 x 7 for 28, the same proportions otherwise."""
    if k < 1:
        raise ValueError(f"need at least one component, got {k}")
    cols = min(k, math.ceil(math.sqrt(k * PAPER_GRID_ASPECT)))
    return math.ceil(k / cols), cols


def component_image(component: np.ndarray) -> tuple[np.ndarray, str | None]:
    """One component ``[C, ph, pw]`` as a displayable image, min-max scaled to [0, 1] on its own.

    Returns ``([ph, pw, 3], None)`` for 3 or more channels (the first three as RGB) and ``([ph, pw], "gray")`` for
    1 or 2 channels (their mean). A constant component becomes mid-grey.
    """
    c = component.shape[0]
    img = np.moveaxis(component[:3], 0, -1) if c >= 3 else component.mean(axis=0)  # [ph, pw, 3] or [ph, pw]
    lo, hi = float(img.min()), float(img.max())
    scaled = (img - lo) / (hi - lo) if hi > lo else np.full_like(img, 0.5)
    return scaled, (None if c >= 3 else "gray")


def components_mosaic(result: FilterPCA, *, hgap: int, vgap: int) -> np.ndarray:
    """Every component image in one RGBA image ``[rows*(ph+vgap) - vgap, cols*(pw+hgap) - hgap, 4]``.

    Component ``k`` sits at row ``k // cols``, column ``k % cols`` of :func:`component_grid`; gaps and empty slots are
    transparent.
    """
    k = result.num_components
    rows, cols = component_grid(k)
    ph, pw = result.components.shape[2:]
    mosaic = np.zeros((rows * (ph + vgap) - vgap, cols * (pw + hgap) - hgap, 4))  # RGBA, alpha 0 = background
    for i in range(k):
        img, _ = component_image(result.components[i])
        rgb = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1)  # [ph, pw, 3]
        top, left = (i // cols) * (ph + vgap), (i % cols) * (pw + hgap)
        mosaic[top : top + ph, left : left + pw, :3] = rgb
        mosaic[top : top + ph, left : left + pw, 3] = 1.0
    return mosaic


def plot_filter_components(result: FilterPCA, *, ax: Axes | None = None) -> Axes:
    """Draw each principal component as a ``ph x pw`` image titled with its explained variance.

    All components are one mosaic image in one Axes (fast for any ``K``): a grid of :func:`component_grid` tiles in
    the paper's 4 x 7 arrangement for 28, each min-max scaled on its own (see :func:`component_image`).

    Args:
        result: the output of :func:`vitlens.analysis.filter_pca`.
        ax: where to draw; a new figure sized for the grid when ``None``.
    """
    rows, cols = component_grid(result.num_components)
    if ax is None:
        with vitlens_style():
            ax = new_figure(cols * TILE_INCHES, rows * (TILE_INCHES + LABEL_INCHES)).add_subplot()
    ph, pw = result.components.shape[2:]
    # Gaps in image pixels: a thin one between columns, room for the percentage label above each row.
    hgap = max(1, round(pw * GAP_INCHES / TILE_INCHES))
    vgap = max(1, round(ph * LABEL_INCHES / TILE_INCHES))
    ax.imshow(components_mosaic(result, hgap=hgap, vgap=vgap), interpolation="nearest")
    for i, ratio in enumerate(result.explained_variance_ratio):
        top, left = (i // cols) * (ph + vgap), (i % cols) * (pw + hgap)
        ax.text(left + (pw - 1) / 2, top - 0.5 - 0.08 * ph, _percent(ratio), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(rows * (ph + vgap) - vgap - 0.5, -0.5 - vgap)  # the first row's labels need the same room
    ax.set_axis_off()
    return ax


def plot_explained_variance(result: FilterPCA, *, ax: Axes | None = None) -> Axes:
    """Cumulative explained variance against the number of components, with the first ``K`` highlighted.

    The curve runs over every component there is (from the singular values), so it also shows what the ``K`` kept
    components leave out.
    """
    if ax is None:
        with vitlens_style():
            ax = new_figure(CURVE_WIDTH_INCHES, 2.6).add_subplot()
    s2 = np.asarray(result.singular_values, dtype=np.float64) ** 2
    total = s2.sum()
    cumulative = np.cumsum(s2) / total if total > 0 else np.zeros_like(s2)  # [min(D, C*ph*pw)]
    x = np.arange(1, len(cumulative) + 1)
    k = result.num_components
    ax.plot(x, 100 * cumulative, color="0.65", lw=1.2, label="all components")
    ax.plot(x[:k], 100 * cumulative[:k], color="C0", lw=1.8, marker="o", ms=2.5, label=f"first {k} (shown)")
    ax.axvline(k, color="C0", lw=0.8, ls="--")
    ax.annotate(
        _percent(cumulative[k - 1]),
        xy=(k, 100 * cumulative[k - 1]),
        xytext=(6, -12),
        textcoords="offset points",
        color="C0",
    )
    ax.set_xlim(0.5, len(cumulative) + 0.5)
    ax.set_ylim(0, 102)
    ax.set_xlabel("Number of principal components")
    ax.set_ylabel("Cumulative explained variance (%)")
    ax.set_title("Explained variance of the filters")
    ax.legend(loc="lower right", frameon=False)
    return ax


def filters_figure(result: FilterPCA) -> Figure:
    """The full figure: the component grid, and the cumulative explained-variance curve beside it."""
    rows, cols = component_grid(result.num_components)
    # Few rows (small K): bigger tiles rather than empty space beside the curve.
    scale = max(1.0, min(1.6, 2.4 / (rows * (TILE_INCHES + LABEL_INCHES))))
    grid_w = max(cols * (TILE_INCHES + GAP_INCHES) * scale, 2.0)
    grid_h = rows * (TILE_INCHES + LABEL_INCHES) * scale
    c, ph, pw = result.components.shape[1:]
    colour = "RGB" if c == 3 else "grey" if c == 1 else f"{c}-channel"
    with vitlens_style():
        fig = new_figure(grid_w + CURVE_WIDTH_INCHES, max(grid_h, 2.6) + 0.35)
        fig.suptitle(
            f"Patch-embedding filters ({colour}, {ph}x{pw}): first {result.num_components} principal components",
            fontsize=10,
        )
        left, right = fig.subplots(1, 2, width_ratios=[grid_w, CURVE_WIDTH_INCHES])
        plot_filter_components(result, ax=left)
        plot_explained_variance(result, ax=right)
    return fig


def _percent(ratio: float) -> str:
    pct = 100 * float(ratio)
    return f"{pct:.1f}%" if pct >= 0.95 or pct == 0 else f"{pct:.2f}%"
