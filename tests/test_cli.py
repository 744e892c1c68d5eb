"""The CLI shell: instant help, one JSON object with --json, one red line and the right exit code on errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, make_vit
from vitlens import __version__
from vitlens.cli.app import app

runner = CliRunner()


def test_version():
    # That --help imports nothing heavy is checked in test_imports.py.
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"vitlens {__version__}"


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(make_vit("reg").state_dict(), path)
    return path


def test_info_json_is_one_object(ckpt):
    result = runner.invoke(app, ["info", str(ckpt), "--num-heads", "3", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # exactly one JSON object, nothing else on stdout
    required = ["source", "arch", "num_params", "img_size", "patch_size", "grid_size", "num_prefix_tokens"]
    required += ["has_class_token", "num_reg_tokens", "embed_dim", "depth", "num_heads", "in_chans", "num_classes"]
    for key in [*required, "mean", "std", "device"]:
        assert key in data, key
    assert data["grid_size"] == [4, 4] and data["num_reg_tokens"] == 4 and data["num_prefix_tokens"] == 5
    assert data["num_heads"] == 3 and data["depth"] == 2 and data["embed_dim"] == 48
    assert data["meta"]["vitlens_version"] == __version__


def test_info_table_says_what_was_guessed(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    wide = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=0)
    torch.save(wide.state_dict(), tmp_path / "w.pth")
    result = runner.invoke(app, ["info", str(tmp_path / "w.pth"), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "grid_size" in result.stdout and "guessed num_heads" in result.stdout
    facts = json.loads((tmp_path / "o" / "info.json").read_text())
    assert facts["embed_dim"] == 192 and facts["num_heads"] == 3 and "num_heads" in facts["guessed"]


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["info", "/no/such/file.pth"], 1, "checkpoint not found"),
        (["info", "{ckpt}", "--img-size", "abc"], 2, "--img-size"),
        (["info", "{ckpt}", "--img-size", "30", "--num-heads", "3"], 2, "not divisible"),
        (["info", "{ckpt}", "--device", "tpu"], 2, "unknown device"),
        (["info", "{ckpt}", "--model-kwargs", "{bad"], 2, "--model-kwargs is not valid JSON"),
        (["info", "{ckpt}", "--num-heads", "5"], 2, "does not divide"),
        (["info", "not_a_model_name"], 1, "not a file and not a timm model name"),
    ],
)
def test_user_errors_are_one_line(ckpt, args, code, needle):
    args = [a.replace("{ckpt}", str(ckpt)) for a in args]
    assert_one_line_error(runner.invoke(app, args), code, needle)


def test_cuda_without_gpu_is_one_line(ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_one_line_error(runner.invoke(app, ["info", str(ckpt), "--device", "cuda"]), 1, "CUDA is not available")


def test_debug_keeps_traceback(ckpt, monkeypatch):
    monkeypatch.setenv("VITLENS_DEBUG", "1")
    result = runner.invoke(app, ["info", "/no/such/file.pth"])
    assert result.exit_code != 0 and result.exception is not None


def test_debug_flag_does_not_leak_into_later_invocations():
    shown = runner.invoke(app, ["--debug", "info", "/no/such/file.pth"])
    assert shown.exit_code != 0 and shown.exception is not None and not isinstance(shown.exception, SystemExit)
    plain = runner.invoke(app, ["info", "/no/such/file.pth"])
    assert_one_line_error(plain, 1, "checkpoint not found")
