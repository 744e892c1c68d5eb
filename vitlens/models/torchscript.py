"""The parameters and buffers of a TorchScript archive (OpenAI's ``clip`` releases), read as data and never run.

A TorchScript archive (``torch.jit.save``) is a zip of ``<root>/data.pkl`` (the module tree as a pickle),
``<root>/data/<key>`` (raw tensor storages), ``<root>/code/`` (the TorchScript source of every class, declaring
which attributes are parameters and buffers) and ``<root>/constants.pkl``. ``torch.jit.load`` compiles and can run
that code, and ``torch.load(weights_only=True)`` refuses the ``__torch__.*`` classes in ``data.pkl``. Here the
pickle is read by an unpickler that knows a short list of globals: the ``__torch__.*`` classes become inert
placeholders that only record the attributes the pickle sets, tensors are rebuilt from validated storages, and any
other global is refused before it can be called. The class declarations in ``code/`` are matched as text (never
compiled) to tell parameters and buffers from other attributes, so the names come out as
``torch.jit.load(path).state_dict()`` gives them (which OpenAI's ``clip.load(jit=False)`` rebuilds from).

TorchScript does not record whether a buffer is persistent: a ``register_buffer(..., persistent=False)`` buffer is
in the archive and in the loaded module's ``state_dict`` alike, and so it is here.
"""

from __future__ import annotations

import io
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from vitlens.errors import VitlensError

# The storage classes a pickle names for each dtype: torch.save and TorchScript's pickler both write
# `torch.<ScalarType>Storage` in the persistent id ('storage', <class>, key, location, numel).
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
# Limits on what a record may claim before it is read: larger is a damaged or hostile archive.
MAX_PICKLE_BYTES = 64 << 20
MAX_CODE_BYTES = 16 << 20
MAX_MODULE_DEPTH = 64
_TORCHSCRIPT_CLASS = re.compile(r"__torch__(\.\w+)*")


def is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive: a zip with ``<root>/data.pkl`` and TorchScript ``<root>/code/``.

    A ``torch.save`` zip has ``data.pkl`` but no ``code/``; nothing is read beyond the zip's directory.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            return _archive_root(zf.namelist()) is not None
    except (OSError, zipfile.BadZipFile):
        return False


def read_torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The module tree's parameters and buffers by dotted name, as ``torch.jit.load(path).state_dict()`` has them.

    Args:
        path: a ``torch.jit.save`` archive (e.g. OpenAI's ``ViT-B-32.pt``).

    Returns:
        CPU tensors in the archive's dtypes (OpenAI's are float16), e.g. ``visual.conv1.weight``,
        ``visual.transformer.resblocks.0.attn.in_proj_weight``, ``positional_embedding``.

    Raises:
        VitlensError: not a TorchScript archive, a pickle that names a global outside the tensor-rebuilding set
            (nothing it names is called), or storages that do not match what the pickle claims.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            root = _archive_root(zf.namelist())
            if root is None:
                hint = (
                    " (a pre-1.3 model.json archive?)" if any(n.endswith("/model.json") for n in zf.namelist()) else ""
                )
                raise VitlensError(f"{path.name}: not a TorchScript archive (no <root>/data.pkl with code/){hint}")
            archive = _Archive(path.name, zf, root)
            top = archive.load_module_tree()
            out: dict[str, torch.Tensor] = {}
            _collect(top, "", out, archive, depth=0, ancestors=set())
            return out
    except zipfile.BadZipFile as e:
        raise VitlensError(f"{path.name}: not a readable zip archive ({_first_line(e)})")
    except OSError as e:
        raise VitlensError(f"{path}: cannot read the archive ({e.strerror or _first_line(e)})")


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def _archive_root(names: list[str]) -> str | None:
    """The archive's root folder (torch names it after the file), if it has ``data.pkl`` and ``code/``."""
    roots = {n[: -len("/data.pkl")] for n in names if n.count("/") == 1 and n.endswith("/data.pkl")}
    if len(roots) != 1:
        return None
    root = roots.pop()
    return root if any(n.startswith(f"{root}/code/") for n in names) else None


# ----------------------------------------------------------------------------------------------- pickle objects
class _ScriptObject:
    """An inert stand-in for an instance of a TorchScript class: it only records what BUILD hands it."""

    __slots__ = ("attrs", "state")
    module_name: ClassVar[str] = ""
    class_name: ClassVar[str] = ""

    def __setstate__(self, state: Any) -> None:
        # Modules pickle their attribute slots as a dict; a class with its own __getstate__ pickles anything.
        self.attrs = dict(state) if isinstance(state, dict) else {}
        self.state = None if isinstance(state, dict) else state


@dataclass(frozen=True, slots=True)
class _StorageType:
    """What a pickle's ``torch.<X>Storage`` global resolves to: a dtype, not a callable storage class."""

    name: str
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class _Storage:
    """A storage read from ``data/<key>``: raw bytes in the machine's byte order, and their dtype."""

    data: torch.UntypedStorage
    dtype: torch.dtype
    numel: int


