"""`vitlens explain` end to end on tiny checkpoints: token layouts, files and JSON keys, a backbone explained by a
cosine score, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, fixture_checkpoint, make_vit, native_kwargs, save_fixture
from vitlens.cli.app import app
from vitlens.data import open_dataset
from vitlens.definitions.explain import explain_for
from vitlens.models import load_vit
from vitlens.result import load_result

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, ["explain", *args])


def _photos(folder) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name in ("cat", "dog", "bird"):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{name}.png")
        paths.append(str(folder / f"{name}.png"))
    return paths


@pytest.mark.parametrize(
    ("name", "method"), [("distilled", "grad-rollout"), ("gap", "attribution"), ("nonsquare", "last-layer")]
)
def test_layouts_files_and_json(tmp_path, name, method):
    ckpt, args = fixture_checkpoint(tmp_path, name)
    images = _photos(tmp_path / "photos")
    out = tmp_path / "out"
    cli = _run(ckpt, *images, *args, "--method", method, "--class", "1", "--out", str(out), "--json")
    assert cli.exit_code == 0, cli.output
    data = json.loads(cli.stdout)
    for key in ("images", "method", "classes", "scores", "maps"):
        assert key in data
    assert data["images"] == images and data["method"] == method and data["classes"] == [1, 1, 1]
    h, w = (4, 6) if name == "nonsquare" else (4, 4)
    maps = np.asarray(data["maps"])
    assert maps.shape == (3, h, w)
    assert data["target"] == ("mean-patch" if name == "gap" else "cls")
    assert ("no class token" in cli.stderr) == (name == "gap")

    vit = load_vit(ckpt, **native_kwargs(name))
    expected = explain_for(vit, open_dataset(images, vit.preprocess), method=method, target=data["target"], class_=1)
    np.testing.assert_allclose(maps, expected.maps, atol=1e-6)
    np.testing.assert_allclose(data["scores"], expected.scores, rtol=1e-6)
    assert sorted(p.name for p in (out / "explain").iterdir()) == ["bird.png", "cat.png", "dog.png"]
    with np.load(out / "explain.npz") as npz:
        np.testing.assert_allclose(npz["maps"], maps)
        assert npz["classes"].tolist() == [1, 1, 1]
    with Image.open(out / "explain.png") as im:
        assert im.format == "PNG" and min(im.size) > 100
    assert load_result(out).explanation.method == method


def test_dist_target(tmp_path):
    ckpt, args = fixture_checkpoint(tmp_path, "distilled")
    images = _photos(tmp_path / "photos")
    cli = _run(ckpt, *images[:1], *args, "--target", "dist", "--out", str(tmp_path / "out"), "--json")
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["target"] == "dist"


def test_a_backbone_is_explained_by_a_cosine_score_only(tmp_path):
    model = make_vit("reg")
    model.reset_classifier(0)
    ckpt = str(save_fixture(tmp_path, "backbone", model))
    images = _photos(tmp_path / "photos")
    args = ["--num-heads", "3", "--device", "cpu", "--out", str(tmp_path / "out")]
    cli = _run(ckpt, *images, *args)
    assert_one_line_error(cli, 2, "--score must be 'cosine:IMAGE' for a model without a classifier head")
    cli = _run(ckpt, *images, *args, "--class", "2")
    assert_one_line_error(cli, 2, "--class '2' needs a classifier head")
    cli = _run(ckpt, *images, *args, "--score", f"cosine:{images[0]}", "--json")
    assert cli.exit_code == 0, cli.output
    data = json.loads(cli.stdout)
    assert data["classes"] == [-1, -1, -1] and data["scores"][0] == pytest.approx(1.0, abs=1e-5)
    assert data["score"] == f"cosine:{images[0]}"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--method", "lrp"], "--method must be one of rollout, grad-rollout, attribution, last-layer"),
        (["--discard-ratio", "0.5"], "--discard-ratio applies to rollout and grad-rollout, not attribution"),
        (["--class", "zebra"], "--class 'zebra' is not one of the model's classes"),
        (["--score", "l2"], "--score must be 'logit' or 'cosine:IMAGE'"),
        (["--target", "dist"], "model has no 'dist' token"),
    ],
)
def test_one_line_errors(tmp_path, args, needle):
    out = tmp_path / "out"
    cli = _run("--data", "digits", "--num-images", "2", "--device", "cpu", *args, "--out", str(out))
    code = 1 if "token" in needle else 2
    assert_one_line_error(cli, code, needle)
    assert not out.exists()


def test_faithfulness_files_json_and_read_back(tmp_path):
    ckpt, args = fixture_checkpoint(tmp_path, "distilled")
    images = _photos(tmp_path / "photos")
    out = tmp_path / "out"
    flags = ["--faithfulness", "--methods", "last-layer,rollout", "--removal", "mean", "--steps", "4", "--seed", "3"]
    cli = _run(ckpt, *images, *args, *flags, "--out", str(out), "--json")
    assert cli.exit_code == 0, cli.output
    data = json.loads(cli.stdout)
    assert data["methods"] == ["last-layer", "rollout", "random"] and data["seed"] == 3 and data["removal"] == "mean"
    assert len(data["fractions"]) == 5 and data["labels"] is None and data["accuracy"] is None
    assert sorted(p.name for p in out.iterdir()) == [
        "explain.json",
        "faithfulness.csv",
        "faithfulness.npz",
        "faithfulness.png",
    ]
    back = load_result(out)
    assert back.to_dict() == {k: v for k, v in data.items() if k not in ("files", "meta")}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--methods", "lrp"], "--methods must be among rollout, grad-rollout, attribution, last-layer, not 'lrp'"),
        (["--removal", "paint"], "--removal must be one of drop, mean, blur"),
        (["--steps", "1"], "--steps must be a whole number of at least 2"),
        (["--method", "rollout"], "with --faithfulness name the methods to judge with --methods"),
        (["--score", "cosine:x.png"], "--faithfulness reads class probabilities"),
    ],
)
def test_faithfulness_one_line_errors(tmp_path, extra, needle):
    out = tmp_path / "out"
    cli = _run("--data", "digits", "--num-images", "2", "--device", "cpu", "--faithfulness", *extra, "--out", str(out))
    assert_one_line_error(cli, 2, needle)
    assert not out.exists()


def test_faithfulness_needs_a_head_and_drop_needs_a_prefix_token(tmp_path):
    images = _photos(tmp_path / "photos")
    ckpt, args = fixture_checkpoint(tmp_path, "gap")
    cli = _run(ckpt, *images, *args, "--faithfulness", "--out", str(tmp_path / "out"))
    assert_one_line_error(cli, 2, "--removal 'drop' removes every patch at 100 %")
    model = make_vit("reg")
    model.reset_classifier(0)
    backbone = str(save_fixture(tmp_path, "backbone", model))
    cli = _run(backbone, *images, "--num-heads", "3", "--device", "cpu", "--faithfulness", "--out", str(tmp_path / "o"))
    assert_one_line_error(cli, 2, "--faithfulness needs class probabilities")
    cli = _run("--data", "digits", "--methods", "rollout", "--out", str(tmp_path / "o"))
    assert_one_line_error(cli, 2, "--methods applies to --faithfulness")
