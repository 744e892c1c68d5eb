"""CLIP image towers (OpenAI CLIP releases, open_clip ``VisionTransformer`` and timm-trunk towers) as timm ViTs.

The visual projection stays on as the timm model's head, so ``forward(x)`` is ``encode_image(x)`` (unnormalised).
The standard layout goes through timm's own ``_convert_openai_clip``; open_clip's extras (layer scale, q/k norm,
sub-LayerNorms, no ``ln_pre``, average pooling) are renamed from the table below, anything timm's
``VisionTransformer`` cannot compute is refused naming its config field. Towers built around a timm trunk
(``visual.trunk.*``: SigLIP, ViT-SO400M configs) are the named timm model itself, read with timm's
``checkpoint_filter_fn``.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from vitlens.errors import ParameterError, VitlensError
from vitlens.models.convert import INFERRED_ARCH, Conversion, build_vit, check_structure, mlp_ratio_for
from vitlens.models.infer import heads_for_width

if TYPE_CHECKING:
    import torch

# OpenAI CLIP's normalisation (clip/clip.py `_transform`; open_clip.constants.OPENAI_DATASET_MEAN / _STD), also
# open_clip's PreprocessCfg defaults.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
OPENAI_PREPROCESS = {
    "mean": list(OPENAI_MEAN),
    "std": list(OPENAI_STD),
    "interpolation": "bicubic",  # Resize(n_px, interpolation=BICUBIC)
    "crop_pct": 1.0,  # Resize(n_px) of the shorter side, then CenterCrop(n_px)
    "crop_mode": "center",
}
_OPENAI_WHY = "OpenAI CLIP's transform (bicubic shorter-side resize, centre crop, OpenAI mean/std)"

# Entries only OpenAI's TorchScript releases carry (open_clip's `build_model_from_openai_state_dict` pops them).
_OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")
# OpenAI's clip/model.py builds the image tower with `vision_heads = vision_width // 64`.
_OPENAI_HEAD_WIDTH = 64
_CLIP_LN_EPS = 1e-5  # nn.LayerNorm's default, used by both OpenAI CLIP and open_clip's LayerNorm

# open_clip names that timm's `_convert_openai_clip` does not know, renamed before it runs (its blanket
# `ln_` -> `norm` swap would otherwise turn `attn.ln_q` into `attn.normq`). Keys are relative to the tower.
_OPEN_CLIP_EXTRA_KEYS = (
    # (open_clip, timm)
    ("ls_1.gamma", "ls1.gamma"),  # layer scale (vision_cfg.ls_init_value)
    ("ls_2.gamma", "ls2.gamma"),
    ("attn.ln_q.", "attn.q_norm."),  # vision_cfg.qk_norm: LayerNorm(head_dim) on q and k
    ("attn.ln_k.", "attn.k_norm."),
    ("attn.ln_inner.", "attn.norm."),  # vision_cfg.scale_attn_inner: LayerNorm before out_proj
    ("mlp.ln.", "mlp.norm."),  # vision_cfg.scale_fc: LayerNorm between the MLP's two layers
)
# What timm's `_convert_openai_clip` does with the rest (for reference):
#   conv1 -> patch_embed.proj                        class_embedding [D] -> cls_token [1, 1, D]
#   positional_embedding [N+1, D] -> pos_embed [1, N+1, D]
#   ln_pre -> norm_pre                               transformer.resblocks.i.ln_1 / ln_2 -> blocks.i.norm1 / norm2
#   attn.in_proj_weight [3D, D] -> attn.qkv.weight   attn.out_proj -> attn.proj
#   mlp.c_fc / c_proj -> mlp.fc1 / fc2               ln_post -> norm
#   proj [D, E] -> head.weight [E, D] and a zero head.bias [E]

# Weights of open_clip features timm's VisionTransformer has no counterpart for: (key fragment, config field).
_UNSUPPORTED_KEYS = (
    ("attn_pool", "attentional_pool"),  # CoCa's attentional pooler
    ("attn.logit_scale", "scaled_cosine_attn"),
    ("attn.head_scale", "scale_heads"),
    (".ln_attn.", "scale_attn"),
)
# vision_cfg fields (when truthy) that change the function and have no timm counterpart.
_UNSUPPORTED_CFG = ("attentional_pool", "scaled_cosine_attn", "scale_heads", "scale_attn")
# open_clip pool_type -> timm global_pool (both skip the class token when averaging).
_POOL = {"tok": "token", "avg": "avg"}


def is_clip(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict is a CLIP model or image tower in OpenAI / open_clip names.

    Recognised: a full model (``visual.class_embedding``, ``visual.conv1.weight``, ..., text tower or not), the
    image tower alone (``model.visual.state_dict()``: ``class_embedding``, ``conv1.weight``, ...), open_clip towers
    around a timm trunk (``visual.trunk.*``) and CLIP ResNets (``visual.attnpool.*``, which :func:`convert_clip`
    refuses with a clear message).
    """
    for prefix in ("visual.", ""):
        if f"{prefix}class_embedding" in state_dict and f"{prefix}conv1.weight" in state_dict:
            return True
    if "visual.attnpool.positional_embedding" in state_dict:
        return True
    return any(k.startswith("visual.trunk.") for k in state_dict)


