"""TorchScript archives read as data: the same state dict as the module, and nothing in the pickle is ever run."""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import sys
import types
import warnings
import zipfile
from collections import OrderedDict

import pytest
import torch
from torch import nn

from vitlens.errors import VitlensError
from vitlens.models.torchscript import is_torchscript_archive, read_torchscript_state_dict

# torch.jit.trace/script/load are deprecated, and tracing MultiheadAttention warns about its shape checks.
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8, bias=False))
        self.register_buffer("steps", torch.tensor(3, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(x) * self.steps


class _Tree(nn.Module):
    """Nested submodules, a MultiheadAttention, parameters, buffers, a float16 parameter and a bfloat16 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(8))
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Parameter(torch.randn(8, 3).half())
        self.register_buffer("table", torch.randn(2, 8).to(torch.bfloat16))
        self.register_buffer("transposed", torch.randn(8, 5).t())  # a non-contiguous buffer: strides survive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) * self.scale
        for block in self.blocks:
            x = block(x)
        return (x + self.table.float().sum() + self.transposed.sum()) @ self.head.float()


def _equal_state(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(reference)  # same names in the same order
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("compile_with", ["script", "trace"])
def test_module_tree_reads_back_as_its_state_dict(tmp_path, compile_with):
    torch.manual_seed(0)
    model = _Tree().eval()
    x = torch.randn(5, 1, 4)
    compiled = torch.jit.script(model) if compile_with == "script" else torch.jit.trace(model, (x,))
    path = tmp_path / "tree.pt"
    torch.jit.save(compiled, str(path))
    assert is_torchscript_archive(path)
    _equal_state(read_torchscript_state_dict(path), model.state_dict())
    assert "blocks.1.attn.in_proj_weight" in model.state_dict()
    assert "blocks.0.mlp.2.bias" not in model.state_dict()  # Linear(bias=False): its None slot is skipped


def test_non_persistent_buffers_are_read_as_torchscript_keeps_them(tmp_path):
    # TorchScript drops the persistent flag: the buffer is in the archive and in torch.jit.load's state_dict.
    model = _Tree().eval()
    model.register_buffer("scratch", torch.ones(2), persistent=False)
    path = tmp_path / "tree.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    ours = read_torchscript_state_dict(path)
    assert "scratch" not in model.state_dict() and torch.equal(ours["scratch"], torch.ones(2))
    _equal_state(ours, torch.jit.load(str(path)).state_dict())


def test_openai_clip_layout_from_open_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32, mlp_ratio=2.0),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=2, mlp_ratio=2.0),
    ).eval()
    open_clip.model.convert_weights_to_lp(model, dtype=torch.float16)  # OpenAI's releases are float16 like this
    image, text = torch.randn(1, 3, 32, 32).half(), torch.randint(0, 64, (1, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    path = tmp_path / "ViT-T-8.pt"
    torch.jit.save(traced, str(path))

    ours = read_torchscript_state_dict(path)
    reference = model.state_dict()
    # open_clip's causal mask is a non-persistent buffer: TorchScript keeps it (see the test above).
    assert set(ours) == set(reference) | {"attn_mask"}
    for name in ("visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight", "positional_embedding"):
        assert name in ours
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    assert ours["visual.conv1.weight"].dtype == torch.float16


def test_no_torch_loader_is_used(tmp_path, monkeypatch):
    path = tmp_path / "tree.pt"
    torch.jit.save(torch.jit.script(_Tree().eval()), str(path))

    def forbidden(*args, **kwargs):
        raise AssertionError("torch's loaders must not be called")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert read_torchscript_state_dict(path)


def test_is_torchscript_archive_rejects_other_files(tmp_path):
    saved = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, saved)  # a zip with data.pkl, but no code/
    text = tmp_path / "notes.txt"
    text.write_text("not a zip")
    assert not is_torchscript_archive(saved)
    assert not is_torchscript_archive(text)
    assert not is_torchscript_archive(tmp_path / "missing.pt")
    with pytest.raises(VitlensError, match="not a TorchScript archive"):
        read_torchscript_state_dict(saved)


# ------------------------------------------------------------------------------------ hand-made archives
# Pickles written with Python's pickler the way TorchScript writes them: `__torch__.<Class>` objects by NEWOBJ +
# BUILD, tensors by torch._utils._rebuild_tensor_v2 on persistent ids ('storage', torch.<X>Storage, key, ...).
_CODE = """class Net(Module):
  __parameters__ = ["weight", ]
  __buffers__ = ["stats", "count", "phase", ]
  training : bool
"""
_STORAGE_CLASS = {
    torch.float32: torch.FloatStorage,
    torch.float16: torch.HalfStorage,
    torch.int64: torch.LongStorage,
    torch.complex64: torch.ComplexFloatStorage,
}


class _Stored:
    """A tensor to pickle: its bytes go to data/<key>, the pickle gets the rebuild call (size/stride overridable)."""

    def __init__(self, key: str, tensor: torch.Tensor, size=None, stride=None) -> None:
        self.key, self.tensor = key, tensor.contiguous()
        self.size = tuple(size or self.tensor.shape)
        self.stride = tuple(stride or self.tensor.stride())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_StorageRef(self), 0, self.size, self.stride, False, OrderedDict())


class _StorageRef:
    def __init__(self, stored: _Stored) -> None:
        self.stored = stored


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            t = obj.stored.tensor
            return ("storage", _STORAGE_CLASS[t.dtype], obj.stored.key, "cpu", t.numel())
        return None


class _Evil:
    """Pickles as a call of os.system (as `posix.system` on Linux)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _net_pickle(state: dict, monkeypatch) -> bytes:
    """A pickle of `__torch__.Net` holding ``state``, as TorchScript writes a module."""
    fake = types.ModuleType("__torch__")

    class Net:
        def __reduce_ex__(self, protocol):
            return copyreg.__newobj__, (Net,), {"training": False, **state}

    Net.__module__, Net.__qualname__ = "__torch__", "Net"
    fake.Net = Net
    monkeypatch.setitem(sys.modules, "__torch__", fake)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(Net())
    return buf.getvalue()


def _write_archive(path, pickled: bytes, state: dict, *, byteorder: str = sys.byteorder, swap: bool = False):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("net/data.pkl", pickled)
        zf.writestr("net/code/__torch__.py", _CODE)
        zf.writestr("net/byteorder", byteorder)
        for value in state.values():
            if isinstance(value, _Stored):
                zf.writestr(f"net/data/{value.key}", _bytes(value.tensor, swap=swap))
    return path


def _bytes(tensor: torch.Tensor, *, swap: bool) -> bytes:
    array = tensor.reshape(-1).view(torch.uint8).numpy()
    if swap:  # reverse each scalar's bytes (a complex number is two scalars)
        unit = tensor.element_size() // (2 if tensor.dtype.is_complex else 1)
        array = array.reshape(-1, unit)[:, ::-1]
    return array.tobytes()


def test_declared_parameters_and_buffers_only(tmp_path, monkeypatch):
    weight, stats = torch.randn(3, 4), torch.randn(5).half()
    state = {"weight": _Stored("0", weight), "stats": _Stored("1", stats), "cache": _Stored("2", torch.ones(2))}
    state["note"] = "not a tensor"
    path = _write_archive(tmp_path / "net.pt", _net_pickle(state, monkeypatch), state)
    ours = read_torchscript_state_dict(path)
    assert list(ours) == ["weight", "stats"]  # `cache` is a plain tensor attribute, not declared: not state
    assert torch.equal(ours["weight"], weight) and torch.equal(ours["stats"], stats)


def test_other_byte_order_is_swapped(tmp_path, monkeypatch):
    other = "big" if sys.byteorder == "little" else "little"
    tensors = {
        "weight": torch.randn(3, 4),
        "stats": torch.tensor([1.5, -2.25], dtype=torch.float16),
        "count": torch.tensor([1, 2**40], dtype=torch.int64),
        "phase": torch.randn(3, dtype=torch.complex64),
    }
    state = {name: _Stored(str(i), t) for i, (name, t) in enumerate(tensors.items())}
    path = _write_archive(tmp_path / "net.pt", _net_pickle(state, monkeypatch), state, byteorder=other, swap=True)
    _equal_state(read_torchscript_state_dict(path), tensors)


def test_tensor_beyond_its_storage_is_refused(tmp_path, monkeypatch):
    state = {"weight": _Stored("0", torch.randn(4), size=(100,), stride=(1,))}
    path = _write_archive(tmp_path / "net.pt", _net_pickle(state, monkeypatch), state)
    with pytest.raises(VitlensError, match="reaches element 99 of a 4-element storage"):
        read_torchscript_state_dict(path)


def test_record_of_the_wrong_size_is_refused(tmp_path, monkeypatch):
    state = {"weight": _Stored("0", torch.randn(4))}
    pickled = _net_pickle(state, monkeypatch)
    path = _write_archive(tmp_path / "net.pt", pickled, {})
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("net/data/0", b"\0" * 8)  # 2 floats where the pickle claims 4
    with pytest.raises(VitlensError, match="record data/0 is missing or not 4"):
        read_torchscript_state_dict(path)


def _os_system(marker) -> bytes:
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


@pytest.mark.parametrize("where", ["top", "nested"])
def test_hostile_archive_is_refused_and_never_run(tmp_path, monkeypatch, where):
    marker = tmp_path / "pwned"
    if where == "top":  # data.pkl is nothing but `os.system("touch marker")`
        pickled, match = _os_system(marker), "names the global os.system"
    else:  # the call hides in a module attribute, after legitimate globals
        pickled = _net_pickle({"weight": _Evil(f"touch {marker}")}, monkeypatch)
        match = f"names the global {os.system.__module__}.system"
    path = _write_archive(tmp_path / "evil.pt", pickled, {})
    assert is_torchscript_archive(path)
    with pytest.raises(VitlensError, match=match) as err:
        read_torchscript_state_dict(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_storage_classes_are_not_callable(tmp_path):
    # `torch.FloatStorage(2**30)` would allocate 4 GiB: the global resolves to an inert dtype token instead.
    pickled = b"\x80\x02ctorch\nFloatStorage\nJ\x00\x00\x00\x40\x85R."
    path = _write_archive(tmp_path / "bomb.pt", pickled, {})
    with pytest.raises(VitlensError, match="not a readable module pickle"):
        read_torchscript_state_dict(path)
