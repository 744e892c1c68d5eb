"""`vitlens features` end to end on tiny checkpoints: token layouts, images or data, files, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, fixture_checkpoint
from vitlens.cli.app import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, ["features", *args])


@pytest.fixture
def photos(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = [tmp_path / "cat.png", tmp_path / "dog.jpg"]
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L").save(paths[1])
    return [str(p) for p in paths]


@pytest.mark.parametrize("name", ["reg", "nonsquare", "gap"])
def test_layouts_write_the_files_and_json(tmp_path, photos, name):
    ckpt, args = fixture_checkpoint(tmp_path, name)
    out = tmp_path / "out"
    result = _run(ckpt, *photos, *args, "--components", "4", "--foreground", "none", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    grid = (4, 6) if name == "nonsquare" else (4, 4)
    assert data["grid_size"] == list(grid) and data["num_components"] == 4 and data["layer"] == 1
    assert (
        data["tokens"] == "final-norm" and data["foreground"] == "none" and data["num_fit_patches"] == 2 * np.prod(grid)
    )
    ratios = np.asarray(data["explained_variance_ratio"])
    assert ratios.shape == (4,) and (np.diff(ratios) <= 1e-12).all() and 0 < ratios.sum() <= 1 + 1e-9
    assert sorted(p.name for p in out.iterdir()) == ["features.json", "features.npz", "features.png"]
    with np.load(out / "features.npz") as npz:
        assert npz["rgb"].shape == (2, *grid, 3) and npz["scores"].shape == (2, *grid, 4)
        assert "foreground_mask" not in npz.files


def test_threshold_layer_and_summary(tmp_path, photos):
    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    out = tmp_path / "out"
    result = _run(ckpt, *photos, *args, "--layer", "0", "--foreground", "-0.5", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "layer 0 (block-output)" in result.stdout and "first component > -0.5" in result.stdout
    saved = json.loads((out / "features.json").read_text())
    assert saved["threshold"] == -0.5 and saved["foreground"] == "threshold" and saved["tokens"] == "block-output"
    with np.load(out / "features.npz") as npz:
        np.testing.assert_array_equal(npz["foreground_mask"], npz["foreground_scores"] > -0.5)


def test_data_spec(tmp_path):
    pytest.importorskip("sklearn")  # the digits data
    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    result = _run(ckpt, *args, "--data", "digits", "--num-images", "4", "--out", str(tmp_path / "o"), "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["images"]) == 4


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--foreground", "maybe"], "--foreground must be auto, none or a finite number"),
        (["--components", "0"], "--components must be an integer of at least 1"),
        (["--components", "1000"], "--components must be at most 48"),
        (["--layer", "5"], "--layer 5 is out of range"),
        (["--foreground", "1e9"], None),  # no foreground left: exit 1
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, photos, extra, needle):
    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    result = _run(ckpt, *photos, *args, *extra, "--out", str(tmp_path / "never"))
    if needle is None:
        assert_one_line_error(result, 1, "too few for a PCA")
    else:
        assert_one_line_error(result, 2, needle)
    assert not (tmp_path / "never").exists()


def test_no_images_is_a_usage_error(tmp_path):
    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    assert_one_line_error(_run(ckpt, *args), 2, "no images")