def convert_clip(
    state_dict: dict[str, torch.Tensor],
    *,
    open_clip_config: dict | None = None,
    num_heads: int | None = None,
    openai: bool = False,
) -> Conversion:
    """Rewrite a CLIP checkpoint's image tower into a timm ``VisionTransformer`` whose forward is ``encode_image``.

    Args:
        state_dict: a full CLIP state dict (``visual.*`` plus the text tower) or ``model.visual.state_dict()``,
            wrapper prefixes already stripped.
        open_clip_config: the parsed ``open_clip_config.json`` of an open_clip hub folder (``{"model_cfg": ...,
            "preprocess_cfg": ...}``; a bare model config with ``vision_cfg`` at the top is accepted too).
        num_heads: heads per layer when neither a config nor the OpenAI rule (width // 64) states it.
        openai: the file is an OpenAI CLIP release: QuickGELU, 64-wide heads, class-token pooling.

    Raises:
        VitlensError: not a CLIP ViT tower, a feature timm's ``VisionTransformer`` cannot compute, a config that
            disagrees with the weights, or a fact that is neither stored nor given.
    """
    model_cfg, preprocess_cfg = _split_config(open_clip_config)
    vision_cfg = dict(model_cfg.get("vision_cfg") or {}) if model_cfg is not None else {}
    if any(k.startswith("visual.trunk.") for k in state_dict):
        return _convert_timm_trunk(state_dict, model_cfg, vision_cfg, preprocess_cfg)
    if "visual.attnpool.positional_embedding" in state_dict or isinstance(vision_cfg.get("layers"), list | tuple):
        raise VitlensError("this CLIP checkpoint has a ResNet image tower (ModifiedResNet), not a Vision Transformer")
    prefix = "visual." if "visual.class_embedding" in state_dict else ""
    if f"{prefix}class_embedding" not in state_dict or f"{prefix}conv1.weight" not in state_dict:
        raise VitlensError("not a CLIP image tower: no visual.class_embedding / visual.conv1.weight")
    tower = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    others = [k for k in state_dict if not k.startswith(prefix)] if prefix else []

    # Refuse what timm cannot compute before reading anything else.
    for key_part, cfg_field in _UNSUPPORTED_KEYS:
        if hit := next((k for k in tower if key_part in k), None):
            raise VitlensError(
                f"open_clip vision_cfg.{cfg_field} ({prefix}{hit}) has no counterpart in timm's VisionTransformer; "
                "this tower cannot be analysed"
            )
    _check_vision_cfg(vision_cfg)

    # Architecture from the shapes; the config (when given) must agree with them.
    conv1 = tower["conv1.weight"]  # [D, C, ph, pw]
    pos = tower.get("positional_embedding")  # [N + 1, D]
    if conv1.ndim != 4 or pos is None or pos.ndim != 2:
        raise VitlensError(f"{prefix}conv1.weight / {prefix}positional_embedding do not have CLIP's shapes")
    width, in_chans, ph, pw = (int(s) for s in conv1.shape)
    blocks = [int(m.group(1)) for k in tower if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))]
    depth = 1 + max(blocks, default=-1)
    if depth == 0:
        raise VitlensError(f"not a CLIP image tower: no {prefix}transformer.resblocks.0.* weights")
    num_patches = int(pos.shape[0]) - 1
    where = "open_clip_config.json vision_cfg" if model_cfg is not None else f"{prefix}* weights"
    if model_cfg is not None:
        _agree(vision_cfg, "width", width, f"{prefix}conv1.weight")
        _agree(vision_cfg, "layers", depth, f"{prefix}transformer.resblocks")
        _agree(vision_cfg, "patch_size", ph, f"{prefix}conv1.weight", also=pw)
        img_size = _pair(vision_cfg.get("image_size", 224), "vision_cfg.image_size")
        grid = (img_size[0] // ph, img_size[1] // pw)
        if grid[0] * grid[1] != num_patches:
            raise VitlensError(
                f"open_clip_config.json: image_size {list(img_size)} with patch {ph} gives {grid[0] * grid[1]} "
                f"patches but {prefix}positional_embedding has {num_patches}: the config is not this checkpoint's"
            )
    else:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise VitlensError(
                f"{prefix}positional_embedding has {num_patches} patch rows, not a square grid: "
                "pass the checkpoint's open_clip_config.json"
            )
        img_size = (side * ph, side * pw)

    guessed: dict[str, str] = {}
    heads, why = _heads(width, vision_cfg, model_cfg is not None, openai, num_heads)
    if why:
        guessed["num_heads"] = why
    check_structure(embed_dim=width, depth=depth, num_heads=heads, patch_size=(ph, pw), img_size=img_size, where=where)

    act, why = _activation(model_cfg, openai, state_dict)
    if why:
        guessed["act_layer"] = why
    pool_type = vision_cfg.get("pool_type", "tok")
    if pool_type not in _POOL:
        raise VitlensError(
            f"open_clip vision_cfg.pool_type '{pool_type}' returns every token, not an image embedding; "
            "only 'tok' and 'avg' map onto timm's VisionTransformer"
        )
    if model_cfg is None and not openai:
        guessed["global_pool"] = (
            "not stored in weights; class token as open_clip's default pool_type 'tok' (its CLIPA configs "
            "average: pass the open_clip_config.json)"
        )
    fc_norm = pool_type == "avg" and bool(vision_cfg.get("final_ln_after_pool", False))
    fc1 = tower.get("transformer.resblocks.0.mlp.c_fc.weight")  # [hidden, D]
    if fc1 is None:
        raise VitlensError(f"{prefix}transformer.resblocks.0.mlp.c_fc.weight is missing: not a CLIP block")
    proj = tower.get("proj")  # [D, E]
    if proj is None or proj.ndim != 2 or int(proj.shape[0]) != width:
        raise VitlensError(f"{prefix}proj (the visual projection [width, embed_dim]) is missing or misshapen")

    kwargs: dict[str, Any] = {
        "img_size": list(img_size) if img_size[0] != img_size[1] else img_size[0],
        "patch_size": ph if ph == pw else [ph, pw],
        "in_chans": in_chans,
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": mlp_ratio_for(int(fc1.shape[0]), width),
        "qkv_bias": "transformer.resblocks.0.attn.in_proj_bias" in tower,
        "class_token": True,
        "pre_norm": "ln_pre.weight" in tower,
        "global_pool": _POOL[pool_type],
        "fc_norm": fc_norm,
        "num_classes": int(proj.shape[1]),  # the visual projection is the head
        "act_layer": act,
        "layer_norm_eps": _ln_eps(vision_cfg),
    }
    if "transformer.resblocks.0.ls_1.gamma" in tower:
        kwargs["init_values"] = 1e-5  # any value switches LayerScale on; the loaded gammas overwrite it
    for key, flag in (("attn.ln_q.weight", "qk_norm"), ("attn.ln_inner.weight", "scale_attn_norm")):
        if f"transformer.resblocks.0.{key}" in tower:
            kwargs[flag] = True
    if "transformer.resblocks.0.mlp.ln.weight" in tower:
        kwargs["scale_mlp_norm"] = True

    sd = _rename(tower, fc_norm=fc_norm, patch_bias=not kwargs["pre_norm"])
    arch = INFERRED_ARCH
    _check_keys(arch, kwargs, sd)

    kind = "OpenAI CLIP" if openai else "open_clip"
    converted = [
        f"{kind} image tower -> timm ViT (timm's _convert_openai_clip: conv1 -> patch_embed.proj, ln_pre/ln_post -> "
        "norm_pre/norm, attn.in_proj -> attn.qkv, mlp.c_fc/c_proj -> mlp.fc1/fc2)",
        f"visual projection proj [{width}, {kwargs['num_classes']}] -> head.weight (transposed, zero bias): "
        "forward() gives encode_image() features, unnormalised",
    ]
    if "init_values" in kwargs:
        converted.append("layer scale ls_1/ls_2.gamma -> ls1/ls2.gamma")
    if not kwargs["pre_norm"]:
        converted.append("no ln_pre (vision_cfg.no_ln_pre): zero patch_embed.proj.bias added (conv1 has no bias)")
    if fc_norm:
        converted.append("ln_post after average pooling (final_ln_after_pool) -> fc_norm")
    if model_cfg is not None and vision_cfg.get("patch_dropout", 0):
        converted.append("patch_dropout ignored: it is the identity at inference")
    dropped = [_text_tower_entry(others)] if others else []
    conv = Conversion(
        source_format="openai-clip" if openai else "open_clip",
        arch=arch,
        kwargs=kwargs,
        state_dict=sd,
        guessed=guessed,
        converted=converted,
        dropped=dropped,
    )
    _set_preprocess(conv, preprocess_cfg)
    return conv


def _split_config(config: dict | None) -> tuple[dict | None, dict | None]:
    """(model_cfg, preprocess_cfg) of an ``open_clip_config.json`` (or of a bare open_clip model config)."""
    if config is None:
        return None, None
    if not isinstance(config, dict):
        raise VitlensError("open_clip_config.json is not a JSON object")
    if isinstance(config.get("model_cfg"), dict):
        return config["model_cfg"], config.get("preprocess_cfg")
    if isinstance(config.get("vision_cfg"), dict):
        return config, config.get("preprocess_cfg")
    raise VitlensError("open_clip_config.json has no model_cfg.vision_cfg: is it an open_clip config?")


def _check_vision_cfg(vision_cfg: dict) -> None:
    for name in _UNSUPPORTED_CFG:
        if vision_cfg.get(name):
            raise VitlensError(
                f"open_clip vision_cfg.{name} = {vision_cfg[name]!r} has no counterpart in timm's VisionTransformer; "
                "this tower cannot be analysed"
            )
    if vision_cfg.get("act_kwargs"):
        raise VitlensError(
            f"open_clip vision_cfg.act_kwargs = {vision_cfg['act_kwargs']!r} is not supported (plain GELU or "
            "QuickGELU only)"
        )
    norm_kwargs = vision_cfg.get("norm_kwargs") or {}
    if set(norm_kwargs) - {"eps"}:
        raise VitlensError(f"open_clip vision_cfg.norm_kwargs = {norm_kwargs!r} is not supported (only eps)")


def _agree(vision_cfg: dict, name: str, value: int, key: str, *, also: int | None = None) -> None:
    """Refuse a config whose ``vision_cfg[name]`` contradicts the weights."""
    if name not in vision_cfg:
        return
    stated = vision_cfg[name]
    weights = value if also is None else (value, also)
    # open_clip takes a size as an int or a pair (to_2tuple).
    as_stated = tuple(stated) if isinstance(stated, list | tuple) else stated if also is None else (stated, stated)
    if as_stated != weights:
        shown = value if also is None or also == value else [value, also]
        raise VitlensError(
            f"open_clip_config.json says vision_cfg.{name} = {stated!r} but {key} has {shown}: "
            "the config is not this checkpoint's"
        )


def _pair(value: Any, name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, list | tuple) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise VitlensError(f"open_clip_config.json: {name} = {value!r} is not a size")
    return pair


def _heads(
    width: int, vision_cfg: dict, has_config: bool, openai: bool, num_heads: int | None
) -> tuple[int, str | None]:
    """Heads per layer: the config's ``width // head_width``, OpenAI's ``width // 64``, else the width table."""
    if has_config or openai:
        head_width = vision_cfg.get("head_width", _OPENAI_HEAD_WIDTH) if has_config else _OPENAI_HEAD_WIDTH
        source = "vision_cfg.head_width" if has_config else "OpenAI CLIP's head width"
        if not isinstance(head_width, int) or head_width < 1 or width % head_width:
            raise VitlensError(f"{source} {head_width!r} does not divide the tower width {width}")
        heads = width // head_width
        if num_heads is not None and num_heads != heads:
            raise ParameterError(
                "num_heads", f"num_heads {num_heads} contradicts {source} ({width} // {head_width} = {heads})"
            )
        return heads, None
    return heads_for_width(width, num_heads)


def _activation(model_cfg: dict | None, openai: bool, state_dict: dict) -> tuple[str, str | None]:
    """timm activation name, and why it was guessed (None when the config or the release states it).

    OpenAI trained with QuickGELU; open_clip builds nn.GELU unless ``quick_gelu`` is set. The weights are the same
    shapes either way, so without a config the choice is a documented default the user can override.
    """
    if model_cfg is not None:
        return ("quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"), None
    if openai:
        return "quick_gelu", None
    if any(k in state_dict for k in _OPENAI_ONLY_KEYS):
        return "quick_gelu", (
            "not stored in weights; QuickGELU because the file has OpenAI's TorchScript-only entries "
            '(input_resolution, context_length, vocab_size); if wrong pass --model-kwargs \'{"act_layer": "gelu"}\''
        )
    return "gelu", (
        "not stored in weights; open_clip's default nn.GELU (OpenAI releases and '-quickgelu' models use QuickGELU: "
        'pass --model-kwargs \'{"act_layer": "quick_gelu"}\')'
    )


def _ln_eps(vision_cfg: dict) -> float:
    eps = (vision_cfg.get("norm_kwargs") or {}).get("eps", _CLIP_LN_EPS)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
        raise VitlensError(f"open_clip vision_cfg.norm_kwargs.eps = {eps!r} is not a small positive number")
    return float(eps)


def _rename(tower: dict[str, torch.Tensor], *, fc_norm: bool, patch_bias: bool) -> dict[str, torch.Tensor]:
    """open_clip tower names -> timm names: the extras table first, then timm's OpenAI-CLIP converter."""
    import torch
    from timm.models.vision_transformer import _convert_openai_clip

    renamed = {}
    for key, value in tower.items():
        for old, new in _OPEN_CLIP_EXTRA_KEYS:
            key = key.replace(old, new)
        renamed[key] = value
    # The converter only reads names (its `model` argument is unused); prefix '' takes every key.
    sd = _convert_openai_clip(renamed, None, prefix="")
    if fc_norm:  # ln_post comes after the pooling: timm's fc_norm
        sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")
    if patch_bias:
        # timm's patch embedding has a bias unless pre_norm; CLIP's conv1 never has one: a zero bias is exact.
        weight = sd["patch_embed.proj.weight"]  # [D, C, ph, pw]
        sd["patch_embed.proj.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)  # [D]
    return sd


def _check_keys(arch: str, kwargs: dict[str, Any], sd: dict[str, torch.Tensor]) -> None:
    """Build the model on the meta device (no memory) and refuse names or shapes it would not load strictly."""
    import torch

    with torch.device("meta"):
        model = build_vit(arch, {**kwargs, "weight_init": "skip"})  # shapes only: no init
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    unexpected = sorted(set(sd) - set(expected))
    missing = sorted(set(expected) - set(sd))
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if unexpected or missing or wrong:
        parts = [
            f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("unexpected", unexpected), ("missing", missing), ("misshapen", wrong))
            if keys
        ]
        raise VitlensError(f"this CLIP tower does not map onto timm's VisionTransformer ({'; '.join(parts)})")


def _text_tower_entry(keys: list[str]) -> str:
    """One ``dropped`` line for everything outside ``visual.``: text tower, projections, logit scale."""
    groups: dict[str, None] = {}
    for key in keys:
        head, dot, _ = key.partition(".")
        groups[f"{head}.*" if dot else head] = None
    return f"text tower ({len(keys)} tensors: {', '.join(groups)})"


def _set_preprocess(conv: Conversion, preprocess_cfg: dict | None) -> None:
    """Fill ``conv.preprocess*`` from open_clip's ``preprocess_cfg``; OpenAI CLIP's transform for the rest."""
    stated: dict[str, Any] = {}
    notes: list[str] = []
    cfg = preprocess_cfg or {}
    for name in ("mean", "std"):
        if name in cfg:
            value = cfg[name]
            stated[name] = [float(v) for v in value] if isinstance(value, list | tuple) else [float(value)] * 3
    if "interpolation" in cfg:
        # open_clip takes 'random' at training time only and resizes bicubic at inference.
        stated["interpolation"] = "bilinear" if cfg["interpolation"] == "bilinear" else "bicubic"
    mode = cfg.get("resize_mode")
    if mode in ("shortest", "squash"):
        stated["crop_pct"] = 1.0
        stated["crop_mode"] = "center" if mode == "shortest" else "squash"
    elif mode is not None:
        notes.append(f"resize_mode '{mode}' (resize the longer side and pad) has no vitlens crop mode")
    conv.preprocess = stated
    conv.preprocess_from = "open_clip_config.json preprocess_cfg" if stated else ""
    conv.preprocess_defaults = {k: v for k, v in OPENAI_PREPROCESS.items() if k not in stated}
    if conv.preprocess_defaults:
        why = _OPENAI_WHY if preprocess_cfg is None else f"open_clip's PreprocessCfg defaults, i.e. {_OPENAI_WHY}"
        conv.preprocess_default_why = "; ".join([why, *notes])


def _convert_timm_trunk(
    state_dict: dict[str, torch.Tensor], model_cfg: dict | None, vision_cfg: dict, preprocess_cfg: dict | None
) -> Conversion:
    """An open_clip ``TimmModel`` tower: the named timm ViT plus open_clip's linear projection as its head.

    open_clip builds the trunk with ``timm.create_model(name, num_classes=..., global_pool=pool)`` (or resets its
    classifier and adds ``visual.head.proj``), at the timm model's default size: ``image_size`` is only used when
    the model was resized with ``force_image_size``.
    """
    import timm
    import torch
    from timm.models import is_model_in_modules
    from timm.models.vision_transformer import checkpoint_filter_fn

    name = vision_cfg.get("timm_model_name")
    if model_cfg is None:
        raise VitlensError(
            "this open_clip tower wraps a timm model (visual.trunk.*) whose name is only in the config: "
            "pass the checkpoint's open_clip_config.json"
        )
    if not name:
        raise VitlensError("open_clip_config.json has no vision_cfg.timm_model_name for these visual.trunk.* weights")
    if not timm.is_model(name):
        raise VitlensError(f"open_clip vision_cfg.timm_model_name '{name}' is not a model of the installed timm")
    if not is_model_in_modules(name, ["vision_transformer"]):
        raise VitlensError(
            f"open_clip vision_cfg.timm_model_name '{name}' is not a timm VisionTransformer; "
            "vitlens analyses timm's VisionTransformer only"
        )
    pool = vision_cfg.get("timm_pool", "avg")  # CLIPVisionCfg defaults
    proj = vision_cfg.get("timm_proj", "linear")
    if pool in ("abs_attn", "rot_attn"):
        raise VitlensError(f"open_clip vision_cfg.timm_pool '{pool}' (attention pooling head) is not supported")
    if proj == "mlp":
        raise VitlensError("open_clip vision_cfg.timm_proj 'mlp' (a two-layer projection head) is not supported")

    visual = {k[len("visual.") :]: v for k, v in state_dict.items() if k.startswith("visual.")}
    others = [k for k in state_dict if not k.startswith("visual.")]
    kwargs: dict[str, Any] = {}
    head_w = visual.get("head.proj.weight")  # [E, num_features]
    if proj == "linear":
        # open_clip reset the trunk's classifier (and its pooling, when timm_pool is set) and projects with
        # visual.head.proj: the same Linear as timm's head after pooling and fc_norm.
        if head_w is None or head_w.ndim != 2:
            raise VitlensError("open_clip vision_cfg.timm_proj is 'linear' but visual.head.proj.weight is missing")
        kwargs["num_classes"] = int(head_w.shape[0])
        if pool:
            kwargs["global_pool"] = pool
    else:
        # No separate projection: the trunk's own head is the projection ('none': no head at all).
        kwargs["num_classes"] = 0 if proj == "none" else model_cfg.get("embed_dim", 0)
        kwargs["global_pool"] = pool

    # The stored grid says at which size the trunk was built: open_clip builds it at timm's default size and only
    # resizes it to vision_cfg.image_size under force_image_size; the config's size is kept when it fits.
    stored_pos = visual.get("trunk.pos_embed")
    candidates = [dict(kwargs)]
    if "image_size" in vision_cfg:
        img_size = list(_pair(vision_cfg["image_size"], "vision_cfg.image_size"))
        candidates.insert(0, {**kwargs, "img_size": img_size if img_size[0] != img_size[1] else img_size[0]})
    meta_model = None
    for candidate in candidates:
        with torch.device("meta"):
            try:
                model = timm.create_model(name, pretrained=False, weight_init="skip", **candidate)  # shapes only
            except (TypeError, ValueError, AssertionError, KeyError) as e:
                raise VitlensError(f"cannot build timm '{name}' with {candidate}: {e}") from e
        if stored_pos is None or getattr(model, "pos_embed", None) is None:
            meta_model, kwargs = model, candidate
            break
        if tuple(model.pos_embed.shape) == tuple(stored_pos.shape):
            meta_model, kwargs = model, candidate
            break
    if meta_model is None:
        raise VitlensError(
            f"visual.trunk.pos_embed {tuple(stored_pos.shape)} fits neither timm '{name}' at its default size nor "
            f"vision_cfg.image_size: the config is not this checkpoint's"
        )

    sd = checkpoint_filter_fn({f"visual.{k}": v for k, v in visual.items()}, meta_model)
    if proj == "linear":
        # checkpoint_filter_fn gives the head a zero bias; open_clip's timm_proj_bias keeps a real one.
        bias = visual.get("head.proj.bias")
        sd["head.bias"] = bias if bias is not None else torch.zeros(head_w.shape[0], dtype=head_w.dtype)  # [E]
    expected = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    bad = sorted(k for k in set(sd) | set(expected) if k not in sd or tuple(sd[k].shape) != expected.get(k))
    if bad:
        raise VitlensError(
            f"the visual.trunk.* weights do not fit timm '{name}' as configured ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''})"
        )
    unused = sorted(k for k in visual if not k.startswith("trunk.") and k not in ("head.proj.weight", "head.proj.bias"))
    dropped = [_text_tower_entry(others)] if others else []
    if unused:
        dropped.append(f"open_clip head parts ({', '.join('visual.' + k for k in unused)})")
    conv = Conversion(
        source_format="open_clip-timm-trunk",
        arch=name,
        kwargs=kwargs,
        state_dict=sd,
        converted=[
            f"open_clip TimmModel tower -> timm '{name}' (timm's checkpoint_filter_fn: visual.trunk.* -> *)",
            *(["visual.head.proj -> head (forward() gives encode_image() features)"] if proj == "linear" else []),
        ],
        dropped=dropped,
    )
    _set_preprocess(conv, preprocess_cfg)
    return conv
