"""The common result of every checkpoint family's converter: timm ``VisionTransformer`` kwargs and a timm state dict.

A converter (one module per source family: :mod:`~vitlens.models.hf_transformers`,
:mod:`~vitlens.models.torchvision_vit`, :mod:`~vitlens.models.clip`, :mod:`~vitlens.models.meta`,
:mod:`~vitlens.models.timm_format` for timm's own layout)
rewrites a foreign state dict into the names and shapes timm uses, reads the architecture from the source's config
where there is one, and says what it guessed, what it converted and what it dropped. Its test proves the converted
model computes the same function as the producing library's on the same input.

Kwargs stay JSON-ready (they are recorded for caches and fine-tuning): activations and MLP layers are named by
string, and :data:`VITLENS_KWARGS` are vitlens' own extras that :func:`build_vit` applies after timm builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitlens.errors import ParameterError, VitlensError

if TYPE_CHECKING:
    import torch
    from torch import nn

INFERRED_ARCH = "vit_inferred"
INFERRED_DISTILLED_ARCH = "vit_distilled_inferred"

# vitlens' own kwargs (not timm's): applied by build_vit after the model is built.
#   layer_norm_eps: the epsilon of every LayerNorm (timm's ViT uses 1e-6; HF ViT 1e-12, CLIP 1e-5).
VITLENS_KWARGS = ("layer_norm_eps",)
# String names for timm MLP layers (timm takes classes; kwargs must stay JSON-ready).
MLP_LAYERS = ("mlp", "swiglu_packed", "swiglu")
# Structural limits on a config before anything is allocated: larger values are a damaged or hostile file.
MAX_DEPTH = 256
MAX_EMBED_DIM = 16384
MAX_IMG_SIZE = 8192


@dataclass
class Conversion:
    """A foreign checkpoint as a timm ViT: what to build, the weights in timm names, and what was read or guessed.

    ``preprocess`` holds the :class:`~vitlens.layout.Preprocess` fields that the source states (mean, std,
    interpolation, crop_pct, crop_mode); ``preprocess_defaults`` the family's documented defaults for the rest,
    which the loader fills in and lists under ``guessed``.
    """

    source_format: str  # e.g. "timm", "hf-transformers:Dinov2WithRegistersModel", "torchvision", "openai-clip"
    arch: str  # INFERRED_ARCH / INFERRED_DISTILLED_ARCH or a timm architecture name
    kwargs: dict[str, Any]  # JSON-ready timm kwargs (+ VITLENS_KWARGS)
    state_dict: dict[str, torch.Tensor]  # timm key names and shapes
    preprocess: dict[str, Any] = field(default_factory=dict)  # Preprocess fields the source states
    preprocess_from: str = ""  # where ``preprocess`` was read (e.g. "preprocessor_config.json")
    preprocess_defaults: dict[str, Any] = field(default_factory=dict)  # the family's defaults for the other fields
    preprocess_default_why: str = ""  # e.g. "torchvision IMAGENET1K_V1 weights' transforms"
    guessed: dict[str, str] = field(default_factory=dict)  # architecture fact -> why it was guessed
    converted: list[str] = field(default_factory=list)  # what was rewritten, for `vitlens info`
    dropped: list[str] = field(default_factory=list)  # one entry per dropped part: "what (keys)"
    class_names: list[str] | None = None
    model: nn.Module | None = None  # already built (timm architectures whose weights pass its checkpoint filter)


def check_structure(
    *,
    embed_dim: int,
    depth: int,
    num_heads: int | None,
    patch_size: tuple[int, int] | int | None = None,
    img_size: tuple[int, int] | int | None = None,
    where: str,
) -> None:
    """Refuse absurd architecture values (from a config or a state dict) before anything is allocated.

    Raises:
        VitlensError: a value is not a positive integer, is beyond vitlens' limits, or the heads do not divide
            the width.
    """

    def positive(name: str, value: Any, limit: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise VitlensError(f"{where}: {name} = {value!r} is not a positive integer up to {limit}")
        return value

    dim = positive("embed_dim", embed_dim, MAX_EMBED_DIM)
    positive("depth", depth, MAX_DEPTH)
    if num_heads is not None:
        heads = positive("num_heads", num_heads, dim)
        if dim % heads:
            raise VitlensError(f"{where}: num_heads = {heads} does not divide embed_dim = {dim}")
    for name, value in (("patch_size", patch_size), ("img_size", img_size)):
        if value is None:
            continue
        for v in value if isinstance(value, tuple | list) else (value,):
            positive(name, v, MAX_IMG_SIZE)


def build_vit(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate a timm ViT (random weights) from an architecture name and JSON-ready kwargs.

    Raises:
        VitlensError: unknown architecture or kwargs timm refuses.
    """
    import timm
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(kwargs)
    extras = {k: kwargs.pop(k) for k in VITLENS_KWARGS if k in kwargs}
    for key in ("img_size", "patch_size"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    if isinstance(kwargs.get("mlp_layer"), str):
        kwargs["mlp_layer"] = _mlp_layer(kwargs["mlp_layer"])
    try:
        if arch == INFERRED_ARCH:
            model = VisionTransformer(**kwargs)
        elif arch == INFERRED_DISTILLED_ARCH:
            model = VisionTransformerDistilled(**kwargs)
        elif not timm.is_model(arch):
            raise VitlensError(f"unknown timm architecture '{arch}' (see timm.list_models('vit_*'))")
        else:
            model = timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise VitlensError(f"cannot build '{arch}' with {fmt_kwargs(kwargs)}: {e}")
    if "layer_norm_eps" in extras:
        from torch import nn

        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = float(extras["layer_norm_eps"])
    return model


def _mlp_layer(name: str) -> type:
    from timm.layers import Mlp, SwiGLU, SwiGLUPacked

    table = {"mlp": Mlp, "swiglu_packed": SwiGLUPacked, "swiglu": SwiGLU}
    if name not in table:
        # The name comes in ``model_kwargs`` (the caller's, or a vitlens checkpoint's own merged with them).
        raise ParameterError("model_kwargs", f"model_kwargs: mlp_layer '{name}' is not one of {', '.join(MLP_LAYERS)}")
    return table[name]


def mlp_ratio_for(hidden: int, dim: int) -> float:
    """A ``mlp_ratio`` that timm turns back into exactly ``hidden`` MLP features.

    timm builds ``int(dim * mlp_ratio)`` features, and the float quotient ``hidden / dim`` can land just below
    ``hidden`` when multiplied back (e.g. 488 / 112); the next float up then truncates to ``hidden``.
    """
    import math

    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else math.nextafter(ratio, math.inf)


def fmt_kwargs(kwargs: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + "}" if kwargs else "default settings"
