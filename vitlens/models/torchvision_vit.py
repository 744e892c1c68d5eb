"""torchvision's ``VisionTransformer`` (``vit_b_16`` ... ``vit_h_14``) state dicts as timm ViT weights.

torchvision's ViT (``torchvision/models/vision_transformer.py``) is the same network as timm's with a class token,
token pooling and no pre-norm: LayerNorm epsilon 1e-6 (timm's default), exact GELU, ``nn.MultiheadAttention`` whose
packed ``in_proj_weight`` [3D, D] holds q, k, v in the order timm's ``qkv`` does, and a position embedding that
covers the class token. Every tensor already has timm's shape, so the conversion is renaming only. What the file
does not say: the number of heads (read from the width) and the transforms of the weights it was trained with.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from vitlens.errors import VitlensError
from vitlens.models.convert import INFERRED_ARCH, Conversion, check_structure, describe_head_layers, mlp_ratio_for
from vitlens.models.infer import heads_for_width

if TYPE_CHECKING:
    import torch

_LAYER = r"encoder\.layers\.encoder_layer_(\d+)\."
# (torchvision key pattern, timm key). Shapes are identical on both sides:
#   class_token [1, 1, D], encoder.pos_embedding [1, 1 + H*W, D], conv_proj [D, C, p, p],
#   in_proj_weight [3D, D] (rows q | k | v, as timm's qkv.weight), in_proj_bias [3D].
# `mlp.linear_1` / `mlp.linear_2` are the names before torchvision 0.14's MLPBlock (its _load_from_state_dict
# still renames them to `mlp.0` / `mlp.3`, the Linear layers of MLP's [Linear, GELU, Dropout, Linear, Dropout]).
KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"class_token", "cls_token"),
    (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.pos_embedding", "pos_embed"),
    (_LAYER + r"ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_LAYER + r"self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (_LAYER + r"self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_LAYER + r"ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_LAYER + r"mlp\.(?:0|linear_1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_LAYER + r"mlp\.(?:3|linear_2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.ln\.(weight|bias)", r"norm.\1"),
    (r"heads\.head\.(weight|bias)", r"head.\1"),
)
_PRE_LOGITS = ("heads.pre_logits.weight", "heads.pre_logits.bias")
_HEAD = ("heads.head.weight", "heads.head.bias")
# The representation_size head (Linear, Tanh, Linear) as vitlens' Sequential head (see _representation_head).
_REPRESENTATION_KEYS = {
    "heads.pre_logits.weight": "head.0.weight",
    "heads.pre_logits.bias": "head.0.bias",
    "heads.head.weight": "head.2.weight",
    "heads.head.bias": "head.2.bias",
}
_FC1 = "encoder.layers.encoder_layer_0.mlp."
_REQUIRED = ("class_token", "conv_proj.weight", "encoder.pos_embedding", "encoder.ln.weight")

# torchvision.transforms._presets.ImageClassification: ImageNet mean/std, resize the shorter side (aspect kept:
# timm's crop_mode "center"), then centre-crop. Its defaults (bilinear, 256 -> 224) are the torchvision reference
# recipe's evaluation transforms, assumed for a checkpoint no builder's weights match.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_DEFAULT_RESIZE, _DEFAULT_CROP = 256, 224
# The builders' published weights, as in the `*_Weights` enums: (patch, width, depth, img_size) ->
# (weights, resize_size, interpolation); crop_size is img_size. At 224 px vit_b_16 and vit_l_16 also have
# SWAG_LINEAR weights of the same shape (bicubic, resize 224): the IMAGENET1K_V1 ones, the builders' DEFAULT, win.
TORCHVISION_WEIGHTS: dict[tuple[int, int, int, int], tuple[str, int, str]] = {
    (16, 768, 12, 224): ("ViT_B_16_Weights.IMAGENET1K_V1", 256, "bilinear"),
    (16, 768, 12, 384): ("ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1", 384, "bicubic"),
    (32, 768, 12, 224): ("ViT_B_32_Weights.IMAGENET1K_V1", 256, "bilinear"),
    (16, 1024, 24, 224): ("ViT_L_16_Weights.IMAGENET1K_V1", 242, "bilinear"),
    (16, 1024, 24, 512): ("ViT_L_16_Weights.IMAGENET1K_SWAG_E2E_V1", 512, "bicubic"),
    (32, 1024, 24, 224): ("ViT_L_32_Weights.IMAGENET1K_V1", 256, "bilinear"),
    (14, 1280, 32, 224): ("ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1", 224, "bicubic"),
    (14, 1280, 32, 518): ("ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1", 518, "bicubic"),
}


def is_torchvision_vit(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict has torchvision ``VisionTransformer`` keys (``conv_proj``, ``encoder.layers...``)."""
    return (
        "class_token" in state_dict
        and "encoder.pos_embedding" in state_dict
        and any(k.startswith("conv_proj.") for k in state_dict)
        and any(k.startswith("encoder.layers.encoder_layer_0.") for k in state_dict)
    )


