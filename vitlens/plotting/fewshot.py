"""The few-shot figures (ViT paper §4.1): accuracy against shots per layer, or a layer x shots heat map; and the
weighted k-NN probe's panel (DINO) beside them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from matplotlib.ticker import FixedLocator, NullLocator

from vitlens.plotting.style import new_figure, vitlens_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vitlens.analysis.fewshot import FewShotResult
    from vitlens.analysis.knn import KnnResult

FigureKind = Literal["curves", "heatmap"]
_MAX_CURVES = 6  # more layers than this read better as a heat map
_MAX_ANNOTATED_CELLS = 120  # heat map cells get their value written in them up to this many


def _layer_label(result: FewShotResult | KnnResult, layer: int) -> str:
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


# --------------------------------------------------------------------------------------------------------------
# The k-NN probe (DINO's weighted k-NN, vitlens.analysis.knn) beside the ridge probe


def _k_label(result: KnnResult, c: int, i: int) -> str:
    """``k=20``, or ``k=200 (used 50)`` where the pool of shots count ``i`` capped it."""
    k, used = result.k[c], int(result.k_used[i, c])
    return f"k={k}" if used == k else f"k={k} (used {used})"


def plot_knn(result: KnnResult, *, ax: Axes | None = None, layer: int = -1, full_pool: bool = False) -> Axes:
    """k-NN test accuracy (%): against shots, one line per k (in layer column ``layer``), with a ±1 std band over
    seeds; with a single shots count (e.g. the full pool), against k, one line per layer.

    Args:
        result: from :func:`vitlens.analysis.knn.fewshot_knn`.
        ax: where to draw; a new figure's axes when None.
        layer: the column of ``result.layers`` drawn against shots (default the last).
        full_pool: the shots are the whole training pool (``shots="all"``), said so in the title.

    Returns:
        The axes drawn on.
    """
    if ax is None:
        with vitlens_style():
            ax = new_figure(4.8, 3.4).add_subplot()
    mean, std = 100 * result.mean, 100 * result.std  # [S, L, len(k)]
    if len(result.shots) > 1:
        x = np.asarray(result.shots, dtype=float)  # [S]
        for c in range(len(result.k)):
            label = f"k={result.k[c]}" + (
                " (capped by small pools)" if (result.k_used[:, c] < result.k[c]).any() else ""
            )
            m, s = mean[:, layer, c], std[:, layer, c]
            (line,) = ax.plot(x, m, marker="o", markersize=3.5, linewidth=1.4, label=label)
            ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_xlabel("training examples per class (shots)")
        where = "" if len(result.layers) == 1 else f", layer {result.layers[layer]}"
    else:
        x = np.asarray(result.k_used[0], dtype=float)  # [len(k)] the k actually used
        shown = range(len(result.layers)) if len(result.layers) <= _MAX_CURVES else [layer]
        for j in shown:
            ax.plot(
                x, mean[0, j], marker="o", markersize=3.5, linewidth=1.4, label=_layer_label(result, result.layers[j])
            )
        ax.set_xlabel("neighbours k (capped at the pool)")
        where = f", full pool ({result.num_train} images)" if full_pool else f", {result.shots[0]} shots"
    chance = 100 * result.chance
    ax.axhline(chance, color="0.35", linestyle="--", linewidth=1.0, label=f"chance (1/{result.num_classes})")
    ticks = np.unique(x)
    if len(ticks) > 1:
        ax.set_xscale("log")
        ax.set_xlim(ticks[0] / 1.3, ticks[-1] * 1.3)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{int(t)}" for t in ticks])
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(axis="y", color="0.92", linewidth=0.6, zorder=0)
    seeds = len(result.seeds)
    ax.set_title(
        f"Weighted k-NN (DINO), T = {result.temperature:g} · {result.feature or 'features'}{where}, "
        f"{seeds} seed{'s' if seeds != 1 else ''}",
        loc="left",
    )
    ax.legend(frameon=False, loc="best")
    return ax


def fewshot_knn_figure(
    lsr: FewShotResult | None,
    knn: KnnResult,
    *,
    layer: int = -1,
    kind: FigureKind | None = None,
    full_pool: bool = False,
) -> Figure:
    """A new figure with the k-NN panel (:func:`plot_knn`), right of the ridge probe's panel when ``lsr`` is given.

    Args:
        lsr: the ridge probes on the same shots, or None for the k-NN panel alone.
        knn: the k-NN probes.
        layer: the column of the layers the k-NN panel draws against shots.
        kind: the ridge panel's kind, as in :func:`fewshot_figure`.
        full_pool: as in :func:`plot_knn`.
    """
    with vitlens_style():
        if lsr is None:
            fig = new_figure(5.2, 3.4)
            plot_knn(knn, ax=fig.add_subplot(), layer=layer, full_pool=full_pool)
            return fig
        kind = figure_kind(lsr, kind)
        height = max(3.4, 1.2 + 0.28 * len(lsr.layers)) if kind == "heatmap" else 3.4
        fig = new_figure(10.8, height)
        left, right = fig.subplots(1, 2)
        plot_fewshot(lsr, ax=left, kind=kind)
        plot_knn(knn, ax=right, layer=layer, full_pool=full_pool)
    return fig
