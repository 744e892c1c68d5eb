"""Trend figures of `vitlens compare`: numbers over epochs (a training run) or side by side (a list of models)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vitlens.plotting.style import new_figure, vitlens_style

if TYPE_CHECKING:
    from vitlens.compare import Trend


def _floats(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)  # [models]


def plot_trend(trend: Trend, *, ax: Axes | None = None) -> Axes:
    """One panel: a line per series over the epochs, with its band; for a list of models, markers side by side.

    Models of a list are unrelated, so no line joins them: each series is a column of markers, shifted a little so
    that series at one model do not hide each other, and a band becomes an error bar.
    """
    if ax is None:
        with vitlens_style():
            ax = new_figure(6, 3.5).subplots()
    by_epoch = trend.by_epoch
    positions = np.array(trend.x, dtype=np.float64) if by_epoch else np.arange(len(trend.x), dtype=np.float64)
    count = max(1, len(trend.lines))
    for i, (label, values) in enumerate(trend.lines.items()):
        y = _floats(values)  # [models]
        band = trend.bands.get(label)
        if by_epoch:
            (line,) = ax.plot(positions, y, marker="o", markersize=3, label=label)
            if band is not None:
                ax.fill_between(positions, _floats(band[0]), _floats(band[1]), color=line.get_color(), alpha=0.15)
        else:
            x = positions + (i - (count - 1) / 2) * min(0.6 / count, 0.15)
            yerr = None
            if band is not None:
                yerr = np.stack([y - _floats(band[0]), _floats(band[1]) - y])  # [2, models]
            ax.errorbar(x, y, yerr=yerr, marker="o", markersize=4, linestyle="none", capsize=2, label=label)
    if by_epoch:
        ax.set_xlabel("epoch")
    else:
        ax.set_xticks(positions, [str(v) for v in trend.x], rotation=30 if len(trend.x) > 3 else 0, ha="right")
        ax.set_xlabel("model")
        ax.set_xlim(positions[0] - 0.5, positions[-1] + 0.5)
    ax.set_ylabel(trend.ylabel)
    ax.set_title(trend.title, fontsize="medium")
    if trend.lines:
        ax.legend(frameon=False, fontsize="small", ncol=2 if len(trend.lines) > 4 else 1)
    return ax


def trend_figure(panels: Sequence[Trend]) -> Figure:
    """The panels side by side: the figure `vitlens compare` saves for one analysis."""
    with vitlens_style():
        fig = new_figure(5.5 * len(panels), 3.6)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for trend, ax in zip(panels, axes, strict=True):
            plot_trend(trend, ax=ax)
    return fig
