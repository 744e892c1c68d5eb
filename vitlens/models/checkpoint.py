"""Reading checkpoint files without ever running code, and writing vitlens checkpoints with their metadata.

Torch pickles are read with ``weights_only=True``: a pickle that names anything beyond tensors and plain
containers is refused, never executed. Safetensors and ``.npz`` (``allow_pickle=False``) cannot carry code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vitlens.errors import VitlensError
from vitlens.io import atomic_path
from vitlens.log import logger

if TYPE_CHECKING:
    import torch

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
SAFETENSORS_SUFFIXES = (".safetensors",)
NPZ_SUFFIXES = (".npz",)
CHECKPOINT_SUFFIXES = TORCH_SUFFIXES + SAFETENSORS_SUFFIXES + NPZ_SUFFIXES

METADATA_KEY = "vitlens"  # safetensors metadata entry holding vitlens' JSON
FORMAT_VERSION = 1

# Where common training codes nest the weights (timm/DeiT 'model', EMA copies, DINO's teacher/student, Lightning's
# 'state_dict'); tried in this order. When several hold weights, the first is taken and the choice is said.
CONTAINER_KEYS = (
    "state_dict",
    "model",
    "teacher",
    "model_ema",
    "state_dict_ema",
    "ema",
    "student",
    "module",
    "net",
    "network",
    "params",
)
# Wrappers' key prefixes: DataParallel/DDP ('module.'), torch.compile ('_orig_mod.'), Lightning ('model.'),
# DINO/MAE-style ('backbone.').
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.")

# Files of a checkpoint folder, in the order they are looked for (Hugging Face transformers / timm `save_for_hf`,
# sharded variants through their index, open_clip hub folders).
FOLDER_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_pytorch_model.bin",
)
# Configs read from a checkpoint folder, or from beside a weights file.
CONFIG_FILES = ("config.json", "preprocessor_config.json", "open_clip_config.json")
MAX_CONFIG_BYTES = 4 << 20  # a config is a few kB; anything larger is not one

Kind = Literal["safetensors", "torch", "npz"]


@dataclass
class RawCheckpoint:
    """What a checkpoint file holds, before any model is built."""

    path: Path
    kind: Kind
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)  # empty for .npz (timm reads those itself)
    metadata: dict[str, Any] | None = None  # vitlens metadata, when the file was written by vitlens
    npz_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # .npz only: array name -> shape
    notes: list[str] = field(default_factory=list)  # what was unwrapped or stripped, for `vitlens info`
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # config file name -> parsed JSON
    torchscript: bool = False  # read from a TorchScript archive (OpenAI CLIP releases), as data
    choice: str | None = None  # which of several models in the file was taken, with how to pick another
    key_taken: bool = False  # --checkpoint-key named an entry of the file's container (not a key prefix)
    # Plain facts a training container holds beside the weights: timm train.py's 'arch' (its model name) and
    # 'args' (argparse.Namespace or dict of the run's arguments, e.g. mean/std/img_size).
    container: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: Path, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_kind(path: Path) -> Kind | None:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in NPZ_SUFFIXES:
        return "npz"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    return None


def read_checkpoint(path: str | os.PathLike, *, checkpoint_key: str | None = None) -> RawCheckpoint:
    """Read a checkpoint file's (or folder's) tensors, configs and vitlens metadata, refusing anything that would
    run code.

    Args:
        path: a weights file, or a folder as Hugging Face / timm / open_clip save them (``config.json`` +
            ``model.safetensors`` or ``pytorch_model.bin``, sharded or not).
        checkpoint_key: the entry (``teacher``, ``model_ema``) or key prefix (``net``) holding the model to take,
            for a file that holds several.

    Raises:
        VitlensError: missing, empty, truncated, not a checkpoint, or a pickle that wants code.
    """
    path = Path(path).expanduser()
    if not path.exists():
        hint = " (for a Hugging Face hub repo, write hf-hub:ORG/NAME)" if str(path).count("/") == 1 else ""
        raise VitlensError(f"checkpoint not found: {path}{hint}")
    if path.is_dir():
        return _read_folder(path, checkpoint_key)
    raw = _read_file(path, checkpoint_key)
    raw.configs = _read_configs(path.parent)
    if raw.configs and raw.metadata is None:
        raw.notes.append(f"read {', '.join(raw.configs)} beside the file")
    return raw


def _read_file(path: Path, checkpoint_key: str | None) -> RawCheckpoint:
    """One weights file: its tensors with wrapper prefixes stripped, and the model ``checkpoint_key`` names."""
    raw = _read_tensors(path, checkpoint_key)
    return _finish(raw, path, checkpoint_key)


def _finish(raw: RawCheckpoint, path: Path, checkpoint_key: str | None) -> RawCheckpoint:
    """Strip wrapper prefixes (``module.``, ...) and keep the model ``checkpoint_key`` names as a key prefix."""
    if raw.kind == "npz" or raw.metadata is not None:
        return raw
    raw.state_dict = _normalise_state_dict(raw.state_dict, raw.notes)
    if checkpoint_key is not None and not raw.key_taken:
        raw.state_dict = _select_prefix(raw.state_dict, checkpoint_key, path, raw.notes)
    return raw


def _read_tensors(path: Path, checkpoint_key: str | None) -> RawCheckpoint:
    """A weights file's tensors as stored (containers unwrapped, prefixes kept), or its vitlens metadata."""
    kind = checkpoint_kind(path)
    if kind is None:
        raise VitlensError(
            f"{path.name}: unknown checkpoint type '{path.suffix}'; vitlens reads "
            + ", ".join(CHECKPOINT_SUFFIXES)
            + " files and checkpoint folders"
        )
    if path.stat().st_size == 0:
        raise VitlensError(f"{path} is empty (0 bytes); the file is not a checkpoint")
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind == "npz":
        return _read_npz(path)
    return _read_torch(path, checkpoint_key)


