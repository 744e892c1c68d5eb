"""Model loading and the :class:`ViT` wrapper: the only package that knows timm's attribute names."""

from vitlens.models.load import load_vit
from vitlens.models.vit import ViT

__all__ = ["ViT", "load_vit"]
