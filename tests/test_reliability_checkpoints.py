"""Issue 9 through the CLI: broken, hostile and mismatching checkpoints, non-finite weights, finite results.

Every case goes through ``vitlens`` itself and must end in one red line and the documented exit code
(docs/reliability.md), never a traceback; test_models.py loads the well-formed files.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, cli_args, fixture_checkpoint, make_vit, save_fixture
from vitlens.cli.app import app

runner = CliRunner()


class _Payload:
    """Unpickling this creates ``marker``: proof that the pickle ran code."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.mkdir, (pathlib.Path(self.marker),))


def _info(path, *extra):
    return runner.invoke(app, ["info", str(path), "--device", "cpu", *extra])


def _truncated_safetensors(path):
    from safetensors.torch import save_file

    save_file(make_vit("cls").state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("name", "make", "needle"),
    [
        ("missing.pth", lambda p: None, "checkpoint not found"),
        ("ckpt.pth", lambda p: p.mkdir(), "folder without model weights"),
        ("empty.pth", lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        ("half.safetensors", _truncated_safetensors, "not a readable safetensors file"),
        (
            "noise.pth",
            lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
            "not a readable PyTorch checkpoint",
        ),
        ("arrays.npz", lambda p: np.savez(p, a=np.zeros(3), b=np.ones((2, 2))), "not a Google ViT"),
    ],
)
def test_broken_checkpoint_files_are_one_line_errors(tmp_path, name, make, needle):
    path = tmp_path / name
    make(path)
    assert_one_line_error(_info(path), 1, needle)


def _evil_checkpoint(path, container: str, marker) -> None:
    if container == "zip":  # torch.save's format, with a real state dict beside the payload
        torch.save({"state_dict": make_vit("cls").state_dict(), "evil": _Payload(marker)}, path)
    else:  # a bare pickle, as old .pt files are
        path.write_bytes(pickle.dumps({"evil": _Payload(marker)}))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    _evil_checkpoint(path, container, marker)
    # The payload is live: an unsafe load of a file made the same way does create its marker.
    probe, probe_marker = tmp_path / "probe.pth", tmp_path / "probe-ran"
    _evil_checkpoint(probe, container, probe_marker)
    if container == "zip":
        torch.load(probe, weights_only=False)
    else:
        pickle.loads(probe.read_bytes())
    assert probe_marker.exists()

    for command in (["info"], ["pos-sim", "--out", str(tmp_path / "o")]):
        result = runner.invoke(app, [command[0], str(path), "--device", "cpu", *command[1:]])
        assert_one_line_error(result, 1, "refused to load evil.pth: its pickle asks to run code")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_a_resnet_checkpoint_is_not_a_vit(tmp_path):
    import timm

    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), path)
    result = _info(path)
    assert_one_line_error(result, 1, "this checkpoint is a CNN (ResNet / ConvNeXt-style keys: conv1.0.weight")
    assert result.stderr.rstrip().endswith("), not a Vision Transformer")
    message = "'resnet10t' builds a ResNet, not a Vision Transformer"
    assert_one_line_error(_info(path, "--arch", "resnet10t"), 1, message)
    assert_one_line_error(_info("resnet10t", "--no-pretrained"), 1, message)  # a timm name rather than a file


def test_arch_of_another_size_names_the_mismatching_keys_and_shapes(tmp_path):
    path = save_fixture(tmp_path, "cls")  # embed_dim 48, patch 8
    result = _info(path, "--arch", "vit_small_patch8_224", "--img-size", "32")
    assert_one_line_error(result, 1, "does not fit this architecture")
    line = result.stderr.strip().splitlines()[-1]
    assert "patch_embed.proj.weight: checkpoint [48, 3, 8, 8] vs model [384, 3, 8, 8]" in line
    assert "pos_embed" in line and "more)" in line


def test_non_finite_weights_warn_and_the_affected_analyses_say_so(tmp_path):
    model = make_vit("cls")
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    path = save_fixture(tmp_path, "nan", model)
    args = cli_args("cls")

    info = _info(path, *args[2:], "--num-heads", "3")
    assert info.exit_code == 0, info.output
    warning = " ".join(info.stderr.split())
    assert "NaN/inf weights in 1 tensors (blocks.0.attn.qkv.weight)" in warning
    assert "every forward-pass analysis will be NaN" in warning
    assert "filters too" not in warning and "pos-sim too" not in warning

    # Analyses that do not run the blocks are unaffected and still succeed.
    for command, produced in (("pos-sim", "pos_sim.json"), ("filters", "filters.json")):
        out = tmp_path / command
        result = runner.invoke(app, [command, str(path), *args, "--out", str(out), "-q"])
        assert result.exit_code == 0 and (out / produced).exists(), result.output

    # Forward-pass analyses stop in one line, before writing anything.
    out = tmp_path / "ad"
    result = runner.invoke(app, ["attention-distance", str(path), *args, "--num-images", "4", "--out", str(out)])
    assert_one_line_error(result, 1, "the attention of layer 0 has NaN/inf values")
    assert not out.exists()
    result = runner.invoke(
        app, ["rollout", str(path), *args, "--data", "digits", "--num-images", "2", "--out", str(out)]
    )
    assert_one_line_error(result, 1, "NaN/inf values")
    assert not out.exists()

    # Broken patch or position embeddings: the warning also names the analyses that read those.
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = 0.0
        model.pos_embed[0, 3, 0] = float("inf")
        model.patch_embed.proj.weight[0, 0, 0, 0] = float("nan")
    info = _info(save_fixture(tmp_path, "nan-embeddings", model), "--num-heads", "3")
    assert info.exit_code == 0, info.output
    warning = " ".join(info.stderr.split())
    assert "NaN/inf weights in 2 tensors (pos_embed, patch_embed.proj.weight)" in warning
    assert "; filters too (patch embedding); pos-sim too (position embedding)" in warning


def _finite_numbers(obj) -> bool:
    if isinstance(obj, dict):
        return all(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite_numbers(v) for v in obj)
    return not isinstance(obj, float) or np.isfinite(obj)


@pytest.mark.parametrize(
    ("command", "extra", "npz"),
    [
        ("attention-distance", ["--num-images", "6"], "attention_distance.npz"),
        ("rollout", ["--data", "digits", "--num-images", "3", "--discard-ratio", "0.9"], "rollout.npz"),
        ("pos-sim", [], "pos_sim.npz"),
    ],
)
def test_results_are_finite(tmp_path, command, extra, npz):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    out = tmp_path / "out"
    result = runner.invoke(app, [command, ckpt, *args, *extra, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert _finite_numbers(json.loads(result.stdout))
    with np.load(out / npz) as arrays:
        for name in arrays.files:
            if arrays[name].dtype.kind == "f":
                assert np.isfinite(arrays[name]).all(), name


def test_a_one_patch_grid_is_one_line_for_pos_sim_and_finite_for_attention_distance(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    one = VisionTransformer(img_size=8, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=0)
    path = save_fixture(tmp_path, "one", one)
    args = ["--num-heads", "3", "--device", "cpu"]
    result = runner.invoke(app, ["pos-sim", str(path), *args, "--out", str(tmp_path / "p")])
    assert_one_line_error(result, 1, "a 1x1 patch grid has one position")
    assert not (tmp_path / "p").exists()

    # One patch: every distance is 0, not 0/0.
    result = runner.invoke(
        app, ["attention-distance", str(path), *args, "--num-images", "3", "--json", "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert _finite_numbers(data) and np.all(np.asarray(data["distance_px"]) == 0) and data["uniform_px"] == 0
