"""Loading any ViT checkpoint the user has: files, timm names, ``hf-hub:`` ids, vitlens checkpoints, ``demo``.

The architecture comes from vitlens metadata, else ``--arch`` (+ ``--model-kwargs``), else it is inferred from the
state dict (:mod:`vitlens.models.infer`). Whatever the source, the result is one :class:`~vitlens.models.vit.ViT`
in eval mode on the chosen device, with ``--img-size`` applied by resampling the position embedding (timm's
``set_input_size``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from vitlens.device import resolve_device
from vitlens.errors import UsageError, VitlensError
from vitlens.layout import Preprocess
from vitlens.log import logger
from vitlens.models.checkpoint import CHECKPOINT_SUFFIXES, RawCheckpoint, read_checkpoint
from vitlens.models.infer import (
    INFERRED_ARCH,
    INFERRED_DISTILLED_ARCH,
    InferredArch,
    infer_from_npz,
    infer_from_state_dict,
)
from vitlens.models.vit import ViT, is_timm_vit

if TYPE_CHECKING:
    import torch
    from torch import nn

DEMO_SPEC = "demo"
HEAD_PREFIXES = ("head.", "head_dist.")
# timm's default for ViTs trained from scratch (AugReg, ViT paper): inputs scaled to [-1, 1].
DEFAULT_MEAN_STD = (0.5, 0.5)


def demo_checkpoint_path() -> Path:
    """Where the embedded demo model lives inside the installed package."""
    return Path(str(resources.files("vitlens") / "assets" / "demo.safetensors"))


def parse_img_size(value: str | int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``224`` -> (224, 224); ``"224,320"`` / ``"224x320"`` -> (224, 320); None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        sizes = [value]
    elif isinstance(value, tuple | list):
        sizes = list(value)
    else:
        parts = str(value).lower().replace("x", ",").split(",")
        try:
            sizes = [int(p) for p in parts if p.strip()]
        except ValueError:
            raise UsageError(f"--img-size '{value}' is not an integer or H,W")
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise UsageError(f"--img-size '{value}' must be one positive integer or H,W")
    return (int(sizes[0]), int(sizes[1]))


def looks_like_path(spec: str) -> bool:
    return (
        os.sep in spec
        or spec.startswith((".", "~"))
        or spec.lower().endswith(CHECKPOINT_SUFFIXES)
        or Path(spec).expanduser().exists()
    )


def load_vit(
    spec: str | os.PathLike | None = None,
    *,
    arch: str | None = None,
    num_heads: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    img_size: str | int | tuple[int, int] | None = None,
    device: str = "auto",
    pretrained: bool = True,
) -> ViT:
    """Load a ViT from whatever the user has.

    Args:
        spec: a checkpoint file (.safetensors/.pth/.pt/.bin/.ckpt/.npz), a timm model name (with optional
            pretrained tag), ``hf-hub:org/name``, or ``demo`` (also when None).
        arch: timm architecture for a state dict that is not a vitlens checkpoint (else it is inferred).
        num_heads: heads per layer for an inferred architecture (not stored in weights).
        model_kwargs: extra ``timm.create_model`` kwargs.
        img_size: analyse at this input size; the position embedding is resampled (timm's resampling).
        device: ``auto|cpu|cuda|cuda:N|mps``.
        pretrained: for timm names, whether to fetch pretrained weights.

    Raises:
        VitlensError: for every problem a user can cause, with a one-line message.
    """
    torch_device = resolve_device(device)
    size = parse_img_size(img_size)
    model_kwargs = dict(model_kwargs or {})
    spec_str = DEMO_SPEC if spec is None else str(spec)
    if spec_str == DEMO_SPEC:
        path = demo_checkpoint_path()
        if not path.exists():
            raise VitlensError("the embedded demo model is missing from this installation; reinstall vitlens")
        vit = _load_file(path, arch, num_heads, model_kwargs, size)
        vit.source = DEMO_SPEC
    elif looks_like_path(spec_str):
        vit = _load_file(Path(spec_str).expanduser(), arch, num_heads, model_kwargs, size)
    else:
        vit = _load_timm_name(spec_str, model_kwargs, pretrained)
    if size is not None and tuple(size) != vit.layout.img_size:
        _set_input_size(vit, size)
    _warn_non_finite(vit.model)
    vit.model.to(torch_device)
    return vit


# ------------------------------------------------------------------------------------------------ files
def _load_file(
    path: Path, arch: str | None, num_heads: int | None, model_kwargs: dict[str, Any], size: tuple[int, int] | None
) -> ViT:
    raw = read_checkpoint(path)
    if raw.kind == "npz":
        vit = _from_npz(raw, arch, model_kwargs)
    elif raw.metadata is not None:
        vit = _from_vitlens_checkpoint(raw, model_kwargs)
    else:
        vit = _from_state_dict(raw, arch, num_heads, model_kwargs, size)
    vit.source = str(path)
    vit.checkpoint_path = path
    for note in raw.notes:
        logger.info("%s: %s", path.name, note)
    return vit


def build_model(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate a timm ViT (random weights) from an architecture name and constructor kwargs."""
    import timm
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(kwargs)
    for key in ("img_size", "patch_size"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    try:
        if arch == INFERRED_ARCH:
            return VisionTransformer(**kwargs)
        if arch == INFERRED_DISTILLED_ARCH:
            return VisionTransformerDistilled(**kwargs)
        if not timm.is_model(arch):
            raise VitlensError(f"unknown timm architecture '{arch}' (see timm.list_models('vit_*'))")
        return timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise VitlensError(f"cannot build '{arch}' with {_fmt_kwargs(kwargs)}: {e}")


def _fmt_kwargs(kwargs: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + "}" if kwargs else "default settings"


def _from_vitlens_checkpoint(raw: RawCheckpoint, model_kwargs: dict[str, Any]) -> ViT:
    meta = raw.metadata or {}
    if "arch" not in meta or "model_kwargs" not in meta:
        raise VitlensError(f"{raw.path.name}: vitlens metadata lacks 'arch' / 'model_kwargs' (file damaged?)")
    kwargs = {**meta["model_kwargs"], **model_kwargs}
    model = build_model(meta["arch"], kwargs)
    _require_vit(model, meta["arch"])
    _load_strict(model, raw.state_dict, raw.path.name)
    pre = meta.get("preprocess") or {}
    layout_size = tuple(int(s) for s in model.patch_embed.img_size)
    in_chans = int(kwargs.get("in_chans", 3))
    preprocess = Preprocess(
        img_size=layout_size,
        in_chans=in_chans,
        mean=tuple(pre.get("mean", (DEFAULT_MEAN_STD[0],) * in_chans)),
        std=tuple(pre.get("std", (DEFAULT_MEAN_STD[1],) * in_chans)),
        interpolation=pre.get("interpolation", "bicubic"),
        crop_pct=float(pre.get("crop_pct", 1.0)),
    )
    return ViT(
        model,
        preprocess,
        arch=meta["arch"],
        arch_kwargs=kwargs,
        class_names=meta.get("class_names"),
        metadata=meta,
    )


def _from_state_dict(
    raw: RawCheckpoint,
    arch: str | None,
    num_heads: int | None,
    model_kwargs: dict[str, Any],
    size: tuple[int, int] | None,
) -> ViT:
    import timm.models.vision_transformer as tvit

    sd = dict(raw.state_dict)
    name = raw.path.name
    guessed: dict[str, str] = {}
    if arch is not None:
        head_w = sd.get("head.weight")
        kwargs = dict(model_kwargs)
        if head_w is not None and head_w.ndim == 2:
            kwargs.setdefault("num_classes", int(head_w.shape[0]))
        else:
            kwargs.setdefault("num_classes", 0)
        if size is not None:
            kwargs.setdefault("img_size", size)
        if num_heads is not None:
            kwargs.setdefault("num_heads", num_heads)
        model = build_model(arch, kwargs)
        _require_vit(model, arch)
        try:
            sd = tvit.checkpoint_filter_fn(sd, model)
        except (RuntimeError, ValueError, KeyError) as e:
            raise VitlensError(f"{name} does not fit --arch {arch}: {str(e).splitlines()[0][:200]}")
        arch_name = arch
    else:
        inferred: InferredArch = infer_from_state_dict(sd, num_heads=num_heads, img_size=size)
        for key in inferred.dropped_keys:
            sd.pop(key, None)
        if inferred.dropped_keys:
            logger.warning(
                "%s: dropped %d classifier weights that are not a linear head (%s); the analyses use the backbone",
                name,
                len(inferred.dropped_keys),
                ", ".join(inferred.dropped_keys[:3]),
            )
        sd.pop("mask_token", None)  # DINOv2 / iBOT masking token: not part of the inference path
        kwargs = {**inferred.kwargs, **model_kwargs}
        model = build_model(inferred.arch, kwargs)
        guessed.update(inferred.guessed)
        arch_name = inferred.arch
    _load_strict(model, sd, name)
    preprocess = _timm_preprocess(model)
    if arch is None:
        guessed["mean/std"] = "not stored in state dicts; assumed timm's ViT default 0.5/0.5"
    return ViT(model, preprocess, arch=arch_name, arch_kwargs=kwargs, guessed=guessed)


def _from_npz(raw: RawCheckpoint, arch: str | None, model_kwargs: dict[str, Any]) -> ViT:
    if arch is not None:
        model = build_model(arch, model_kwargs)
        arch_name, kwargs = arch, dict(model_kwargs)
    else:
        inferred = infer_from_npz(raw.npz_shapes)
        kwargs = {**inferred.kwargs, **model_kwargs}
        model = build_model(inferred.arch, kwargs)
        arch_name = inferred.arch
    _require_vit(model, arch_name)
    try:
        model.load_pretrained(str(raw.path))
    except (KeyError, RuntimeError, ValueError) as e:
        raise VitlensError(f"{raw.path.name} does not match a ViT of {arch_name}: {str(e).splitlines()[0][:200]}")
    return ViT(model, _timm_preprocess(model), arch=arch_name, arch_kwargs=kwargs)


def _require_vit(model: nn.Module, arch: str) -> None:
    if not is_timm_vit(model):
        raise VitlensError(f"'{arch}' builds a {type(model).__name__}, not a Vision Transformer")


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
    """Load weights, reporting mismatching shapes and missing / unexpected keys in one line each.

    Classifier weights that do not fit are dropped with a warning (the analyses use the backbone); any other
    difference is an error, since silently random weights would make every analysis meaningless.
    """
    own = model.state_dict()
    mismatched = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    head_mismatch = [k for k in mismatched if k.startswith(HEAD_PREFIXES)]
    body_mismatch = [k for k in mismatched if not k.startswith(HEAD_PREFIXES)]
    if body_mismatch:
        detail = "; ".join(
            f"{k}: checkpoint {list(sd[k].shape)} vs model {list(own[k].shape)}" for k in body_mismatch[:3]
        )
        more = f" (+{len(body_mismatch) - 3} more)" if len(body_mismatch) > 3 else ""
        raise VitlensError(f"{name} does not fit this architecture: {detail}{more}")
    sd = {k: v for k, v in sd.items() if k not in head_mismatch}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    head_missing = [k for k in missing if k.startswith(HEAD_PREFIXES)]
    head_unexpected = [k for k in unexpected if k.startswith(HEAD_PREFIXES)]
    missing = [k for k in missing if k not in head_missing]
    unexpected = [k for k in unexpected if k not in head_unexpected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:4])})")
        raise VitlensError(f"{name} does not fit this architecture: " + "; ".join(parts))
    if head_mismatch or head_unexpected or head_missing:
        dropped = head_mismatch + head_unexpected
        logger.warning(
            "%s: classifier head does not fit (%s); the head is left untrained, the backbone is loaded",
            name,
            ", ".join((dropped or head_missing)[:3]),
        )
    sd = {k: v for k, v in sd.items() if k not in head_unexpected}
    model.load_state_dict(sd, strict=False)


