"""Figures of class-specific relevance maps (rollout's photo-and-overlay figures, titled with the method and class)
and of their faithfulness: the perturbation curves of every method beside the random order's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from vitlens.plotting.rollout import plot_rollout, rollout_figure, rollout_grid_figure, rollout_map_grid_figure
from vitlens.plotting.style import new_figure, vitlens_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

    from vitlens.analysis.explain import Explanation
    from vitlens.analysis.faithfulness import Faithfulness

METHOD_TITLES = {
    "attribution": "attribution (Chefer et al. 2021)",
    "grad-rollout": "gradient-weighted rollout",
    "last-layer": "last layer, attention x gradient",
    "rollout": "attention rollout (class-agnostic)",
}


def explanation_settings(explanation: Explanation) -> str:
    """The method and its options in words, for titles."""
    target = "mean of patch tokens" if explanation.target == "mean-patch" else f"{explanation.target} token"
    text = f"{METHOD_TITLES.get(explanation.method, explanation.method)}: {target}"
    if explanation.discard_ratio:
        text += f", discard {explanation.discard_ratio:g}"
    return text


def plot_explanation(
    image: Image.Image | None, relevance_map: np.ndarray, *, ax: Axes | None = None, title: str | None = None
) -> Axes:
    """Draw a relevance map ``[H, W]`` (max 1) over the photo in grey, or alone without a photo (rollout's overlay,
    :func:`~vitlens.plotting.rollout.plot_rollout`)."""
    return plot_rollout(image, relevance_map, ax=ax, title=title)


def explain_figure(image: Image.Image, relevance_map: np.ndarray, title: str, explanation: Explanation) -> Figure:
    """Photo and relevance overlay side by side with a colour bar (rollout's figure, the overlay titled with the
    method); ``title`` names the image and its class above the photo."""
    fig = rollout_figure(image, relevance_map, title=title)
    fig.axes[1].set_title(explanation.method)
    return fig


def explain_grid_figure(
    images: Sequence[Image.Image] | None, maps: np.ndarray, names: Sequence[str], *, title: str = ""
) -> Figure:
    """All images in one figure, each photo above its overlay; without photos (read back from files) the maps alone."""
    if images is None:
        return rollout_map_grid_figure(maps, names, title=title)
    return rollout_grid_figure(images, maps, names, title=title)


CURVE_TITLES = {
    "deletion": "deletion: most relevant removed first (lower is faithful)",
    "negative": "negative: least relevant removed first (higher is faithful)",
    "insertion": "insertion: most relevant inserted first (higher is faithful)",
}


def plot_faithfulness(faithfulness: Faithfulness, curve: str = "deletion", *, ax: Axes | None = None) -> Axes:
    """One perturbation curve kind: the mean class probability against the fraction of patches removed (inserted,
    for insertion), one line per method labelled with its area, the random order dashed in grey."""
    from vitlens.analysis.faithfulness import CURVES, RANDOM

    if ax is None:
        with vitlens_style():
            ax = new_figure(4.2, 3.4).add_subplot()
    c = CURVES.index(curve)
    mean, areas = faithfulness.mean_probabilities(), faithfulness.probability_areas()
    for i, method in enumerate(faithfulness.methods):
        style = {"color": "0.5", "linestyle": "--"} if method == RANDOM else {"marker": "o", "markersize": 3}
        ax.plot(faithfulness.fractions, mean[i, c], label=f"{method} ({areas[i, c]:.3f})", **style)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of patches inserted" if curve == "insertion" else "fraction of patches removed")
    ax.set_ylabel("probability of the explained class")
    ax.set_title(CURVE_TITLES.get(curve, curve), fontsize="small")
    ax.legend(fontsize="x-small", title="method (area)", title_fontsize="x-small")
    return ax


def faithfulness_figure(faithfulness: Faithfulness, *, title: str = "") -> Figure:
    """Deletion, negative perturbation and insertion side by side (:func:`plot_faithfulness` each)."""
    from vitlens.analysis.faithfulness import CURVES

    with vitlens_style():
        fig = new_figure(4.0 * len(CURVES), 3.6)
        for curve, ax in zip(CURVES, fig.subplots(1, len(CURVES), sharey=True), strict=True):
            plot_faithfulness(faithfulness, curve, ax=ax)
        removal = faithfulness.removal
        if faithfulness.blur_sigma is not None:
            removal += f" (sigma {faithfulness.blur_sigma[0]:g} x {faithfulness.blur_sigma[1]:g} px)"
        fig.suptitle(f"faithfulness, {removal} removal" + (f", {title}" if title else ""))
    return fig
