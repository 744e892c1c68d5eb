"""Tiny timm ViTs covering every token layout vitlens must handle; built in-process, no downloads."""

from __future__ import annotations

import logging
import signal

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

# A shell without job control starts background jobs (`pytest &`) with Ctrl-C ignored, and Python then keeps it
# ignored, in itself and in every child it starts: the Ctrl-C tests would see nothing. Restore Python's own.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# name -> (class, kwargs). Widths of 48 with 3 heads (head dim 16) keep every test fast.
_BASE = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
VIT_FIXTURES: dict[str, tuple[type, dict]] = {
    "cls": (VisionTransformer, dict(_BASE)),
    "reg": (VisionTransformer, dict(_BASE, reg_tokens=4)),
    "reg_no_embed_class": (VisionTransformer, dict(_BASE, reg_tokens=4, no_embed_class=True)),
    "distilled": (VisionTransformerDistilled, dict(_BASE)),
    "gap": (VisionTransformer, dict(_BASE, class_token=False, global_pool="avg")),
    "nonsquare": (VisionTransformer, dict(_BASE, img_size=(32, 48))),
    "layerscale": (VisionTransformer, dict(_BASE, img_size=28, patch_size=14, init_values=1e-5, qk_norm=True)),
}


def make_vit(name: str, seed: int = 0) -> torch.nn.Module:
    """A fixture model with non-trivial weights (random pos/prefix embeddings, layer scale away from 1e-5)."""
    cls, kwargs = VIT_FIXTURES[name]
    torch.manual_seed(seed)
    model = cls(**kwargs).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("gamma"):  # layer scale: make the residual branches matter
                p.uniform_(0.5, 1.0)
            if pname in ("pos_embed", "cls_token", "reg_token", "dist_token"):
                p.normal_(0, 0.5)
    return model


@pytest.fixture(params=list(VIT_FIXTURES))
def fixture_name(request) -> str:
    return request.param


@pytest.fixture
def tiny_vit(fixture_name):
    """(name, timm model) for every fixture layout."""
    return fixture_name, make_vit(fixture_name)


def input_for(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = model.patch_embed.img_size
    c = model.patch_embed.proj.weight.shape[1]
    return torch.randn(batch, c, h, w, generator=g)


def native_kwargs(name: str) -> dict:
    """Loader options a fixture needs (non-square grids cannot be read from a state dict alone)."""
    out: dict = {"num_heads": 3, "device": "cpu"}
    if name == "nonsquare":
        out["img_size"] = "32,48"
    return out


def cli_args(name: str) -> list[str]:
    """The same loader options as :func:`native_kwargs`, on the command line."""
    kw = native_kwargs(name)
    args = ["--num-heads", str(kw["num_heads"]), "--device", kw["device"]]
    return [*args, "--img-size", kw["img_size"]] if "img_size" in kw else args


def save_fixture(tmp_path, name: str, model: torch.nn.Module | None = None):
    """Save a fixture's (or ``model``'s) state dict as ``<name>.pth`` in ``tmp_path``; return the path."""
    path = tmp_path / f"{name}.pth"
    torch.save((model if model is not None else make_vit(name)).state_dict(), path)
    return path


def fixture_checkpoint(tmp_path, name: str) -> tuple[str, list[str]]:
    """A saved fixture and the CLI options that load it."""
    return str(save_fixture(tmp_path, name)), cli_args(name)


def assert_one_line_error(result, code: int, needle: str) -> None:
    """Exit ``code`` and one red ``error:`` line, last on stderr (logged warnings before it are allowed)."""
    assert result.exit_code == code, (result.exit_code, result.output)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    assert result.stderr.rstrip().endswith(errors[0].rstrip()), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


@pytest.fixture(scope="session")
def demo():
    """The embedded demo model on the CPU, loaded once for the session (analyses never change it)."""
    from vitlens.models import load_vit

    return load_vit("demo", device="cpu")


@pytest.fixture
def vitlens_warnings():
    """The messages the ``vitlens`` logger warns while the test runs, by a handler on that logger itself (a CLI
    invocation earlier in the session turns its propagation to the root logger, and so ``caplog``, off)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    from vitlens.log import logger

    handler, level = Collect(logging.WARNING), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
