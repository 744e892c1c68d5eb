"""Issue 9 for data: folders without images, unreadable images, odd file names, symlink loops, empty classes.

Each case is checked where it is sharpest: the data layer for which images were read and what was warned, a
``vitlens`` command for the one warning or the one red line a user sees. test_data.py checks well-formed data.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, fixture_checkpoint
from vitlens.cli.app import app
from vitlens.data import ImageDataset, iterate_batches, open_dataset
from vitlens.errors import VitlensError
from vitlens.layout import Preprocess

runner = CliRunner()

# Mean 0, std 1 and no resampling blur: a pixel of the model's input times 255 is the file's 8-bit value.
IDENTITY = Preprocess(img_size=(4, 4), in_chans=3, mean=(0.0,) * 3, std=(1.0,) * 3)


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


def _truncated(path) -> None:
    """A real PNG or JPEG (by suffix) of noise, cut in half."""
    _image(path, size=(64, 64), seed=2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _unreadable_images(folder) -> int:
    """One file of each kind PIL cannot read, in ``folder``; returns how many. ``empty.png`` sorts first."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(np.random.default_rng(1).bytes(2000))
    (folder / "text.png").write_bytes(b"not a png at all")
    _truncated(folder / "truncated.png")
    _truncated(folder / "truncated.jpg")
    _png_header(folder / "zero.png", 0, 0)
    return 6


def _distance(tmp_path, data, *extra):
    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    out = tmp_path / "out"
    result = runner.invoke(app, ["attention-distance", ckpt, *args, "--data", str(data), "--out", str(out), *extra])
    return result, out


def test_a_folder_without_images_is_one_line(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)  # an empty subfolder does not make it an ImageFolder
    (folder / "notes.txt").write_text("no images here")
    result, out = _distance(tmp_path, folder)
    assert_one_line_error(result, 1, "no images (")
    assert not out.exists()


def test_only_unreadable_images_is_one_line(tmp_path):
    folder = tmp_path / "bad"
    n = _unreadable_images(folder)
    result, out = _distance(tmp_path, folder)
    assert_one_line_error(result, 1, f"none of the {n} images of {folder.resolve()} could be read (e.g. empty.png)")
    assert not out.exists()


