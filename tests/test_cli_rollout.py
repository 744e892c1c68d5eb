"""`vitlens rollout` end to end on tiny checkpoints: every token layout, images or data, figures, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, fixture_checkpoint, native_kwargs
from vitlens.analysis.rollout import threshold_masks
from vitlens.attention import head_attention_for, rollout_for
from vitlens.cli.app import app
from vitlens.data import open_dataset
from vitlens.definitions.rollout import unique_stems
from vitlens.models import load_vit
from vitlens.result import load_result

runner = CliRunner()
LAYOUTS = ["reg", "distilled", "gap", "reg_no_embed_class", "nonsquare"]


def _run(*args: str):
    return runner.invoke(app, ["rollout", *args])


def _photos(folder, n_sub: bool = False) -> list[str]:
    """Three photos of different modes and sizes; with ``n_sub`` a fourth sharing a stem in a subfolder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(folder / "cat.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L").save(folder / "dog.jpg")
    Image.new("RGBA", (33, 41), (0, 0, 255, 128)).save(folder / "bird.png")
    paths = [folder / "cat.png", folder / "dog.jpg", folder / "bird.png"]
    if n_sub:
        (folder / "sub").mkdir()
        Image.new("RGB", (30, 30), "red").save(folder / "sub" / "cat.png")
        paths.append(folder / "sub" / "cat.png")
    return [str(p) for p in paths]


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_with_data(tmp_path, name):
    ckpt, args = fixture_checkpoint(tmp_path, name)
    out = tmp_path / "out"
    result = _run(
        ckpt, *args, "--data", "digits", "--num-images", "12", "--batch-size", "5", "--out", str(out), "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)

    h, w = (4, 6) if name == "nonsquare" else (4, 4)
    maps = np.asarray(data["maps"])
    assert maps.shape == (12, h, w) and len(data["images"]) == 12
    np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0)
    assert data["head_fusion"] == "mean" and data["discard_ratio"] == 0.0 and "meta" in data
    # No class token: the default target becomes the mean of the patch tokens, and the user is told.
    assert data["target"] == ("mean-patch" if name == "gap" else "cls") and data["target_defaulted"] is True
    assert ("no class token" in result.stderr) == (name == "gap")

    vit = load_vit(ckpt, **native_kwargs(name))
    expected = rollout_for(vit, open_dataset("digits", vit.preprocess, num_images=12), batch_size=12)
    np.testing.assert_allclose(maps, expected.maps, atol=1e-6)

    with np.load(out / "rollout.npz") as npz:
        np.testing.assert_allclose(npz["maps"], maps)
        assert list(npz["images"]) == data["images"]
    assert json.loads((out / "rollout.json").read_text())["maps"] == data["maps"]
    figures = sorted((out / "rollout").glob("*.png"))
    assert [p.stem for p in figures] == sorted(s.rsplit("/", 1)[-1] for s in data["images"])
    for path in [*figures[:2], out / "rollout.png"]:
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) > 100


