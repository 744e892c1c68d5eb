"""`vitlens tokens` end to end on tiny checkpoints: every token layout, its files and JSON, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, fixture_checkpoint, native_kwargs
from vitlens.cli.app import app
from vitlens.data import open_dataset
from vitlens.definitions.tokens import tokens
from vitlens.models import load_vit

runner = CliRunner()
LAYOUTS = ["reg", "distilled", "gap", "nonsquare"]
KINDS = {"reg": ["patch", "cls", "reg"], "distilled": ["patch", "cls", "dist"], "gap": ["patch"], "nonsquare": None}


def _run(*args: str):
    return runner.invoke(app, ["tokens", *args])


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_end_to_end(tmp_path, name):
    ckpt, args = fixture_checkpoint(tmp_path, name)
    out = tmp_path / "out"
    result = _run(ckpt, *args, "--num-images", "6", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_images"] == 6 and data["grid_size"] == ([4, 6] if name == "nonsquare" else [4, 4])
    assert data["kinds"] == (KINDS[name] or ["patch", "cls"]) and data["threshold_auto"] is True
    assert [layer["layer"] for layer in data["layers"]] == [0, 1]
    regs = 4 if name == "reg" else 0
    for layer in data["layers"]:
        assert len(layer["register_attention"]) == regs
        assert (layer["sink_share_cls"]["cls"] is None) == (name == "gap")
    assert sorted(p.name for p in out.iterdir()) == ["tokens.json", "tokens.npz", "tokens.png"]

    vit = load_vit(ckpt, **native_kwargs(name))
    expected = tokens(vit, open_dataset("digits", vit.preprocess, num_images=6), batch_size=4)
    assert data["threshold"] == (None if expected.norms.threshold == float("inf") else expected.norms.threshold)
    np.testing.assert_allclose([la["norm_mean"]["patch"] for la in data["layers"]], expected.norms.norm_mean[0])


def test_layers_threshold_and_summary(tmp_path):
    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    result = _run(
        ckpt, *args, "--num-images", "4", "--layer", "-1", "--norm-threshold", "0.001", "--out", str(tmp_path)
    )
    assert result.exit_code == 0, result.output
    assert "token norms" in result.stdout and "100.00%" in result.stdout  # every patch token is above 0.001
    saved = json.loads((tmp_path / "tokens.json").read_text())
    assert [la["layer"] for la in saved["layers"]] == [1] and saved["threshold"] == 0.001
    assert saved["layers"][0]["outlier_fraction"] == 1.0 and saved["layers"][0]["images_with_outliers"] == 1.0
    sim = saved["layers"][0]["neighbour_similarity_outliers"]  # every patch an outlier: no normal patch
    assert saved["layers"][0]["neighbour_similarity_normal"] is None
    assert f"outliers {sim:.3f}, normal patches n/a" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--layer", "a,b"], "--layer must be comma-separated integers"),
        (["--layer", "7"], "--layer: layer 7 is out of range"),
        (["--norm-threshold", "zero"], "--norm-threshold must be 'auto' or a positive number"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, flags, needle):
    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    result = _run(ckpt, *args, "--num-images", "2", "--out", str(tmp_path / "out"), *flags)
    assert_one_line_error(result, 2, needle)
    assert not (tmp_path / "out" / "tokens.json").exists()


def test_images_write_the_per_image_figure(tmp_path):
    from PIL import Image

    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    photos = []
    for i, colour in enumerate(("red", "navy")):
        photos += ["--images", str(tmp_path / f"photo{i}.png")]
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"photo{i}.png")
    out = tmp_path / "out"
    result = _run(ckpt, *args, "--num-images", "4", *photos, "--image-layer", "0", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["image_layer"] == 0 and data["image_query"] == "cls"
    assert [e["name"] for e in data["images"]] == [photos[1], photos[3]]
    assert (out / "tokens_images.png").stat().st_size > 0
    bad = _run(ckpt, *args, "--num-images", "2", *photos, "--image-layer", "5", "--out", str(tmp_path / "bad"))
    assert_one_line_error(bad, 2, "--image-layer must be a layer of the model")
    assert not (tmp_path / "bad" / "tokens.json").exists()
