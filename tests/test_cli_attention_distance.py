"""`vitlens attention-distance` end to end on tiny checkpoints: every token layout, every output, one-line errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, fixture_checkpoint, native_kwargs
from vitlens.attention import mean_attention_distance_for
from vitlens.cli.app import app
from vitlens.data import open_dataset
from vitlens.models import load_vit

runner = CliRunner()
LAYOUTS = ["reg", "distilled", "gap", "reg_no_embed_class", "nonsquare"]


def _run(*args: str):
    return runner.invoke(app, ["attention-distance", *args])


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_end_to_end(tmp_path, name):
    ckpt, args = fixture_checkpoint(tmp_path, name)
    out = tmp_path / "out"
    result = _run(ckpt, *args, "--data", "digits", "--num-images", "12", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # exactly one JSON object on stdout

    grid = [4, 6] if name == "nonsquare" else [4, 4]
    assert data["grid_size"] == grid and data["patch_size"] == [8, 8]
    assert data["num_images"] == 12 and data["renormalized"] is True
    assert np.asarray(data["distance_px"]).shape == (2, 3) and np.asarray(data["std_px"]).shape == (2, 3)
    assert data["uniform_px"] > 0 and data["meta"]["command"] == "attention-distance"

    # Cross-check against the library on the same model and images.
    vit = load_vit(ckpt, **native_kwargs(name))
    expected = mean_attention_distance_for(vit, open_dataset("digits", vit.preprocess, num_images=12), batch_size=5)
    np.testing.assert_allclose(data["distance_px"], expected.distance_px, rtol=1e-6)
    np.testing.assert_allclose(data["std_px"], expected.std_px, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(data["uniform_px"], expected.uniform_px)

    with open(out / "attention_distance.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3
    assert list(rows[0]) == ["layer", "head", "mean_px", "std_px", "prefix_mass"]
    assert [(int(r["layer"]), int(r["head"])) for r in rows] == [(la, h) for la in range(2) for h in range(3)]
    np.testing.assert_allclose([float(r["mean_px"]) for r in rows], np.ravel(data["distance_px"]), rtol=1e-5)
    np.testing.assert_allclose([float(r["prefix_mass"]) for r in rows], np.ravel(data["prefix_mass"]), rtol=1e-5)
    has_prefix = name != "gap"
    assert all((float(r["prefix_mass"]) > 0) == has_prefix for r in rows)

    with np.load(out / "attention_distance.npz") as npz:
        np.testing.assert_allclose(npz["distance_px"], data["distance_px"])
        assert int(npz["num_images"]) == 12 and bool(npz["renormalized"])
    saved = json.loads((out / "attention_distance.json").read_text())
    assert saved["distance_px"] == data["distance_px"] and saved["grid_size"] == grid
    with Image.open(out / "attention_distance.png") as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_images_from_a_folder_any_mode_and_size(tmp_path):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L").save(folder / "b.jpg")
    Image.new("RGBA", (33, 41), (0, 0, 255, 128)).save(folder / "c.png")
    out = tmp_path / "out"
    result = _run(ckpt, *args, "--data", str(folder), "--out", str(out), "--json", "--no-renormalize")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_images"] == 3 and data["renormalized"] is False
    assert json.loads((out / "attention_distance.json").read_text())["renormalized"] is False


def test_batch_size_format_table_and_quiet(tmp_path):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    common = [ckpt, *args, "--num-images", "12"]
    one = _run(*common, "--batch-size", "1", "--out", str(tmp_path / "a"), "--json")
    many = _run(*common, "--batch-size", "12", "--out", str(tmp_path / "b"), "--json", "--format", "SVG")
    assert one.exit_code == 0 and many.exit_code == 0, one.output + many.output
    np.testing.assert_allclose(json.loads(one.stdout)["distance_px"], json.loads(many.stdout)["distance_px"])
    assert (tmp_path / "b" / "attention_distance.svg").read_text().lstrip().startswith("<?xml")
    assert not (tmp_path / "b" / "attention_distance.png").exists()

    table = _run(*common, "--out", str(tmp_path / "c"))
    assert table.exit_code == 0, table.output
    body = [ln for ln in table.stdout.splitlines() if ln.strip().startswith("│")]
    assert len(body) == 2 and body[0].split("│")[1].strip() == "0"  # one row per layer
    assert "uniform attention" in table.stdout

    quiet = _run(*common, "--out", str(tmp_path / "d"), "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert (tmp_path / "d" / "attention_distance.csv").exists()


@pytest.mark.parametrize(
    ("extra", "code", "needle"),
    [
        (["--num-images", "0"], 2, "--num-images must be a positive number"),
        (["--num-images", "-5"], 2, "--num-images must be a positive number"),
        (["--format", "jpg"], 2, "--format must be one of png, svg, pdf"),
        (["--split", "validation"], 2, "--split must be one of"),
        (["--data", "no-such-data"], 2, "--data 'no-such-data' is neither a known dataset"),
    ],
)
def test_errors_are_one_line_and_write_nothing(tmp_path, extra, code, needle):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    out = tmp_path / "out"
    assert_one_line_error(_run(ckpt, *args, "--out", str(out), *extra), code, needle)
    assert not out.exists()