def test_image_files_per_head_and_unique_stems(tmp_path):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    images = _photos(tmp_path / "photos", n_sub=True)
    out = tmp_path / "out"
    result = _run(ckpt, *images, *args, "--per-head", "--layer", "0", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["images"] == images
    assert data["stems"] == ["cat", "dog", "bird", "cat-1"]
    assert sorted(p.name for p in (out / "rollout").iterdir()) == ["bird.png", "cat-1.png", "cat.png", "dog.png"]
    assert (out / "rollout.png").exists() and (out / "rollout_heads_L0.png").exists()

    vit = load_vit(ckpt, **native_kwargs("reg"))
    expected = head_attention_for(vit, open_dataset(images, vit.preprocess), layer=0)
    assert data["heads_layer"] == 0
    with np.load(out / "rollout.npz") as npz:
        assert npz["heads"].shape == (4, 3, 4, 4) and int(npz["heads_layer"]) == 0
        np.testing.assert_allclose(npz["heads"], expected, atol=1e-6)
    with Image.open(out / "rollout_heads_L0.png") as im:
        assert min(im.size) > 300  # four rows of a photo and three head tiles


def test_threshold_writes_the_mask_figure_and_arrays(tmp_path):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    images = _photos(tmp_path / "photos")
    out = tmp_path / "out"
    result = _run(ckpt, *images, *args, "--per-head", "--layer", "1", "--threshold", "0.6", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["threshold"] == 0.6 and str(out / "rollout_heads_L1_masks.png") in data["files"]
    with Image.open(out / "rollout_heads_L1_masks.png") as im:
        assert im.format == "PNG" and min(im.size) > 300  # three rows of a photo and three head tiles
    with np.load(out / "rollout.npz") as npz:
        masks, heads = npz["heads_masks"], npz["heads"]
    assert masks.shape == (3, 3, 4, 4) and masks.dtype == bool
    np.testing.assert_array_equal(masks, threshold_masks(heads, mass=0.6))
    share = heads / heads.sum(axis=(2, 3), keepdims=True)  # over patches only: the registers' weight left out
    assert (np.where(masks, share, 0.0).sum(axis=(2, 3)) >= 0.6).all()
    assert data["heads_masks"] == masks.tolist()
    back = load_result(out)
    assert back.threshold == 0.6 and back.heads_layer == 1
    np.testing.assert_array_equal(back.heads_masks, masks)


def test_options_reach_the_analysis_and_one_image_has_no_grid(tmp_path):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    images = _photos(tmp_path / "photos")
    opts = ["--head-fusion", "max", "--discard-ratio", "0.5", "--start-layer", "1", "--target", "reg:3"]
    result = _run(ckpt, images[0], *args, *opts, "--out", str(tmp_path / "out"), "--json", "--format", "pdf")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["head_fusion"], data["discard_ratio"], data["start_layer"], data["num_layers"]) == ("max", 0.5, 1, 1)
    assert data["target"] == "reg:3" and data["target_defaulted"] is False
    vit = load_vit(ckpt, **native_kwargs("reg"))
    expected = rollout_for(
        vit,
        open_dataset(images[:1], vit.preprocess),
        head_fusion="max",
        discard_ratio=0.5,
        start_layer=1,
        target="reg:3",
    )
    np.testing.assert_allclose(data["maps"], expected.maps, atol=1e-6)
    assert (tmp_path / "out" / "rollout" / "cat.pdf").read_bytes().startswith(b"%PDF")
    assert not (tmp_path / "out" / "rollout.pdf").exists()  # the grid is for more than one image


def test_folder_batch_size_table_and_quiet(tmp_path):
    ckpt, args = fixture_checkpoint(tmp_path, "nonsquare")
    folder = tmp_path / "photos"
    _photos(folder)
    one = _run(ckpt, str(folder), *args, "--batch-size", "1", "--out", str(tmp_path / "a"), "--json")
    three = _run(ckpt, str(folder), *args, "--batch-size", "3", "--out", str(tmp_path / "b"), "--json")
    assert one.exit_code == 0 and three.exit_code == 0, one.output + three.output
    assert len(json.loads(one.stdout)["images"]) == 3
    np.testing.assert_allclose(json.loads(one.stdout)["maps"], json.loads(three.stdout)["maps"], atol=1e-6)

    table = _run(ckpt, str(folder), *args, "--out", str(tmp_path / "c"))
    assert table.exit_code == 0, table.output
    assert all(name in table.stdout for name in ("cat.png", "dog.jpg", "bird.png")) and "peak patch" in table.stdout
    quiet = _run(ckpt, str(folder), *args, "--out", str(tmp_path / "d"), "-q")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_a_first_argument_that_is_an_image_is_not_the_model(tmp_path, monkeypatch):
    from vitlens.cli import options

    ckpt, _ = fixture_checkpoint(tmp_path, "reg")
    images = _photos(tmp_path / "photos")
    asked: list[str | None] = []
    load = options.ModelOptions.load

    def fake_load(self):
        asked.append(self.model)
        return load(options.ModelOptions(ckpt, num_heads=3, device="cpu"))

    monkeypatch.setattr(options.ModelOptions, "load", fake_load)
    result = _run(*images[:2], "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    assert asked == [None] and json.loads(result.stdout)["images"] == images[:2]


def test_unique_stems():
    assert unique_stems(["a/x.png", "b/x.jpg", "x-1.png", "X.png"]) == ["x", "x-1", "x-1-1", "X-2"]


@pytest.mark.parametrize(
    ("extra", "code", "needle"),
    [
        ([], 2, "no images"),
        (["{notes}"], 1, "cannot read image"),
        (["{missing}"], 1, "image file not found"),
        (["{cat}", "--target", "dist"], 1, "no 'dist' token"),
        (["{cat}", "--target", "middle"], 2, "--target must be cls, dist, reg:N or mean-patch"),
        (["{cat}", "--discard-ratio", "1"], 2, "--discard-ratio must be in [0, 1)"),
        (["{cat}", "--discard-ratio", "-0.1"], 2, "--discard-ratio must be in [0, 1)"),
        (["{cat}", "--start-layer", "2"], 2, "--start-layer 2 is out of range"),
        (["{cat}", "--start-layer", "-1"], 2, "--start-layer must be 0 or more"),
        (["{cat}", "--per-head", "--layer", "2"], 2, "--layer 2 is out of range"),
        (["{cat}", "--layer", "1"], 2, "add --per-head"),
        (["{cat}", "--threshold", "0.6"], 2, "--threshold cuts masks from the --per-head maps; add --per-head"),
        (["{cat}", "--per-head", "--threshold", "0"], 2, "--threshold must be in (0, 1], not 0.0"),
        (["{cat}", "--per-head", "--threshold", "1.5"], 2, "--threshold must be in (0, 1], not 1.5"),
        (["{cat}", "--head-fusion", "sum"], 2, "--head-fusion must be mean, max or min"),
        (["{cat}", "--data", "digits"], 2, "not both"),
        (["--data", "digits", "--num-images", "0"], 2, "--num-images must be a positive number"),
    ],
)
def test_errors_are_one_line_and_write_nothing(tmp_path, extra, code, needle):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    cat = _photos(tmp_path / "photos")[0]
    (tmp_path / "notes.txt").write_text("not an image")
    fill = {"{cat}": cat, "{notes}": str(tmp_path / "notes.txt"), "{missing}": str(tmp_path / "nope.png")}
    out = tmp_path / "out"
    assert_one_line_error(_run(ckpt, *[fill.get(a, a) for a in extra], *args, "--out", str(out)), code, needle)
    assert not out.exists()
