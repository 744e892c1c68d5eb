"""Architecture inference: timm ``VisionTransformer`` kwargs read off a state dict's key names and shapes.

Everything but the number of heads is in the shapes: patch size and channels (patch projection), width and depth
(blocks), MLP ratio, qkv bias, q/k norm, layer scale, prefix tokens, the position-embedding grid and whether the
prefix tokens have position embeddings (``no_embed_class``), final / fc norm, and the classifier: one Linear layer,
or the layers of a Sequential head (:func:`sequential_head`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitlens.errors import ParameterError, VitlensError
from vitlens.models.convert import HEAD_ACT_GUESS, HEAD_ACTS, INFERRED_ARCH, INFERRED_DISTILLED_ARCH, mlp_ratio_for

if TYPE_CHECKING:
    import torch

# Heads per width of the released ViT families, with where each row comes from. A width whose released families
# disagree (1536) is ambiguous unless the family is known; any other width is not guessed at all.
HEAD_TABLE: dict[int, tuple[tuple[int, str, str], ...]] = {
    # width: ((heads, family, source), ...)
    192: ((3, "deit", "DeiT-Ti, Touvron et al. 2021, Table 1"),),
    384: ((6, "vit", "ViT-S / DeiT-S, Touvron et al. 2021, Table 1; DINOv2 ViT-S/14"),),
    768: ((12, "vit", "ViT-B, Dosovitskiy et al. 2020, Table 1"),),
    1024: ((16, "vit", "ViT-L, Dosovitskiy et al. 2020, Table 1"),),
    1152: ((16, "siglip", "SigLIP So400m/14, Alabdulmohsin et al. 2023 (width 1152, 16 heads)"),),
    1280: ((16, "vit", "ViT-H, Dosovitskiy et al. 2020, Table 1; open_clip ViT-H-14 (head width 80)"),),
    1408: ((16, "vit", "ViT-g/14 of EVA and open_clip (width 1408, head width 88)"),),
    1536: (
        (24, "dinov2", "DINOv2 ViT-g/14, Oquab et al. 2023 (24 heads of 64)"),
        (16, "siglip", "SigLIP 2 giant-opt/16, Tschannen et al. 2025 (16 heads of 96)"),
    ),
    1664: ((16, "vit", "ViT-bigG/14 of open_clip (width 1664, head width 104)"),),
}


@dataclass
class InferredArch:
    """timm constructor kwargs for a state dict, and what had to be guessed."""

    arch: str
    kwargs: dict[str, Any]
    guessed: dict[str, str] = field(default_factory=dict)
    dropped_keys: list[str] = field(default_factory=list)  # head weights vitlens cannot rebuild (DINO heads, ...)
    head_keys: dict[str, str] = field(default_factory=dict)  # a multi-layer head's keys: state dict -> head_layers'


def heads_for_width(embed_dim: int, num_heads: int | None, family: str | None = None) -> tuple[int, str | None]:
    """The number of heads: given, else from :data:`HEAD_TABLE`. Returns (heads, why-guessed or None).

    Args:
        embed_dim: the width.
        num_heads: what the user gave (``--num-heads``), if anything.
        family: a family hint (``"dinov2"``, ``"siglip"``) that settles a width whose families disagree.

    Raises:
        ParameterError: ``num_heads`` does not divide the width.
        VitlensError: the width is not in the table, or its released families disagree and no family settles it.
    """
    if num_heads is not None:
        if num_heads < 1 or embed_dim % num_heads:
            raise ParameterError("num_heads", f"num_heads {num_heads} does not divide the embedding width {embed_dim}")
        return num_heads, None
    rows = HEAD_TABLE.get(embed_dim, ())
    if family is not None and len(rows) > 1:
        rows = tuple(r for r in rows if r[1] == family) or rows
    if len({r[0] for r in rows}) == 1:
        heads, _, source = rows[0]
        return heads, f"not stored in the checkpoint; {heads} for width {embed_dim} as in {source} (pass --num-heads)"
    if rows:
        options = "; ".join(f"{h} in {src}" for h, _, src in rows)
        raise VitlensError(
            f"the number of heads is not stored in this checkpoint and width {embed_dim} has several ({options}): "
            "pass --num-heads"
        )
    raise VitlensError(
        f"the number of heads is not stored in this checkpoint and width {embed_dim} is not a standard ViT width: "
        "pass --num-heads"
    )


def infer_from_state_dict(
    sd: dict[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    img_size: tuple[int, int] | None = None,
) -> InferredArch:
    """Infer timm ``VisionTransformer`` kwargs from a timm-format state dict.

    Args:
        sd: the state dict (wrapper prefixes already stripped).
        num_heads: heads per layer, when the user knows it.
        img_size: the checkpoint's native input size, only needed when its grid is not square.

    Raises:
        VitlensError: not a ViT state dict, or a fact that cannot be read and was not given.
    """
    keys = list(sd)
    proj = sd.get("patch_embed.proj.weight")
    if proj is None or "blocks.0.attn.qkv.weight" not in sd:  # callers detect the layout first: a damaged one
        sample = ", ".join(keys[:5]) or "none"
        raise VitlensError(
            f"this is not a timm ViT state dict (no patch_embed.proj.weight / blocks.0.attn.qkv.weight; "
            f"keys: {sample}); pass --arch if it is a ViT with other names"
        )
    if proj.ndim != 4:
        raise VitlensError(f"patch_embed.proj.weight has shape {tuple(proj.shape)}; expected [D, C, ph, pw]")
    embed_dim, in_chans, ph, pw = (int(s) for s in proj.shape)
    depth = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k)))
    q_norm = sd.get("blocks.0.attn.q_norm.weight")
    if num_heads is None and q_norm is not None and q_norm.ndim == 1 and embed_dim % int(q_norm.shape[0]) == 0:
        num_heads = embed_dim // int(q_norm.shape[0])  # q/k norm works per head: its width is the head width
    heads, why = heads_for_width(embed_dim, num_heads)
    guessed = {"num_heads": why} if why else {}

    reg_tokens = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    class_token = "cls_token" in sd
    distilled = "dist_token" in sd
    num_prefix = int(class_token) + int(distilled) + reg_tokens
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise VitlensError("blocks.0.mlp.fc1.weight is missing: only the standard two-layer MLP block is supported")
    kwargs: dict[str, Any] = {
        "patch_size": (ph, pw) if ph != pw else ph,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": mlp_ratio_for(int(fc1.shape[0]), embed_dim),
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "qk_norm": "blocks.0.attn.q_norm.weight" in sd,
        "proj_bias": "blocks.0.attn.proj.bias" in sd,
        "class_token": class_token,
        "reg_tokens": reg_tokens,
        "pre_norm": "norm_pre.weight" in sd,
    }
    if "blocks.0.ls1.gamma" in sd:
        kwargs["init_values"] = 1e-5  # any value: switches LayerScale on; the loaded gammas overwrite it

    # Pooling and final norms: timm puts the final norm in `fc_norm` for pooled (avg / map) models.
    has_fc_norm = "fc_norm.weight" in sd
    if "attn_pool.latent" in sd:
        kwargs["global_pool"] = "map"
    elif not class_token or has_fc_norm:
        kwargs["global_pool"] = "avg"
    else:
        kwargs["global_pool"] = "token"
    kwargs["fc_norm"] = has_fc_norm
    # timm builds `fc_norm` only when final_norm is on (it then replaces `norm`).
    kwargs["final_norm"] = "norm.weight" in sd or has_fc_norm

    # Position embedding and grid.
    pos = sd.get("pos_embed")
    if pos is None:
        kwargs["pos_embed"] = "none"
        grid = _grid_from_img_size(img_size, (ph, pw)) if img_size else None
        if grid is None:
            grid = (224 // ph, 224 // pw)
            guessed["img_size"] = "no position embedding to read it from; assumed 224 (pass --img-size)"
    else:
        grid, no_embed_class = _infer_grid(int(pos.shape[1]), num_prefix, img_size, (ph, pw))
        kwargs["no_embed_class"] = no_embed_class
    kwargs["img_size"] = (grid[0] * ph, grid[1] * pw)

    # Classifier: a linear head of width embed_dim, or a Sequential of Linear layers (an MLP head) is kept; anything
    # else (DINO projection heads `head.mlp.*` / `head.last_layer.*`, heads on another width) is dropped.
    dropped: list[str] = []
    head_keys: dict[str, str] = {}
    head_w = sd.get("head.weight")
    mlp = None if distilled else sequential_head(sd, "head.", embed_dim)
    if head_w is not None and head_w.ndim == 2 and head_w.shape[1] == embed_dim:
        kwargs["num_classes"] = int(head_w.shape[0])
    elif mlp is not None:
        kwargs["head_layers"], head_keys, head_guessed = mlp
        kwargs["num_classes"] = int(kwargs["head_layers"][-1]["linear"][1])
        guessed.update(head_guessed)
    else:
        kwargs["num_classes"] = 0
        dropped = [k for k in keys if k.startswith(("head.", "head_dist."))]
    if distilled and kwargs["num_classes"] == 0:
        dropped = sorted(set(dropped) | {k for k in keys if k.startswith("head_dist.")})
    arch = INFERRED_DISTILLED_ARCH if distilled else INFERRED_ARCH
    return InferredArch(arch, kwargs, guessed, dropped, head_keys)


def sequential_head(
    sd: dict[str, torch.Tensor], prefix: str, embed_dim: int
) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, str]] | None:
    """A classifier saved from an ``nn.Sequential`` (``head.0.weight``, ``head.2.weight``, ...) as ``head_layers``.

    What a state dict holds of such a head is its Linear layers (2-D weight ``[out, in]`` + bias) and LayerNorms
    (1-D weight + bias); the modules without parameters leave gaps in the numbering. A gap between two Linear
    layers is read as one activation (a dropout beside it is the identity in eval mode) which the state dict does
    not name: GELU is assumed, as in the from-scratch ViT scripts' MLP heads (early lucidrains/vit-pytorch
    ``mlp_head``: Linear, GELU, Linear), and listed as guessed (``model_kwargs`` ``head_act`` sets it). A LayerNorm
    of width ``embed_dim`` may come first (vit-pytorch's later ``mlp_head``: LayerNorm, Linear); its epsilon is
    not stored either: torch's default 1e-5, as vit-pytorch builds it.

    Args:
        sd: the state dict.
        prefix: the head's key prefix, e.g. ``"head."``.
        embed_dim: the width of the pooled features.

    Returns:
        (head_layers, key renames from ``sd`` to the rebuilt Sequential's numbering, guessed facts), or None when
        the keys under ``prefix`` are not such a head (e.g. DINO's ``head.mlp.*``) or the widths do not chain.
    """
    indexed: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        if not key.startswith(prefix):
            continue
        m = re.fullmatch(re.escape(prefix) + r"(\d+)\.(weight|bias)", key)
        if m is None:
            return None
        indexed.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
    if not indexed:
        return None
    layers: list[dict[str, Any]] = []
    renames: dict[str, str] = {}
    guessed: dict[str, str] = {}
    width, previous = embed_dim, None  # the features so far; the last source index and its kind
    for index in sorted(indexed):
        params = indexed[index]
        w, b = params.get("weight"), params.get("bias")
        if w is None or b is None:  # Linear(bias=False) and LayerNorm(bias=False) are not rebuilt
            return None
        if w.ndim == 2 and b.ndim == 1 and int(w.shape[1]) == width and int(b.shape[0]) == int(w.shape[0]):
            if previous is not None and previous[1] == "linear" and index - previous[0] > 1:
                layers.append({"act": "gelu"})
                guessed[HEAD_ACT_GUESS] = (
                    "a state dict does not store the activation between the head's Linear layers; assumed GELU, "
                    f"as the from-scratch ViT scripts' MLP heads (set with --model-kwargs "
                    f'\'{{"head_act": "relu"}}\'; one of {", ".join(HEAD_ACTS)})'
                )
            elif previous is not None and index - previous[0] > 1:
                return None  # something without parameters after a LayerNorm: not a layout vitlens knows
            kind, entry = "linear", {"linear": [width, int(w.shape[0])]}
            width = int(w.shape[0])
        elif previous is None and w.ndim == 1 and b.ndim == 1 and int(w.shape[0]) == width == int(b.shape[0]):
            kind, entry = "layer_norm", {"layer_norm": [width, 1e-5]}
            guessed["head_layer_norm_eps"] = (
                "the head's LayerNorm epsilon is not stored; assumed 1e-5, torch's default, as vit-pytorch's "
                "mlp_head builds it"
            )
        else:
            return None
        for name in ("weight", "bias"):
            renames[f"{prefix}{index}.{name}"] = f"head.{len(layers)}.{name}"
        layers.append(entry)
        previous = (index, kind)
    if "linear" not in layers[-1]:
        return None
    return layers, renames, guessed


def _grid_from_img_size(img_size: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    h, w = img_size
    if h % patch[0] or w % patch[1]:
        raise ParameterError("img_size", f"img_size {h},{w} is not divisible by the patch size {patch[0]}x{patch[1]}")
    return (h // patch[0], w // patch[1])


def _infer_grid(
    rows: int, num_prefix: int, img_size: tuple[int, int] | None, patch: tuple[int, int]
) -> tuple[tuple[int, int], bool]:
    """The checkpoint's patch grid and ``no_embed_class`` from the number of position-embedding rows.

    With ``img_size`` the grid is known and the row count only decides ``no_embed_class``; without it the grid
    must be square (a checkpoint does not record a non-square one).
    """
    if img_size is not None:
        gh, gw = _grid_from_img_size(img_size, patch)
        if rows == gh * gw + num_prefix:
            return (gh, gw), False
        if rows == gh * gw:
            return (gh, gw), True
    # Square grids: prefix rows included (timm's default) first, then `no_embed_class`.
    for count, no_embed_class in ((rows - num_prefix, False), (rows, True)):
        side = math.isqrt(max(count, 0))
        if count > 0 and side * side == count:
            return (side, side), no_embed_class
    hint = "" if img_size is None else f" (it does not fit --img-size {img_size[0]},{img_size[1]} either)"
    raise VitlensError(
        f"cannot infer the patch grid from {rows} position-embedding rows and {num_prefix} prefix tokens{hint}: "
        "pass the checkpoint's --img-size H,W"
    )


def infer_from_npz(shapes: dict[str, tuple[int, ...]]) -> InferredArch:
    """Infer kwargs for a Google ViT / big_vision ``.npz`` (the heads are stored there: query kernel [D, H, d]).

    Raises:
        VitlensError: the archive is not a ViT checkpoint.
    """
    prefix = next(
        (p for p in ("", "opt/target/", "params/", "params/img/") if f"{p}embedding/kernel" in shapes),
        None,
    )
    if prefix is None:
        names = ", ".join(list(shapes)[:5]) or "none"
        raise VitlensError(f"this .npz is not a Google ViT / big_vision checkpoint (no embedding/kernel; has {names})")
    ph, pw, in_chans, embed_dim = shapes[f"{prefix}embedding/kernel"]
    stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in shapes
    big_vision = prefix.startswith("params/") or f"{prefix}pos_embedding" in shapes or stacked
    mha = "MultiHeadDotProductAttention_0" if big_vision else "MultiHeadDotProductAttention_1"
    mlp = "MlpBlock_0" if big_vision else "MlpBlock_3"
    if stacked:
        depth = shapes[f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"][0]
        block = f"{prefix}Transformer/encoderblock/"
        q_shape = shapes[f"{block}{mha}/query/kernel"][1:]
        fc1 = shapes[f"{block}{mlp}/Dense_0/kernel"][1:]
    else:
        depth = 1 + max(
            int(m.group(1))
            for k in shapes
            if (m := re.match(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/", k))
        )
        block = f"{prefix}Transformer/encoderblock_0/"
        q_shape = shapes[f"{block}{mha}/query/kernel"]
        fc1 = shapes[f"{block}{mlp}/Dense_0/kernel"]
    pos_key = f"{prefix}pos_embedding" if big_vision else f"{prefix}Transformer/posembed_input/pos_embedding"
    class_token = f"{prefix}cls" in shapes
    rows = shapes[pos_key][1]
    grid, no_embed_class = _infer_grid(rows, int(class_token), None, (ph, pw))
    head = shapes.get(f"{prefix}head/kernel")
    kwargs = {
        "img_size": (grid[0] * ph, grid[1] * pw),
        "patch_size": ph if ph == pw else (ph, pw),
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": q_shape[1],
        "mlp_ratio": mlp_ratio_for(int(fc1[1]), int(embed_dim)),
        "qkv_bias": True,
        "class_token": class_token,
        "no_embed_class": no_embed_class,
        "global_pool": "token" if class_token else "avg",
        "fc_norm": False,
        "num_classes": int(head[-1]) if head is not None and head[-1] > 0 else 0,
    }
    if f"{prefix}MAPHead_0/probe" in shapes:
        kwargs["global_pool"] = "map"
    # The ViT paper's pre-training head (§3.1; google-research/vision_transformer: Dense `pre_logits`, tanh, Dense
    # `head`), kept in the original i21k releases: a Sequential head, its kernels [in, out] transposed when loaded.
    pre = shapes.get(f"{prefix}pre_logits/kernel")  # [D, R]
    head_keys: dict[str, str] = {}
    if pre is not None and len(pre) == 2 and pre[0] == embed_dim and kwargs["num_classes"] and head[0] == pre[1]:
        kwargs["head_layers"] = [{"linear": [int(embed_dim), int(pre[1])]}, {"act": "tanh"}]
        kwargs["head_layers"].append({"linear": [int(pre[1]), kwargs["num_classes"]]})
        for src, index in (("pre_logits", 0), ("head", 2)):
            head_keys[f"{prefix}{src}/kernel"] = f"head.{index}.weight"
            head_keys[f"{prefix}{src}/bias"] = f"head.{index}.bias"
    return InferredArch(INFERRED_ARCH, kwargs, head_keys=head_keys)
