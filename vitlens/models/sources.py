"""Which family a state dict comes from, and its conversion to a timm ViT.

The families are tried in a fixed order on the whole state dict, then on the tensors under each top-level key
prefix (Lightning modules keep the network under any attribute name: ``net.``, ``vit.``, ``backbone_model.``;
self-distillation checkpoints keep ``teacher.`` and ``student.`` side by side). A recognised but unsupported format
(Swin, BEiT, a CNN) and an unrecognised one each end in one line that says what was found and what vitlens reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vitlens.errors import VitlensError
from vitlens.models import meta, timm_format
from vitlens.models.convert import Conversion

if TYPE_CHECKING:
    import torch

    from vitlens.models.checkpoint import RawCheckpoint

# What vitlens reads, for the message about a state dict it does not recognise.
KNOWN_FORMATS = (
    "timm ViT state dicts and hub folders, Hugging Face transformers ViT / DeiT / DINOv2 folders, torchvision "
    "VisionTransformer, OpenAI CLIP and open_clip, DINO / DINOv2 / MAE / DeiT releases, .npz (Google ViT)"
)
# Prefixes preferred when one file holds several models: the one that is evaluated comes first.
PREFERRED_PREFIXES = ("teacher", "model_ema", "ema", "model", "net", "student")
_CNN_KEYS = ("layer1.0.conv1.weight", "stages.0.", "stem.0.weight", "features.0.weight", "downsample_layers.0.")


def convert_checkpoint(
    raw: RawCheckpoint,
    *,
    arch: str | None = None,
    num_heads: int | None = None,
    img_size: tuple[int, int] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Conversion:
    """Convert a checkpoint without vitlens metadata into a timm ViT description.

    Args:
        raw: what :func:`~vitlens.models.checkpoint.read_checkpoint` read (state dict, configs, container facts).
        arch: a timm architecture name the user gave (``--arch``); else it is read from the source.
        num_heads: heads per layer the user gave; else read from a config or the width table.
        img_size: the checkpoint's native input size when its grid is not square.
        model_kwargs: the user's extra timm kwargs (they override what a converter chose).

    Raises:
        VitlensError: an unsupported or unrecognised format, or facts that cannot be read and were not given.
    """
    model_kwargs = dict(model_kwargs or {})
    sd = raw.state_dict
    if arch is not None:
        return timm_format.convert_with_arch(
            sd, arch, model_kwargs=model_kwargs, num_heads=num_heads, img_size=img_size, source_format="timm (--arch)"
        )
    convert = _family(sd, raw)
    if convert is None:
        prefix, convert = _nested_model(sd, raw)
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        raw.notes.append(f"kept the {len(sd)} '{prefix}' weights")
    return convert(sd, num_heads, img_size, model_kwargs)


Converter = Callable[["dict[str, torch.Tensor]", "int | None", "tuple[int, int] | None", "dict[str, Any]"], Conversion]


def _family(sd: dict[str, torch.Tensor], raw: RawCheckpoint) -> Converter | None:
    """The converter for ``sd``'s layout, or None when no family recognises it."""
    from vitlens.models import clip, hf_transformers, torchvision_vit  # their producing libraries are not needed

    config = raw.configs.get("config.json")
    if hf_transformers.is_hf_transformers(sd, config):
        pre = raw.configs.get("preprocessor_config.json")
        return lambda s, heads, size, kw: hf_transformers.convert_hf_transformers(
            s, config, preprocessor_config=pre, num_heads=heads
        )
    if torchvision_vit.is_torchvision_vit(sd):
        return lambda s, heads, size, kw: torchvision_vit.convert_torchvision_vit(s, num_heads=heads)
    if clip.is_clip(sd):
        oc_config = raw.configs.get("open_clip_config.json")
        return lambda s, heads, size, kw: clip.convert_clip(
            s, open_clip_config=oc_config, num_heads=heads, openai=raw.torchscript
        )
    if meta.is_dinov2(sd):
        return lambda s, heads, size, kw: meta.convert_dinov2(s, num_heads=heads, img_size=size)
    if meta.is_mae(sd):
        return lambda s, heads, size, kw: meta.convert_mae(s, num_heads=heads, img_size=size)
    if timm_format.is_timm_config(config) and "patch_embed.proj.weight" in sd:
        return lambda s, heads, size, kw: timm_format.convert_timm_hub(
            s, config, model_kwargs=kw, num_heads=heads, img_size=size
        )
    if timm_format.is_timm_layout(sd):
        train_arch = raw.container.get("arch")
        if train_arch:  # timm train.py names its model; its arguments may state the preprocessing
            stated = timm_format.train_args_preprocess(raw.container.get("args", {}))

            def from_train_arch(s, heads, size, kw):
                conv = timm_format.convert_with_arch(s, train_arch, model_kwargs=kw, num_heads=heads, img_size=size)
                conv.source_format = f"timm-train:{train_arch}"
                if stated:
                    conv.preprocess, conv.preprocess_from = stated, "the checkpoint's training arguments"
                return conv

            return from_train_arch
        return lambda s, heads, size, kw: timm_format.convert_timm(s, num_heads=heads, img_size=size)
    return None


def _nested_model(sd: dict[str, torch.Tensor], raw: RawCheckpoint) -> tuple[str, Converter]:
    """The key prefix (one or two levels deep) under which a known family sits, e.g. Lightning's ``net.``."""
    found: list[tuple[str, Converter]] = []
    firsts = sorted({k.split(".")[0] for k in sd if "." in k})
    for first in firsts:
        prefix = first + "."
        sub = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        convert = _family(sub, raw)
        if convert is None:  # one level deeper: teacher.backbone., model.encoder.
            seconds = sorted({k.split(".")[0] for k in sub if "." in k})
            for second in seconds:
                deeper = {k[len(second) + 1 :]: v for k, v in sub.items() if k.startswith(second + ".")}
                convert = _family(deeper, raw)
                if convert is not None:
                    found.append((f"{prefix}{second}.", convert))
                    break
        else:
            found.append((prefix, convert))
    if not found:
        raise VitlensError(_unrecognised(sd))
    rank = {p: i for i, p in enumerate(PREFERRED_PREFIXES)}
    found.sort(key=lambda item: rank.get(item[0].split(".")[0], len(rank)))
    if len(found) > 1 and raw.choice is None:
        names = [p.rstrip(".") for p, _ in found]
        raw.choice = (
            f"{raw.path.name} holds several models ({', '.join(names)}): took '{names[0]}'; "
            f"pass --checkpoint-key {names[1]} for another"
        )
    return found[0]


def _unrecognised(sd: dict[str, torch.Tensor]) -> str:
    keys = list(sd)
    sample = ", ".join(keys[:5]) or "none"
    if any("relative_position_bias_table" in k or "rel_pos_bias" in k for k in keys):
        return (
            "this checkpoint has relative position biases (Swin / BEiT-style keys): vitlens rebuilds plain ViTs "
            f"(timm VisionTransformer) only; keys: {sample}"
        )
    if any(k.startswith(_CNN_KEYS) for k in keys) or ("conv1.weight" in sd and "bn1.weight" in sd):
        return f"this checkpoint is a CNN (ResNet / ConvNeXt-style keys: {sample}), not a Vision Transformer"
    return (
        f"vitlens does not recognise this state dict (keys: {sample}); it reads {KNOWN_FORMATS}. If it is a ViT "
        "with other names, pass --arch with the timm architecture it matches"
    )