def test_unreadable_empty_tiny_and_huge_images_are_skipped_with_one_warning(tmp_path, monkeypatch, vitlens_warnings):
    folder = tmp_path / "mixed"
    n_bad = _unreadable_images(folder)
    _png_header(folder / "zz_huge.png", 100_000, 100_000)  # 10 G pixels claimed: PIL's bomb guard raises
    _image(folder / "warned.png", size=(60, 60))  # between MAX_IMAGE_PIXELS and twice that PIL only warns
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # (fork-started loader workers inherit it)
    n_bad += 2
    for i in range(2):
        _image(folder / f"good{i}.png", seed=i)
    _image(folder / "one_pixel.png", size=(1, 1))  # tiny is not broken

    dataset = open_dataset(str(folder), IDENTITY)
    assert len(dataset) == n_bad + 3
    for num_workers in (0, 2):  # skips are counted in the main process, with or without worker processes
        vitlens_warnings.clear()
        batches = list(iterate_batches(dataset, batch_size=2, num_workers=num_workers))
        read = [dataset.names[i] for b in batches for i in b.indices.tolist()]
        assert read == ["good0.png", "good1.png", "one_pixel.png"] and sum(len(b.images) for b in batches) == 3
        assert vitlens_warnings == [f"skipped {n_bad} unreadable images (e.g. empty.png)"], num_workers
    assert dataset[0] is None
    with pytest.raises(VitlensError, match="cannot read image empty.png"):
        dataset.load_pil(0)

    result, out = _distance(tmp_path, folder, "--num-images", str(len(dataset)), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_images"] == 3
    assert " ".join(result.stderr.split()).count(f"skipped {n_bad} unreadable images (e.g. empty.png)") == 1
    assert "Traceback" not in result.stderr and (out / "attention_distance.json").exists()


def test_odd_file_and_folder_names(tmp_path):
    # Spaces, quotes, an apostrophe, shell characters, non-ASCII and names that differ only in case: in the data
    # folder, the class folder, the image names and the output folder.
    folder = tmp_path / 'it\'s a "dïr"'
    names = ["with space.png", "it's.png", 'say "hi".png', "semi;colon&.png", "ünïcødé λ.png", "ÜNÏCØDÉ λ.PNG"]
    for i, name in enumerate(names):
        path = folder / "cls ä" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 6), (10 * i,) * 3).save(path)
    dataset = open_dataset(str(folder), IDENTITY, split="all")
    assert dataset.classes == ["cls ä"]
    read = {name: round(dataset[i][0][0, 0, 0].item() * 255) for i, name in enumerate(dataset.names)}
    assert read == {f"cls ä/{name}": 10 * i for i, name in enumerate(names)}  # each name reads its own file
    files = open_dataset([folder / "cls ä" / name for name in names], IDENTITY)
    assert len(next(iterate_batches(files, batch_size=8)).indices) == len(names)

    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    out = tmp_path / "out 'ö' \"q\""
    result = runner.invoke(app, ["rollout", ckpt, str(folder), *args, "--split", "all", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert sorted(data["images"]) == sorted(read)
    # Stems are unique even where only the case differs (case-blind file systems).
    assert sorted(p.name for p in (out / "rollout").iterdir()) == sorted(f"{s}.png" for s in data["stems"])
    assert len({s.lower() for s in data["stems"]}) == len(names)


def test_a_symlink_loop_in_the_data_folder_ends(tmp_path):
    root = tmp_path / "loopy"
    for cls in ("cat", "dog"):
        for i in range(3):
            _image(root / cls / f"{i}.png", seed=i)
    os.symlink(root / "cat", root / "cat" / "again")  # cat/again/again/... forever, if followed naively
    (root / "dog" / "deeper").mkdir()
    os.symlink(root / "dog", root / "dog" / "deeper" / "up")  # dog/deeper/up/deeper/up/...
    opened: dict[str, ImageDataset] = {}
    worker = threading.Thread(target=lambda: opened.update(ds=open_dataset(str(root), IDENTITY, split="all")))
    worker.daemon = True
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "listing a folder with a symlink loop hung"
    # Each real folder once: 3 cats, 3 dogs, and nothing twice.
    assert Counter(opened["ds"].labels.tolist()) == {0: 3, 1: 3}
    assert opened["ds"].names == [f"{cls}/{i}.png" for cls in ("cat", "dog") for i in range(3)]


def test_an_empty_class_is_kept_with_a_warning(tmp_path, vitlens_warnings):
    root = tmp_path / "classes"
    for cls in ("cat", "dog"):
        for i in range(4):
            _image(root / cls / f"{i}.png", seed=i)
    (root / "aardvark").mkdir()  # sorts first: the other labels move up, the class stays
    dataset = open_dataset(str(root), IDENTITY, split="all")
    assert dataset.classes == ["aardvark", "cat", "dog"] and set(dataset.labels.tolist()) == {1, 2}
    assert len(vitlens_warnings) == 1 and "no images for class 'aardvark'" in vitlens_warnings[0]

    # A few-shot probe needs examples of every class: one line naming the empty one, nothing written.
    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    out = tmp_path / "fewshot"
    result = runner.invoke(
        app, ["fewshot", ckpt, *args, "--data", str(root), "--shots", "1", "--no-cache", "--out", str(out)]
    )
    assert_one_line_error(result, 1, "'aardvark'")
    assert not out.exists()


@pytest.mark.parametrize("layer", ["99", "-99"])
def test_fewshot_layer_far_out_of_range(tmp_path, layer):
    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    out = tmp_path / "out"
    result = runner.invoke(app, ["fewshot", ckpt, *args, "--layer", layer, "--out", str(out)])
    assert_one_line_error(result, 2, "out of range")
    assert not out.exists()