def convert_torchvision_vit(state_dict: dict[str, torch.Tensor], *, num_heads: int | None = None) -> Conversion:
    """Rename a torchvision ``VisionTransformer`` state dict to timm's and read its architecture off the shapes.

    A classifier behind ``heads.pre_logits`` (``representation_size``: Linear + tanh + Linear) is kept as a
    Sequential head (``head_layers``), so the logits are torchvision's.

    Args:
        state_dict: the ``model.state_dict()`` of a torchvision ``VisionTransformer``.
        num_heads: heads per layer (not stored in the file); read from :data:`~vitlens.models.infer.HEAD_TABLE`
            for the builders' widths when not given.

    Raises:
        VitlensError: a convolutional stem, a non-square position grid, missing or unknown keys, or a width whose
            heads are not known and were not given.
    """
    if any(k.startswith(("conv_proj.conv_bn_relu_", "conv_proj.conv_last.")) for k in state_dict):
        raise VitlensError(
            "this torchvision ViT has a convolutional stem (conv_stem_configs), not a linear patch embedding: "
            "timm's VisionTransformer cannot hold it"
        )
    missing = [k for k in _REQUIRED if k not in state_dict]
    if missing:
        raise VitlensError(f"not a torchvision VisionTransformer state dict: {', '.join(missing)} missing")

    # Architecture from the shapes, validated before any tensor is touched.
    proj = state_dict["conv_proj.weight"]  # [D, C, p, p]
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise VitlensError(f"conv_proj.weight has shape {tuple(proj.shape)}; expected [D, C, p, p]")
    embed_dim, in_chans, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    layers = sorted({int(m.group(1)) for k in state_dict if (m := re.match(_LAYER, k))})
    if not layers or layers != list(range(len(layers))):
        raise VitlensError(f"encoder layers are not numbered 0..N-1 (found {layers[:8]}); the state dict is damaged")
    depth = len(layers)
    pos = state_dict["encoder.pos_embedding"]  # [1, 1 + H*W, D]: the class token's row first
    grid = math.isqrt(max(int(pos.shape[1]) - 1, 0))
    if pos.ndim != 3 or grid < 1 or grid * grid != pos.shape[1] - 1:
        raise VitlensError(
            f"encoder.pos_embedding has shape {tuple(pos.shape)}: torchvision's grid is square, so it must have "
            "1 + n*n rows"
        )
    img_size = grid * patch
    fc1 = next((f"{_FC1}{n}.weight" for n in ("0", "linear_1") if f"{_FC1}{n}.weight" in state_dict), None)
    if fc1 is None:
        raise VitlensError(f"{_FC1}0.weight is missing: the state dict is damaged")
    mlp_dim = int(state_dict[fc1].shape[0])  # fc1.weight [mlp_dim, D]
    heads, why = heads_for_width(embed_dim, num_heads)
    check_structure(
        embed_dim=embed_dim, depth=depth, num_heads=heads, patch_size=patch, img_size=img_size, where="torchvision ViT"
    )
    mlp_ratio = mlp_ratio_for(mlp_dim, embed_dim)

    num_classes = int(state_dict["heads.head.weight"].shape[0]) if "heads.head.weight" in state_dict else 0
    head_layers = _representation_head(state_dict, embed_dim)
    renames = dict(_REPRESENTATION_KEYS) if head_layers else {}

    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        name = renames.get(key) or _timm_name(key)
        if name is None:
            unknown.append(key)
        else:
            out[name] = tensor
    if unknown:
        raise VitlensError(
            f"keys a torchvision VisionTransformer does not have: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}; is this a modified model?"
        )

    kwargs: dict[str, Any] = {
        "img_size": img_size,
        "patch_size": patch,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": True,
        "class_token": True,
        "global_pool": "token",
        "fc_norm": False,
        "num_classes": num_classes,
        # torchvision's norm_layer default is LayerNorm(eps=1e-6), timm's ViT default: nothing to set.
    }
    converted = [
        "renamed torchvision keys to timm's (class_token, conv_proj, encoder.layers.encoder_layer_i, encoder.ln, "
        "heads.head); shapes unchanged",
        "self_attention.in_proj_weight/bias -> attn.qkv (q, k, v rows in the same order)",
    ]
    if head_layers:
        kwargs["head_layers"] = head_layers
        converted.append(
            f"representation_size head kept: heads.pre_logits + tanh + heads.head -> head.0 + tanh + head.2 "
            f"({describe_head_layers(head_layers)})"
        )
    if any(".mlp.linear_" in k for k in state_dict):
        converted.append("legacy MLP names mlp.linear_1/linear_2 (torchvision < 0.14) -> mlp.fc1/fc2")
    defaults, default_why = _preprocess_defaults(img_size, patch, embed_dim, depth)
    return Conversion(
        source_format="torchvision",
        arch=INFERRED_ARCH,
        kwargs=kwargs,
        state_dict=out,
        preprocess_defaults=defaults,
        preprocess_default_why=default_why,
        guessed={"num_heads": why} if why else {},
        converted=converted,
    )


