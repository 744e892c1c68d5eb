"""Image decoding and the model's input geometry: any file or PIL mode to a grey or RGB image of ``img_size``.

Follows timm's eval transforms (resize by ``crop_pct``, centre crop, per-channel normalisation), written with PIL
so that a DataLoader worker needs neither torchvision nor timm.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitlens.errors import VitlensError
from vitlens.layout import Preprocess

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

_WHITE = (255, 255, 255, 255)


def _read_file(path: Path) -> Image.Image:
    """Decode an image file fully (so truncation shows here), treating a decompression bomb as unreadable."""
    with warnings.catch_warnings():
        # PIL only *warns* between MAX_IMAGE_PIXELS and twice that; we want such files skipped, not decoded.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.load()
            return im.copy()  # the context manager closes the file, and a closed PIL image refuses operations


def _to_model_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Convert any PIL mode to ``L`` (``in_chans=1``) or ``RGB`` (``in_chans=3``).

    16-bit grey is rescaled to 8 bits (PIL's own ``convert`` clips it, turning most of the range white);
    transparency is composited onto white, which is how viewers show such images.
    """
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 'I' is what PIL gives for 16-bit sources in some formats, so it is read as 0..65535 too.
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = img.convert("L")  # float images have no agreed range; PIL clips to 0..255
    elif img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, _WHITE), img.convert("RGBA"))
    target = "L" if in_chans == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def _resize_crop(img: Image.Image, preprocess: Preprocess) -> Image.Image:
    """timm's eval geometry (``timm.data.transforms_factory.transforms_imagenet_eval``): resize towards
    ``img_size / crop_pct``, then centre-crop ``img_size``.

    With ``crop_mode='center'`` the aspect ratio is kept: for a square input the shorter side becomes
    ``floor(S / crop_pct)`` (torchvision's ``Resize(int)``, the longer side truncated); for a non-square one the
    image is scaled by the smaller of the two side ratios and both sides rounded (timm's ``ResizeKeepRatio``), so
    that it covers ``floor(H / crop_pct) x floor(W / crop_pct)``. ``crop_mode='squash'`` resizes to exactly that size
    (aspect not kept), as Hugging Face's ``ViTImageProcessor`` does. The 1e-6 lets a ``crop_pct`` read as
    ``crop / resize`` (e.g. 17 / 25) give back ``resize`` where the float quotient lands just below it.
    """
    H, W = preprocess.img_size
    w, h = img.size
    scale_h, scale_w = math.floor(H / preprocess.crop_pct + 1e-6), math.floor(W / preprocess.crop_pct + 1e-6)
    if preprocess.crop_mode == "squash":
        new_w, new_h = scale_w, scale_h
    elif H == W:
        # torchvision's Resize(int) rounding: the longer side is truncated, not rounded.
        new_w, new_h = (scale_w, int(scale_w * h / w)) if w <= h else (int(scale_h * w / h), scale_h)
    else:
        ratio = min(h / scale_h, w / scale_w)  # ResizeKeepRatio(longest=0): the shorter relative side fits
        new_w, new_h = round(w / ratio), round(h / ratio)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _RESAMPLE[preprocess.interpolation])
    # torchvision's CenterCrop offsets; PIL fills anything outside the image (crop_pct > 1) with black.
    left, top = round((new_w - W) / 2.0), round((new_h - H) / 2.0)
    return img.crop((left, top, left + W, top + H))


def _channel_stats(preprocess: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as ``[C, 1, 1]`` tensors, fitted to ``in_chans``.

    A grey model often carries the RGB defaults; the average is exact when the three values are equal (as in
    :class:`Preprocess`'s own default) and a grey image is a mix of the channels otherwise.
    """
    C = preprocess.in_chans
    stats = []
    for name in ("mean", "std"):
        values = tuple(getattr(preprocess, name))
        if len(values) == 1:
            values = values * C
        elif len(values) != C and C == 1:
            values = (sum(values) / len(values),)
        elif len(values) != C:
            raise VitlensError(f"preprocess {name} has {len(values)} values but the model takes {C} channels")
        stats.append(torch.tensor(values, dtype=torch.float32).view(C, 1, 1))  # [C, 1, 1]
    if bool((stats[1] <= 0).any()):
        raise VitlensError(f"preprocess std must be positive, got {tuple(preprocess.std)}")
    return stats[0], stats[1]


def _check_preprocess(preprocess: Preprocess) -> None:
    if preprocess.in_chans not in (1, 3):
        raise VitlensError(f"models with in_chans={preprocess.in_chans} are not supported; vitlens feeds grey or RGB")
    if preprocess.interpolation not in _RESAMPLE:
        known = ", ".join(_RESAMPLE)
        raise VitlensError(f"unknown interpolation {preprocess.interpolation!r}; use one of {known}")
    if min(preprocess.img_size) < 1 or preprocess.crop_pct <= 0:
        raise VitlensError(f"bad preprocess: img_size {preprocess.img_size}, crop_pct {preprocess.crop_pct}")


def _one_line(e: BaseException) -> str:
    """An exception as one line of text, for messages about a file that could not be decoded or listed."""
    return " ".join(str(e).split()) or type(e).__name__
