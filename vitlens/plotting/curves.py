"""Training curves: loss and held-out accuracy per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vitlens.plotting.style import new_figure, vitlens_style

if TYPE_CHECKING:
    from vitlens.history import EpochStats


def plot_loss(history: Sequence[EpochStats], *, ax: Axes) -> Axes:
    epochs = [h.epoch for h in history]
    ax.plot(epochs, [h.train_loss for h in history], marker="o", markersize=3, label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (label-smoothed CE)")
    ax.legend(frameon=False)
    return ax


def plot_accuracy(history: Sequence[EpochStats], *, ax: Axes) -> Axes:
    epochs = [h.epoch for h in history]
    ax.plot(epochs, [100 * h.train_acc for h in history], marker="o", markersize=3, label="train (augmented)")
    ax.plot(epochs, [100 * h.test_acc for h in history], marker="o", markersize=3, label="held-out")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(frameon=False, loc="lower right")
    return ax


def training_curves_figure(history: Sequence[EpochStats]) -> Figure:
    with vitlens_style():
        fig = new_figure(8, 3)
        ax_loss, ax_acc = fig.subplots(1, 2)
        plot_loss(history, ax=ax_loss)
        plot_accuracy(history, ax=ax_acc)
        best = max(history, key=lambda h: h.test_acc)
        fig.suptitle(f"final held-out accuracy {100 * history[-1].test_acc:.1f}% (best {100 * best.test_acc:.1f}%)")
    return fig
