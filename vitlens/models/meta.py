"""Meta's own ViT layouts: DINOv2 (``facebookresearch/dinov2``, with and without registers, SwiGLU) and MAE.

Both are timm-like block by block. DINOv2 differs in its register tokens (inserted after the class token, without
position embeddings), its masking token, its SwiGLU names (``w12``/``w3``) and, in training checkpoints, chunked
blocks (``blocks.<chunk>.<index>.``); timm's own ``_convert_dinov2`` does the register surgery. MAE pre-training
checkpoints carry the decoder beside the encoder; the encoder is a timm ViT.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from vitlens.errors import VitlensError
from vitlens.models.convert import Conversion
from vitlens.models.infer import heads_for_width, infer_from_state_dict

if TYPE_CHECKING:
    import torch

# ImageNet statistics, bicubic, resize 256 -> crop 224: the evaluation transforms of both DINOv2
# (dinov2/data/transforms.py, make_classification_eval_transform) and MAE (main_finetune.py, build_transform).
IMAGENET_EVAL = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bicubic",
    "crop_pct": 224 / 256,
    "crop_mode": "center",
}

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_MAE_DECODER = ("decoder_", "mask_token")


def is_dinov2(sd: dict[str, torch.Tensor]) -> bool:
    """DINOv2's layout: timm-like names with a ``[1, D]`` masking token or ``register_tokens``."""
    has_body = "patch_embed.proj.weight" in sd and any(k.startswith("blocks.") for k in sd)
    mask = sd.get("mask_token")
    return has_body and ("register_tokens" in sd or (mask is not None and mask.ndim == 2))


def is_mae(sd: dict[str, torch.Tensor]) -> bool:
    """An MAE pre-training checkpoint: the timm encoder plus ``decoder_*`` weights."""
    return "patch_embed.proj.weight" in sd and any(k.startswith("decoder_") for k in sd)


def convert_dinov2(
    sd: dict[str, torch.Tensor], *, num_heads: int | None = None, img_size: tuple[int, int] | None = None
) -> Conversion:
    """A DINOv2 backbone as a timm ViT (the ``vit_*_patch14_dinov2`` / ``*_reg4_dinov2`` models of timm).

    With registers, the class token's position embedding is folded into the class token and the model becomes
    ``no_embed_class`` (neither prefix token type then has a position embedding row), which computes the same
    function: DINOv2 adds position embeddings to [cls, patches] and inserts the registers afterwards.
    """
    from timm.models.vision_transformer import _convert_dinov2

    converted = []
    sd = dict(sd)
    if any(_CHUNKED_BLOCK.match(k) for k in sd):
        # BlockChunk keeps each block at its global index inside its chunk: blocks.<chunk>.<i>. -> blocks.<i>.
        sd = {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in sd.items()}
        converted.append("chunked blocks (blocks.<chunk>.<i>) flattened")
    registers = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    swiglu = "blocks.0.mlp.w12.weight" in sd
    embed_dim = int(sd["patch_embed.proj.weight"].shape[0])
    heads, why = heads_for_width(embed_dim, num_heads, family="dinov2")
    sd = _convert_dinov2(sd, None)
    if registers:
        converted.append(f"{registers} register tokens; the class token's position embedding folded into it")
    if swiglu:
        converted.append("SwiGLU w12/w3 -> timm SwiGLUPacked fc1/fc2")
    inferred = infer_from_state_dict(sd, num_heads=heads, img_size=img_size)
    kwargs = dict(inferred.kwargs)
    kwargs["layer_norm_eps"] = 1e-6  # DINOv2 builds partial(nn.LayerNorm, eps=1e-6), as timm's ViT does
    if swiglu:
        # timm's vit_giant_patch14_dinov2: a packed GLU MLP whose fc1 holds both halves, SiLU on the first half.
        kwargs["mlp_layer"] = "swiglu_packed"
        kwargs["act_layer"] = "silu"
    guessed = dict(inferred.guessed)
    if why:
        guessed["num_heads"] = why
    return Conversion(
        source_format="dinov2",
        arch=inferred.arch,
        kwargs=kwargs,
        state_dict=sd,
        preprocess_defaults=dict(IMAGENET_EVAL),
        preprocess_default_why="DINOv2's evaluation transforms",
        guessed=guessed,
        converted=[*converted, "masking token (unused at inference) dropped"],
    )


def convert_mae(
    sd: dict[str, torch.Tensor], *, num_heads: int | None = None, img_size: tuple[int, int] | None = None
) -> Conversion:
    """The encoder of an MAE pre-training checkpoint (He et al. 2022) as a timm ViT; the decoder is dropped."""
    decoder = sorted(k for k in sd if k.startswith(_MAE_DECODER))
    encoder = {k: v for k, v in sd.items() if not k.startswith(_MAE_DECODER)}
    inferred = infer_from_state_dict(encoder, num_heads=num_heads, img_size=img_size)
    if inferred.dropped_keys:
        raise VitlensError(f"unexpected classifier weights beside an MAE decoder: {', '.join(inferred.dropped_keys)}")
    shown = ", ".join(sorted({k.split(".")[0] for k in decoder})[:6])
    return Conversion(
        source_format="mae",
        arch=inferred.arch,
        kwargs={**inferred.kwargs, "layer_norm_eps": 1e-6},  # MAE's encoder: partial(nn.LayerNorm, eps=1e-6)
        state_dict=encoder,
        preprocess_defaults=dict(IMAGENET_EVAL),
        preprocess_default_why="MAE's evaluation transforms",
        guessed=dict(inferred.guessed),
        dropped=[f"MAE decoder ({len(decoder)} tensors: {shown}): pre-training only; the encoder is analysed"],
    )