def _representation_head(state_dict: dict[str, torch.Tensor], embed_dim: int) -> list[dict[str, Any]] | None:
    """``head_layers`` for torchvision's ``representation_size`` head, or None when it has none.

    torchvision builds ``heads`` as ``pre_logits`` = Linear(hidden_dim, representation_size), ``act`` = Tanh,
    ``head`` = Linear(representation_size, num_classes) (the ViT paper's pre-training head, §3.1): a Sequential
    whose parameters sit at 0 and 2, as :data:`_REPRESENTATION_KEYS` renumbers them.

    Raises:
        VitlensError: a pre-logits layer whose shapes do not chain from the width into the classifier.
    """
    if not any(k in state_dict for k in _PRE_LOGITS):
        return None
    missing = [k for k in (*_PRE_LOGITS, *_HEAD) if k not in state_dict]
    pre, head = state_dict.get("heads.pre_logits.weight"), state_dict.get("heads.head.weight")  # [R, D], [K, R]
    if missing or pre.ndim != 2 or head.ndim != 2 or pre.shape[1] != embed_dim or head.shape[1] != pre.shape[0]:
        shapes = {k: list(state_dict[k].shape) for k in (*_PRE_LOGITS, *_HEAD) if k in state_dict}
        raise VitlensError(
            f"the representation_size head does not chain from width {embed_dim} into the classifier: {shapes}"
        )
    rep, classes = int(pre.shape[0]), int(head.shape[0])
    return [{"linear": [embed_dim, rep]}, {"act": "tanh"}, {"linear": [rep, classes]}]


def _timm_name(key: str) -> str | None:
    for pattern, replacement in KEY_MAP:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _preprocess_defaults(img_size: int, patch: int, embed_dim: int, depth: int) -> tuple[dict[str, Any], str]:
    """The transforms of the torchvision weights a checkpoint of this shape matches, else the reference recipe's.

    A torchvision checkpoint does not record its transforms, so these are always a guess: the published weights
    of the same builder and input size (:data:`TORCHVISION_WEIGHTS`), or ``ImageClassification``'s defaults.
    """
    base = {"mean": _IMAGENET_MEAN, "std": _IMAGENET_STD, "crop_mode": "center"}
    known = TORCHVISION_WEIGHTS.get((patch, embed_dim, depth, img_size))
    if known is None:
        weights, resize, crop, interpolation = (
            "the vit_* builders' IMAGENET1K_V1 weights",
            _DEFAULT_RESIZE,
            _DEFAULT_CROP,
            "bilinear",
        )
        note = "no builder's weights have this shape; SWAG weights use bicubic and resize straight to the input"
    else:
        weights, resize, interpolation = known
        crop = img_size
        note = "the weights of this builder and input size" + (
            "; its SWAG_LINEAR weights use bicubic resize to 224" if weights.endswith("IMAGENET1K_V1") else ""
        )
    why = (
        f"torchvision checkpoints do not record their transforms; assumed those of {weights} (ImageNet mean/std, "
        f"{interpolation} resize to {resize}, centre-crop {crop}): {note}"
    )
    return {**base, "interpolation": interpolation, "crop_pct": crop / resize}, why
