"""Figures of attention rollout (ViT paper Fig. 6 / App. D.8) and of per-head target attention: photo and heat map."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from vitlens.plotting.style import new_figure, vitlens_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CMAP = "inferno"  # perceptually uniform; dark where the map is low, so the overlay dims what the model ignores
ALPHA = 0.6  # heat map opacity over the grey photo
_TILE = 1.55  # inches per image tile


def upsample_map(attention_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a patch-resolution map ``[H, W]`` to ``size = (height, width)`` pixels.

    PIL's bilinear filter samples at pixel centres, so each patch's value lands on its patch's centre and the map
    stays aligned with the photo (``align_corners=False`` in torch's terms).
    """
    m = np.asarray(attention_map, dtype=np.float32)
    up = Image.fromarray(m, mode="F").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(up, dtype=np.float64)  # [height, width]


def _pixels(image: Image.Image) -> tuple[np.ndarray, dict]:
    """The photo as an array and the imshow options that show it in its own colours (grey images in grey)."""
    if image.mode == "L":
        return np.asarray(image), {"cmap": "gray", "vmin": 0, "vmax": 255}
    return np.asarray(image.convert("RGB")), {}


def _clean(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def plot_photo(image: Image.Image, *, ax: Axes | None = None, title: str | None = None) -> Axes:
    """Draw the photo as the model sees it (resized and cropped), without axes."""
    if ax is None:
        with vitlens_style():
            ax = new_figure(2.2, 2.2).add_subplot()
    pixels, opts = _pixels(image)
    ax.imshow(pixels, interpolation="antialiased", **opts)
    _clean(ax)
    if title:
        ax.set_title(title)
    return ax


def plot_rollout(
    image: Image.Image | None,
    attention_map: np.ndarray,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    vmax: float | None = 1.0,
) -> Axes:
    """Draw ``attention_map`` ``[H, W]`` upsampled (bilinear) to the photo, as a heat map over the photo in grey; or,
    without a photo (a result read back from its files), the map alone, one square per patch.

    Args:
        image: the photo aligned with the model input (``ImageDataset.load_pil``), or None.
        attention_map: patch-resolution map, e.g. a rollout map scaled to max 1.
        ax: where to draw; a new figure's axes when None.
        title: axes title.
        vmax: top of the colour scale; None for the map's own maximum.

    Returns:
        The axes drawn on; the heat map is ``ax.images[-1]`` (for a colour bar).
    """
    if ax is None:
        with vitlens_style():
            ax = new_figure(2.2, 2.2).add_subplot()
    if image is None:
        heat = np.asarray(attention_map, dtype=np.float64)  # [H, W]
        top = float(heat.max()) if vmax is None else vmax
        ax.imshow(heat, cmap=CMAP, vmin=0.0, vmax=top if top > 0 else 1.0, interpolation="nearest")
    else:
        grey = np.asarray(image.convert("L"))  # [h, w]
        heat = upsample_map(attention_map, grey.shape)  # [h, w]
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
        top = float(heat.max()) if vmax is None else vmax
        ax.imshow(heat, cmap=CMAP, vmin=0.0, vmax=top if top > 0 else 1.0, alpha=ALPHA)
    _clean(ax)
    if title:
        ax.set_title(title)
    return ax


def _wrap(text: str, width_in: float) -> str:
    """Break a suptitle into lines that fit a figure ``width_in`` inches wide (about 13 characters per inch at 9 pt)."""
    return textwrap.fill(text, width=max(int(width_in * 13), 20))


def _aspect(image: Image.Image) -> float:
    """Height over width: tiles follow the model's input shape, so non-square inputs leave no gaps."""
    return image.height / image.width


def _short(name: str, limit: int = 22) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def rollout_figure(image: Image.Image, attention_map: np.ndarray, *, title: str = "") -> Figure:
    """Photo and rollout overlay side by side, with a colour bar of the map (max = 1)."""
    with vitlens_style():
        fig = new_figure(2 * _TILE + 0.8, _TILE * _aspect(image) + 0.45)
        left, right = fig.subplots(1, 2)
        plot_photo(image, ax=left, title=_short(title, 34) if title else None)
        plot_rollout(image, attention_map, ax=right, title="attention rollout")
        bar = fig.colorbar(right.images[-1], ax=right, fraction=0.07, pad=0.03)
        bar.set_ticks([0, 0.5, 1])
        bar.outline.set_visible(False)
        bar.ax.tick_params(labelsize=7)
    return fig


def rollout_grid_figure(
    images: Sequence[Image.Image], maps: np.ndarray, names: Sequence[str], *, max_columns: int = 8, title: str = ""
) -> Figure:
    """All images in one figure: each column shows a photo above its rollout overlay; wraps after ``max_columns``."""
    n = len(images)
    cols = min(n, max_columns)
    rows = math.ceil(n / cols)
    width = cols * _TILE * 0.8 + 0.2
    title = _wrap(title, width) if title else ""
    with vitlens_style():
        tile_h = _TILE * 0.8 * _aspect(images[0]) + 0.2  # + the name above the photo
        fig = new_figure(width, rows * 2 * tile_h + 0.2 * (title.count("\n") + 1 if title else 0))
        axes = np.asarray(fig.subplots(2 * rows, cols, squeeze=False))  # [2 * rows, cols]
        for k in range(rows * cols):
            r, c = divmod(k, cols)
            top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
            if k >= n:
                top.set_axis_off()
                bottom.set_axis_off()
                continue
            plot_photo(images[k], ax=top)
            top.set_title(_short(names[k], 16), fontsize=7)
            plot_rollout(images[k], maps[k], ax=bottom)
        if title:
            fig.suptitle(title, fontsize=9)
    return fig


def rollout_map_grid_figure(maps: np.ndarray, names: Sequence[str], *, max_columns: int = 8, title: str = "") -> Figure:
    """All maps ``[B, H, W]`` in one figure, without photos (a rollout read back from its files); wraps after
    ``max_columns``."""
    n = len(maps)
    cols = min(n, max_columns)
    rows = math.ceil(n / cols)
    width = cols * _TILE * 0.8 + 0.2
    title = _wrap(title, width) if title else ""
    with vitlens_style():
        tile_h = _TILE * 0.8 * maps.shape[1] / maps.shape[2] + 0.2  # + the name above the map
        fig = new_figure(width, rows * tile_h + 0.2 * (title.count("\n") + 1 if title else 0))
        axes = np.asarray(fig.subplots(rows, cols, squeeze=False))  # [rows, cols]
        for k in range(rows * cols):
            ax = axes.flat[k]
            if k >= n:
                ax.set_axis_off()
                continue
            plot_rollout(None, maps[k], ax=ax)
            ax.set_title(_short(names[k], 16), fontsize=7)
        if title:
            fig.suptitle(title, fontsize=9)
    return fig


def head_attention_figure(
    images: Sequence[Image.Image], heads: np.ndarray, names: Sequence[str], *, layer: int, target: str
) -> Figure:
    """Tile grid of one layer's per-head target attention: a row per image, the photo then one tile per head.

    Each tile is scaled to its own maximum (raw weights differ by orders of magnitude between heads), so the grid
    compares where heads look, not how strongly.
    """
    n, num_heads = heads.shape[:2]  # [B, heads, H, W]
    width = (num_heads + 1) * _TILE * 0.72 + 0.2
    title = _wrap(f"layer {layer}: attention of the {target} token per head (each tile scaled to its max)", width)
    with vitlens_style():
        fig = new_figure(width, n * _TILE * 0.72 * _aspect(images[0]) + 0.25 + 0.2 * (title.count("\n") + 1))
        axes = np.asarray(fig.subplots(n, num_heads + 1, squeeze=False))  # [B, heads + 1]
        for i in range(n):
            plot_photo(images[i], ax=axes[i, 0])
            axes[i, 0].set_ylabel(_short(names[i], 14), fontsize=7)
            for h in range(num_heads):
                plot_rollout(images[i], heads[i, h], ax=axes[i, h + 1], vmax=None)
                if i == 0:
                    axes[i, h + 1].set_title(f"head {h}", fontsize=8)
        fig.suptitle(title, fontsize=9)
    return fig


MASK_COLOUR = (0.2, 0.85, 1.0)  # cyan: stands out on a grey photo and on inferno's dark end alike
MASK_ALPHA = 0.55


def plot_head_mask(
    image: Image.Image | None, mask: np.ndarray, *, ax: Axes | None = None, title: str | None = None
) -> Axes:
    """Draw a patch mask ``[H, W]`` (True = kept) in colour over the photo in grey, one block per patch, with the
    patches left out showing the photo; without a photo, the mask alone.

    The mask is not resampled: it is stretched over the photo with ``extent`` and ``nearest`` interpolation, so each
    patch's block covers exactly that patch's pixels (the photo is the model input, ``grid_size x patch_size``).
    """
    if ax is None:
        with vitlens_style():
            ax = new_figure(2.2, 2.2).add_subplot()
    mask = np.asarray(mask, dtype=bool)  # [H, W]
    rgba = np.zeros((*mask.shape, 4))  # [H, W, 4] transparent where the patch is left out
    rgba[mask] = (*MASK_COLOUR, MASK_ALPHA)
    if image is None:
        ax.imshow(np.zeros(mask.shape), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.imshow(rgba, interpolation="nearest")
    else:
        grey = np.asarray(image.convert("L"))  # [h, w]
        h, w = grey.shape
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
        ax.imshow(rgba, interpolation="nearest", extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    _clean(ax)
    if title:
        ax.set_title(title)
    return ax


def head_mask_figure(
    images: Sequence[Image.Image],
    masks: np.ndarray,
    names: Sequence[str],
    *,
    layer: int,
    target: str,
    threshold: float,
) -> Figure:
    """Tile grid of per-head threshold masks (DINO's ``visualize_attention.py --threshold``): a row per image, the
    photo then one tile per head with its kept patches in colour; each tile's title gives how many patches it keeps.
    """
    n, num_heads = masks.shape[:2]  # [B, heads, H, W]
    patches = masks.shape[2] * masks.shape[3]
    width = (num_heads + 1) * _TILE * 0.72 + 0.2
    title = _wrap(
        f"layer {layer}: smallest set of patches holding {threshold:.0%} of the {target} token's attention on "
        "patches, per head (coloured: kept)",
        width,
    )
    with vitlens_style():
        tile_h = _TILE * 0.72 * _aspect(images[0]) + 0.2  # + the count above each tile
        fig = new_figure(width, n * tile_h + 0.25 + 0.2 * (title.count("\n") + 1))
        axes = np.asarray(fig.subplots(n, num_heads + 1, squeeze=False))  # [B, heads + 1]
        for i in range(n):
            plot_photo(images[i], ax=axes[i, 0])
            axes[i, 0].set_ylabel(_short(names[i], 14), fontsize=7)
            for h in range(num_heads):
                kept = int(masks[i, h].sum())
                label = f"head {h}: {kept}/{patches}" if i == 0 else f"{kept}/{patches}"
                plot_head_mask(images[i], masks[i, h], ax=axes[i, h + 1])
                axes[i, h + 1].set_title(label, fontsize=7)
        fig.suptitle(title, fontsize=9)
    return fig
