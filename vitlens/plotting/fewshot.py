"""The few-shot figures (ViT paper §4.1): accuracy against shots per layer, or a layer x shots heat map."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from matplotlib.ticker import FixedLocator, NullLocator

from vitlens.plotting.style import new_figure, vitlens_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vitlens.analysis.fewshot import FewShotResult

FigureKind = Literal["curves", "heatmap"]
_MAX_CURVES = 6  # more layers than this read better as a heat map
_MAX_ANNOTATED_CELLS = 120  # heat map cells get their value written in them up to this many


def _layer_label(result: FewShotResult, layer: int) -> str:
    kind = result.feature or "features"
    return f"{kind}" if len(result.layers) == 1 else f"layer {layer} ({kind})"


def _title(result: FewShotResult) -> str:
    l2 = "λ by leave-one-out" if result.l2_auto else f"λ = {result.l2.flat[0]:g}"
    seeds = len(result.seeds)
    return f"Few-shot linear probe · {result.num_classes} classes, {seeds} seed{'s' if seeds != 1 else ''}, {l2}"


def plot_fewshot_curves(result: FewShotResult, *, ax: Axes | None = None) -> Axes:
    """Test accuracy (%) against shots per class, one line per layer with a ±1 std band over seeds.

    The x axis is logarithmic with a tick at every shots value; a dashed line marks chance (1/K).

    Args:
        result: from :func:`vitlens.analysis.fewshot.fewshot_lsr`.
        ax: where to draw; a new figure's axes when None.

    Returns:
        The axes drawn on.
    """
    if ax is None:
        with vitlens_style():
            ax = new_figure(4.8, 3.4).add_subplot()
    shots = np.asarray(result.shots, dtype=float)  # [S]
    mean, std = 100 * result.mean, 100 * result.std  # [S, L]
    for j, layer in enumerate(result.layers):
        (line,) = ax.plot(
            shots, mean[:, j], marker="o", markersize=3.5, linewidth=1.4, label=_layer_label(result, layer)
        )
        ax.fill_between(shots, mean[:, j] - std[:, j], mean[:, j] + std[:, j], color=line.get_color(), alpha=0.2, lw=0)
    chance = 100 * result.chance
    ax.axhline(chance, color="0.35", linestyle="--", linewidth=1.0, label=f"chance (1/{result.num_classes})")
    if len(shots) > 1:
        ax.set_xscale("log")
        ax.set_xlim(shots[0] / 1.3, shots[-1] * 1.3)
    ax.xaxis.set_major_locator(FixedLocator(shots))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{int(s)}" for s in shots])
    ax.set_ylim(0, 100)
    ax.set_xlabel("training examples per class (shots)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(axis="y", color="0.92", linewidth=0.6, zorder=0)
    ax.set_title(_title(result), loc="left")
    ax.legend(frameon=False, loc="best")
    return ax


def plot_fewshot_heatmap(result: FewShotResult, *, ax: Axes | None = None) -> Axes:
    """Mean test accuracy (%) over seeds as a layer (rows, 0 at the bottom) x shots (columns) heat map.

    The colour scale runs from chance to 100 %, so a cell at the bottom of the scale has learnt nothing; values are
    written in the cells when there are few enough.

    Args:
        result: from :func:`vitlens.analysis.fewshot.fewshot_lsr`.
        ax: where to draw; a new figure's axes when None.

    Returns:
        The axes drawn on.
    """
    if ax is None:
        with vitlens_style():
            ax = new_figure(4.8, 3.8).add_subplot()
    grid = 100 * result.mean.T  # [L, S]
    chance = 100 * result.chance
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=chance, vmax=100)
    num_layers, num_shots = grid.shape
    ax.set_xticks(np.arange(num_shots), [str(s) for s in result.shots])
    ax.set_yticks(np.arange(num_layers), [str(layer) for layer in result.layers])
    if grid.size <= _MAX_ANNOTATED_CELLS:
        for (row, col), value in np.ndenumerate(grid):
            light = (value - chance) < 0.6 * (100 - chance)  # dark cells get white text
            ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if light else "black")
    ax.set_xlabel("training examples per class (shots)")
    ax.set_ylabel(f"layer ({result.feature or 'features'})")
    ax.set_title(_title(result), loc="left")
    bar = ax.figure.colorbar(image, ax=ax, pad=0.02, fraction=0.05)
    bar.set_label(f"test accuracy (%), from chance ({chance:.0f}%)")
    bar.outline.set_visible(False)
    return ax


def figure_kind(result: FewShotResult, kind: FigureKind | None = None) -> FigureKind:
    """``kind``, or when None the heat map for more than a few layers and the curves otherwise."""
    if kind is None:
        return "heatmap" if len(result.layers) > _MAX_CURVES else "curves"
    return kind


def plot_fewshot(result: FewShotResult, *, ax: Axes | None = None, kind: FigureKind | None = None) -> Axes:
    """:func:`plot_fewshot_curves` or :func:`plot_fewshot_heatmap` (``kind`` as in :func:`fewshot_figure`)."""
    if figure_kind(result, kind) == "heatmap":
        return plot_fewshot_heatmap(result, ax=ax)
    return plot_fewshot_curves(result, ax=ax)


def fewshot_figure(result: FewShotResult, *, kind: FigureKind | None = None) -> Figure:
    """A new figure with :func:`plot_fewshot_curves` or :func:`plot_fewshot_heatmap`, in vitlens' style.

    Args:
        kind: ``curves`` or ``heatmap``; None picks the heat map for more than a few layers.
    """
    kind = figure_kind(result, kind)
    with vitlens_style():
        if kind == "heatmap":
            fig = new_figure(5.2, max(2.6, 1.2 + 0.28 * len(result.layers)))
            plot_fewshot_heatmap(result, ax=fig.add_subplot())
        else:
            fig = new_figure(5.2, 3.4)
            plot_fewshot_curves(result, ax=fig.add_subplot())
    return fig
