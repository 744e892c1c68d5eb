"""Token norm figures: per-layer patch-norm distributions (log x), outlier fraction and sink shares vs depth, the
redundancy of outlier patches, the outlier position map (after Darcet et al. 2023, Figs. 3-5), and per image the
token-norm map of one layer beside the photo with the query's attention with and without the outlier keys (Figs. 1
and 2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.ticker import MaxNLocator

from vitlens.plotting.style import new_figure, vitlens_style

if TYPE_CHECKING:
    from collections.abc import Sequence

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

    from vitlens.analysis.tokens import TokenImageMaps, TokenNorms

_COARSE = 8  # fine bins merged per drawn bin (8 per decade)


def plot_token_norms(result: TokenNorms, *, ax: Axes | None = None) -> Axes:
    """Patch-token norm distribution of every layer, one line each (log x), with the threshold dashed."""
    from matplotlib import colormaps

    if ax is None:
        with vitlens_style():
            ax = new_figure(4.8, 3.4).add_subplot()
    hist = result.histograms[result.kind("patch")]  # [L, E]
    edges = result.bin_edges[1:-1]  # finite positive inner edges
    inner = hist[:, 1:-1]  # drop the open end bins [0, 1e-3) and [1e6, inf)
    occupied = np.flatnonzero(inner.sum(axis=0))
    if occupied.size:
        lo = occupied[0] // _COARSE * _COARSE
        hi = min(-(-(occupied[-1] + 1) // _COARSE) * _COARSE, inner.shape[1])
        coarse = inner[:, lo:hi].reshape(len(hist), -1, _COARSE).sum(axis=2)  # [L, bins]
        centres = np.sqrt(edges[lo:hi:_COARSE] * edges[lo + _COARSE : hi + 1 : _COARSE])
        colours = colormaps["viridis"](np.linspace(0, 1, len(hist)))
        for r, layer in enumerate(result.layers):
            density = coarse[r] / max(coarse[r].sum(), 1)
            ax.plot(centres, density, color=colours[r], label=f"layer {int(layer)}")
    if np.isfinite(result.threshold):
        ax.axvline(result.threshold, color="black", linestyle="--", linewidth=1, label="threshold")
    ax.set_xscale("log")
    ax.set_xlabel("patch token L2 norm")
    ax.set_ylabel("fraction of patch tokens")
    ax.set_title("token norms per layer")
    if len(result.layers) <= 12:
        ax.legend(fontsize="x-small")
    return ax


def plot_outliers_by_depth(result: TokenNorms, *, ax: Axes | None = None) -> Axes:
    """Outlier fraction, images with outliers and sink shares against depth."""
    if ax is None:
        with vitlens_style():
            ax = new_figure(4.8, 3.4).add_subplot()
    layers = result.layers
    ax.plot(layers, result.outlier_fraction, "o-", label="outlier patch fraction")
    ax.plot(layers, result.images_with_outliers, "s--", label="images with outliers")
    for query, marker in (("cls", "^"), ("patch", "v")):
        shares = result.sink_shares(query)
        for name in ("outliers", "registers", "cls"):
            values = shares[name]
            if np.isfinite(values).any() and not (name == "registers" and "reg" not in result.prefix_kinds):
                ax.plot(layers, values, marker=marker, linestyle=":", label=f"{query} query -> {name}")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_ylabel("fraction")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("outliers and attention sinks")
    ax.legend(fontsize="x-small")
    return ax


def plot_neighbour_similarity(result: TokenNorms, *, ax: Axes | None = None) -> Axes:
    """Mean cosine similarity of a patch's input embedding to its grid neighbours, outlier vs normal patches, per
    layer (Darcet et al. 2023 Fig. 5a: outliers sit in patches that look like their neighbours)."""
    if ax is None:
        with vitlens_style():
            ax = new_figure(4.0, 3.4).add_subplot()
    layers = result.layers
    for values, marker, label in (
        (result.neighbour_similarity_outliers, "o-", "outlier patches"),
        (result.neighbour_similarity_normal, "s--", "normal patches"),
    ):
        if np.isfinite(values).any():
            ax.plot(layers, values, marker, label=label)
    if not np.isfinite(result.neighbour_similarity_outliers).any():
        ax.text(0.5, 0.06, "no outliers", transform=ax.transAxes, ha="center", fontsize="small")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cosine similarity to neighbours")
    ax.set_title("are outliers redundant patches?")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small")
    return ax


def plot_outlier_map(result: TokenNorms, *, ax: Axes | None = None) -> Axes:
    """How often each patch position is an outlier in the last chosen layer."""
    if ax is None:
        with vitlens_style():
            ax = new_figure(3.6, 3.4).add_subplot()
    # A fraction of images: the scale is 0..1 whatever is found, so an empty map reads as "never an outlier".
    image = ax.imshow(result.outlier_map[-1], cmap="magma", vmin=0, vmax=1)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, label="fraction of images")
    ax.set_title(f"outlier positions, layer {int(result.layers[-1])}")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def tokens_figure(result: TokenNorms) -> Figure:
    """The four panels side by side: norm distributions, outliers and sinks vs depth, neighbour similarity of
    outlier and normal patches, outlier map."""
    with vitlens_style():
        fig = new_figure(18.0, 3.8)
        axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1.3, 1.3, 1.1, 1]})
        plot_token_norms(result, ax=axes[0])
        plot_outliers_by_depth(result, ax=axes[1])
        plot_neighbour_similarity(result, ax=axes[2])
        plot_outlier_map(result, ax=axes[3])
    return fig


def _patch_overlay(ax: Axes, photo: Image.Image | None, grid: np.ndarray, **imshow) -> object:
    """Draw ``grid [H, W]`` one block per patch over the photo in grey (or alone); NaN patches stay transparent."""
    from vitlens.plotting.rollout import ALPHA

    if photo is None:
        return ax.imshow(grid, interpolation="nearest", **imshow)
    grey = np.asarray(photo.convert("L"))  # [h, w] pixels
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
    extent = (-0.5, grey.shape[1] - 0.5, grey.shape[0] - 0.5, -0.5)  # the grid's blocks cover the photo's pixels
    return ax.imshow(grid, interpolation="nearest", extent=extent, alpha=ALPHA, **imshow)


def plot_token_norm_map(
    maps: TokenImageMaps, index: int, photo: Image.Image | None = None, *, ax: Axes | None = None
) -> Axes:
    """Image ``index``'s patch-token norms after ``maps.layer`` (log colour), outliers ringed, over the photo."""
    from matplotlib.colors import LogNorm

    if ax is None:
        with vitlens_style():
            ax = new_figure(2.4, 2.4).add_subplot()
    norms = maps.norms[index]  # [H, W]
    positive = norms[norms > 0]
    lo, hi = (float(positive.min()), float(positive.max())) if positive.size else (1.0, 10.0)
    image = _patch_overlay(ax, photo, norms, cmap="viridis", norm=LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001)))
    rows, cols = np.nonzero(maps.outliers[index])
    if rows.size:
        h, w = norms.shape
        sy, sx = (1.0, 1.0) if photo is None else (photo.height / h, photo.width / w)
        y, x = (rows + 0.5) * sy - 0.5, (cols + 0.5) * sx - 0.5  # patch centres in the drawn coordinates
        ax.scatter(x, y, s=60, facecolors="none", edgecolors="red", linewidths=1.2)
    ax.figure.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"norms, layer {maps.layer} ({rows.size} outliers)", fontsize=8)
    return ax


