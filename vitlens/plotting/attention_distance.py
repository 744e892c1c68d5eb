"""The mean attention distance figure: per layer and head, like Fig. 7 (right) of the ViT paper (Dosovitskiy et al.)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.ticker import MaxNLocator

from vitlens.plotting.style import new_figure, vitlens_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vitlens.analysis.attention_distance import AttentionDistance

# Up to this many heads get a legend entry each; more get a colour bar (16-head ViT-H would need two legend columns
# taller than the plot).
_MAX_LEGEND_HEADS = 12
_DODGE = 0.36  # total horizontal spread of one layer's heads, in layers: keeps coincident heads visible


def _head_colours(num_heads: int) -> np.ndarray:
    """One distinct colour per head: tab10/tab20 while they last, then evenly spaced viridis."""
    from matplotlib import colormaps

    if num_heads <= 10:
        return colormaps["tab10"](np.arange(num_heads))
    if num_heads <= 20:
        return colormaps["tab20"](np.arange(num_heads))
    return colormaps["viridis"](np.linspace(0, 1, num_heads))


def plot_attention_distance(result: AttentionDistance, *, ax: Axes | None = None) -> Axes:
    """Draw one point per head at each layer: x = network depth (0-based layer), y = mean attention distance (px).

    Points of one layer are spread slightly sideways so that heads with equal distances stay visible; a dashed line
    marks the distance of uniform attention over all patches (fully global attention).

    Args:
        result: from :func:`vitlens.attention.mean_attention_distance_for` or
            :func:`vitlens.analysis.mean_attention_distance`.
        ax: where to draw; a new figure's axes when None.

    Returns:
        The axes drawn on.
    """
    if ax is None:
        with vitlens_style():
            fig = new_figure(4.8, 3.4)
            ax = fig.add_subplot()
    distance = np.asarray(result.distance_px)  # [L, heads]
    depth, num_heads = distance.shape
    colours = _head_colours(num_heads)
    offsets = (np.arange(num_heads) - (num_heads - 1) / 2) * (_DODGE / max(num_heads - 1, 1))  # [heads]
    layers = np.arange(depth)
    for h in range(num_heads):
        ax.scatter(
            layers + offsets[h],
            distance[:, h],
            s=18,
            color=colours[h],
            edgecolors="white",
            linewidths=0.4,
            label=f"head {h}",
            zorder=3,
        )
    uniform = float(result.uniform_px)
    ax.axhline(
        uniform, color="0.35", linestyle="--", linewidth=1.0, zorder=1, label="uniform attention\n(fully global)"
    )
    top = max(uniform, float(np.nanmax(distance)) if distance.size else 0.0)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    ax.set_xlim(-0.6, depth - 0.4)
    if depth <= 16:
        ax.set_xticks(layers)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.grid(axis="y", color="0.92", linewidth=0.6, zorder=0)
    renorm = "renormalised to patches" if result.renormalized else "not renormalised"
    ax.set_title(f"Mean attention distance · {result.num_images} images, {renorm}", loc="left")
    if num_heads <= _MAX_LEGEND_HEADS:
        handles, labels = ax.get_legend_handles_labels()
        # The heads, then the dashed line: in the legend its label can never hide a point.
        ax.legend(
            handles,
            labels,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
            handletextpad=0.2,
            borderaxespad=0.0,
        )
    else:  # too many heads for a legend: a colour bar, and the line labelled in place, under the points
        ax.annotate(
            "uniform attention (fully global)",
            xy=(1.0, uniform),
            xycoords=("axes fraction", "data"),
            xytext=(-2, 3),
            textcoords="offset points",
            ha="right",
            va="bottom",
            fontsize=7,
            color="0.35",
            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            zorder=2,  # over the line, under the points: the label never hides a head
        )
        from matplotlib.cm import ScalarMappable

        cmap = ListedColormap(colours)
        norm = BoundaryNorm(np.arange(num_heads + 1) - 0.5, num_heads)
        bar = ax.figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02, fraction=0.05)
        bar.set_label("head")
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        bar.outline.set_visible(False)
    return ax


def attention_distance_figure(result: AttentionDistance) -> Figure:
    """A new figure with :func:`plot_attention_distance`, sized for the page, in vitlens' style."""
    with vitlens_style():
        fig = new_figure(5.2, 3.4)
        plot_attention_distance(result, ax=fig.add_subplot())
    return fig
