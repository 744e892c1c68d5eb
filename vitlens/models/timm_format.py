"""timm's own layout: state dicts of timm ``VisionTransformer`` models (timm ``train.py``, DeiT / DeiT-III and DINO
releases, MAE fine-tuning), timm hub folders (``config.json`` with ``architecture`` and ``pretrained_cfg``, as
``save_for_hf`` writes) and a named ``--arch``.

Without an architecture name the kwargs are inferred from the shapes (:mod:`vitlens.models.infer`); with one (given,
in a timm ``config.json``, or in a ``train.py`` checkpoint's ``arch`` entry), timm builds it and its own
``checkpoint_filter_fn`` adapts the weights.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from vitlens.errors import VitlensError
from vitlens.models.convert import Conversion, build_vit, check_structure, describe_head_layers
from vitlens.models.infer import infer_from_state_dict
from vitlens.models.vit import is_timm_vit

if TYPE_CHECKING:
    import torch

# timm's ViT defaults (timm.models.vision_transformer._cfg, the AugReg / ViT-paper setting): inputs in [-1, 1].
TIMM_VIT_DEFAULTS = {
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bicubic",
    "crop_pct": 0.9,
    "crop_mode": "center",
}
# DeiT and DeiT-III releases (Touvron et al. 2021, 2022): ImageNet statistics; DeiT crops 224/256, DeiT-III 1.0.
DEIT_DEFAULTS = {**TIMM_VIT_DEFAULTS, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}
DEIT3_DEFAULTS = {**DEIT_DEFAULTS, "crop_pct": 1.0}
PREPROCESS_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
_DEIT3_GAMMA = re.compile(r"^(blocks\.\d+\.)gamma_([12])$")


def is_timm_layout(sd: dict[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd


def is_timm_config(config: dict[str, Any] | None) -> bool:
    """A timm hub ``config.json`` (``save_for_hf``): it names the architecture."""
    return isinstance(config, dict) and isinstance(config.get("architecture"), str)


def convert_timm(
    sd: dict[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    img_size: tuple[int, int] | None = None,
) -> Conversion:
    """A timm-layout state dict, its architecture read off the shapes."""
    sd = dict(sd)
    converted = []
    deit3 = any(_DEIT3_GAMMA.match(k) for k in sd)
    if deit3:
        # DeiT-III's own blocks keep layer scale as gamma_1 / gamma_2; timm's as ls1.gamma / ls2.gamma.
        sd = {_DEIT3_GAMMA.sub(r"\1ls\2.gamma", k): v for k, v in sd.items()}
        converted.append("DeiT-III layer scale gamma_1/gamma_2 -> ls1/ls2")
    sd.pop("mask_token", None)  # iBOT / DINO-style masking token: not on the inference path
    if not any(k.startswith("head.") for k in sd) and any(k.startswith("mlp_head.") for k in sd):
        # The from-scratch ViT scripts name their classifier `mlp_head` (lucidrains/vit-pytorch and its copies).
        sd = {("head." + k.removeprefix("mlp_head.") if k.startswith("mlp_head.") else k): v for k, v in sd.items()}
        converted.append("mlp_head -> head")
    inferred = infer_from_state_dict(sd, num_heads=num_heads, img_size=img_size)
    if inferred.head_keys:
        sd = {inferred.head_keys.get(k, k): v for k, v in sd.items()}
        layers = inferred.kwargs["head_layers"]
        converted.append(
            f"classifier of {sum('linear' in e for e in layers)} Linear layers kept as a Sequential head "
            f"({describe_head_layers(layers)}); logits are the checkpoint's"
        )
    dropped = []
    if inferred.dropped_keys:
        for key in inferred.dropped_keys:
            sd.pop(key, None)
        dropped.append(
            f"classifier ({', '.join(inferred.dropped_keys[:3])}{', ...' if len(inferred.dropped_keys) > 3 else ''})"
            ": not one linear layer of the backbone's width, nor a Sequential of Linear layers that vitlens rebuilds; "
            "the analyses use the backbone"
        )
    if "dist_token" in sd:
        defaults, why = DEIT_DEFAULTS, "DeiT's evaluation transforms"
    elif deit3:
        defaults, why = DEIT3_DEFAULTS, "DeiT-III's evaluation transforms"
    else:
        defaults, why = TIMM_VIT_DEFAULTS, "timm's ViT default"
    return Conversion(
        source_format="timm",
        arch=inferred.arch,
        kwargs=inferred.kwargs,
        state_dict=sd,
        preprocess_defaults=dict(defaults),
        preprocess_default_why=why,
        guessed=dict(inferred.guessed),
        converted=converted,
        dropped=dropped,
    )


def convert_with_arch(
    sd: dict[str, torch.Tensor],
    arch: str,
    *,
    model_kwargs: dict[str, Any],
    num_heads: int | None = None,
    img_size: tuple[int, int] | None = None,
    source_format: str = "timm",
    pretrained_cfg: dict[str, Any] | None = None,
    preprocess_from: str = "",
) -> Conversion:
    """Build timm's ``arch`` and pass the weights through its ``checkpoint_filter_fn`` (which also resamples the
    position embedding to the architecture's grid and converts OpenAI-CLIP / DINOv2 layouts).

    Args:
        pretrained_cfg: timm's data config stated by the source (a hub ``config.json``), used for preprocessing;
            without it timm's default config for ``arch`` is the (guessed) default.
    """
    import timm.models.vision_transformer as tvit

    kwargs = dict(model_kwargs)
    head_w = sd.get("head.weight")
    if head_w is not None and head_w.ndim == 2:
        kwargs.setdefault("num_classes", int(head_w.shape[0]))
    else:
        kwargs.setdefault("num_classes", 0)
    if img_size is not None:
        kwargs.setdefault("img_size", list(img_size))
    elif "img_size" not in kwargs:
        native = _native_img_size(sd)
        if native is not None:  # build at the checkpoint's own grid, so that its position embedding is not resampled
            kwargs["img_size"] = list(native)
    if num_heads is not None:
        kwargs.setdefault("num_heads", num_heads)
    model = build_vit(arch, kwargs)
    if not is_timm_vit(model):
        raise VitlensError(f"'{arch}' builds a {type(model).__name__}, not a Vision Transformer")
    try:
        filtered = tvit.checkpoint_filter_fn(dict(sd), model)
    except (RuntimeError, ValueError, KeyError) as e:
        raise VitlensError(f"the weights do not fit {arch}: {str(e).splitlines()[0][:200]}")
    dropped = [k for k in sd if "pre_logits" in k]
    stated = {k: pretrained_cfg[k] for k in PREPROCESS_KEYS if pretrained_cfg and pretrained_cfg.get(k) is not None}
    default_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    defaults = {k: default_cfg[k] for k in PREPROCESS_KEYS if default_cfg.get(k) is not None}
    return Conversion(
        source_format=source_format,
        arch=arch,
        kwargs=kwargs,
        state_dict=filtered,
        preprocess=_tuples(stated),
        preprocess_from=preprocess_from if stated else "",
        preprocess_defaults={**TIMM_VIT_DEFAULTS, **_tuples(defaults)},
        preprocess_default_why=f"timm's default data config for {arch}",
        dropped=[f"pre-logits layer ({', '.join(dropped)}): timm has no representation layer"] if dropped else [],
        model=model,
    )


def convert_timm_hub(
    sd: dict[str, torch.Tensor],
    config: dict[str, Any],
    *,
    model_kwargs: dict[str, Any],
    num_heads: int | None = None,
    img_size: tuple[int, int] | None = None,
) -> Conversion:
    """A timm hub folder (``config.json`` naming ``architecture`` with ``model_args`` and ``pretrained_cfg``)."""
    kwargs = dict(config.get("model_args") or {})
    numbers = {k: kwargs.get(k) for k in ("embed_dim", "depth", "num_heads", "patch_size", "img_size") if k in kwargs}
    if numbers:
        check_structure(
            embed_dim=numbers.get("embed_dim", 768),
            depth=numbers.get("depth", 12),
            num_heads=numbers.get("num_heads"),
            patch_size=numbers.get("patch_size"),
            img_size=numbers.get("img_size"),
            where="config.json model_args",
        )
    if isinstance(config.get("num_classes"), int):
        kwargs["num_classes"] = config["num_classes"]
    if isinstance(config.get("global_pool"), str):
        kwargs["global_pool"] = config["global_pool"]
    kwargs.update(model_kwargs)
    cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    conv = convert_with_arch(
        sd,
        config["architecture"],
        model_kwargs=kwargs,
        num_heads=num_heads,
        img_size=img_size,
        source_format=f"timm-hub:{config['architecture']}",
        pretrained_cfg=cfg,
        preprocess_from="config.json pretrained_cfg",
    )
    labels = config.get("label_names")
    if isinstance(labels, list) and len(labels) == conv.kwargs.get("num_classes"):
        conv.class_names = [str(label) for label in labels]
    return conv


def _native_img_size(sd: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """The input size a timm-layout state dict was trained at, from its position-embedding rows (square grids)."""
    from vitlens.models.infer import _infer_grid

    proj, pos = sd.get("patch_embed.proj.weight"), sd.get("pos_embed")
    if proj is None or pos is None or proj.ndim != 4 or pos.ndim != 3:
        return None
    prefix = (
        int("cls_token" in sd) + int("dist_token" in sd) + (int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0)
    )
    ph, pw = int(proj.shape[2]), int(proj.shape[3])
    try:
        (gh, gw), _ = _infer_grid(int(pos.shape[1]), prefix, None, (ph, pw))
    except VitlensError:
        return None
    return (gh * ph, gw * pw)


def train_args_preprocess(args: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing a timm ``train.py`` run states in its arguments (``--mean``, ``--std``, ...)."""
    out = {k: args[k] for k in ("mean", "std", "interpolation", "crop_pct") if args.get(k) not in (None, "", [])}
    return _tuples(out)


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(float(x) for x in v) if isinstance(v, list | tuple) else v for k, v in values.items()}
