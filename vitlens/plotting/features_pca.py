"""Figures of the patch-token PCA as RGB (DINOv2 paper Fig. 1 style): each photo beside its map, at photo resolution."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from vitlens.plotting.rollout import plot_photo, upsample_map
from vitlens.plotting.style import new_figure, vitlens_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

_TILE = 1.55  # inches per image tile
MAX_COLUMNS = 6  # image pairs (photo, map) per row before the grid wraps


def upsample_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``rgb`` ``[H, W, 3]`` bilinearly upsampled per channel to ``size = (height, width)``, clipped to [0, 1]."""
    channels = [upsample_map(rgb[..., c], size) for c in range(rgb.shape[-1])]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)  # [height, width, 3]


def plot_features_pca(
    image: Image.Image | None, rgb: np.ndarray, *, ax: Axes | None = None, title: str | None = None
) -> Axes:
    """Draw the RGB map ``[H, W, 3]`` upsampled (bilinear) to the photo's size; without a photo (a result read back
    from its files), one square per patch.

    Args:
        image: the photo as the model sees it (``ImageDataset.load_pil``), or None.
        rgb: the first three components in [0, 1] (``FeaturesPCA.rgb[i]``).
        ax: where to draw; a new figure's axes when None.
        title: axes title.
    """
    if ax is None:
        with vitlens_style():
            ax = new_figure(2.2, 2.2).add_subplot()
    if image is None:
        ax.imshow(np.asarray(rgb, dtype=np.float64), interpolation="nearest")
    else:
        ax.imshow(upsample_rgb(np.asarray(rgb, dtype=np.float64), (image.height, image.width)))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title)
    return ax


def features_pca_figure(
    photos: Sequence[Image.Image] | None, rgb: np.ndarray, names: Sequence[str], *, title: str = ""
) -> Figure:
    """Every image: its photo and, beside it, its RGB map; ``MAX_COLUMNS`` pairs per row. Without photos, the maps."""
    n = len(names)
    per_image = 1 if photos is None else 2
    cols = min(n, MAX_COLUMNS)
    rows = math.ceil(n / cols)
    aspect = 1.0 if photos is None else photos[0].height / photos[0].width
    with vitlens_style():
        fig = new_figure(cols * per_image * _TILE + 0.2, rows * (_TILE * aspect + 0.25) + (0.3 if title else 0))
        axes = np.asarray(fig.subplots(rows, cols * per_image, squeeze=False))  # [rows, cols * per_image]
        for k in range(rows * cols):
            r, c = divmod(k, cols)
            pair = axes[r, c * per_image : (c + 1) * per_image]
            if k >= n:
                for ax in pair:
                    ax.set_axis_off()
                continue
            name = _short(names[k])
            if photos is None:
                plot_features_pca(None, rgb[k], ax=pair[0], title=name)
            else:
                plot_photo(photos[k], ax=pair[0], title=name)
                plot_features_pca(photos[k], rgb[k], ax=pair[1], title="PCA 1-3 as RGB")
        if title:
            fig.suptitle(title)
    return fig


def _short(name: str, limit: int = 22) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]
