"""The position-embedding similarity figure: Fig. 7 (centre) of the ViT paper (Dosovitskiy et al. 2020).

Tile ``(i, j)`` of an ``H x W`` grid of tiles is itself ``H x W``: the cosine similarity of position ``(i, j)``'s
embedding with every position's. All tiles are drawn as one mosaic image with one-cell gaps (masked, so they show as
the background) instead of ``H * W`` axes: a DINOv2 grid at 518 px is 37 x 37 = 1,369 tiles, which would take
matplotlib minutes as separate axes and milliseconds as one image.

The colour scale is fixed to ``[-1, 1]``, the whole range of a cosine similarity, so that figures of different models
(and resolutions) can be compared by eye; it also matches the paper's colour bar.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from einops import rearrange

from vitlens.plotting.style import DPI, new_figure, vitlens_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vitlens.analysis.pos_sim import PositionSimilarity

# The whole range of a cosine similarity: fixed so that figures compare across models (the paper uses the same).
VMIN, VMAX = -1.0, 1.0
CMAP = "viridis"  # the paper's colour map; perceptually uniform and readable in grey
TARGET_PX = 560  # the mosaic's longer side aims at about this many pixels: cells get a whole number of pixels each
MAX_PX = 2400  # beyond this (grids over ~48 x 48) the mosaic is downsampled instead of growing the figure
# Margins around the mosaic in pixels at DPI 120: room for tick labels, axis labels, title and the colour bar.
LEFT_PX, BOTTOM_PX, TOP_PX = 96, 72, 48
CBAR_GAP_PX, CBAR_PX, CBAR_LABELS_PX = 18, 16, 84


def similarity_mosaic(result: PositionSimilarity, *, gap: int = 1) -> np.ndarray:
    """All tiles as one image ``[H*H + (H-1)*gap, W*W + (W-1)*gap]``, tile ``(i, j)`` = ``similarity[i, j]``.

    Gap cells are NaN (drawn as the background by :func:`plot_position_similarity`).
    """
    h, w = result.grid_size
    sim = np.asarray(result.similarity, dtype=np.float64)  # [H, W, H, W]
    padded = np.full((h, w, h + gap, w + gap), np.nan)  # [H, W, H+gap, W+gap]: each tile with gap rows/cols after it
    padded[:, :, :h, :w] = sim
    mosaic = rearrange(padded, "i j h2 w2 -> (i h2) (j w2)")
    return mosaic[: mosaic.shape[0] - gap, : mosaic.shape[1] - gap]  # no gap after the last tile


def plot_position_similarity(
    result: PositionSimilarity,
    *,
    ax: Axes | None = None,
    cax: Axes | None = None,
    colorbar: bool = True,
    vmin: float = VMIN,
    vmax: float = VMAX,
    cmap: str = CMAP,
    interpolation: str = "antialiased",
) -> Axes:
    """Draw the grid of similarity tiles on ``ax``, with one colour bar for all of them.

    Args:
        result: the output of :func:`vitlens.analysis.position_similarity`.
        ax: where to draw; ``None`` builds :func:`pos_sim_figure` (sized to the grid) and returns its Axes.
        cax: Axes for the colour bar; ``None`` takes the room from ``ax``.
        colorbar: draw the colour bar.
        vmin, vmax: the colour scale, shared by every tile (default the full cosine range -1 .. 1).
        cmap: a matplotlib colour map name.
        interpolation: how imshow resamples the mosaic; :func:`pos_sim_figure` uses ``"nearest"`` because it gives
            every cell whole pixels.
    """
    if ax is None:
        return pos_sim_figure(result, vmin=vmin, vmax=vmax, cmap=cmap).axes[0]
    import matplotlib as mpl

    h, w = result.grid_size
    mosaic = similarity_mosaic(result)
    colours = mpl.colormaps[cmap].with_extremes(bad=(1.0, 1.0, 1.0, 0.0))  # gaps are transparent
    image = ax.imshow(np.ma.masked_invalid(mosaic), cmap=colours, vmin=vmin, vmax=vmax, interpolation=interpolation)
    # One tick per tile (thinned on big grids) at the tile's centre, labelled with its 0-based row / column.
    for axis, n in ((ax.yaxis, h), (ax.xaxis, w)):
        tiles = range(0, n, _tick_step(n))
        centre = [t * (n + 1) + (n - 1) / 2 for t in tiles]
        axis.set_ticks(centre, [str(t) for t in tiles])
    ax.tick_params(length=2, pad=2)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    ax.set_title(f"Position embedding similarity ({h} x {w} patches)")
    if colorbar:
        fig = ax.figure
        bar = fig.colorbar(image, cax=cax) if cax is not None else fig.colorbar(image, ax=ax)
        bar.set_label("Cosine similarity")
        bar.outline.set_visible(False)
    return ax


def pos_sim_figure(result: PositionSimilarity, *, vmin: float = VMIN, vmax: float = VMAX, cmap: str = CMAP) -> Figure:
    """The full figure, sized to the grid so that every cell gets whole pixels (4 x 4 up to ~48 x 48 grids).

    The Axes are placed at fixed pixel positions (no layout engine) so the mosaic maps onto the pixel grid exactly.
    """
    h, w = result.grid_size
    rows, cols = h * h + h - 1, w * w + w - 1  # the mosaic's shape, gaps included
    scale = _px_per_cell((rows, cols))
    img_h, img_w = math.ceil(rows * scale), math.ceil(cols * scale)
    fig_w = LEFT_PX + img_w + CBAR_GAP_PX + CBAR_PX + CBAR_LABELS_PX
    fig_h = BOTTOM_PX + img_h + TOP_PX
    with vitlens_style():
        fig = new_figure(fig_w / DPI, fig_h / DPI)
        fig.set_layout_engine("none")
        ax = fig.add_axes((LEFT_PX / fig_w, BOTTOM_PX / fig_h, img_w / fig_w, img_h / fig_h))
        # The colour bar is as tall as the mosaic but at most 320 px, centred on it.
        bar_h = min(img_h, 320)
        cax = fig.add_axes(
            (
                (LEFT_PX + img_w + CBAR_GAP_PX) / fig_w,
                (BOTTOM_PX + (img_h - bar_h) / 2) / fig_h,
                CBAR_PX / fig_w,
                bar_h / fig_h,
            )
        )
        # Whole pixels per cell: nearest keeps cells and gaps crisp; a downsampled mosaic needs antialiasing.
        interpolation = "nearest" if scale >= 1 else "antialiased"
        plot_position_similarity(result, ax=ax, cax=cax, vmin=vmin, vmax=vmax, cmap=cmap, interpolation=interpolation)
    return fig


def _px_per_cell(shape: tuple[int, int]) -> float:
    """Whole pixels per mosaic cell so that the longer side is about ``TARGET_PX``; a fraction past ``MAX_PX``."""
    longest = max(shape)
    if longest > MAX_PX:
        return MAX_PX / longest
    return float(max(1, round(TARGET_PX / longest)))


def _tick_step(n: int) -> int:
    """1, 2, 5, 10, 20, ...: the smallest step that leaves at most 10 labelled tiles."""
    for magnitude in (1, 10, 100, 1000):
        for base in (1, 2, 5):
            if math.ceil(n / (base * magnitude)) <= 10:
                return base * magnitude
    return 10_000
