"""Token norm figures: per-layer patch-norm distributions (log x), outlier fraction and sink shares vs depth, and
the outlier position map (after Darcet et al. 2023, Figs. 3 and 4)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.ticker import MaxNLocator

from vitlens.plotting.style import new_figure, vitlens_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vitlens.analysis.tokens import TokenNorms

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
    """The three panels side by side: norm distributions, outliers and sinks vs depth, outlier map."""
    with vitlens_style():
        fig = new_figure(14.0, 3.8)
        axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.3, 1.3, 1]})
        plot_token_norms(result, ax=axes[0])
        plot_outliers_by_depth(result, ax=axes[1])
        plot_outlier_map(result, ax=axes[2])
    return fig
