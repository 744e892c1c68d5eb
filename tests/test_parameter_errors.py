"""Library errors speak parameters: a bad argument raises a ParameterError that names the library parameter (and
starts with it, no CLI flag in it); the CLI turns that name into its flag in one place (``vitlens.cli.console``)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, make_vit, save_fixture
from vitlens.cli.app import app
from vitlens.cli.console import cli_message, flag_for
from vitlens.errors import ParameterError
from vitlens.layout import Preprocess
from vitlens.models.vit import ViT

runner = CliRunner()


@functools.cache
def _vit() -> ViT:
    model = make_vit("cls")  # 2 layers, width 48, patch 8
    return ViT(model, Preprocess(img_size=tuple(model.patch_embed.img_size)))


@functools.cache
def _digits():
    from vitlens.data import open_dataset

    return open_dataset("digits", _vit().preprocess, num_images=2)


def _pixels() -> Preprocess:
    return Preprocess(img_size=(4, 4), in_chans=3, mean=(0.0,) * 3, std=(1.0,) * 3)


_X = torch.arange(24, dtype=torch.float32).reshape(6, 4)  # 6 examples, 4 features
_Y = np.array([0, 0, 0, 1, 1, 1])


def _fewshot(**kwargs):
    from vitlens.analysis.fewshot import fewshot_lsr

    args = {"train_feats": _X, "train_labels": _Y, "test_feats": _X, "test_labels": _Y, "shots": (1,), "seeds": 1}
    return fewshot_lsr(**{**args, **kwargs})


def _capture_layer_5(_tmp: Path) -> None:
    from vitlens.capture import attention_capture

    with attention_capture(_vit(), lambda i, a: None, layers=[5]):
        pass


def _load(*args, **kwargs):
    from vitlens.models.load import load_vit

    return load_vit(*args, device="cpu", **kwargs)


def _overrides(**kwargs):
    from vitlens.models.load import preprocess_overrides

    return preprocess_overrides(**kwargs)


def _mod(name: str, attr: str) -> Callable:
    import importlib

    return getattr(importlib.import_module(name), attr)


OUT_OF_RANGE = "layers: layer 5 is out of range: the model has 2 layers (0..1)"

# (param, the message's start, what raises it given tmp_path)
LIBRARY: list[tuple[str, str, Callable[[Path], object]]] = [
    # vitlens.models.load
    (
        "img_size",
        "img_size 'abc' is not an integer or H,W",
        lambda t: _mod("vitlens.models.load", "parse_img_size")("abc"),
    ),
    ("img_size", "img_size '0' must be one positive integer or H,W", lambda t: _load("demo", img_size="0")),
    ("img_size", "img_size 30,30 is not divisible by the patch size 4x4", lambda t: _load("demo", img_size=30)),
    (
        "checkpoint_key",
        "checkpoint_key applies to checkpoint files, not to timm names",
        lambda t: _load("vit_tiny_patch16_224", pretrained=False, checkpoint_key="ema"),
    ),
    ("mean", "mean 'a,b' is not a comma-separated list of numbers", lambda t: _overrides(mean="a,b")),
    ("std", "std must be one number or one per channel, not (1, 1, 1, 1)", lambda t: _overrides(std=(1, 1, 1, 1))),
    ("std", "std must be positive, not '0.5,0'", lambda t: _overrides(std="0.5,0")),
    ("crop_pct", "crop_pct must be in (0, 2], not 3", lambda t: _overrides(crop_pct=3)),
    ("interpolation", "interpolation must be one of nearest, bilinear", lambda t: _overrides(interpolation="cubic")),
    ("mean", "mean has 2 values; this model takes 1 channels", lambda t: _load("demo", mean="0.5,0.5")),
    # vitlens.models.infer / clip / convert
    (
        "img_size",
        "img_size 30,30 is not divisible by the patch size 8x8",
        lambda t: _load(save_fixture(t, "cls"), num_heads=3, img_size=30),
    ),
    (
        "num_heads",
        "num_heads 5 does not divide the embedding width 48",
        lambda t: _mod("vitlens.models.infer", "heads_for_width")(48, 5),
    ),
    (
        "num_heads",
        "num_heads 3 contradicts vision_cfg.head_width (64 // 32 = 2)",
        lambda t: _mod("vitlens.models.clip", "_heads")(64, {"head_width": 32}, True, False, 3),
    ),
    (
        "model_kwargs",
        "model_kwargs: mlp_layer 'nope' is not one of mlp, swiglu_packed, swiglu",
        lambda t: _load(save_fixture(t, "cls"), num_heads=3, model_kwargs={"mlp_layer": "nope"}),
    ),
    # vitlens.data
    (
        "batch_size",
        "batch_size must be at least 1, not 0",
        lambda t: _mod("vitlens.data", "iterate_batches")(_digits(), batch_size=0),
    ),
    (
        "num_workers",
        "num_workers must be 0 or more, not -1",
        lambda t: _mod("vitlens.data", "iterate_batches")(_digits(), batch_size=1, num_workers=-1),
    ),
    ("spec", "spec is an empty list", lambda t: _mod("vitlens.data", "open_dataset")([], _pixels())),
    (
        "spec",
        "spec 'no-such-thing' is neither a known dataset (digits, ",
        lambda t: _mod("vitlens.data", "open_dataset")("no-such-thing", _pixels()),
    ),
    # vitlens.attention / features / capture
    (
        "start_layer",
        "start_layer 2 is out of range: the model has 2 layers (0..1)",
        lambda t: _mod("vitlens.attention", "rollout_for")(_vit(), _digits(), start_layer=2),
    ),
    (
        "layer",
        "layer 2 is out of range: the model has 2 layers (0..1)",
        lambda t: _mod("vitlens.attention", "head_attention_for")(_vit(), _digits(), layer=2),
    ),
    (
        "layer",
        "layer -3 is out of range: the model has 2 layers (0..1)",
        lambda t: _mod("vitlens.attention", "head_attention_for")(_vit(), _digits(), layer=-3),
    ),
    (
        "feature",
        "feature must be one of pre-logits, cls, mean-patch, not 'mean'",
        lambda t: _mod("vitlens.features", "resolve_feature_layers")(_vit(), None, "mean"),
    ),
    (
        "layers",
        "layers [0] need feature cls or mean-patch: pre-logits exist after the last block only",
        lambda t: _mod("vitlens.features", "resolve_feature_layers")(_vit(), [0], "pre-logits"),
    ),
    ("layers", OUT_OF_RANGE, lambda t: _mod("vitlens.features", "resolve_feature_layers")(_vit(), [5], "cls")),
    ("layers", OUT_OF_RANGE, lambda t: _mod("vitlens.capture", "resolve_layers")([5], 2)),
    ("layers", OUT_OF_RANGE, _capture_layer_5),
    # vitlens.analysis
    (
        "method",
        "method must be auto, primal or dual, not 'qr'",
        lambda t: _mod("vitlens.analysis.fewshot", "RidgeEigen").fit(_X[None].double(), _X[None].double(), method="qr"),
    ),
    ("shots", "shots must be positive, got [0, 1]", lambda t: _fewshot(shots=(0, 1))),
    ("seeds", "seeds must be at least 1, got 0", lambda t: _fewshot(seeds=0)),
    ("l2", "l2 must be a positive number or 'auto', not 'big'", lambda t: _fewshot(l2="big")),
    ("l2", "l2 must be positive, got [-1.0]", lambda t: _fewshot(l2=-1.0)),
    (
        "test_feats",
        "test_feats has layers [1], train_feats [0]",
        lambda t: _fewshot(train_feats={0: _X}, test_feats={1: _X}),
    ),
    ("train_feats", "train_feats must be [6, 4] (one row per label", lambda t: _fewshot(train_feats=_X[:5])),
    (
        "test_feats",
        "test_feats must be [6, 4] (one row per label, the width of train_feats), not [6, 3]",
        lambda t: _fewshot(test_feats=_X[:, :3]),
    ),
    (
        "depth",
        "depth must be positive, not 0",
        lambda t: _mod("vitlens.analysis", "AttentionDistanceAccumulator")(_vit().layout, depth=0, num_heads=3),
    ),
    (
        "num_heads",
        "num_heads must be positive, not 0",
        lambda t: _mod("vitlens.analysis", "AttentionDistanceAccumulator")(_vit().layout, depth=2, num_heads=0),
    ),
    (
        "num_components",
        "num_components must be between 1 and 4 (min of 4 filters and 3*2*2 values), got 13",
        lambda t: _mod("vitlens.analysis.filters", "filter_pca")(torch.randn(4, 3, 2, 2), num_components=13),
    ),
    # vitlens.report
    (
        "sections",
        "sections: unknown section nope; choose from info, filters",
        lambda t: _mod("vitlens.report", "parse_sections")("info,nope"),
    ),
    (
        "sections",
        "sections: unknown section nope; choose from info, filters",
        lambda t: _mod("vitlens.report", "build_report")(_vit(), sections=["nope"], out=t / "r"),
    ),
    (
        "images",
        "images: no such file or folder: ",
        lambda t: _mod("vitlens.report", "build_report")(_vit(), images=[str(t / "no-such.png")], out=t / "r"),
    ),
    # a spec given under another argument's name: the error names that argument (errors.spec_named)
    (
        "images",
        "images 'no-such-thing' is neither a known dataset (digits, ",
        lambda t: _mod("vitlens", "tokens")(_vit(), _digits(), images="no-such-thing"),
    ),
    (
        "test_data",
        "test_data 'no-such-thing' is neither a known dataset (digits, ",
        lambda t: _mod("vitlens", "fewshot")(_vit(), "digits", test_data="no-such-thing"),
    ),
]


@pytest.mark.parametrize(("param", "start", "call"), LIBRARY, ids=[f"{p}:{s[:40]}" for p, s, _ in LIBRARY])
def test_library_error_names_the_parameter(tmp_path, param, start, call):
    with pytest.raises(ParameterError) as info:
        call(tmp_path)
    message = str(info.value)
    assert info.value.param == param and isinstance(info.value, ValueError)
    assert message.startswith(start), message
    assert "--" not in message and "\n" not in message
    # The CLI's words: the parameter at the start becomes the flag.
    assert cli_message(info.value) == flag_for(param) + message.removeprefix(param)


@pytest.mark.parametrize(
    ("param", "flag"),
    [
        ("img_size", "--img-size"),
        ("checkpoint_key", "--checkpoint-key"),
        ("crop_pct", "--crop-pct"),
        ("model_kwargs", "--model-kwargs"),
        ("spec", "--data"),
        ("layers", "--layer"),
        ("num_components", "--components"),
        ("sections", "--sections"),
    ],
)
def test_flag_for_each_parameter_is_the_commands_flag(param, flag):
    assert flag_for(param) == flag


# (command line, the one error line's text); {ckpt} is a saved 2-layer fixture of width 48, patch 8 (demo: patch 4,
# one channel); {tmp} the test's folder.
CLI = [
    (["info", "demo", "--img-size", "abc"], "--img-size 'abc' is not an integer or H,W"),
    (["info", "demo", "--img-size", "0"], "--img-size '0' must be one positive integer or H,W"),
    (["info", "demo", "--img-size", "30"], "--img-size 30,30 is not divisible by the patch size 4x4"),
    (
        ["info", "{ckpt}", "--num-heads", "3", "--img-size", "30"],
        "--img-size 30,30 is not divisible by the patch size 8x8",
    ),
    (
        ["info", "vit_tiny_patch16_224", "--no-pretrained", "--checkpoint-key", "ema"],
        "--checkpoint-key applies to checkpoint files, not to timm names",
    ),
    (["info", "demo", "--mean", "a,b"], "--mean 'a,b' is not a comma-separated list of numbers"),
    (["info", "demo", "--std", "1,1,1,1"], "--std must be one number or one per channel, not '1,1,1,1'"),
    (["info", "demo", "--std", "0"], "--std must be positive, not '0'"),
    (["info", "demo", "--crop-pct", "3"], "--crop-pct must be in (0, 2], not 3.0"),
    (["info", "demo", "--interpolation", "cubic"], "--interpolation must be one of nearest, bilinear"),
    (["info", "demo", "--mean", "0.5,0.5"], "--mean has 2 values; this model takes 1 channels"),
    (["info", "{ckpt}", "--num-heads", "5"], "--num-heads 5 does not divide the embedding width 48"),
    (
        ["info", "{ckpt}", "--num-heads", "3", "--model-kwargs", '{"mlp_layer": "nope"}'],
        "--model-kwargs: mlp_layer 'nope' is not one of mlp, swiglu_packed, swiglu",
    ),
    (["report", "--sections", "info,nope", "--out", "{tmp}/r"], "--sections: unknown section nope; choose from info"),
    (
        ["attention-distance", "--data", "{tmp}/no-such-thing", "--out", "{tmp}/o"],
        "--data '{tmp}/no-such-thing' is neither a known dataset (digits, ",
    ),
    (
        ["tokens", "demo", "--images", "{tmp}/no-such-thing", "--out", "{tmp}/o"],
        "--images '{tmp}/no-such-thing' is neither a known dataset (digits, ",
    ),
    (
        ["fewshot", "demo", "--test-data", "{tmp}/no-such-thing", "--no-cache", "--out", "{tmp}/o"],
        "--test-data '{tmp}/no-such-thing' is neither a known dataset (digits, ",
    ),
    (
        ["report", "demo", "--images", "{tmp}/no.png", "--out", "{tmp}/o"],
        "--images: no such file or folder: {tmp}/no.png",
    ),
]


@pytest.mark.parametrize(("args", "needle"), CLI, ids=[" ".join(a[2:]) for a, _ in CLI])
def test_cli_error_names_the_flag(tmp_path, args, needle):
    ckpt = save_fixture(tmp_path, "cls")
    fill = {"{ckpt}": str(ckpt), "{tmp}": str(tmp_path)}

    def filled(text: str) -> str:
        return re.sub("|".join(map(re.escape, fill)), lambda m: fill[m.group(0)], text)

    result = runner.invoke(app, [*(filled(a) for a in args), "--device", "cpu"])
    assert_one_line_error(result, 2, "error: " + filled(needle))
    assert not (tmp_path / "o").exists()  # nothing written, not even the output folder