class _TensorRef:
    """A rebuilt tensor, wrapped so that the pickle cannot reach it (BUILD on it fails: no ``__dict__``)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    metadata: Any = None,
) -> _TensorRef:
    """``torch._utils._rebuild_tensor_v2`` with every argument checked: a strided view into a loaded storage."""
    if not isinstance(storage, _Storage):
        raise VitlensError(f"tensor rebuilt from {type(storage).__name__}, not a storage record")
    if not _ints(size) or not _ints(stride) or len(size) != len(stride) or not _ints((storage_offset,)):
        raise VitlensError(f"tensor with size {size!r}, stride {stride!r}, offset {storage_offset!r}")
    if not isinstance(requires_grad, bool) or backward_hooks or metadata:
        raise VitlensError("tensor with backward hooks or conj/neg metadata: not a plain parameter or buffer")
    # The last element the view touches must lie inside the storage (Tensor.set_ would grow it instead).
    if all(s > 0 for s in size):
        last = storage_offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
        if last >= storage.numel:
            raise VitlensError(
                f"tensor of size {tuple(size)} reaches element {last} of a {storage.numel}-element storage"
            )
    tensor = torch.empty(0, dtype=storage.dtype).set_(storage.data, storage_offset, tuple(size), tuple(stride))
    return _TensorRef(tensor)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
    return _rebuild_tensor_v2(storage, storage_offset, size, stride, False, None)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> _TensorRef:
    if not isinstance(data, _TensorRef) or backward_hooks:
        raise VitlensError("parameter rebuilt from something other than a plain tensor")
    return data


def _ordered_dict(*args: Any) -> OrderedDict:
    # Only the empty backward-hooks dict of _rebuild_tensor_v2 is expected.
    if args and args != ((),) and args != ([],):
        raise VitlensError("collections.OrderedDict called with contents: not a parameter archive")
    return OrderedDict()


def _same(value: Any, *_type_tag: Any) -> Any:
    return value


def _ints(values: Any) -> bool:
    return isinstance(values, tuple | list) and all(type(v) is int and v >= 0 for v in values)


# (module, name) in a pickle GLOBAL -> what it resolves to. Everything else (bar __torch__.* classes and
# STORAGE_DTYPES) is refused. torch.jit._pickle's helpers only tag a list's static type for the JIT.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch.jit._pickle", "restore_type_tag"): _same,
    ("torch.jit._pickle", "build_intlist"): _same,
    ("torch.jit._pickle", "build_doublelist"): _same,
    ("torch.jit._pickle", "build_boollist"): _same,
    ("torch.jit._pickle", "build_tensorlist"): _same,
}


class _Unpickler(pickle.Unpickler):
    """Reads ``data.pkl``: placeholders for ``__torch__`` classes, checked tensor rebuilds, nothing else."""

    def __init__(self, data: bytes, archive: _Archive) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._classes: dict[tuple[str, str], type[_ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if _TORCHSCRIPT_CLASS.fullmatch(module) and name.isidentifier():
            if (module, name) not in self._classes:
                attrs = {"__slots__": (), "module_name": module, "class_name": name}
                self._classes[module, name] = type(name, (_ScriptObject,), attrs)
            return self._classes[module, name]
        raise VitlensError(
            f"{self._archive.name}: data.pkl names the global {module}.{name}, which a TorchScript archive of "
            "parameters does not need; refused without calling it (the file may be hostile)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[3], str)
            and type(pid[4]) is int
        ):
            raise VitlensError(f"{self._archive.name}: data.pkl has a persistent id {pid!r:.80} that is not a storage")
        _, storage_type, key, _location, numel = pid
        return self._archive.storage(key, storage_type.dtype, numel)


# ----------------------------------------------------------------------------------------------- the archive
@dataclass(frozen=True)
class _Declaration:
    """A class in ``code/``: whether it is a Module, and its declared parameter and buffer attributes."""

    is_module: bool
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]


class _Archive:
    """One open archive: storages by key (read once, byte-swapped to this machine) and class declarations."""

    def __init__(self, name: str, zf: zipfile.ZipFile, root: str) -> None:
        self.name, self._zf, self._root = name, zf, root
        self._storages: dict[str, _Storage] = {}
        self._code: dict[str, str | None] = {}
        self._declarations: dict[type, _Declaration | None] = {}
        order = self._read("byteorder", 16).decode(errors="replace").strip() if self._has("byteorder") else "little"
        if order not in ("little", "big"):
            raise VitlensError(f"{name}: byteorder record says {order!r}")
        self._swap = order != sys.byteorder

    def load_module_tree(self) -> _ScriptObject:
        data = self._read("data.pkl", MAX_PICKLE_BYTES)
        try:
            top = _Unpickler(data, self).load()
        except VitlensError:
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            TypeError,
            ValueError,
            AttributeError,
            LookupError,
            RuntimeError,
            ArithmeticError,
        ) as e:
            raise VitlensError(
                f"{self.name}: data.pkl is not a readable module pickle ({type(e).__name__}: {_first_line(e)})"
            )
        if not isinstance(top, _ScriptObject):
            raise VitlensError(f"{self.name}: data.pkl holds a {type(top).__name__}, not a TorchScript module")
        return top

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> _Storage:
        if key in self._storages:
            cached = self._storages[key]
            if cached.dtype != dtype or cached.numel != numel:
                raise VitlensError(f"{self.name}: storage {key} is claimed with two dtypes or sizes")
            return cached
        if not re.fullmatch(r"\w+", key):
            raise VitlensError(f"{self.name}: storage key {key!r:.40} is not a record name")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        nbytes = numel * itemsize
        record = f"data/{key}"
        if not self._has(record) or self._zf.getinfo(f"{self._root}/{record}").file_size != nbytes:
            raise VitlensError(f"{self.name}: record {record} is missing or not {numel} x {dtype} ({nbytes} bytes)")
        raw = self._read(record, nbytes)
        if nbytes == 0:
            data = torch.UntypedStorage(0)
        else:
            flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # [nbytes]
            if self._swap:
                # Reverse the bytes of every scalar: [numel * k, unit] rows of one scalar each (a complex number
                # is two scalars of half its size).
                unit = itemsize // 2 if dtype.is_complex else itemsize
                flat = flat.view(-1, unit).flip(1).reshape(-1)
            data = flat.untyped_storage()
        self._storages[key] = _Storage(data, dtype, numel)
        return self._storages[key]

    def declaration(self, cls: type[_ScriptObject]) -> _Declaration | None:
        """The class's declaration in ``code/<module path>.py``, matched as text; None if the file lacks it."""
        if cls not in self._declarations:
            self._declarations[cls] = self._find_declaration(cls)
        return self._declarations[cls]

    def _find_declaration(self, cls: type[_ScriptObject]) -> _Declaration | None:
        file = "code/" + cls.module_name.replace(".", "/") + ".py"
        if file not in self._code:
            self._code[file] = self._read(file, MAX_CODE_BYTES).decode("utf-8", "replace") if self._has(file) else None
        source = self._code[file]
        if source is None:
            return None
        # A class body is every indented (or blank) line after its header, e.g.
        #   class Linear(Module):
        #     __parameters__ = ["weight", "bias", ]
        #     __buffers__ = []
        header = re.search(
            rf"^class {re.escape(cls.class_name)}(?:\((\w+)\))?:\n((?:[ \t][^\n]*(?:\n|\Z)|\n)*)", source, re.M
        )
        if header is None:
            return None
        body = header.group(2)
        return _Declaration(
            header.group(1) == "Module", _declared(body, "__parameters__"), _declared(body, "__buffers__")
        )

    def _has(self, record: str) -> bool:
        try:
            self._zf.getinfo(f"{self._root}/{record}")
        except KeyError:
            return False
        return True

    def _read(self, record: str, limit: int) -> bytes:
        info = self._zf.getinfo(f"{self._root}/{record}")
        if info.file_size > limit:
            raise VitlensError(f"{self.name}: record {record} is {info.file_size} bytes, more than {limit}")
        return self._zf.read(info)


