"""Figures of attention rollout and per-head attention: the overlay's upsampling, titles."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vitlens.plotting.rollout import head_attention_figure, upsample_map
from vitlens.plotting.style import vitlens_style


def test_upsample_map_is_torchs_bilinear_without_corner_alignment():
    # A non-square map to a size that is no whole multiple of it, so that every pixel mixes up to four patches and
    # the edges clamp: nearest, align_corners=True or an off-by-half centre all differ from this.
    attention_map = np.random.default_rng(0).random((5, 7)).astype(np.float32)  # [H, W]
    size = (37, 61)
    expected = F.interpolate(
        torch.from_numpy(attention_map)[None, None], size=size, mode="bilinear", align_corners=False
    )[0, 0].numpy()  # [37, 61]
    up = upsample_map(attention_map, size)
    assert up.shape == size
    np.testing.assert_allclose(up, expected, rtol=0, atol=1e-6)


def test_head_attention_figure_title_is_wrapped_to_the_figure():
    images = [Image.new("RGB", (32, 32), (90, 120, 150))] * 2
    heads = np.random.default_rng(0).random((2, 2, 4, 4))  # [B, heads, H, W]: 3 narrow tiles a row
    with vitlens_style():
        fig = head_attention_figure(images, heads, ["a.png", "b.png"], layer=3, target="cls")
        fig.draw_without_rendering()  # lays out the figure, so that the title's extent is the drawn one
    (suptitle,) = fig.texts
    box = suptitle.get_window_extent()
    lines = fig.get_suptitle().split("\n")
    assert len(lines) > 1  # the whole title is wider than a figure of three narrow tiles
    assert " ".join(lines) == "layer 3: attention of the cls token per head (each tile scaled to its max)"
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width  # drawn inside the figure, not clipped at its sides