# ------------------------------------------------------------------------------------------- timm names
def _load_timm_name(name: str, model_kwargs: dict[str, Any], pretrained: bool) -> ViT:
    import timm

    base = name.removeprefix("hf-hub:") if name.startswith("hf-hub:") else name.split(".")[0]
    if not name.startswith("hf-hub:") and not timm.is_model(base):
        raise VitlensError(
            f"'{name}' is not a file and not a timm model name; give a checkpoint path, a timm name "
            "(e.g. vit_small_patch16_224.augreg_in21k), hf-hub:org/name, or demo"
        )
    try:
        with _hub_offline_if_unreachable(pretrained):
            model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise VitlensError(f"cannot build '{name}' with {_fmt_kwargs(model_kwargs)}: {e}")
    except Exception as e:  # network stacks raise many types (OSError, HTTP, hub errors)
        if not pretrained:
            raise
        raise VitlensError(
            f"could not fetch pretrained weights for '{name}' ({type(e).__name__}; no network?): "
            "download the checkpoint elsewhere and pass the file, or use --no-pretrained for random weights"
        )
    _require_vit(model, name)
    vit = ViT(model, _timm_preprocess(model), arch=name, arch_kwargs=dict(model_kwargs))
    vit.source = name
    tag = getattr(model, "pretrained_cfg", {}).get("tag") if pretrained else "random-init"
    vit.model_id = f"timm:{name}:{tag}"
    return vit