def _declared(body: str, field: str) -> tuple[str, ...]:
    match = re.search(rf"^[ \t]+{field} = \[(.*)\]\s*$", body, re.M)
    return tuple(re.findall(r'"([^"]*)"', match.group(1))) if match else ()


# ----------------------------------------------------------------------------------------------- the module tree
def _collect(
    obj: _ScriptObject, prefix: str, out: dict[str, torch.Tensor], archive: _Archive, *, depth: int, ancestors: set[int]
) -> None:
    """Add ``obj``'s parameters, then its buffers, then each submodule's, as ``nn.Module.state_dict`` orders them.

    A class whose declaration is missing from ``code/`` keeps all its tensor attributes.
    """
    if depth > MAX_MODULE_DEPTH or id(obj) in ancestors:
        raise VitlensError(
            f"{archive.name}: the module tree is deeper than {MAX_MODULE_DEPTH} or has a cycle at {prefix!r}"
        )
    attrs = getattr(obj, "attrs", {})
    decl = archive.declaration(type(obj))
    if decl is None:
        state = [k for k, v in attrs.items() if isinstance(v, _TensorRef)]
    else:
        state = [*decl.parameters, *decl.buffers]
    for name in state:
        value = attrs.get(name)
        if value is None:  # an optional parameter left unset, e.g. Linear(bias=False).bias
            continue
        if not isinstance(value, _TensorRef):
            raise VitlensError(f"{archive.name}: {prefix}{name} is declared a tensor but holds {type(value).__name__}")
        out[prefix + name] = value.tensor
    for name, value in attrs.items():
        if isinstance(value, _ScriptObject):
            child = archive.declaration(type(value))
            if child is None or child.is_module:
                _collect(value, f"{prefix}{name}.", out, archive, depth=depth + 1, ancestors=ancestors | {id(obj)})
