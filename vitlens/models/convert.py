"""The common result of every checkpoint family's converter: timm ``VisionTransformer`` kwargs and a timm state dict.

A converter (one module per source family: :mod:`~vitlens.models.hf_transformers`,
:mod:`~vitlens.models.torchvision_vit`, :mod:`~vitlens.models.clip`, :mod:`~vitlens.models.meta`,
:mod:`~vitlens.models.timm_format` for timm's own layout)
rewrites a foreign state dict into the names and shapes timm uses, reads the architecture from the source's config
where there is one, and says what it guessed, what it converted and what it dropped. Its test proves the converted
model computes the same function as the producing library's on the same input.

Kwargs stay JSON-ready (they are recorded for caches and fine-tuning): activations and MLP layers are named by
string, and :data:`VITLENS_KWARGS` are vitlens' own extras that :func:`build_vit` applies after timm builds. A
classifier head of more than one layer is such an extra, described as data (``head_layers``, see
:func:`build_head`), so that a vitlens checkpoint's ``model_kwargs`` rebuild it as they rebuild the backbone.
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
#   head_layers: the checkpoint's own classifier when it is more than one Linear layer (see build_head).
#   head_act: replaces every activation in head_layers (the user's answer to a guessed head activation).
VITLENS_KWARGS = ("layer_norm_eps", "head_layers", "head_act")
# Activations a head may hold between its Linear layers, by name (kwargs must stay JSON-ready). "gelu" is exact
# (erf) GELU, nn.GELU's default and that of the ViT scripts' MLP heads; "gelu_tanh" its tanh approximation.
HEAD_ACTS = ("gelu", "gelu_tanh", "relu", "silu", "tanh", "sigmoid")
# The guessed-fact key under which a head activation that no file states is listed (model_kwargs head_act sets it).
HEAD_ACT_GUESS = "head_act"
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
    layers = extras.get("head_layers")
    if extras.get("head_act") is not None:
        if not layers or not any("act" in entry for entry in layers if isinstance(entry, dict)):
            raise ParameterError(
                "model_kwargs", "model_kwargs: head_act applies to a classifier with activations; this one has none"
            )
        layers = with_head_act(layers, extras["head_act"])
    if layers:
        _set_head(model, layers, kwargs.get("num_classes"))
    return model


def build_head(layers: list[dict[str, Any]], embed_dim: int) -> nn.Sequential:
    """An ``nn.Sequential`` classifier from its JSON-ready description, checked layer by layer.

    One entry per module, in order, each with one key: ``{"linear": [in, out]}`` (with bias),
    ``{"act": NAME}`` (one of :data:`HEAD_ACTS`), ``{"layer_norm": [width, eps]}``. The state-dict keys are those
    of the Sequential: ``head.<i>.weight`` / ``head.<i>.bias`` for the i-th entry. The description holds no
    dropout: it is the identity in eval mode, and converters renumber the keys around it. E.g. torchvision's
    ``representation_size`` head: ``[{"linear": [768, 768]}, {"act": "tanh"}, {"linear": [768, 1000]}]``.

    Args:
        layers: the description.
        embed_dim: the width of the pooled features the head reads (its first layer's input).

    Raises:
        ParameterError: (``model_kwargs``) an unknown entry or activation, widths that do not chain, or no Linear
            layer at the end.
    """
    from torch import nn

    def bad(why: str) -> ParameterError:
        return ParameterError("model_kwargs", f"model_kwargs: head_layers {why}")

    if not isinstance(layers, list | tuple) or not layers:
        raise bad("must be a non-empty list of layers")
    modules: list[nn.Module] = []
    width = embed_dim
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise bad(f"entry {i} must be one of {{'linear': [in, out]}}, {{'act': name}}, {{'layer_norm': [D, eps]}}")
        ((kind, value),) = entry.items()
        if kind == "linear":
            n_in, n_out = _int_pair(value, bad, i)
            if n_in != width:
                raise bad(f"entry {i}: linear {n_in}->{n_out} does not read the {width} features before it")
            modules.append(nn.Linear(n_in, n_out))
            width = n_out
        elif kind == "act":
            modules.append(_head_act(value, bad))
        elif kind == "layer_norm":
            if not isinstance(value, list | tuple) or len(value) != 2 or value[0] != width:
                raise bad(f"entry {i}: layer_norm must be [{width}, eps]")
            modules.append(nn.LayerNorm(width, eps=float(value[1])))
        else:
            raise bad(f"entry {i}: unknown layer '{kind}' (linear, act, layer_norm)")
    if not isinstance(modules[-1], nn.Linear):
        raise bad("must end with a linear layer (the logits)")
    return nn.Sequential(*modules)


def describe_head_layers(layers: list[dict[str, Any]]) -> str:
    """``head_layers`` in words: ``"linear 768→768, tanh, linear 768→1000"``."""
    parts = []
    for entry in layers:
        ((kind, value),) = entry.items()
        if kind == "linear":
            parts.append(f"linear {value[0]}→{value[1]}")
        elif kind == "layer_norm":
            parts.append(f"layer_norm {value[0]}")
        else:
            parts.append(str(value))
    return ", ".join(parts)


def with_head_act(layers: list[dict[str, Any]], act: str) -> list[dict[str, Any]]:
    """``layers`` with every activation set to ``act`` (the user's ``head_act``, over a guess)."""
    return [{"act": act} if "act" in entry else dict(entry) for entry in layers]


def _set_head(model: nn.Module, layers: list[dict[str, Any]], num_classes: int | None) -> None:
    """Put the described head in place of timm's Linear ``head``; ``num_classes`` becomes the last layer's outputs.

    timm's ``forward_head`` pools, applies ``fc_norm`` and calls ``self.head``, so any module fits there;
    ``reset_classifier`` later replaces it by one Linear as usual.
    """
    if getattr(model, "head_dist", None) is not None:
        raise VitlensError("a multi-layer head on a distilled ViT (head + head_dist) is not supported")
    head = build_head(layers, int(model.embed_dim))
    if num_classes not in (None, head[-1].out_features):
        raise ParameterError(
            "model_kwargs",
            f"model_kwargs: num_classes {num_classes} disagrees with head_layers, whose last layer has "
            f"{head[-1].out_features} outputs",
        )
    model.head = head
    model.num_classes = int(head[-1].out_features)


def _int_pair(value: Any, bad: Any, i: int) -> tuple[int, int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_EMBED_DIM * 64 for v in value)
    ):
        raise bad(f"entry {i}: linear must be [in, out] positive integers, not {value!r}")
    return int(value[0]), int(value[1])


def _head_act(name: Any, bad: Any) -> nn.Module:
    from torch import nn

    table = {
        "gelu": lambda: nn.GELU(),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "relu": nn.ReLU,
        "silu": nn.SiLU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
    if name not in table:
        raise bad(f"activation {name!r} is not one of {', '.join(HEAD_ACTS)}")
    return table[name]()


def describe_head(model: nn.Module) -> str:
    """The classifier as ``vitlens info`` shows it: ``"linear 384→10"``, ``"mlp: linear 768→768, tanh, linear
    768→1000"``, or ``"none"`` (a backbone); ``" (+ distillation head)"`` for DeiT's second head."""
    from torch import nn

    def one(module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear):
            return f"linear {module.in_features}→{module.out_features}"
        if isinstance(module, nn.LayerNorm):
            return f"layer_norm {module.normalized_shape[0]}"
        if isinstance(module, nn.GELU):
            return "gelu" if module.approximate == "none" else "gelu_tanh"
        if isinstance(module, nn.Identity | nn.Dropout):
            return None
        return type(module).__name__.lower()

    head = getattr(model, "head", None)
    if head is None or isinstance(head, nn.Identity):
        text = "none"
    elif isinstance(head, nn.Sequential):
        text = "mlp: " + ", ".join(part for part in map(one, head) if part)
    else:
        text = one(head) or "none"
    if isinstance(getattr(model, "head_dist", None), nn.Linear):
        text += " (+ distillation head)"
    return text


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