def _read_folder(folder: Path, checkpoint_key: str | None) -> RawCheckpoint:
    """A folder as ``save_pretrained`` / timm's ``save_for_hf`` / open_clip's hub upload write it."""
    configs = _read_configs(folder)
    found = next((folder / name for name in FOLDER_WEIGHTS if (folder / name).is_file()), None)
    if found is None:
        files = sorted(p for p in folder.iterdir() if p.is_file() and checkpoint_kind(p) is not None)
        if len(files) != 1:
            listed = ", ".join(p.name for p in files[:5]) or "none"
            raise VitlensError(
                f"{folder} is a folder without model weights vitlens knows (model.safetensors, pytorch_model.bin, "
                f"open_clip_model.safetensors, sharded *.index.json); checkpoint files in it: {listed}"
            )
        found = files[0]
    if found.name.endswith(".index.json"):
        raw = _read_sharded(found, checkpoint_key)
    else:
        raw = _read_file(found, checkpoint_key)
    raw.configs = configs
    raw.notes.insert(0, f"weights from {found.name}" + (f", {', '.join(configs)}" if configs else ""))
    return raw


def read_shard_names(index: Path) -> list[str]:
    """The shard files a ``*.index.json`` lists (its ``weight_map``: tensor name -> shard file)."""
    return sorted({str(v) for v in _weight_map(index).values()})


def _weight_map(index: Path) -> dict[str, Any]:
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise VitlensError(f"{index.name} has no weight_map; the sharded checkpoint index is damaged")
    return weight_map


def _read_sharded(index: Path, checkpoint_key: str | None) -> RawCheckpoint:
    """Merge the shards listed in a ``*.index.json``."""
    weight_map = _weight_map(index)
    shards = sorted({str(v) for v in weight_map.values()})
    merged: dict[str, Any] = {}
    kind: Kind = "safetensors"
    for shard in shards:
        shard_path = index.parent / shard
        if Path(shard).name != shard or not shard_path.is_file():
            raise VitlensError(f"{index.name} lists the shard {shard!r}, which is not a file beside it")
        part = _read_tensors(shard_path, checkpoint_key)
        kind = part.kind
        merged.update(part.state_dict)
    missing = [k for k in weight_map if k not in merged]
    if missing:
        raise VitlensError(
            f"{index.name}: {len(missing)} tensors of its weight_map are in no shard ({missing[0]}, ...)"
        )
    raw = RawCheckpoint(index, kind, merged)
    raw.notes.append(f"merged {len(shards)} shards")
    return _finish(raw, index, checkpoint_key)


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise VitlensError(f"{path.name} is {path.stat().st_size} bytes: too large for a config file")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VitlensError(f"{path.name} is not readable JSON: {_first_line(e)}")


def _read_configs(folder: Path) -> dict[str, dict[str, Any]]:
    configs = {}
    for name in CONFIG_FILES:
        candidate = folder / name
        if candidate.is_file():
            data = _read_json(candidate)
            if not isinstance(data, dict):
                raise VitlensError(f"{candidate.name} holds a JSON {type(data).__name__}, not an object")
            configs[name] = data
    return configs


def _select_prefix(sd: dict[str, torch.Tensor], key: str, path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    """``--checkpoint-key`` on a flat state dict: keep the tensors under ``key.`` (prefix stripped)."""
    prefix = key.rstrip(".") + "."
    inside = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not inside:
        tops = sorted({k.split(".")[0] for k in sd})
        raise VitlensError(
            f"--checkpoint-key {key}: {path.name} has no entry or key prefix '{key}' (it has: {', '.join(tops[:8])})"
        )
    notes.append(f"kept the {len(inside)} '{prefix}' weights (--checkpoint-key)")
    return inside


def _read_safetensors(path: Path) -> RawCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from safetensors.torch import safe_open as _safe_open

    try:
        with _safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise VitlensError(f"{path.name} is not a readable safetensors file (truncated or corrupt): {_first_line(e)}")
    metadata = None
    if METADATA_KEY in header:
        try:
            metadata = json.loads(header[METADATA_KEY])
        except json.JSONDecodeError:
            raise VitlensError(f"{path.name}: its vitlens metadata is not valid JSON (file damaged?)")
    return RawCheckpoint(path, "safetensors", state_dict, metadata)


def _read_npz(path: Path) -> RawCheckpoint:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            shapes = {name: tuple(npz[name].shape) for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise VitlensError(f"{path.name} is not a readable .npz archive: {_first_line(e)}")
    return RawCheckpoint(path, "npz", npz_shapes=shapes)


def _read_torch(path: Path, checkpoint_key: str | None = None) -> RawCheckpoint:
    import argparse

    import torch

    from vitlens.models.torchscript import is_torchscript_archive, read_torchscript_state_dict

    if is_torchscript_archive(path):
        # OpenAI CLIP releases: read the module tree's tensors as data; TorchScript code is never run.
        raw = RawCheckpoint(path, "torch", torchscript=True)
        raw.state_dict = read_torchscript_state_dict(path)
        raw.notes.append("read the tensors of a TorchScript archive as data (its code is not run)")
        return raw

    # argparse.Namespace holds training arguments in many checkpoints (DeiT, MAE); rebuilding one runs no code.
    try:
        # torch warns (a raw Python warning on stderr) about pickle protocols it may not parse; a failure is
        # reported below in one line, so the warning only adds noise.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = _unsafe_global(str(e)) or _code_global_in_pickle(path)
        if culprit is not None:
            raise VitlensError(
                f"refused to load {path.name}: its pickle asks to run code ({culprit}), which vitlens never "
                "executes; re-save only the state dict, or convert it to .safetensors"
            )
        raise VitlensError(f"{path.name} is not a readable PyTorch checkpoint (corrupt or not a torch file)")
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, IndexError) as e:
        raise VitlensError(f"{path.name} is not a readable PyTorch checkpoint (truncated or corrupt): {_first_line(e)}")
    raw = RawCheckpoint(path, "torch")
    raw.state_dict = _unwrap_container(obj, path, raw, checkpoint_key)
    return raw


def _unsafe_global(msg: str) -> str | None:
    """The global a refused pickle asked for (e.g. ``posix.system``), or None when the file is just corrupt."""
    match = re.search(r"GLOBAL ([\w.]+)", msg)
    return match.group(1) if match else None


# Globals a plain state-dict pickle needs; anything else (os.system, builtins.eval, ...) would run code.
_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "argparse.Namespace")


