"""Issue 9 through the CLI: folders without images, unreadable images, odd file names, symlink loops, empty classes.

test_data.py checks the data layer itself; here the same situations go through ``vitlens`` commands: a bad image is
skipped with one warning, no readable image at all is one red line.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, fixture_checkpoint
from vitlens.cli.app import app

runner = CliRunner()


def _png_header(path, width: int, height: int) -> None:
    """A PNG that claims ``width x height`` RGB pixels and holds none: cheap to make, refused when opened."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _image(path, size=(20, 20), seed=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _distance(tmp_path, data, *extra):
    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    out = tmp_path / "out"
    result = runner.invoke(app, ["attention-distance", ckpt, *args, "--data", str(data), "--out", str(out), *extra])
    return result, out


def test_a_folder_without_images_is_one_line(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    result, out = _distance(tmp_path, folder)
    assert_one_line_error(result, 1, "no images (")
    assert not out.exists()


def test_only_corrupt_images_is_one_line(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png at all")
    (folder / "b.jpg").write_bytes(np.random.default_rng(1).bytes(2000))
    _png_header(folder / "c.png", 0, 0)
    result, out = _distance(tmp_path, folder)
    assert_one_line_error(result, 1, "none of the 3 images")
    assert not out.exists()


def test_unreadable_empty_tiny_and_huge_images_are_skipped_with_one_warning(tmp_path, monkeypatch):
    folder = tmp_path / "mixed"
    _image(folder / "good.png")
    _image(folder / "one_pixel.png", size=(1, 1))
    jpeg = folder / "truncated.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    _png_header(folder / "zero.png", 0, 0)
    _png_header(folder / "zz_huge.png", 100_000, 100_000)  # 10 G pixels claimed: PIL's bomb guard raises
    # Between MAX_IMAGE_PIXELS and twice that PIL only warns; vitlens skips those too.
    _image(folder / "warned.png", size=(60, 60))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)

    result, out = _distance(tmp_path, folder, "--num-images", "6", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_images"] == 2
    assert "skipped 4 unreadable images" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr and (out / "attention_distance.json").exists()


def test_odd_file_and_folder_names(tmp_path):
    # Spaces, quotes, an apostrophe, non-ASCII; in the data folder, the image names and the output folder.
    folder = tmp_path / 'it\'s a "dïr"'
    names = ["with space.png", "it's.png", 'say "hi".png', "ünïcødé λ.png", "ÜNÏCØDÉ λ.PNG"]
    for i, name in enumerate(names):
        _image(folder / name, seed=i)
    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    out = tmp_path / "out 'ö' \"q\""
    result = runner.invoke(app, ["rollout", ckpt, str(folder), *args, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert sorted(data["images"]) == sorted(names)
    # Stems are unique even where only the case differs (case-blind file systems).
    assert sorted(p.name for p in (out / "rollout").iterdir()) == sorted(f"{s}.png" for s in data["stems"])
    assert len({s.lower() for s in data["stems"]}) == len(names)

    result, _ = _distance(tmp_path, folder, "--num-images", "5", "-q")
    assert result.exit_code == 0, result.output


def test_a_symlink_loop_in_the_data_folder_ends(tmp_path):
    root = tmp_path / "loopy"
    for cls in ("cat", "dog"):
        for i in range(3):
            _image(root / cls / f"{i}.png", seed=i)
    os.symlink(root / "cat", root / "cat" / "again")  # cat/again/again/... forever, if followed naively
    (root / "dog" / "deeper").mkdir()
    os.symlink(root / "dog", root / "dog" / "deeper" / "up")  # dog/deeper/up/deeper/up/...
    result, _ = _distance(tmp_path, root, "--split", "all", "--json")
    assert result.exit_code == 0, result.output
    # Each real folder once: 3 cats, 3 dogs, and nothing twice.
    assert json.loads(result.stdout)["num_images"] == 6


def test_an_empty_class_is_kept_with_a_warning(tmp_path):
    root = tmp_path / "classes"
    for cls in ("cat", "dog"):
        for i in range(4):
            _image(root / cls / f"{i}.png", seed=i)
    (root / "empty").mkdir()
    result, _ = _distance(tmp_path, root, "--split", "all", "--json")
    assert result.exit_code == 0, result.output
    assert "no images for class 'empty'" in " ".join(result.stderr.split())

    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    out = tmp_path / "fewshot"
    result = runner.invoke(
        app, ["fewshot", ckpt, *args, "--data", str(root), "--shots", "1", "--no-cache", "--out", str(out)]
    )
    assert_one_line_error(result, 1, "'empty'")
    assert not out.exists()


@pytest.mark.parametrize("layer", ["99", "-99"])
def test_fewshot_layer_far_out_of_range(tmp_path, layer):
    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    out = tmp_path / "out"
    result = runner.invoke(app, ["fewshot", ckpt, *args, "--layer", layer, "--out", str(out)])
    assert_one_line_error(result, 2, "out of range")
    assert not out.exists()