def plot_query_attention(
    maps: TokenImageMaps,
    index: int,
    photo: Image.Image | None = None,
    *,
    without_outliers: bool = False,
    ax: Axes | None = None,
) -> Axes:
    """Image ``index``'s query attention on the patches in ``maps.layer`` (scaled to its max), with or without the
    outlier keys (removed keys left blank)."""
    if ax is None:
        with vitlens_style():
            ax = new_figure(2.4, 2.4).add_subplot()
    grid = (maps.attention_without_outliers if without_outliers else maps.attention)[index]  # [H, W]
    top = np.nanmax(grid) if np.isfinite(grid).any() else 1.0
    _patch_overlay(ax, photo, grid, cmap="inferno", vmin=0.0, vmax=top if top > 0 else 1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{maps.query} attention{' w/o outliers' if without_outliers else ''}", fontsize=8)
    return ax


def tokens_images_figure(maps: TokenImageMaps, photos: Sequence[Image.Image] | None, names: Sequence[str]) -> Figure:
    """A row per image: the photo, its token-norm map, the query's attention, and that attention without the
    outlier keys (without photos, a result read back from its files, the three maps alone)."""
    from vitlens.plotting.rollout import plot_photo

    n = maps.norms.shape[0]
    first = 0 if photos is None else 1
    cols = first + 3
    with vitlens_style():
        fig = new_figure(2.6 * cols, 2.5 * n + 0.3)
        axes = np.asarray(fig.subplots(n, cols, squeeze=False))  # [B, cols]
        for i in range(n):
            photo = None if photos is None else photos[i]
            if photo is not None:
                plot_photo(photo, ax=axes[i, 0], title=names[i][-24:])
            plot_token_norm_map(maps, i, photo, ax=axes[i, first])
            plot_query_attention(maps, i, photo, ax=axes[i, first + 1])
            plot_query_attention(maps, i, photo, without_outliers=True, ax=axes[i, first + 2])
    return fig
