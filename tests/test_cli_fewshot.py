"""`vitlens fewshot` end to end on tiny checkpoints: outputs, one forward pass per split, the cache, one-line errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, fixture_checkpoint, native_kwargs
from vitlens.analysis.fewshot import fewshot_lsr
from vitlens.cli.app import app
from vitlens.data import open_dataset
from vitlens.features import extract_features
from vitlens.models import ViT, load_vit
from vitlens.models.load import demo_checkpoint_path

runner = CliRunner()
FAST = ["--data", "digits", "--num-images", "200", "--shots", "1,5", "--seeds", "2"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the user's cache: the default cache folder is inside this test's tmp_path."""
    monkeypatch.setenv("VITLENS_CACHE_DIR", str(tmp_path / "default-cache"))


@pytest.fixture
def forward_calls(monkeypatch):
    """Counts calls of ViT.features, the one forward pass of feature extraction."""
    calls = [0]
    original = ViT.features

    def counting(self, images):
        calls[0] += 1
        return original(self, images)

    monkeypatch.setattr(ViT, "features", counting)
    return calls


def _run(*args: str):
    return runner.invoke(app, ["fewshot", *args])


def _image_folder(root, counts: dict[str, int], *, seed: int = 0) -> None:
    """An ImageFolder of small random images, ``counts[class]`` per class."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_prelogits_end_to_end_matches_the_library(tmp_path, forward_calls):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    out = tmp_path / "out"
    result = _run(ckpt, *args, *FAST, "--out", str(out), "--json", "--batch-size", "256")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert forward_calls[0] == 2  # one batch of the pool, one of the test split
    assert data["feature"] == "pre-logits" and data["layers"] == [1] and data["shots"] == [1, 5]
    assert data["num_classes"] == 10 and data["chance"] == pytest.approx(0.1) and data["l2"] == 1024.0
    assert data["data"] == "digits:train#n=200,seed=0" and data["test_data"] == "digits:test#n=200,seed=0"
    assert data["cache"] == {"train": "miss", "test": "miss"} and data["meta"]["command"] == "fewshot"
    assert [(r["shots"], r["layer"]) for r in data["results"]] == [(1, 1), (5, 1)]
    assert all(len(r["per_seed"]) == 2 and r["mean"] == pytest.approx(np.mean(r["per_seed"])) for r in data["results"])

    vit = load_vit(ckpt, **native_kwargs("reg"))
    pool = open_dataset("digits", vit.preprocess, split="train", num_images=200)
    test = open_dataset("digits", vit.preprocess, split="test", num_images=200)
    expected = fewshot_lsr(
        extract_features(vit, pool), pool.labels, extract_features(vit, test), test.labels, shots=(1, 5), seeds=2
    )
    np.testing.assert_allclose([r["per_seed"] for r in data["results"]], expected.accuracy[:, 0], rtol=1e-12)

    with open(out / "fewshot.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["shots", "layer", "seed", "accuracy", "l2"]
    assert len(rows) == 2 * 1 * 2  # shots x layers x seeds
    np.testing.assert_allclose([float(r["accuracy"]) for r in rows], expected.accuracy.ravel(), rtol=1e-5)
    saved = json.loads((out / "fewshot.json").read_text())
    assert saved["results"] == data["results"] and "meta" in saved
    with Image.open(out / "fewshot.png") as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_every_layer_gap_in_one_forward_pass_then_from_the_cache(tmp_path, forward_calls):
    ckpt, args = fixture_checkpoint(tmp_path, "gap")
    common = [ckpt, *args, *FAST, "--layer", "all", "--feature", "gap", "--batch-size", "256"]
    first = _run(*common, "--out", str(tmp_path / "a"), "--json", "--cache-dir", str(tmp_path / "cache"))
    assert first.exit_code == 0, first.output
    assert forward_calls[0] == 2  # both layers from the same pass over each split
    data = json.loads(first.stdout)
    assert data["layers"] == [0, 1] and data["feature"] == "gap" and data["depth"] == 2
    assert sorted((r["shots"], r["layer"]) for r in data["results"]) == [(1, 0), (1, 1), (5, 0), (5, 1)]
    with open(tmp_path / "a" / "fewshot.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * 2 * 2
    assert (tmp_path / "a" / "fewshot.png").stat().st_size > 0

    second = _run(*common, "--out", str(tmp_path / "b"), "--json", "--cache-dir", str(tmp_path / "cache"))
    assert second.exit_code == 0, second.output
    assert forward_calls[0] == 2  # no forward pass at all
    again = json.loads(second.stdout)
    assert again["cache"] == {"train": "hit", "test": "hit"} and again["results"] == data["results"]

    bypass = _run(*common, "--out", str(tmp_path / "c"), "--json", "--no-cache", "--cache-dir", str(tmp_path / "cache"))
    assert json.loads(bypass.stdout)["cache"] == {"train": "off", "test": "off"} and forward_calls[0] == 4


def test_auto_l2_table_allow_fewer_test_data_and_svg(tmp_path):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    _image_folder(tmp_path / "pool", {"ant": 6, "bee": 3, "cow": 6})
    _image_folder(tmp_path / "held", {"ant": 4, "bee": 4, "cow": 4}, seed=1)
    common = [ckpt, *args, "--data", str(tmp_path / "pool"), "--test-data", str(tmp_path / "held")]
    common += ["--shots", "2,4", "--l2", "auto", "--allow-fewer", "--layer", "-1", "--format", "svg"]
    result = _run(*common, "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["l2"] == "auto" and data["feature"] == "cls" and data["layers"] == [1]
    assert data["num_test"] == 12 and data["num_classes"] == 3 and data["classes"] == ["ant", "bee", "cow"]
    assert data["allow_fewer"] is True and data["short_classes"] == {"bee": 2}  # 3 images, 80/20 hold-out: 2 left
    assert "fewer than 4 training examples in class 'bee' (2): using all" in result.stderr
    assert all(2.0**-2 <= r["l2"] <= 2.0**16 for r in data["results"])
    assert (tmp_path / "out" / "fewshot.svg").read_text().lstrip().startswith("<?xml")

    table = _run(*common, "--out", str(tmp_path / "out2"))
    assert table.exit_code == 0, table.output
    body = [ln for ln in table.stdout.splitlines() if ln.strip().startswith("│")]
    assert len(body) == 2 and body[0].split("│")[1].strip() == "2"  # one row per shots value
    assert "chance (1/3): 33.3%" in table.stdout and "λ" in table.stdout

    quiet = _run(*common, "--out", str(tmp_path / "out3"), "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == ""


@pytest.mark.parametrize(
    ("extra", "code", "needle"),
    [
        (["--shots", "1,x"], 2, "--shots must be positive integers"),
        (["--shots", "0,5"], 2, "--shots must be positive integers"),
        (["--shots", ""], 2, "--shots must be positive integers"),
        (["--seeds", "0"], 2, "--seeds must be at least 1"),
        (["--l2", "-3"], 2, "--l2 must be a positive number or 'auto'"),
        (["--l2", "inf"], 2, "--l2 must be a positive number or 'auto'"),
        (["--layer", "1;2"], 2, "--layer must be 'all' or 0-based layer indices"),
        (["--layer", "7"], 2, "layer 7 is out of range"),
        (["--feature", "mean"], 2, "--feature must be one of pre-logits, cls, gap"),
        (["--layer", "0", "--feature", "pre-logits"], 2, "pre-logits exist after the last block only"),
        (["--shots", "500"], 1, "class '0' has"),
    ],
)
def test_bad_options_are_one_line_errors_that_write_nothing(tmp_path, extra, code, needle):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    out = tmp_path / "out"
    assert_one_line_error(_run(ckpt, *args, "--num-images", "200", "--out", str(out), *extra), code, needle)
    assert not out.exists()


def test_cls_feature_on_a_model_without_class_token(tmp_path):
    ckpt, args = fixture_checkpoint(tmp_path, "gap")
    result = _run(ckpt, *args, "--feature", "cls", "--layer", "0", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, 1, "no class token")


def test_data_errors_name_the_problem(tmp_path, forward_calls):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    _image_folder(tmp_path / "few" / "train", {"ant": 6, "bee": 3})
    _image_folder(tmp_path / "few" / "test", {"ant": 2, "bee": 2})
    result = _run(ckpt, *args, "--data", str(tmp_path / "few"), "--shots", "1,5", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, 1, "class 'bee' has 3 training examples, fewer than the 5 shots")

    _image_folder(tmp_path / "one", {"ant": 8})
    result = _run(ckpt, *args, "--data", str(tmp_path / "one"), "--shots", "1", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, 1, "at least 2 classes; the data has 1 ('ant')")

    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(3):
        Image.new("RGB", (9, 9), (i * 40, 0, 0)).save(loose / f"{i}.png")
    result = _run(ckpt, *args, "--data", str(loose), "--shots", "1", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, 1, "has no labels")

    _image_folder(tmp_path / "other", {"ant": 2, "cat": 2})
    result = _run(ckpt, *args, "--data", str(tmp_path / "few"), "--test-data", str(tmp_path / "other"), "--shots", "1")
    assert_one_line_error(result, 1, "they must be the same")
    assert forward_calls[0] == 0 and not (tmp_path / "o").exists()  # all found before any forward pass


@pytest.mark.skipif(not demo_checkpoint_path().exists(), reason="the embedded demo model is not built yet")
def test_demo_model_on_digits_is_far_above_chance(tmp_path):
    result = _run("--shots", "10", "--device", "cpu", "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["source"] == "demo" and data["data"] == "digits:train" and data["chance"] == pytest.approx(0.1)
    (row,) = data["results"]
    assert row["shots"] == 10 and row["mean"] > 0.8  # a model trained with the demo preset: 0.97
