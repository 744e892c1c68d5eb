"""The CKA heat map: layer x layer, layer indices on the axes, the first layers at the bottom left (as in Kornblith
et al. 2019, Fig. 3, and Raghu et al. 2021, Fig. 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vitlens.plotting.style import new_figure, vitlens_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vitlens.analysis.cka import CKA

_MAX_TICKS = 16  # above this many layers, every k-th index is labelled


def _ticks(layers: np.ndarray) -> tuple[list[int], list[str]]:
    step = max(1, -(-len(layers) // _MAX_TICKS))
    positions = list(range(0, len(layers), step))
    return positions, [str(int(layers[i])) for i in positions]


def plot_cka(result: CKA, *, ax: Axes | None = None, labels: tuple[str, str] = ("layer of A", "layer of B")) -> Axes:
    """CKA of every layer pair: rows are model A's layers (y, first layer at the bottom), columns model B's (x).

    The colour scale is fixed to [0, 1] (CKA's range for these features), so two maps read alike.
    """
    if ax is None:
        with vitlens_style():
            ax = new_figure(4.4, 3.8).add_subplot()
    image = ax.imshow(result.matrix, cmap="magma", vmin=0, vmax=1, origin="lower", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, label="linear CKA")
    ys, ylabels = _ticks(result.layers_a)
    xs, xlabels = _ticks(result.layers_b)
    ax.set_yticks(ys, ylabels)
    ax.set_xticks(xs, xlabels)
    ax.set_ylabel(labels[0])
    ax.set_xlabel(labels[1])
    ax.set_title(f"linear CKA, {result.tokens} tokens, {result.num_images} images")
    return ax


def cka_figure(result: CKA, *, labels: tuple[str, str] = ("layer of A", "layer of B")) -> Figure:
    """The heat map alone, on a figure of its own."""
    with vitlens_style():
        fig = new_figure(4.4, 3.8)
        plot_cka(result, ax=fig.add_subplot(), labels=labels)
    return fig
