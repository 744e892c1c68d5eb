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


def test_every_layer_mean_patch_in_one_forward_pass_then_from_the_cache(tmp_path, forward_calls):
    ckpt, args = fixture_checkpoint(tmp_path, "gap")  # the model without a class token
    common = [ckpt, *args, *FAST, "--layer", "all", "--batch-size", "256", "--json"]

    def run(feature: str, out: str, *extra: str):
        return _run(*common, "--feature", feature, "--out", str(tmp_path / out), *extra)

    cache = ["--cache-dir", str(tmp_path / "cache")]
    first = run("mean-patch", "a", *cache)
    assert first.exit_code == 0, first.output
    assert forward_calls[0] == 2  # both layers from the same pass over each split
    data = json.loads(first.stdout)
    assert data["layers"] == [0, 1] and data["feature"] == "mean-patch" and data["depth"] == 2
    assert sorted((r["shots"], r["layer"]) for r in data["results"]) == [(1, 0), (1, 1), (5, 0), (5, 1)]
    with open(tmp_path / "a" / "fewshot.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * 2 * 2
    assert (tmp_path / "a" / "fewshot.png").stat().st_size > 0

    second = run("mean-patch", "b", *cache)
    assert second.exit_code == 0, second.output
    assert forward_calls[0] == 2  # no forward pass at all
    again = json.loads(second.stdout)
    assert again["cache"] == {"train": "hit", "test": "hit"} and again["results"] == data["results"]

    # The old name `gap` still works: a one-line deprecation warning, the same features (read from the same cache
    # entry, so no forward pass), and `mean-patch` in the JSON.
    old = run("gap", "d", *cache)
    assert old.exit_code == 0, old.output
    warned = [ln for ln in old.stderr.splitlines() if "deprecated" in ln]
    assert warned == ["warning: feature 'gap' is deprecated; use 'mean-patch' (the same features)"], old.stderr
    old_data = json.loads(old.stdout)
    assert old_data["feature"] == "mean-patch" and old_data["cache"] == {"train": "hit", "test": "hit"}
    assert old_data["results"] == data["results"] and forward_calls[0] == 2

    bypass = run("mean-patch", "c", *cache, "--no-cache")
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
    # With --test-data all of --data is the pool: bee keeps its 3 images (an 80/20 hold-out would leave 2).
    assert data["allow_fewer"] is True and data["short_classes"] == {"bee": 3} and data["num_train"] == 15
    assert "fewer than 4 training examples in class 'bee' (3): using all" in result.stderr
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
        (["--feature", "mean"], 2, "--feature must be one of pre-logits, cls, mean-patch, not 'mean'"),
        (["--split", "test"], 2, "--split must be train or all, not 'test'"),
        (["--split", "all"], 2, "--split all leaves nothing to score"),
        (["--layer", "0", "--feature", "pre-logits"], 2, "pre-logits exist after the last block only"),
        (["--shots", "500"], 1, "class '0' has"),
    ],
)
def test_bad_options_are_one_line_errors_that_write_nothing(tmp_path, extra, code, needle):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    out = tmp_path / "out"
    assert_one_line_error(_run(ckpt, *args, "--num-images", "200", "--out", str(out), *extra), code, needle)
    assert not out.exists()


def test_test_data_makes_all_of_data_the_shot_pool(tmp_path):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    _image_folder(tmp_path / "pool", {"ant": 10, "bee": 10, "cow": 10})
    _image_folder(tmp_path / "held", {"ant": 3, "bee": 3, "cow": 3}, seed=1)
    pool, held = str(tmp_path / "pool"), str(tmp_path / "held")
    common = [ckpt, *args, "--data", pool, "--test-data", held, "--shots", "1,5", "--seeds", "1", "--no-cache"]

    whole = _run(*common, "--out", str(tmp_path / "a"), "--json")
    assert whole.exit_code == 0, whole.output
    data = json.loads(whole.stdout)
    assert data["num_train"] == 30 and data["num_test"] == 9  # every image of --data is a candidate shot
    assert data["data"] == f"{pool}:all" and data["test_data"] == f"{held}:all"

    # --split train keeps the 80/20 hold-out of a plain folder (its 20% unused: --test-data is scored instead).
    train = _run(*common, "--split", "train", "--out", str(tmp_path / "b"), "--json")
    assert train.exit_code == 0, train.output
    data = json.loads(train.stdout)
    assert data["num_train"] == 24 and data["data"] == f"{pool}:train" and data["num_test"] == 9

    # Without --test-data the default is still train, and its test split is scored; --split all is an error.
    alone = _run(ckpt, *args, "--data", pool, "--shots", "1", "--seeds", "1", "--no-cache", "--json")
    assert alone.exit_code == 0, alone.output
    data = json.loads(alone.stdout)
    assert (data["num_train"], data["num_test"]) == (24, 6) and data["test_data"] == f"{pool}:test"
    nothing = _run(ckpt, *args, "--data", pool, "--split", "all", "--out", str(tmp_path / "c"))
    assert_one_line_error(
        nothing, 2, "--split all leaves nothing to score (all of --data is the shot pool): give --test"
    )
    assert not (tmp_path / "c").exists()


def test_help_says_what_the_pool_is():
    result = runner.invoke(app, ["fewshot", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "--split" in text and "With --test-data, all of --data is the shot pool" in text
    assert "mean-patch" in text and "gap" not in text


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


# --------------------------------------------------------------------------------------------------------------
# --probe knn | both


def test_probe_knn_and_both_files_json_and_one_extraction(tmp_path, forward_calls):
    from vitlens.analysis.knn import fewshot_knn
    from vitlens.result import load_result

    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    common = [ckpt, *args, *FAST, "--batch-size", "256", "--knn-k", "5,20", "--cache-dir", str(tmp_path / "cache")]
    both = _run(*common, "--probe", "both", "--out", str(tmp_path / "both"), "--json")
    assert both.exit_code == 0, both.output
    assert forward_calls[0] == 2  # one batch of the pool, one of the test split, for both probes
    data = json.loads(both.stdout)
    assert data["probe"] == "both" and data["knn"]["k"] == [5, 20] and data["knn"]["temperature"] == 0.07
    assert [(r["shots"], r["k"], r["k_used"]) for r in data["knn"]["results"]] == [
        (1, 5, 5),
        (1, 20, 10),
        (5, 5, 5),
        (5, 20, 20),
    ]
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == [
        "fewshot-knn.csv",
        "fewshot.csv",
        "fewshot.json",
        "fewshot.png",
    ]
    vit = load_vit(ckpt, **native_kwargs("reg"))
    pool = open_dataset("digits", vit.preprocess, split="train", num_images=200)
    test = open_dataset("digits", vit.preprocess, split="test", num_images=200)
    expected = fewshot_knn(
        extract_features(vit, pool),
        pool.labels,
        extract_features(vit, test),
        test.labels,
        shots=(1, 5),
        seeds=2,
        k=(5, 20),
    )
    per_seed = [r["per_seed"] for r in data["knn"]["results"]]
    np.testing.assert_array_equal(per_seed, expected.accuracy[:, 0].transpose(0, 2, 1).reshape(4, 2))
    assert load_result(tmp_path / "both").to_dict() == {k: v for k, v in data.items() if k not in ("files", "meta")}

    forward_calls[0] = 0  # the reference extraction above is not the command's
    knn = _run(*common, "--probe", "knn", "--out", str(tmp_path / "knn"))  # the table; features from the cache
    assert knn.exit_code == 0, knn.output
    text = " ".join(knn.stdout.split())  # rich wraps at the terminal's width
    assert forward_calls[0] == 0 and "k-NN accuracy (%)" in text and "feature cache: train hit, test hit" in text
    assert "few-shot accuracy (%)" not in text and "(k=10)" in text  # k=20 capped at the 1-shot pool of 10
    assert sorted(p.name for p in (tmp_path / "knn").iterdir()) == ["fewshot-knn.csv", "fewshot.json", "fewshot.png"]
    with open(tmp_path / "knn" / "fewshot-knn.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["shots", "layer", "seed", "k", "k_used", "accuracy"] and len(rows) == 2 * 1 * 2 * 2

    full = _run(*common, "--probe", "knn", "--shots", "all", "--out", str(tmp_path / "all"), "--json")
    assert full.exit_code == 0, full.output
    data = json.loads(full.stdout)
    assert data["full_pool"] is True and data["seeds"] == [0] and data["num_train"] == 200
    assert [r["k_used"] for r in data["knn"]["results"]] == [5, 20]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--probe", "svm"], "--probe must be one of lsr, knn, both, not 'svm'"),
        (["--knn-k", "0"], "--knn-k must be positive integers"),
        (["--knn-temperature", "-1"], "--knn-temperature must be a positive number"),
    ],
)
def test_bad_probe_options_are_one_line_exit_2_errors(tmp_path, extra, needle, forward_calls):
    ckpt, args = fixture_checkpoint(tmp_path, "reg")
    out = tmp_path / "out"
    assert_one_line_error(_run(ckpt, *args, "--num-images", "200", "--out", str(out), *extra), 2, needle)
    assert not out.exists() and forward_calls[0] == 0
