"""Token layout and preprocessing of a ViT: the frozen facts every analysis asks for instead of guessing.

A timm ViT's token sequence is ``[prefix tokens..., patch tokens in row-major (H, W) order]``. The prefix is the
class token (if any), then either the distillation token (DeiT distilled) or the register tokens. Analyses slice
with :attr:`TokenLayout.patch_slice` and reshape with :attr:`TokenLayout.grid_size`; nothing else in vitlens
hard-codes ``1:`` or ``sqrt(N)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PrefixKind = Literal["cls", "dist", "reg"]
CropMode = Literal["center", "squash"]


@dataclass(frozen=True)
class TokenLayout:
    """Where each token sits in a ViT's sequence, and the pixel geometry of the patch grid."""

    grid_size: tuple[int, int]  # patch rows H, patch columns W
    patch_size: tuple[int, int]  # patch height, width in pixels
    prefix_kinds: tuple[PrefixKind, ...] = ("cls",)  # one entry per prefix token, in sequence order
    pos_embed_includes_prefix: bool = True  # False for timm's ``no_embed_class`` (prefix gets no pos. embedding)
    has_pos_embed: bool = True  # False when the model has no learned absolute position embedding

    def __post_init__(self) -> None:
        if min(self.grid_size) < 1 or min(self.patch_size) < 1:
            raise ValueError(f"grid_size {self.grid_size} and patch_size {self.patch_size} must be positive")

    @property
    def num_prefix_tokens(self) -> int:
        return len(self.prefix_kinds)

    @property
    def has_class_token(self) -> bool:
        return "cls" in self.prefix_kinds

    @property
    def has_dist_token(self) -> bool:
        return "dist" in self.prefix_kinds

    @property
    def num_reg_tokens(self) -> int:
        return self.prefix_kinds.count("reg")

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def img_size(self) -> tuple[int, int]:
        """Input height and width in pixels covered by the grid."""
        return (self.grid_size[0] * self.patch_size[0], self.grid_size[1] * self.patch_size[1])

    @property
    def prefix_slice(self) -> slice:
        return slice(0, self.num_prefix_tokens)

    @property
    def patch_slice(self) -> slice:
        return slice(self.num_prefix_tokens, self.num_prefix_tokens + self.num_patches)

    def token_index(self, kind: PrefixKind, n: int = 0) -> int:
        """Sequence index of the ``n``-th prefix token of ``kind`` (e.g. ``("reg", 2)`` for the third register).

        Raises:
            KeyError: the model has no such token.
        """
        positions = [i for i, k in enumerate(self.prefix_kinds) if k == kind]
        if not 0 <= n < len(positions):
            have = len(positions)
            raise KeyError(f"model has {have} '{kind}' token{'s' if have != 1 else ''}, asked for index {n}")
        return positions[n]

    def pos_embed_patch_slice(self) -> slice:
        """Rows of ``pos_embed[0]`` that belong to the patch tokens."""
        start = self.num_prefix_tokens if self.pos_embed_includes_prefix else 0
        return slice(start, start + self.num_patches)

    def as_dict(self) -> dict:
        return {
            "grid_size": list(self.grid_size),
            "patch_size": list(self.patch_size),
            "prefix_kinds": list(self.prefix_kinds),
            "num_prefix_tokens": self.num_prefix_tokens,
            "has_class_token": self.has_class_token,
            "has_dist_token": self.has_dist_token,
            "num_reg_tokens": self.num_reg_tokens,
            "pos_embed_includes_prefix": self.pos_embed_includes_prefix,
            "has_pos_embed": self.has_pos_embed,
        }


@dataclass(frozen=True)
class Preprocess:
    """How images are turned into the model's input tensor (what timm calls the data config)."""

    img_size: tuple[int, int]  # (H, W) in pixels of the model input
    in_chans: int = 3  # 1 for grey models; RGB is converted to L for them
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # per channel, after scaling to [0, 1]
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"  # PIL resampling name: bilinear, bicubic, nearest, lanczos
    crop_pct: float = 1.0  # resize to img_size / crop_pct, then centre-crop img_size (timm's convention)
    # timm's crop_mode: 'center' resizes the shorter side (aspect kept), 'squash' resizes both sides to
    # img_size / crop_pct (aspect not kept, as Hugging Face's ViTImageProcessor and DeiTImageProcessor do).
    crop_mode: CropMode = "center"

    def as_dict(self) -> dict:
        return {
            "img_size": list(self.img_size),
            "in_chans": self.in_chans,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }
