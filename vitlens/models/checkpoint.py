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
# 'state_dict'); tried in this order.
CONTAINER_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema", "teacher", "student", "module", "net")
# Wrappers' key prefixes: DataParallel/DDP ('module.'), Lightning ('model.'), DINO/MAE-style ('backbone.').
STRIP_PREFIXES = ("module.", "model.", "backbone.")

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


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read a checkpoint file's tensors and vitlens metadata, refusing anything that would run code.

    Raises:
        VitlensError: missing, a directory, empty, truncated, not a checkpoint, or a pickle that wants code.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise VitlensError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise VitlensError(f"{path} is a directory; give a checkpoint file (.safetensors, .pth, .pt, .bin, .npz)")
    kind = checkpoint_kind(path)
    if kind is None:
        raise VitlensError(
            f"{path.name}: unknown checkpoint type '{path.suffix}'; vitlens reads " + ", ".join(CHECKPOINT_SUFFIXES)
        )
    if path.stat().st_size == 0:
        raise VitlensError(f"{path} is empty (0 bytes); the file is not a checkpoint")
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind == "npz":
        return _read_npz(path)
    return _read_torch(path)


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
    raw = RawCheckpoint(path, "safetensors", state_dict, metadata)
    if metadata is None:
        raw.state_dict = _normalise_state_dict(state_dict, raw.notes)
    return raw


def _read_npz(path: Path) -> RawCheckpoint:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            shapes = {name: tuple(npz[name].shape) for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise VitlensError(f"{path.name} is not a readable .npz archive: {_first_line(e)}")
    return RawCheckpoint(path, "npz", npz_shapes=shapes)


def _read_torch(path: Path) -> RawCheckpoint:
    import argparse

    import torch

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
    raw.state_dict = _normalise_state_dict(_unwrap_container(obj, path, raw.notes), raw.notes)
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


def _unwrap_container(obj: Any, path: Path, notes: list[str]) -> dict[str, Any]:
    """Descend through training-checkpoint containers to the dict of tensors."""
    for _ in range(4):
        if not isinstance(obj, dict):
            raise VitlensError(f"{path.name} holds a {type(obj).__name__}, not a state dict")
        if any(k in obj and isinstance(obj[k], dict) for k in CONTAINER_KEYS):
            key = next(k for k in CONTAINER_KEYS if k in obj and isinstance(obj[k], dict))
            notes.append(f"weights taken from the '{key}' entry")
            obj = obj[key]
            continue
        if _is_tensor_dict(obj):
            return obj
        keys = ", ".join(list(map(str, obj))[:8])
        raise VitlensError(f"no state dict found in {path.name} (top-level keys: {keys})")
    raise VitlensError(f"no state dict found in {path.name}: containers nested too deeply")


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
