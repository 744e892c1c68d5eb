"""The model a run trains: a timm ViT built from scratch, or a loadable one with a new head for fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitlens.errors import VitlensError
from vitlens.layout import Preprocess
from vitlens.train.config import GREY_DATA, TrainConfig

if TYPE_CHECKING:
    from torch import nn


@dataclass
class _Model:
    model: nn.Module
    arch: str
    kwargs: dict[str, Any]
    preprocess: Preprocess
    source: str | None


def _scratch_model(config: TrainConfig, num_classes: int) -> _Model:
    from vitlens.models.load import build_model
    from vitlens.models.vit import is_timm_vit, token_layout

    kwargs = dict(config.model_kwargs)
    base = config.data.split(":")[0].lower()
    kwargs.setdefault("in_chans", 1 if base in GREY_DATA else 3)
    if config.img_size is not None:
        kwargs["img_size"] = tuple(config.img_size)
    kwargs["num_classes"] = num_classes
    model = build_model(config.arch, kwargs)
    if not is_timm_vit(model):
        raise VitlensError(f"--arch {config.arch} is not a Vision Transformer; vitlens trains timm ViTs only")
    in_chans = int(kwargs["in_chans"])
    preprocess = Preprocess(
        img_size=token_layout(model).img_size,
        in_chans=in_chans,
        mean=(0.5,) * in_chans,  # timm's ViT default: inputs in [-1, 1]
        std=(0.5,) * in_chans,
        interpolation="bicubic",
        crop_pct=1.0,
    )
    if "img_size" in kwargs and isinstance(kwargs["img_size"], tuple):
        kwargs["img_size"] = list(kwargs["img_size"])
    return _Model(model, config.arch, kwargs, preprocess, None)


def _finetune_model(config: TrainConfig, num_classes: int) -> _Model:
    """Load ``init_from``, resample its position embedding, and give it a new zero-initialised head.

    The ViT paper fine-tunes with a zero-initialised D x K head (§3.2); its position embeddings are resampled
    (timm's interpolation) when the input size changes.
    """

    from vitlens.models.load import load_vit

    load_kwargs = dict(config.model_kwargs)  # when fine-tuning: options for loading the source model
    heads = load_kwargs.pop("num_heads", None)
    vit = load_vit(config.init_from, num_heads=heads, model_kwargs=load_kwargs, img_size=config.img_size, device="cpu")
    vit.reset_head(num_classes)  # zero-initialised, as the ViT paper fine-tunes (§3.2)
    model = vit.model
    arch = vit.arch.split(".")[0] if vit.arch and not vit.arch.startswith("hf-hub:") else vit.arch
    kwargs = dict(vit.arch_kwargs)
    kwargs["img_size"] = list(vit.layout.img_size)
    kwargs["num_classes"] = num_classes
    if arch.startswith("hf-hub:") or not arch:
        raise VitlensError(
            f"cannot record how to rebuild '{vit.source}' for a vitlens checkpoint; fine-tune from a timm name "
            "or a checkpoint file"
        )
    return _Model(model, arch, kwargs, vit.preprocess, vit.source)