def _host_resolves(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host`` resolves within ``timeout`` seconds (a DNS lookup on a daemon thread, nothing sent)."""
    import socket
    import threading

    answers: list[bool] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
            answers.append(True)
        except OSError:
            answers.append(False)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answers and answers[0])


@contextmanager
def _hub_offline_if_unreachable(pretrained: bool) -> Iterator[None]:
    """Use the Hugging Face hub's offline mode (cache only) when its host does not even resolve.

    Without this, an offline machine spends about a minute in the hub client's retries before failing; with it, a
    cached model still loads and a missing one fails at once.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    host = urlparse(constants.ENDPOINT).hostname or ""
    if not pretrained or constants.HF_HUB_OFFLINE or _host_resolves(host):
        yield
        return
    logger.info("%s does not resolve: looking for the weights in the local cache only", host)
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _timm_preprocess(model: nn.Module) -> Preprocess:
    """timm's data config for the model (input size, interpolation, mean/std, crop) as a :class:`Preprocess`."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    if hasattr(model.patch_embed, "backbone"):  # hybrid: the CNN stem takes the image
        in_chans = int(cfg["input_size"][0])
    else:
        in_chans = int(model.patch_embed.proj.weight.shape[1])
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != in_chans:  # e.g. a 1-channel model built from an RGB config: average the channel stats
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return Preprocess(
        img_size=tuple(int(s) for s in model.patch_embed.img_size),
        in_chans=in_chans,
        mean=mean,
        std=std,
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 1.0) or 1.0),
    )


# -------------------------------------------------------------------------------------------- shared
def _set_input_size(vit: ViT, size: tuple[int, int]) -> None:
    """Resample the position embedding for another input size (timm's ``set_input_size``); the grid follows."""
    from dataclasses import replace

    patch = vit.layout.patch_size
    if size[0] % patch[0] or size[1] % patch[1]:
        raise UsageError(f"--img-size {size[0]},{size[1]} is not divisible by the patch size {patch[0]}x{patch[1]}")
    vit.model.set_input_size(img_size=size)
    vit.refresh_layout()
    vit.preprocess = replace(vit.preprocess, img_size=size)


def _warn_non_finite(model: nn.Module) -> None:
    import torch

    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        logger.warning(
            "the checkpoint has NaN/inf weights in %d tensors (%s): every forward-pass analysis will be NaN%s%s",
            len(bad),
            ", ".join(bad[:3]),
            "; filters too (patch embedding)" if any(b.startswith("patch_embed") for b in bad) else "",
            "; pos-sim too (position embedding)" if "pos_embed" in bad else "",
        )
