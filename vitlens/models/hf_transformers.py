"""Hugging Face transformers ViT-family checkpoints (ViT, DeiT, DINOv2 with and without registers, ViT-MAE, ViT-MSN,
I-JEPA) rewritten as timm ``VisionTransformer`` weights, with the architecture read from their ``config.json``.

Both key layouts are read: the one ``save_pretrained`` writes (``encoder.layer.N.attention.attention.query``; every
checkpoint on the Hub) and transformers 5's in-memory one (``layers.N.attention.q_proj``; a raw ``state_dict()``).
The producing definitions matched here are ``transformers/models/{vit,deit,dinov2,dinov2_with_registers,vit_mae,
vit_msn,ijepa}/modeling_*.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitlens.errors import VitlensError
from vitlens.models.convert import INFERRED_ARCH, INFERRED_DISTILLED_ARCH, Conversion, check_structure, mlp_ratio_for
from vitlens.models.infer import heads_for_width

if TYPE_CHECKING:
    import torch

PATCH_KEY = "embeddings.patch_embeddings.projection.weight"

# ImageNet statistics (timm.data.IMAGENET_DEFAULT_*), as the DeiT and DINOv2 checkpoints state them.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class _Family:
    """What a transformers ``model_type`` builds, in timm's terms, and its config class's defaults."""

    model_class: str  # the base model, for source_format when config.json has no `architectures`
    dist_token: bool = False  # DeiT: a distillation token after the class token (position embedding N + 2 rows)
    class_token: bool = True  # False for I-JEPA (patch tokens only, mean-pooled)
    registers: bool = False  # DINOv2 with registers: tokens after the class token without position embeddings
    dinov2_block: bool = False  # norm1/norm2 names, layer scale, MLP width from mlp_ratio, optional SwiGLU
    layer_norm_eps: float = 1e-12  # the config class's default
    patch_size: int = 16  # the config class's default
    preprocess_defaults: tuple[tuple[str, Any], ...] = ()
    preprocess_default_why: str = ""


# ViTImageProcessor's class defaults (transformers/models/vit/image_processing_vit.py): resize to 224 x 224
# bilinear, no crop, mean = std = 0.5. transformers maps vit, vit_mae, vit_msn and ijepa to this processor.
_VIT_PROCESSOR = (
    ("mean", (0.5, 0.5, 0.5)),
    ("std", (0.5, 0.5, 0.5)),
    ("interpolation", "bilinear"),
    ("crop_pct", 1.0),
    ("crop_mode", "squash"),
)
_VIT_PROCESSOR_WHY = "ViTImageProcessor's defaults (squash to the model size, bilinear, mean = std = 0.5)"
# The facebook/dinov2-* processors (BitImageProcessor): shortest edge 256, centre crop 224, bicubic, ImageNet.
_DINOV2_PROCESSOR = (
    ("mean", _IMAGENET_MEAN),
    ("std", _IMAGENET_STD),
    ("interpolation", "bicubic"),
    ("crop_pct", 224 / 256),
    ("crop_mode", "center"),
)
_DINOV2_PROCESSOR_WHY = (
    "the facebook/dinov2-* preprocessor configs (BitImageProcessor: shortest edge 256, centre crop 224, bicubic, "
    "ImageNet mean/std)"
)

FAMILIES: dict[str, _Family] = {
    "vit": _Family("ViTModel", preprocess_defaults=_VIT_PROCESSOR, preprocess_default_why=_VIT_PROCESSOR_WHY),
    "vit_msn": _Family("ViTMSNModel", preprocess_defaults=_VIT_PROCESSOR, preprocess_default_why=_VIT_PROCESSOR_WHY),
    "vit_mae": _Family("ViTMAEModel", preprocess_defaults=_VIT_PROCESSOR, preprocess_default_why=_VIT_PROCESSOR_WHY),
    "ijepa": _Family(
        "IJepaModel", class_token=False, preprocess_defaults=_VIT_PROCESSOR, preprocess_default_why=_VIT_PROCESSOR_WHY
    ),
    # DeiTImageProcessor's geometry (squash to 256 x 256, centre crop 224, bicubic) with the ImageNet statistics of
    # DeiT's own evaluation (timm's deit configs); the processor class itself defaults to mean = std = 0.5.
    "deit": _Family(
        "DeiTModel",
        dist_token=True,
        preprocess_defaults=(
            ("mean", _IMAGENET_MEAN),
            ("std", _IMAGENET_STD),
            ("interpolation", "bicubic"),
            ("crop_pct", 224 / 256),
            ("crop_mode", "squash"),
        ),
        preprocess_default_why=(
            "DeiTImageProcessor's geometry (squash to 256, centre crop 224, bicubic) with DeiT's ImageNet mean/std"
        ),
    ),
    "dinov2": _Family(
        "Dinov2Model",
        dinov2_block=True,
        layer_norm_eps=1e-6,
        patch_size=14,
        preprocess_defaults=_DINOV2_PROCESSOR,
        preprocess_default_why=_DINOV2_PROCESSOR_WHY,
    ),
    "dinov2_with_registers": _Family(
        "Dinov2WithRegistersModel",
        registers=True,
        dinov2_block=True,
        layer_norm_eps=1e-6,
        preprocess_defaults=_DINOV2_PROCESSOR,
        preprocess_default_why=_DINOV2_PROCESSOR_WHY,
    ),
}

# transformers' `hidden_act` -> timm activation. gelu_new is the tanh approximation written out (same function).
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "silu": "silu",
    "swish": "silu",
}

# Outside the encoder. (key prefix, what it is). Everything else there is dropped as unknown.
_BASE_PREFIXES = ("vit.", "deit.", "dinov2.", "dinov2_with_registers.", "ijepa.")
# Encoder keys outside the layers: (foreign name, timm name); None = not kept by timm.
_EMBEDDING_KEYS: tuple[tuple[str, str | None], ...] = (
    ("embeddings.cls_token", "cls_token"),  # [1, 1, D]
    ("embeddings.distillation_token", "dist_token"),  # [1, 1, D]
    ("embeddings.register_tokens", "reg_token"),  # [1, R, D]
    ("embeddings.position_embeddings", "pos_embed"),  # [1, N + prefix, D]
    ("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),  # [D, C, ph, pw]
    ("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
    ("embeddings.mask_token", None),  # masked-image pre-training only
    ("layernorm.weight", "norm.weight"),
    ("layernorm.bias", "norm.bias"),
    ("pooler.dense.weight", None),  # ViTModel / DeiTModel's dense + tanh pooler
    ("pooler.dense.bias", None),
)
_LAYER = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)")
# One layer's modules: (foreign module, timm module in the block, slot in a concatenation or None). Saved layout
# first, then transformers 5's in-memory names; q, k, v become timm's fused qkv, DINOv2's split SwiGLU gate / up
# become SwiGLUPacked's fc1 (gate first, as timm's GluMlp with gate_last=False expects).
_LAYER_MODULES: tuple[tuple[str, str, int | None], ...] = (
    ("attention.attention.query", "attn.qkv", 0),
    ("attention.attention.key", "attn.qkv", 1),
    ("attention.attention.value", "attn.qkv", 2),
    ("attention.q_proj", "attn.qkv", 0),
    ("attention.k_proj", "attn.qkv", 1),
    ("attention.v_proj", "attn.qkv", 2),
    ("attention.output.dense", "attn.proj", None),
    ("attention.o_proj", "attn.proj", None),
    ("layernorm_before", "norm1", None),
    ("layernorm_after", "norm2", None),
    ("norm1", "norm1", None),
    ("norm2", "norm2", None),
    ("intermediate.dense", "mlp.fc1", None),
    ("output.dense", "mlp.fc2", None),
    ("mlp.fc1", "mlp.fc1", None),
    ("mlp.fc2", "mlp.fc2", None),
    ("mlp.weights_in", "mlp.fc1", None),  # SwiGLU [2H, D] = [gate; up]
    ("mlp.weights_out", "mlp.fc2", None),
    ("mlp.gate_proj", "mlp.fc1", 0),
    ("mlp.up_proj", "mlp.fc1", 1),
    ("mlp.down_proj", "mlp.fc2", None),
    ("layer_scale1", "ls1", None),  # lambda1 [D] -> gamma [D]
    ("layer_scale2", "ls2", None),
)
_LAYER_MAP = {foreign: (timm, slot) for foreign, timm, slot in _LAYER_MODULES}
_SLOTS = {"attn.qkv": 3, "mlp.fc1": 2}  # parts per concatenated module (only when split in the source)

# Processor classes' defaults for fields a preprocessor_config.json leaves out (transformers/models/*/
# image_processing_*.py); the key is the class name without the Pil / Fast / FeatureExtractor suffix.
_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "ViT": {"resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 224, "width": 224}},
    "DeiT": {
        "resample": 3,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
        "size": {"height": 256, "width": 256},
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
    },
    "Bit": {
        "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "size": {"shortest_edge": 224},
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
    },
}
# Processors whose integer `size` means the shortest edge (default_to_square=False); others resize to size x size.
_SHORTEST_EDGE_PROCESSORS = ("Bit", "CLIP", "ConvNext")
# PIL resampling filters by their integer value (PIL.Image.Resampling).
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def is_hf_transformers(state_dict: dict[str, torch.Tensor], config: dict | None) -> bool:
    """Whether ``state_dict`` has the key layout of a transformers ViT-family model (any head, any base prefix).

    Args:
        state_dict: the checkpoint's tensors (wrapper prefixes such as ``module.`` already stripped).
        config: the parsed ``config.json`` beside it, if any (not needed to recognise the layout).
    """
    del config  # the keys decide; a config alone (timm's save_for_hf writes one too) does not
    return any(k == PATCH_KEY or k.endswith("." + PATCH_KEY) for k in state_dict)


def convert_hf_transformers(
    state_dict: dict[str, torch.Tensor],
    config: dict | None,
    *,
    preprocessor_config: dict | None = None,
    num_heads: int | None = None,
) -> Conversion:
    """Rewrite a transformers ViT-family state dict into a timm ``VisionTransformer`` (or DeiT's distilled one).

    Args:
        state_dict: the tensors as ``save_pretrained`` writes them (``model.safetensors``) or as ``state_dict()``
            returns them; with or without the base-model prefix (``vit.``, ``deit.``, ``dinov2.`` ...) and heads.
        config: the parsed ``config.json``; it states the heads, LayerNorm epsilon, activation and image size.
        preprocessor_config: the parsed ``preprocessor_config.json``, when there is one.
        num_heads: heads per layer from the user; only used when the config does not state them.

    Raises:
        VitlensError: no config, a model type vitlens does not rebuild, config values out of range, or a config
            that does not match the weights.
    """
    if config is None:
        raise VitlensError(
            "these are Hugging Face transformers weights: their config.json must sit beside the weights file "
            "(or pass the folder)"
        )
    if not isinstance(config, dict):
        raise VitlensError(f"config.json must hold a JSON object, not {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        supported = ", ".join(FAMILIES)
        if not isinstance(model_type, str) or not model_type:
            raise VitlensError(f"config.json has no model_type; vitlens reads transformers model types {supported}")
        raise VitlensError(
            f"transformers model_type '{model_type}' is not supported: vitlens rebuilds plain ViTs only ({supported})"
        )
    family = FAMILIES[model_type]
    architectures = config.get("architectures") or [family.model_class]
    arch_name = str(architectures[0])

    # 1. Architecture facts from config.json, validated before any tensor is touched.
    facts = _read_config(config, model_type, family, num_heads)

    # 2. Sort the keys: encoder embeddings, encoder layers, heads and anything else.
    encoder, layers, outside = _split_keys(state_dict)
    _check_weights(facts, family, encoder, layers)

    # 3. Tensor surgery.
    converted: list[str] = []
    dropped: list[str] = []
    out = _convert_embeddings(encoder, facts, family, converted, dropped)
    out.update(_convert_layers(layers, facts, converted))
    kwargs = _timm_kwargs(facts, family)
    head_notes = _convert_heads(outside, facts, model_type, arch_name, out, kwargs, dropped)
    converted.extend(head_notes)
    if model_type == "vit_mae":
        converted.append(
            f"ViT-MAE's random patch masking (mask_ratio {config.get('mask_ratio', 0.75)}) is a pre-training step: "
            "the encoder sees every patch"
        )

    class_names = _class_names(config, kwargs["num_classes"])
    preprocess, preprocess_from, notes = _preprocess(preprocessor_config, facts)
    converted.extend(notes)
    return Conversion(
        source_format=f"hf-transformers:{arch_name}",
        arch=INFERRED_DISTILLED_ARCH if family.dist_token else INFERRED_ARCH,
        kwargs=kwargs,
        state_dict=out,
        preprocess=preprocess,
        preprocess_from=preprocess_from,
        preprocess_defaults=dict(family.preprocess_defaults),
        preprocess_default_why=family.preprocess_default_why,
        guessed=facts.guessed,
        converted=converted,
        dropped=dropped,
        class_names=class_names,
    )


# --- config.json ------------------------------------------------------------------------------------------------


@dataclass
class _Facts:
    """The architecture as config.json states it (timm vocabulary)."""

    model_type: str
    embed_dim: int
    depth: int
    num_heads: int
    img_size: tuple[int, int]  # from the config; the grid is img_size // patch_size
    patch_size: tuple[int, int]
    in_chans: int
    qkv_bias: bool
    act_layer: str
    layer_norm_eps: float
    mlp_hidden: int  # the MLP's hidden width (SwiGLU: of gate and up each), from intermediate_size or mlp_ratio
    swiglu: bool
    reg_tokens: int
    layerscale_value: float
    guessed: dict[str, str]

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])


# check_structure speaks timm; config.json's names for the same facts.
_CONFIG_NAMES = {
    "embed_dim": "hidden_size",
    "depth": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "img_size": "image_size",
}


def _read_config(config: dict, model_type: str, family: _Family, num_heads: int | None) -> _Facts:
    guessed: dict[str, str] = {}

    def get(name: str, default: Any) -> Any:
        if name in config:
            return config[name]
        guessed[name] = f"absent from config.json; transformers' {model_type} config default {default!r}"
        return default

    embed_dim = get("hidden_size", 768)
    depth = get("num_hidden_layers", 12)
    heads = config.get("num_attention_heads")
    img_size = _pair(get("image_size", 224), "image_size")
    patch_size = _pair(get("patch_size", family.patch_size), "patch_size")
    # Ranges first (a 10**9-layer or 0-head config stops here), then the heads if the config does not state them.
    try:
        check_structure(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=heads,
            patch_size=patch_size,
            img_size=img_size,
            where="config.json",
        )
    except VitlensError as e:  # say it in the config's own field names
        message = str(e)
        for timm_name, hf_name in _CONFIG_NAMES.items():
            message = re.sub(rf"\b{timm_name}\b", hf_name, message)
        raise VitlensError(message) from None
    if heads is None:
        heads, why = heads_for_width(embed_dim, num_heads, "dinov2" if family.dinov2_block else None)
        if why:
            guessed["num_heads"] = why
    elif num_heads is not None and num_heads != heads:
        raise VitlensError(
            f"config.json has num_attention_heads = {heads} but {num_heads} heads were given: the config states "
            "them, drop --num-heads"
        )
    if img_size[0] < patch_size[0] or img_size[1] < patch_size[1]:
        raise VitlensError(f"config.json: image_size {list(img_size)} is smaller than patch_size {list(patch_size)}")
    head_dim = config.get("head_dim")
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim * heads != embed_dim):
        raise VitlensError(
            f"config.json: head_dim {head_dim} x {heads} heads != hidden_size {embed_dim}; timm's attention needs "
            "heads x head_dim = width"
        )
    in_chans = _integer(get("num_channels", 3), "num_channels", limit=64)

    act = get("hidden_act", "gelu")
    swiglu = bool(config.get("use_swiglu_ffn", False)) and family.dinov2_block
    if swiglu:
        act_layer = "silu"  # DINOv2's SwiGLU FFN applies SiLU whatever hidden_act says
    elif act in _ACTIVATIONS:
        act_layer = _ACTIVATIONS[act]
    else:
        raise VitlensError(
            f"config.json: hidden_act '{act}' has no exact timm equivalent (vitlens maps {', '.join(_ACTIVATIONS)})"
        )
    eps = get("layer_norm_eps", family.layer_norm_eps)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
        raise VitlensError(f"config.json: layer_norm_eps = {eps!r} is not a number between 0 and 1")

    if family.dinov2_block:
        ratio = get("mlp_ratio", 4)
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 64:
            raise VitlensError(f"config.json: mlp_ratio = {ratio!r} is not a number in (0, 64]")
        mlp_hidden = int(embed_dim * ratio)
        if swiglu:
            # Dinov2SwiGLUFFN: two thirds of the MLP width, rounded up to a multiple of 8 (gate and up each).
            mlp_hidden = (int(mlp_hidden * 2 / 3) + 7) // 8 * 8
    else:
        mlp_hidden = _integer(get("intermediate_size", 3072), "intermediate_size", limit=64 * embed_dim)
    reg_tokens = 0
    if family.registers:
        reg_tokens = _integer(get("num_register_tokens", 4), "num_register_tokens", limit=1024, minimum=0)
    layerscale = config.get("layerscale_value", 1.0)
    layerscale = float(layerscale) if isinstance(layerscale, int | float) and layerscale > 0 else 1e-5
    return _Facts(
        model_type=model_type,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        qkv_bias=bool(get("qkv_bias", True)),
        act_layer=act_layer,
        layer_norm_eps=float(eps),
        mlp_hidden=mlp_hidden,
        swiglu=swiglu,
        reg_tokens=reg_tokens,
        layerscale_value=layerscale,
        guessed=guessed,
    )


def _integer(value: Any, name: str, *, limit: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise VitlensError(f"config.json: {name} = {value!r} is not an integer")
    if not minimum <= value <= limit:
        raise VitlensError(f"config.json: {name} = {value} is not an integer from {minimum} to {limit}")
    return value


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, list | tuple) and len(value) == 2:
        h, w = value
    else:
        h = w = value
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, int):
            raise VitlensError(f"config.json: {name} = {value!r} is not an integer or a pair of integers")
    return (h, w)


# --- weights ----------------------------------------------------------------------------------------------------


def _split_keys(
    sd: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(embedding / final-norm tensors, per-layer tensors by index, everything outside the encoder).

    The base prefix (``vit.`` ...) is removed where present; transformers writes ViTMSNForImageClassification's
    layers without it, so a key is read with or without it.
    """
    encoder: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    outside: dict[str, torch.Tensor] = {}
    known = {name for name, _ in _EMBEDDING_KEYS}
    for key, tensor in sd.items():
        name = next((key[len(p) :] for p in _BASE_PREFIXES if key.startswith(p)), key)
        m = _LAYER.fullmatch(name)
        if name in known:
            target = encoder
        elif m:
            target = layers.setdefault(int(m.group(1)), {})
            name = f"{m.group(2)}.{m.group(3)}"
        else:
            outside[key] = tensor
            continue
        if name in target:
            raise VitlensError(f"the checkpoint holds '{name}' twice (with and without its base-model prefix)")
        target[name] = tensor
    return encoder, layers, outside


def _check_weights(
    facts: _Facts,
    family: _Family,
    encoder: dict[str, torch.Tensor],
    layers: dict[int, dict[str, torch.Tensor]],
) -> None:
    """Compare config.json with the weights' shapes; name the first disagreement."""
    D = facts.embed_dim
    proj = encoder.get(PATCH_KEY)
    if proj is None:
        raise VitlensError(f"the checkpoint has no {PATCH_KEY}: not a transformers ViT-family state dict")
    expected = (D, facts.in_chans, *facts.patch_size)
    if tuple(proj.shape) != expected:
        raise VitlensError(
            f"config.json (hidden_size {D}, num_channels {facts.in_chans}, patch_size {list(facts.patch_size)}) "
            f"does not match {PATCH_KEY} of shape {list(proj.shape)}"
        )
    found = sorted(layers)
    if found != list(range(facts.depth)):
        have = f"layers {found[0]}-{found[-1]}" if found else "no layers"
        if found and len(found) != found[-1] + 1:
            have = f"layers {found} (with gaps)"
        raise VitlensError(f"config.json says num_hidden_layers = {facts.depth} but the weights have {have}")

    prefix = int(family.class_token) + int(family.dist_token)
    gh, gw = facts.grid_size
    pos = encoder.get("embeddings.position_embeddings")
    if pos is None or tuple(pos.shape) != (1, gh * gw + prefix, D):
        shape = "none" if pos is None else list(pos.shape)
        raise VitlensError(
            f"config.json (image_size {list(facts.img_size)}, patch_size {list(facts.patch_size)}: a {gh}x{gw} grid "
            f"+ {prefix} prefix rows) does not match embeddings.position_embeddings of shape {shape}"
        )
    for name, want in (
        ("embeddings.cls_token", family.class_token),
        ("embeddings.distillation_token", family.dist_token),
    ):
        if (name in encoder) != want:
            raise VitlensError(f"model_type '{facts.model_type}' {'needs' if want else 'has no'} {name}")
    if family.registers:
        reg = encoder.get("embeddings.register_tokens")
        if reg is None or tuple(reg.shape) != (1, facts.reg_tokens, D):
            shape = "none" if reg is None else list(reg.shape)
            raise VitlensError(
                f"config.json says num_register_tokens = {facts.reg_tokens} but embeddings.register_tokens has "
                f"shape {shape}"
            )
    if "layernorm.weight" not in encoder:
        raise VitlensError("the checkpoint has no final layernorm.weight: not a complete transformers ViT encoder")

    # Layer 0 stands for all: the timm model's strict load checks every other layer's shapes.
    layer0 = layers[0]
    q = layer0.get("attention.attention.query.weight", layer0.get("attention.q_proj.weight"))
    if q is None or tuple(q.shape) != (D, D):
        raise VitlensError(
            f"layer 0's query projection is {'missing' if q is None else list(q.shape)}, expected [{D}, {D}]"
        )
    has_bias = "attention.attention.query.bias" in layer0 or "attention.q_proj.bias" in layer0
    if has_bias != facts.qkv_bias:
        raise VitlensError(
            f"config.json says qkv_bias = {facts.qkv_bias} but the query projection "
            f"{'has' if has_bias else 'has no'} bias"
        )
    split_swiglu = "mlp.gate_proj.weight" in layer0
    packed_swiglu = "mlp.weights_in.weight" in layer0
    if (split_swiglu or packed_swiglu) != facts.swiglu:
        raise VitlensError(
            f"config.json says use_swiglu_ffn = {facts.swiglu} but layer 0's MLP is "
            f"{'SwiGLU' if facts.swiglu is False else 'a two-layer GELU MLP'}"
        )
    if facts.swiglu:
        fc1 = layer0["mlp.gate_proj.weight" if split_swiglu else "mlp.weights_in.weight"]
        width = fc1.shape[0] if split_swiglu else fc1.shape[0] // 2
    else:
        fc1 = layer0.get("intermediate.dense.weight", layer0.get("mlp.fc1.weight"))
        if fc1 is None:
            raise VitlensError("layer 0 has no MLP input projection (intermediate.dense / mlp.fc1)")
        width = fc1.shape[0]
    if width != facts.mlp_hidden:
        source = "mlp_ratio" if family.dinov2_block else "intermediate_size"
        raise VitlensError(
            f"config.json's {source} gives an MLP width of {facts.mlp_hidden} but layer 0's is {width} "
            f"(shape {list(fc1.shape)})"
        )
    if family.dinov2_block and "layer_scale1.lambda1" not in layer0:
        raise VitlensError("layer 0 has no layer_scale1.lambda1, which every DINOv2 layer has")


def _convert_embeddings(
    encoder: dict[str, torch.Tensor],
    facts: _Facts,
    family: _Family,
    converted: list[str],
    dropped: list[str],
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for foreign, timm_name in _EMBEDDING_KEYS:
        if foreign in encoder and timm_name is not None:
            out[timm_name] = encoder[foreign]
    converted.append("embeddings -> cls_token / pos_embed / patch_embed.proj, layernorm -> norm")
    if family.dist_token:
        converted.append("embeddings.distillation_token -> dist_token")
    if "embeddings.mask_token" in encoder:
        converted.append("embeddings.mask_token left out (used only for masked-image pre-training)")
    if "pooler.dense.weight" in encoder:
        dropped.append(
            "pooler (pooler.dense.weight, pooler.dense.bias): the dense + tanh pooler of the base model; timm's ViT "
            "has none (the final norm's class token is the feature)"
        )
    if family.registers:
        # transformers adds the class token's position embedding and none to the registers, which it inserts after
        # the class token: timm's no_embed_class layout with that row folded into cls_token (timm's _convert_dinov2).
        pos = out["pos_embed"]  # [1, 1 + N, D]
        out["cls_token"] = out["cls_token"] + pos[:, :1]  # [1, 1, D]
        out["pos_embed"] = pos[:, 1:]  # [1, N, D]
        if facts.reg_tokens == 0:
            del out["reg_token"]  # timm builds no reg_token for zero registers
        converted.append(
            f"{facts.reg_tokens} register tokens -> reg_token; the class token's position embedding folded into "
            "cls_token (registers get none: timm no_embed_class)"
        )
    return out


def _convert_layers(layers: dict[int, dict[str, torch.Tensor]], facts: _Facts, converted: list[str]) -> dict:
    import torch

    out: dict[str, torch.Tensor] = {}
    for index, tensors in sorted(layers.items()):
        parts: dict[str, dict[int, torch.Tensor]] = {}  # timm name -> slot -> tensor, for concatenations
        for name, tensor in tensors.items():
            module, param = name.rsplit(".", 1)
            if module not in _LAYER_MAP:
                raise VitlensError(
                    f"layer {index} has '{name}', which vitlens cannot map to a timm ViT block "
                    f"(a {facts.model_type} variant it does not know)"
                )
            timm_module, slot = _LAYER_MAP[module]
            timm_param = "gamma" if param == "lambda1" else param
            target = f"blocks.{index}.{timm_module}.{timm_param}"
            if slot is None:
                if target in out:
                    raise VitlensError(f"layer {index} has two tensors for timm's {target}")
                out[target] = tensor
            else:
                parts.setdefault(target, {})[slot] = tensor
        for target, pieces in parts.items():
            module = target.split(".", 2)[2].rsplit(".", 1)[0]
            if sorted(pieces) != list(range(_SLOTS[module])):
                raise VitlensError(f"layer {index} lacks part of timm's {target} (has parts {sorted(pieces)})")
            # q, k, v: 3 x [D, D] -> [3D, D] (biases 3 x [D] -> [3D]); gate, up: 2 x [H, D] -> [2H, D].
            out[target] = torch.cat([pieces[s] for s in range(len(pieces))], dim=0)
    converted.append("encoder layer N -> blocks.N; query, key, value -> attn.qkv (concatenated [3D, D], q, k, v)")
    if facts.swiglu:
        converted.append(
            f"SwiGLU FFN (hidden {facts.mlp_hidden}) -> timm SwiGLUPacked mlp.fc1 [gate; up] / mlp.fc2, SiLU"
        )
    if any("layer_scale1" in k for k in layers.get(0, {})):
        converted.append("layer_scale1/2.lambda1 -> ls1/ls2.gamma")
    return out


def _timm_kwargs(facts: _Facts, family: _Family) -> dict[str, Any]:
    ph, pw = facts.patch_size
    gh, gw = facts.grid_size
    img = (gh * ph, gw * pw)  # transformers' grid is image_size // patch_size; extra pixels are never read
    kwargs: dict[str, Any] = {
        "img_size": list(img) if img[0] != img[1] else img[0],
        "patch_size": [ph, pw] if ph != pw else ph,
        "in_chans": facts.in_chans,
        "embed_dim": facts.embed_dim,
        "depth": facts.depth,
        "num_heads": facts.num_heads,
        "qkv_bias": facts.qkv_bias,
        "class_token": family.class_token,
        "reg_tokens": facts.reg_tokens,
        "no_embed_class": family.registers,
        "global_pool": "token" if family.class_token else "avg",
        # transformers normalises the whole sequence before any pooling: keep timm's `norm`, never `fc_norm`.
        "fc_norm": False,
        "act_layer": facts.act_layer,
        "layer_norm_eps": facts.layer_norm_eps,
        "num_classes": 0,
    }
    if facts.swiglu:
        kwargs["mlp_layer"] = "swiglu_packed"
        kwargs["mlp_ratio"] = mlp_ratio_for(2 * facts.mlp_hidden, facts.embed_dim)  # fc1 holds gate and up
    else:
        kwargs["mlp_ratio"] = mlp_ratio_for(facts.mlp_hidden, facts.embed_dim)
    if family.dinov2_block:
        kwargs["init_values"] = facts.layerscale_value  # switches LayerScale on; the loaded gammas overwrite it
    return kwargs


def _convert_heads(
    outside: dict[str, torch.Tensor],
    facts: _Facts,
    model_type: str,
    arch_name: str,
    out: dict[str, torch.Tensor],
    kwargs: dict[str, Any],
    dropped: list[str],
) -> list[str]:
    """Map the classification heads into ``out`` / ``kwargs``; everything else outside the encoder is dropped."""
    import torch

    notes: list[str] = []
    rest = dict(outside)
    D = facts.embed_dim
    w, b = rest.pop("classifier.weight", None), rest.pop("classifier.bias", None)
    cls_w, cls_b = rest.pop("cls_classifier.weight", None), rest.pop("cls_classifier.bias", None)
    dist_w, dist_b = rest.pop("distillation_classifier.weight", None), rest.pop("distillation_classifier.bias", None)

    if cls_w is not None or dist_w is not None:
        if cls_w is None or dist_w is None or cls_w.shape != dist_w.shape or cls_w.shape[1] != D:
            raise VitlensError(
                "cls_classifier and distillation_classifier must both be linear layers of width "
                f"{D} with the same outputs"
            )
        out["head.weight"], out["head_dist.weight"] = cls_w, dist_w  # [K, D] each
        out["head.bias"] = cls_b if cls_b is not None else torch.zeros(cls_w.shape[0], dtype=cls_w.dtype)
        out["head_dist.bias"] = dist_b if dist_b is not None else torch.zeros(dist_w.shape[0], dtype=dist_w.dtype)
        kwargs["num_classes"] = int(cls_w.shape[0])
        notes.append("cls_classifier -> head, distillation_classifier -> head_dist (eval output: their mean)")
    if w is not None:
        keys = ", ".join(k for k, t in (("classifier.weight", w), ("classifier.bias", b)) if t is not None)
        if w.ndim == 2 and w.shape[1] == 2 * D and facts.model_type.startswith("dinov2"):
            dropped.append(
                f"classifier ({keys}): {arch_name}'s head reads concat(class token, mean patch token) of width "
                f"{2 * D}, which timm's linear head cannot express; the features are kept"
            )
        elif w.ndim != 2 or w.shape[1] != D or "head.weight" in out:
            dropped.append(f"classifier ({keys}): shape {list(w.shape)} is not a linear head on width {D}")
        elif model_type == "deit":
            # DeiTForImageClassification reads the class token only; timm's distilled model averages head(cls)
            # and head_dist(dist). head = 2 W, head_dist = 0 gives (2 W cls + 2 b + 0) / 2 = W cls + b exactly
            # (scaling by 2 is exact in floating point).
            out["head.weight"] = w * 2  # [K, D]
            out["head.bias"] = (b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)) * 2  # [K]
            out["head_dist.weight"] = torch.zeros_like(w)
            out["head_dist.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
            kwargs["num_classes"] = int(w.shape[0])
            notes.append(
                "classifier (class token only) -> head with weights x2 and a zero head_dist: timm's distilled model "
                "averages its two heads, so this reproduces the logits exactly"
            )
        else:
            out["head.weight"] = w  # [K, D]
            out["head.bias"] = b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
            kwargs["num_classes"] = int(w.shape[0])
            pooled = "the class token" if kwargs["global_pool"] == "token" else "the mean of the normalised tokens"
            notes.append(f"classifier -> head (on {pooled})")

    groups: dict[str, list[str]] = {}
    for key in rest:
        groups.setdefault(key.split(".", 1)[0], []).append(key)
    for group, keys in groups.items():
        listed = ", ".join(keys[:3]) + (f", ... {len(keys)} tensors" if len(keys) > 3 else "")
        if group == "decoder":
            what = f"the pre-training decoder of {arch_name}; vitlens analyses the encoder"
        else:
            what = f"not part of a ViT encoder or a linear classifier in {arch_name}"
        dropped.append(f"{group} ({listed}): {what}")
    return notes


def _class_names(config: dict, num_classes: int) -> list[str] | None:
    """Labels from ``id2label`` when they are real names (not transformers' default LABEL_0, LABEL_1 ...)."""
    id2label = config.get("id2label")
    if not num_classes or not isinstance(id2label, dict) or not id2label:
        return None
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise VitlensError("config.json: id2label keys must be class indices")
    if all(re.fullmatch(r"LABEL_\d+", v) for v in labels.values()):
        return None
    if sorted(labels) != list(range(num_classes)):
        raise VitlensError(
            f"config.json: id2label has {len(labels)} labels but the classifier has {num_classes} outputs"
        )
    return [labels[i] for i in range(num_classes)]


# --- preprocessor_config.json -----------------------------------------------------------------------------------


def _preprocess(pp: dict | None, facts: _Facts) -> tuple[dict[str, Any], str, list[str]]:
    """The :class:`~vitlens.layout.Preprocess` fields a ``preprocessor_config.json`` states, where, and notes.

    transformers computes ``(pixel * rescale_factor - mean) / std`` after resizing (``size``: height/width is a
    squash, shortest_edge keeps the aspect) and an optional centre crop; vitlens computes
    ``(pixel / 255 - mean') / std'`` after resizing to ``img_size / crop_pct``, so mean' = mean / (255 s) and
    std' = std / (255 s) for ``s = rescale_factor``, and crop_pct = crop / resize.
    """
    if pp is None:
        return {}, "", []
    if not isinstance(pp, dict):
        raise VitlensError(f"preprocessor_config.json must hold a JSON object, not {type(pp).__name__}")
    kind = str(pp.get("image_processor_type") or pp.get("feature_extractor_type") or "")
    kind = re.sub(r"(ImageProcessor|FeatureExtractor)(Pil|Fast)?$", "", kind)
    pp = {**_PROCESSOR_DEFAULTS.get(kind, {}), **pp}
    fields: dict[str, Any] = {}
    notes: list[str] = []

    scale = pp.get("rescale_factor", 1 / 255) if pp.get("do_rescale", True) else 1.0
    if pp.get("do_normalize", True):
        mean, std = pp.get("image_mean"), pp.get("image_std")
    else:
        mean, std = [0.0] * facts.in_chans, [1.0] * facts.in_chans
    if _numbers(mean) and _numbers(std) and isinstance(scale, int | float) and scale > 0:
        to_unit = 255 * scale  # 1 when rescale_factor is 1/255
        fields["mean"] = tuple(_tidy(float(m) / to_unit) for m in _as_list(mean))
        fields["std"] = tuple(_tidy(float(s) / to_unit) for s in _as_list(std))

    resample = pp.get("resample")
    if isinstance(resample, int) and resample in _RESAMPLE:
        fields["interpolation"] = _RESAMPLE[resample]

    if pp.get("do_resize", True) is False:
        notes.append("preprocessor_config.json does not resize; vitlens resizes to the model's input size")
        return fields, "preprocessor_config.json", notes
    size = pp.get("size")
    if isinstance(size, int):
        shortest_edge = kind.startswith(_SHORTEST_EDGE_PROCESSORS)
        size = {"shortest_edge": size} if shortest_edge else {"height": size, "width": size}
    elif isinstance(size, list | tuple) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    crop = pp.get("crop_size") if pp.get("do_center_crop", False) else None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if not isinstance(size, dict):
        return fields, "preprocessor_config.json", notes
    if isinstance(size.get("height"), int) and isinstance(size.get("width"), int):
        fields["crop_mode"] = "squash"
        resize = size["height"]
        if size["height"] * facts.img_size[1] != size["width"] * facts.img_size[0]:
            notes.append(
                f"the processor resizes to {size['height']}x{size['width']}; vitlens keeps the model's "
                f"{facts.img_size[0]}x{facts.img_size[1]} aspect"
            )
    elif isinstance(size.get("shortest_edge"), int):
        fields["crop_mode"] = "center"
        resize = size["shortest_edge"]
        if crop is None:
            notes.append("the processor keeps the aspect ratio without a crop; vitlens centre-crops to the model size")
    else:
        notes.append(f"preprocessor_config.json size {size} is not a height/width or shortest_edge resize")
        return fields, "preprocessor_config.json", notes
    crop_h = crop.get("height") if isinstance(crop, dict) else None
    if isinstance(crop_h, int) and resize > 0:
        fields["crop_pct"] = crop_h / resize
    else:
        fields["crop_pct"] = 1.0
    out_size = crop_h if isinstance(crop_h, int) else resize
    if out_size != facts.img_size[0]:
        notes.append(
            f"the processor makes {out_size}-px inputs but the position embeddings are for {facts.img_size[0]} px; "
            "vitlens runs the model at that native size with the same crop fraction"
        )
    return fields, "preprocessor_config.json", notes


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _numbers(value: Any) -> bool:
    items = _as_list(value)
    return bool(items) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in items)


def _tidy(value: float) -> float:
    """Round away float noise from the rescale arithmetic (0.5 / (255 / 255) stays 0.5)."""
    return float(f"{value:.12g}")
