"""Figures of class-specific relevance maps: rollout's photo-and-overlay figures, titled with the method and class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from vitlens.plotting.rollout import plot_rollout, rollout_figure, rollout_grid_figure, rollout_map_grid_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

    from vitlens.analysis.explain import Explanation

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