def _code_global_in_pickle(path: Path) -> str | None:
    """Scan the pickle's opcodes (never executing them) for a global beyond tensors and containers.

    torch's weights-only unpickler names the global only for pickles it can parse; older protocols fail earlier
    with 'Unsupported operand', so we look ourselves to tell a hostile file from a corrupt one.
    """
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                data = zf.read(member) if member else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return None
    strings: list[str] = []
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            name = None
            if opcode.name in ("GLOBAL", "INST"):
                name = str(arg).replace(" ", ".")
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = f"{strings[-2]}.{strings[-1]}"
            elif isinstance(arg, str):
                strings.append(arg)
            if name is not None and not name.startswith(_SAFE_GLOBAL_PREFIXES):
                return name
    except Exception:  # a corrupt stream ends the scan; what was seen so far is all we know
        return None
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _is_tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_container(obj: Any, path: Path, raw: RawCheckpoint, checkpoint_key: str | None) -> dict[str, Any]:
    """Descend through training-checkpoint containers to the dict of tensors.

    Where a container holds several models (DINO's teacher and student, a model and its EMA), the first of
    :data:`CONTAINER_KEYS` is taken and ``raw.choice`` says so and how to pick another; ``checkpoint_key`` picks.
    """
    import argparse

    if isinstance(obj, dict):
        if isinstance(obj.get("arch"), str):
            raw.container["arch"] = obj["arch"]
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        if isinstance(args, dict):
            raw.container["args"] = {str(k): v for k, v in args.items() if isinstance(v, str | int | float | list)}
    for _ in range(4):
        if not isinstance(obj, dict):
            raise VitlensError(f"{path.name} holds a {type(obj).__name__}, not a state dict")
        if checkpoint_key is not None and checkpoint_key in obj:
            if not isinstance(obj[checkpoint_key], dict):
                raise VitlensError(f"--checkpoint-key {checkpoint_key}: that entry of {path.name} holds no weights")
            raw.notes.append(f"weights taken from the '{checkpoint_key}' entry (--checkpoint-key)")
            raw.key_taken = True
            obj = obj[checkpoint_key]
            checkpoint_key = None
            continue
        candidates = [k for k in CONTAINER_KEYS if k in obj and isinstance(obj[k], dict) and _holds_tensors(obj[k])]
        if candidates and not _is_tensor_dict(obj):
            key = candidates[0]
            if len(candidates) > 1 and raw.choice is None:
                others = ", ".join(candidates[1:])
                raw.choice = (
                    f"{path.name} holds several models ({', '.join(candidates)}): took '{key}'; "
                    f"pass --checkpoint-key {candidates[1]} for another ({others})"
                )
            raw.notes.append(f"weights taken from the '{key}' entry")
            obj = obj[key]
            continue
        if _is_tensor_dict(obj):
            return obj
        keys = ", ".join(list(map(str, obj))[:8])
        raise VitlensError(f"no state dict found in {path.name} (top-level keys: {keys})")
    raise VitlensError(f"no state dict found in {path.name}: containers nested too deeply")


def _holds_tensors(obj: Any, depth: int = 3) -> bool:
    if _is_tensor_dict(obj):
        return True
    return depth > 0 and isinstance(obj, dict) and any(_holds_tensors(v, depth - 1) for v in obj.values())


def _normalise_state_dict(state_dict: dict[str, Any], notes: list[str]) -> dict[str, torch.Tensor]:
    """Keep tensors only and strip wrapper prefixes (``module.``, ``model.``, ``backbone.``)."""
    import torch

    sd = {str(k): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed and sd:
        changed = False
        for prefix in STRIP_PREFIXES:
            inside = [k for k in sd if k.startswith(prefix)]
            if not inside:
                continue
            if len(inside) < len(sd) and prefix != "backbone.":
                continue
            if len(inside) < len(sd):
                # DINO-style: the projection head sits beside the backbone; the analyses use the backbone.
                notes.append(f"kept the {len(inside)} 'backbone.' weights, ignored {len(sd) - len(inside)} others")
            else:
                notes.append(f"stripped the '{prefix}' prefix")
            sd = {k[len(prefix) :]: sd[k] for k in inside}
            changed = True
    return sd


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write a vitlens ``.safetensors`` checkpoint atomically (temporary file, then rename).

    ``metadata`` must hold ``arch`` and ``model_kwargs`` (enough for the loader to rebuild the model) and may hold
    anything JSON-serialisable (preprocessing, class names, training facts).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise VitlensError(f"vitlens checkpoints are .safetensors files, not '{path.suffix}'")
    meta = {"format_version": FORMAT_VERSION, **metadata}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    logger.debug("wrote checkpoint %s", path)
    return path
