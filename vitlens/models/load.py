"""Loading any ViT checkpoint the user has: files, folders, timm names, ``hf-hub:`` ids, vitlens checkpoints, ``demo``.

The architecture comes from vitlens metadata, else ``--arch`` (+ ``--model-kwargs``), else the source family's
converter reads it from the source's config or the state dict (:mod:`vitlens.models.sources`). Preprocessing comes
from vitlens metadata, else the source's own config, else the family's documented default, which is then listed
under ``guessed``; ``--mean``/``--std``/``--crop-pct``/``--interpolation`` override any of them. Everything guessed
and every part dropped is said in one warning line each, on every command. Whatever the source, the result is one
:class:`~vitlens.models.vit.ViT` in eval mode on the chosen device, with ``--img-size`` applied by resampling the
position embedding (timm's ``set_input_size``).
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
from vitlens.errors import ParameterError, VitlensError
from vitlens.layout import Preprocess
from vitlens.log import logger
from vitlens.models.checkpoint import CHECKPOINT_SUFFIXES, RawCheckpoint, read_checkpoint
from vitlens.models.convert import Conversion, build_vit, fmt_kwargs
from vitlens.models.infer import infer_from_npz
from vitlens.models.vit import ViT, is_timm_vit

if TYPE_CHECKING:
    import torch
    from torch import nn

DEMO_SPEC = "demo"
LOCAL_DIR = "local-dir:"  # timm's spelling for a hub-style folder on disk
HF_HUB = "hf-hub:"
HEAD_PREFIXES = ("head.", "head_dist.")
# timm's default for ViTs trained from scratch (AugReg, ViT paper): inputs scaled to [-1, 1].
DEFAULT_MEAN_STD = (0.5, 0.5)
PREPROCESS_FIELDS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


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
            raise ParameterError("img_size", f"img_size '{value}' is not an integer or H,W") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise ParameterError("img_size", f"img_size '{value}' must be one positive integer or H,W")
    return (int(sizes[0]), int(sizes[1]))


def looks_like_path(spec: str) -> bool:
    """A file or folder path rather than a timm name (timm names have no separators and no checkpoint suffix)."""
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
    checkpoint_key: str | None = None,
    mean: str | float | tuple[float, ...] | None = None,
    std: str | float | tuple[float, ...] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> ViT:
    """Load a ViT from whatever the user has.

    Args:
        spec: a checkpoint file (.safetensors/.pth/.pt/.bin/.ckpt/.npz), a checkpoint folder (Hugging Face
            ``save_pretrained``, timm ``save_for_hf``, open_clip hub) or ``local-dir:FOLDER``, a timm model name
            (with optional pretrained tag), ``hf-hub:org/name[@revision]`` (timm, transformers or open_clip repos,
            through the hub cache), or ``demo`` (also when None).
        arch: timm architecture for a state dict that is not a vitlens checkpoint (else it is read or inferred).
        num_heads: heads per layer where the source does not say (state dicts without a config).
        model_kwargs: extra ``timm.create_model`` kwargs; they override what a converter chose (e.g.
            ``{"act_layer": "quick_gelu"}``).
        img_size: analyse at this input size; the position embedding is resampled (timm's resampling).
        device: ``auto|cpu|cuda|cuda:N|mps``.
        pretrained: for timm names, whether to fetch pretrained weights.
        checkpoint_key: which model of a file that holds several (``teacher``, ``student``, ``model_ema``, or a key
            prefix such as ``net``).
        mean: per-channel input mean (``"0.5,0.5,0.5"``, one value for all channels, or a tuple); overrides the
            source's.
        std: per-channel input standard deviation, likewise.
        crop_pct: centre-crop fraction (resize to ``img_size / crop_pct``, then crop ``img_size``).
        interpolation: resize filter (``bilinear``, ``bicubic``, ``nearest``, ``lanczos``, ``box``, ``hamming``).

    Raises:
        ParameterError: an option out of range or of the wrong kind, named by its ``param`` (``img_size`` not a
            size or not a multiple of the patch, ``num_heads`` that does not divide the width, ``mean``/``std``/
            ``crop_pct``/``interpolation``, ``checkpoint_key`` with a timm name, an unknown ``mlp_layer`` in
            ``model_kwargs``).
        VitlensError: every other problem a user can cause, with a one-line message.
    """
    torch_device = resolve_device(device)
    size = parse_img_size(img_size)
    overrides = preprocess_overrides(mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation)
    model_kwargs = dict(model_kwargs or {})
    spec_str = DEMO_SPEC if spec is None else str(spec)
    if spec_str.startswith(LOCAL_DIR):
        folder = Path(spec_str.removeprefix(LOCAL_DIR)).expanduser()
        if not folder.is_dir():
            raise VitlensError(f"{spec_str}: {folder} is not a folder")
        vit = _load_file(folder, arch, num_heads, model_kwargs, size, checkpoint_key)
    elif spec_str == DEMO_SPEC:
        path = demo_checkpoint_path()
        if not path.exists():
            raise VitlensError("the embedded demo model is missing from this installation; reinstall vitlens")
        vit = _load_file(path, arch, num_heads, model_kwargs, size, checkpoint_key)
        vit.source = DEMO_SPEC
    elif spec_str.startswith(HF_HUB) and pretrained:
        # Any hub repo (timm, transformers, open_clip): its files come through the hub cache and load as a folder.
        folder, revision = _hub_folder(spec_str.removeprefix(HF_HUB))
        vit = _load_file(folder, arch, num_heads, model_kwargs, size, checkpoint_key)
        vit.source = spec_str
        vit.model_id = f"{spec_str}@{revision}"
    elif looks_like_path(spec_str) and not spec_str.startswith(HF_HUB):
        vit = _load_file(Path(spec_str).expanduser(), arch, num_heads, model_kwargs, size, checkpoint_key)
    else:
        if checkpoint_key is not None:
            raise ParameterError("checkpoint_key", "checkpoint_key applies to checkpoint files, not to timm names")
        vit = _load_timm_name(spec_str, model_kwargs, pretrained)
    if size is not None and tuple(size) != vit.layout.img_size:
        _set_input_size(vit, size)
    _apply_overrides(vit, overrides)
    for fact, why in vit.guessed.items():
        logger.warning("guessed %s: %s", fact, why)
    _warn_non_finite(vit.model)
    vit.model.to(torch_device)
    return vit


def preprocess_overrides(
    *,
    mean: str | float | tuple[float, ...] | None = None,
    std: str | float | tuple[float, ...] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> dict[str, Any]:
    """The user's preprocessing overrides, validated (values per channel are fitted to the model later).

    Raises:
        ParameterError: a value that is not a number list, a non-positive std or crop, or an unknown filter.
    """
    out: dict[str, Any] = {}
    for name, value in (("mean", mean), ("std", std)):
        if value is None or value == "":
            continue
        if isinstance(value, str):
            try:
                values = tuple(float(v) for v in value.replace(" ", "").split(",") if v)
            except ValueError:
                raise ParameterError(name, f"{name} '{value}' is not a comma-separated list of numbers") from None
        elif isinstance(value, int | float):
            values = (float(value),)
        else:
            values = tuple(float(v) for v in value)
        if not values or len(values) > 3 or any(v != v for v in values):
            raise ParameterError(name, f"{name} must be one number or one per channel, not {value!r}")
        if name == "std" and min(values) <= 0:
            raise ParameterError("std", f"std must be positive, not {value!r}")
        out[name] = values
    if crop_pct is not None:
        if not 0 < float(crop_pct) <= 2:
            raise ParameterError("crop_pct", f"crop_pct must be in (0, 2], not {crop_pct}")
        out["crop_pct"] = float(crop_pct)
    if interpolation is not None:
        value = interpolation.strip().lower()
        if value not in INTERPOLATIONS:
            raise ParameterError(
                "interpolation", f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {interpolation!r}"
            )
        out["interpolation"] = value
    return out


def _apply_overrides(vit: ViT, overrides: dict[str, Any]) -> None:
    """Put the user's preprocessing into ``vit.preprocess``; what they set is no longer a guess."""
    from dataclasses import replace

    if not overrides:
        return
    fields = dict(overrides)
    for name in ("mean", "std"):
        if name in fields:
            values = fields[name]
            if len(values) == 1:
                values = values * vit.in_chans
            if len(values) != vit.in_chans:
                raise ParameterError(name, f"{name} has {len(values)} values; this model takes {vit.in_chans} channels")
            fields[name] = values
    vit.preprocess = replace(vit.preprocess, **fields)
    key = _preprocess_guess_key(vit.guessed)
    if key is not None:
        left = [f for f in key.split("/") if f not in fields]
        why = vit.guessed.pop(key)
        if left:
            vit.guessed["/".join(left)] = why
    vit.converted.append("preprocessing set by the user: " + ", ".join(sorted(fields)))


def _preprocess_guess_key(guessed: dict[str, str]) -> str | None:
    return next((k for k in guessed if k.split("/")[0] in PREPROCESS_FIELDS), None)


# ------------------------------------------------------------------------------------------------ files
def _load_file(
    path: Path,
    arch: str | None,
    num_heads: int | None,
    model_kwargs: dict[str, Any],
    size: tuple[int, int] | None,
    checkpoint_key: str | None = None,
) -> ViT:
    raw = read_checkpoint(path, checkpoint_key=checkpoint_key)
    if raw.kind == "npz":
        vit = _from_npz(raw, arch, model_kwargs)
    elif raw.metadata is not None:
        vit = _from_vitlens_checkpoint(raw, model_kwargs)
    else:
        from vitlens.models.sources import convert_checkpoint

        conv = convert_checkpoint(raw, arch=arch, num_heads=num_heads, img_size=size, model_kwargs=model_kwargs)
        vit = _from_conversion(conv, raw, model_kwargs)
    vit.source = str(path)
    vit.checkpoint_path = path if path.is_file() else raw.path
    for note in raw.notes:
        logger.info("%s: %s", path.name, note)
    if raw.choice:
        logger.warning("%s", raw.choice)
    return vit


def build_model(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate a timm ViT (random weights) from an architecture name and constructor kwargs."""
    return build_vit(arch, kwargs)


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
        crop_mode=pre.get("crop_mode", "center"),
    )
    return ViT(
        model,
        preprocess,
        arch=meta["arch"],
        arch_kwargs=kwargs,
        class_names=meta.get("class_names"),
        metadata=meta,
        source_format="vitlens",
    )


def _from_conversion(conv: Conversion, raw: RawCheckpoint, model_kwargs: dict[str, Any]) -> ViT:
    """Build the converted timm ViT, load its weights strictly, and settle its preprocessing."""
    name = raw.path.name
    kwargs = {**conv.kwargs, **model_kwargs}
    guessed = dict(conv.guessed)
    # A converter that built the model already (timm architectures) did so with the user's kwargs applied.
    model = conv.model if conv.model is not None else build_model(conv.arch, kwargs)
    for key in model_kwargs:  # what the user set (e.g. act_layer) is no longer a guess
        guessed.pop(key, None)
    _require_vit(model, conv.arch)
    _load_strict(model, conv.state_dict, name)
    for part in conv.dropped:
        logger.warning("%s: dropped %s", name, part)
    in_chans = int(model.patch_embed.proj.weight.shape[1]) if hasattr(model.patch_embed, "proj") else 3
    fields = {**conv.preprocess}
    missing = [f for f in PREPROCESS_FIELDS if f not in fields]
    for f in missing:
        fields[f] = conv.preprocess_defaults.get(f, _FALLBACK_PREPROCESS[f])
    shown = [f for f in missing if f != "crop_mode" or fields[f] != "center"]
    if shown:
        values = ", ".join(f"{f}={_fmt_value(fields[f])}" for f in shown)
        why = conv.preprocess_default_why or "timm's ViT default"
        flags = "/".join("--" + f.replace("_", "-") for f in shown if f != "crop_mode")
        guessed["/".join(shown)] = f"not in the checkpoint; assumed {why}: {values} (set with {flags})"
    for f in ("mean", "std"):
        values = tuple(float(v) for v in fields[f])
        if len(values) != in_chans:  # e.g. a 1-channel model with RGB statistics: average them
            values = (sum(values) / len(values),) * in_chans
        fields[f] = values
    preprocess = Preprocess(
        img_size=tuple(int(s) for s in model.patch_embed.img_size),
        in_chans=in_chans,
        mean=fields["mean"],
        std=fields["std"],
        interpolation=str(fields["interpolation"]),
        crop_pct=float(fields["crop_pct"]),
        crop_mode=fields["crop_mode"],
    )
    converted = list(conv.converted)
    if conv.preprocess_from:
        converted.append(f"preprocessing ({', '.join(conv.preprocess)}) read from {conv.preprocess_from}")
    return ViT(
        model,
        preprocess,
        arch=conv.arch,
        arch_kwargs=kwargs,
        class_names=conv.class_names,
        guessed=guessed,
        source_format=conv.source_format,
        converted=converted,
        dropped=list(conv.dropped),
    )


# Used only when a converter states no default for a field.
_FALLBACK_PREPROCESS: dict[str, Any] = {
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bicubic",
    "crop_pct": 0.9,
    "crop_mode": "center",
}


def _fmt_value(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "(" + ", ".join(f"{float(v):.4g}" for v in value) + ")"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _from_npz(raw: RawCheckpoint, arch: str | None, model_kwargs: dict[str, Any]) -> ViT:
    head_keys: dict[str, str] = {}
    if arch is not None:
        model = build_model(arch, model_kwargs)
        arch_name, kwargs = arch, dict(model_kwargs)
    else:
        inferred = infer_from_npz(raw.npz_shapes)
        kwargs = {**inferred.kwargs, **model_kwargs}
        model = build_model(inferred.arch, kwargs)
        arch_name, head_keys = inferred.arch, inferred.head_keys
    _require_vit(model, arch_name)
    try:
        model.load_pretrained(str(raw.path))  # timm's reader skips a head that is not one Linear layer
    except (KeyError, RuntimeError, ValueError) as e:
        raise VitlensError(f"{raw.path.name} does not match a ViT of {arch_name}: {str(e).splitlines()[0][:200]}")
    dropped, converted = [], []
    if head_keys:
        _load_npz_head(model, raw.path, head_keys)
        converted.append(
            "pre_logits + tanh + head (the ViT paper's representation layer) -> head.0 + tanh + head.2: the "
            "checkpoint's logits"
        )
    pre_logits = sorted(k for k in raw.npz_shapes if "pre_logits/" in k)
    if pre_logits and not head_keys:
        # timm dropped the representation layer (ViT paper §3.1, used only by the original i21k releases): the
        # head then reads the class token directly, so logits are not the checkpoint's.
        dropped.append(
            f"pre-logits layer ({', '.join(pre_logits)}): timm has no representation layer, so logits differ from "
            "the original model's; the backbone is exact"
        )
        for part in dropped:
            logger.warning("%s: dropped %s", raw.path.name, part)
    in_chans = int(model.patch_embed.proj.weight.shape[1])
    guessed = {}
    if arch is None:
        guessed["mean/std/interpolation/crop_pct"] = (
            "not stated by .npz checkpoints; assumed the Google / big_vision ViT releases' inputs in [-1, 1] and "
            "timm's ViT default: mean=(0.5, ...), std=(0.5, ...), interpolation=bicubic, crop_pct=0.9 "
            "(--mean/--std/... to set)"
        )
        preprocess = Preprocess(
            img_size=tuple(int(s) for s in model.patch_embed.img_size),
            in_chans=in_chans,
            mean=(0.5,) * in_chans,
            std=(0.5,) * in_chans,
            interpolation="bicubic",
            crop_pct=0.9,
        )
    else:
        preprocess = _timm_preprocess(model)
    return ViT(
        model,
        preprocess,
        arch=arch_name,
        arch_kwargs=kwargs,
        guessed=guessed,
        source_format="npz (Google ViT / big_vision)",
        converted=converted,
        dropped=dropped,
    )


def _load_npz_head(model: nn.Module, path: Path, head_keys: dict[str, str]) -> None:
    """Copy a Sequential head's weights from the ``.npz`` (Flax Dense kernels are [in, out]: transposed)."""
    import numpy as np
    import torch

    own = model.state_dict()
    with np.load(path) as arrays, torch.no_grad():
        for src, dst in head_keys.items():
            value = torch.from_numpy(np.asarray(arrays[src], dtype=np.float32))
            value = value.T if src.endswith("/kernel") else value  # [in, out] -> [out, in]
            own[dst].copy_(value)


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

    base = name.removeprefix(HF_HUB) if name.startswith(HF_HUB) else name.split(".")[0]
    if not name.startswith(HF_HUB) and not timm.is_model(base):
        raise VitlensError(
            f"'{name}' is not a file and not a timm model name; give a checkpoint path, a timm name "
            "(e.g. vit_small_patch16_224.augreg_in21k), hf-hub:org/name, or demo"
        )
    try:
        with _hub_offline_if_unreachable(pretrained):
            model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise VitlensError(f"cannot build '{name}' with {fmt_kwargs(model_kwargs)}: {e}")
    except Exception as e:  # network stacks raise many types (OSError, HTTP, hub errors)
        if not pretrained:
            raise
        raise VitlensError(
            f"could not fetch pretrained weights for '{name}' ({type(e).__name__}; no network?): "
            "download the checkpoint elsewhere and pass the file, or use --no-pretrained for random weights"
        )
    _require_vit(model, name)
    vit = ViT(model, _timm_preprocess(model), arch=name, arch_kwargs=dict(model_kwargs), source_format="timm-name")
    vit.source = name
    tag = getattr(model, "pretrained_cfg", {}).get("tag") if pretrained else "random-init"
    vit.model_id = f"timm:{name}:{tag}"
    return vit


def _hub_folder(repo: str) -> tuple[Path, str]:
    """The snapshot folder of a hub repo with the files vitlens reads (configs, then the first weights it knows).

    Files come from the hub cache; they are downloaded when the hub is reachable. ``repo`` may end in
    ``@revision``. Returns the folder and its revision (the snapshot's commit hash).

    Raises:
        VitlensError: nothing vitlens can read was found (unreachable hub and not cached, or no weights).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    from vitlens.models.checkpoint import CONFIG_FILES, FOLDER_WEIGHTS, read_shard_names

    repo_id, _, revision = repo.partition("@")

    def fetch(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision or None))
        except EntryNotFoundError:  # absent from the repo, or (offline) from the cache
            return None
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise VitlensError(f"hf-hub:{repo}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")

    with _hub_offline_if_unreachable(True):
        found = [p for p in (fetch(name) for name in CONFIG_FILES) if p is not None]
        weights = next((p for p in (fetch(name) for name in FOLDER_WEIGHTS) if p is not None), None)
        if weights is not None and weights.name.endswith(".index.json"):
            for shard in read_shard_names(weights):
                if fetch(shard) is None:
                    raise VitlensError(f"hf-hub:{repo}: the shard {shard} of {weights.name} could not be fetched")
    if weights is None:
        where = "in the hub cache or on the hub" if found else "(no network, and not in the hub cache?)"
        raise VitlensError(
            f"hf-hub:{repo}: found no model weights vitlens reads {where}; download the repo elsewhere "
            f"(hf download {repo_id} --local-dir DIR) and pass the folder"
        )
    return weights.parent, weights.parent.name


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
        crop_mode="squash" if cfg.get("crop_mode") == "squash" else "center",
    )


# -------------------------------------------------------------------------------------------- shared
def _set_input_size(vit: ViT, size: tuple[int, int]) -> None:
    """Resample the position embedding for another input size (timm's ``set_input_size``); the grid follows."""
    from dataclasses import replace

    patch = vit.layout.patch_size
    if size[0] % patch[0] or size[1] % patch[1]:
        raise ParameterError(
            "img_size", f"img_size {size[0]},{size[1]} is not divisible by the patch size {patch[0]}x{patch[1]}"
        )
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
