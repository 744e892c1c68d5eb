"""``vitlens.fewshot`` on the demo model and 100 digits per split: the numbers are the solver's on the extracted
features, specs and datasets give the same probes, bad options name their parameter, and the result draws, saves,
reads back and prints what the CLI command does."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error
from vitlens.analysis.fewshot import fewshot_lsr
from vitlens.cli.app import app
from vitlens.data import open_dataset
from vitlens.definitions.fewshot import DEFINITION, FewShotProbeResult, fewshot
from vitlens.errors import NotApplicable, ParameterError, VitlensError
from vitlens.features import extract_features
from vitlens.registry import get
from vitlens.result import load_result

NUM_IMAGES = 100  # per split: 10 digits of each class
FAST = {"shots": (1, 5), "seeds": 2, "num_images": NUM_IMAGES, "use_cache": False}


@pytest.fixture(scope="module")
def splits(demo):
    return tuple(open_dataset("digits", demo, split=s, num_images=NUM_IMAGES) for s in ("train", "test"))


@pytest.fixture(scope="module")
def result(demo):
    return fewshot(demo, "digits", **FAST)


@pytest.fixture(scope="module")
def every_layer(demo, splits):
    pool, test = splits
    return fewshot(demo, pool, test_data=test, shots="1,5", seeds=1, l2="auto", layers="all", use_cache=False)


def test_the_numbers_are_the_solvers(demo, splits, result):
    pool, test = splits
    expected = fewshot_lsr(
        extract_features(demo, pool), pool.labels, extract_features(demo, test), test.labels, shots=(1, 5), seeds=2
    )
    assert isinstance(result, FewShotProbeResult)
    np.testing.assert_array_equal(result.probe.accuracy, expected.accuracy)
    assert result.probe.feature == "pre-logits" and result.probe.layers == (demo.depth - 1,)
    assert (result.data, result.test_data) == (pool.spec, test.spec) and result.classes == tuple(pool.classes)
    assert result.cache == {"train": "off", "test": "off"} and result.solve_seconds >= 0
    assert result.allow_fewer is False and result.depth == demo.depth and not result.heatmap
    mean = {"1": float(expected.mean[0, 0]), "5": float(expected.mean[1, 0])}
    assert result.key_numbers() == {"data": pool.spec, "seeds": 2, "chance": 0.1, "mean_accuracy": mean}


def test_datasets_and_string_options_give_the_same_probes(demo, splits, result):
    pool, test = splits
    same = fewshot(demo, pool, test_data=test, shots="5,1,5", seeds=2, l2="1024", use_cache=False)
    assert same == result


def test_layers_and_feature(demo, splits, every_layer):
    assert every_layer.probe.layers == tuple(range(demo.depth)) and every_layer.probe.feature == "cls"
    assert every_layer.probe.l2_auto and every_layer.heatmap
    pool, test = splits
    two = fewshot(demo, pool, test_data=test, shots=1, seeds=1, layers=[0, -1], feature="Mean-Patch", use_cache=False)
    assert two.probe.layers == (0, demo.depth - 1) and two.probe.feature == "mean-patch" and not two.heatmap
    text = every_layer.summary()
    assert "best of 4 layers" in text and text.startswith("5-shot accuracy ")
    assert every_layer.key_numbers()["layer"] in every_layer.probe.layers


def test_gap_is_a_deprecated_alias_of_mean_patch(demo, splits, vitlens_warnings):
    pool, test = splits
    options = {"test_data": test, "shots": 1, "seeds": 1, "layers": [0, -1], "use_cache": False}
    new = fewshot(demo, pool, feature="mean-patch", **options)
    assert vitlens_warnings == []
    old = fewshot(demo, pool, feature="gap", **options)
    assert vitlens_warnings == ["feature 'gap' is deprecated; use 'mean-patch' (the same features)"]  # once
    assert old == new and old.probe.feature == "mean-patch" and old.to_dict()["feature"] == "mean-patch"


def test_a_file_written_before_the_rename_reads_back_as_mean_patch(every_layer, tmp_path):
    mean_patch = dataclasses.replace(every_layer, probe=dataclasses.replace(every_layer.probe, feature="mean-patch"))
    mean_patch.save(tmp_path, fmt="svg")
    saved = json.loads((tmp_path / "fewshot.json").read_text())
    (tmp_path / "fewshot.json").write_text(json.dumps({**saved, "feature": "gap"}))  # as vitlens wrote it then
    back = load_result(tmp_path)
    assert back.probe.feature == "mean-patch" and back == mean_patch


def _image_folder(root, counts: dict[str, int], *, seed: int = 0) -> str:
    """An ImageFolder of tiny random PNGs, ``counts[class]`` per class; its path as a spec."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return str(root)


def test_test_data_makes_all_of_data_the_shot_pool(demo, tmp_path):
    pool = _image_folder(tmp_path / "pool", {"ant": 10, "bee": 10, "cow": 10})
    held = _image_folder(tmp_path / "held", {"ant": 2, "bee": 2, "cow": 2}, seed=1)
    options = {"test_data": held, "shots": (1, 5), "seeds": 1, "use_cache": False}
    whole = fewshot(demo, pool, **options)
    assert whole.probe.num_train == 30 and whole.data == f"{pool}:all" and whole.probe.num_test == 6
    assert fewshot(demo, pool, split="all", **options) == whole
    train = fewshot(demo, pool, split="train", **options)  # the 80/20 hold-out of a plain folder, on request
    assert train.probe.num_train == 24 and train.data == f"{pool}:train" and train.test_data == f"{held}:all"
    alone = fewshot(demo, pool, shots=1, seeds=1, use_cache=False)  # no test_data: train is scored on test
    assert (alone.probe.num_train, alone.probe.num_test, alone.test_data) == (24, 6, f"{pool}:test")


@pytest.mark.parametrize(
    ("data", "kwargs", "needle"),
    [
        ("digits", {"split": "all"}, r"split 'all' leaves nothing to score \(all of data is the shot pool\): give"),
        ("digits", {"split": "test"}, "split must be train or all, not 'test'"),
        ("digits", {"split": 1}, "split must be train or all, not 1"),
        ("pool", {"split": "train"}, "split applies to a data spec"),
    ],
)
def test_bad_split_names_its_parameter(demo, splits, data, kwargs, needle):
    pool, test = splits
    data = pool if data == "pool" else data
    extra = {"test_data": test, "num_images": None} if data is pool else {}
    with pytest.raises(ParameterError, match=needle) as info:
        fewshot(demo, data, **{**FAST, **extra, **kwargs})
    assert info.value.param == "split"


def test_the_cache_is_read_back(demo, splits, tmp_path):
    pool, test = splits
    options = {"test_data": test, "shots": 1, "seeds": 1, "cache_dir": tmp_path}
    first, second = fewshot(demo, pool, **options), fewshot(demo, pool, **options)
    assert first.cache == {"train": "miss", "test": "miss"} and second.cache == {"train": "hit", "test": "hit"}
    np.testing.assert_array_equal(first.probe.accuracy, second.probe.accuracy)


def test_progress_counts_both_parts(demo, splits):
    pool, test = splits
    calls = []
    fewshot(demo, pool, test_data=test, shots=1, seeds=1, use_cache=False, progress=lambda *a: calls.append(a))
    total = len(pool) + len(test)
    assert calls[-1] == (total, total) and all(n == total for _, n in calls)


def test_plot_and_figure(result, every_layer):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    assert isinstance(result.plot(), Axes) and isinstance(result.figure(), Figure)
    fig = Figure()
    ax = fig.add_subplot()
    assert result.plot(ax=ax) is ax and ax.lines  # accuracy against shots, chance
    fig = Figure()
    ax = fig.add_subplot()
    assert every_layer.plot(ax=ax) is ax and ax.images  # the layer-by-shots heat map
    assert len(every_layer.figure().axes) == 2  # heat map and colour bar


def test_save_writes_the_cli_files_and_reads_back_equal(result, every_layer, tmp_path):
    files = result.save(tmp_path, meta={"command": "test"})
    assert sorted(f.name for f in files) == ["fewshot.csv", "fewshot.json", "fewshot.png"]
    saved = json.loads((tmp_path / "fewshot.json").read_text())
    assert saved.pop("meta") == {"command": "test"}
    assert list(saved) == list(result.to_dict()) and saved == result.to_dict()
    rows = (tmp_path / "fewshot.csv").read_text().splitlines()
    assert rows[0] == "shots,layer,seed,accuracy,l2" and len(rows) == 1 + 2 * 1 * 2
    back = load_result(tmp_path)
    assert isinstance(back, FewShotProbeResult) and back == result and back.solve_seconds is None
    assert back != dataclasses.replace(result, data="other")

    every_layer.save(tmp_path / "all", fmt="pdf")
    back = load_result(tmp_path / "all")
    assert back == every_layer and back.heatmap


def test_repr_summary_and_html(result):
    text = repr(result)
    assert "\n" not in text and text.startswith("<FewShotProbeResult fewshot: 5-shot accuracy ")
    assert text.endswith("(chance 10.0%)>")
    assert "<img" in result._repr_html_()


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({"shots": (0, 5)}, "shots", "shots must be positive integers"),
        ({"shots": "1,x"}, "shots", "shots must be positive integers separated by commas"),
        ({"shots": ()}, "shots", "shots must be positive integers"),
        ({"shots": (1.5,)}, "shots", "shots must be positive integers"),
        ({"seeds": 0}, "seeds", "seeds must be at least 1, not 0"),
        ({"l2": -3.0}, "l2", "l2 must be a positive number or 'auto', not -3.0"),
        ({"l2": "inf"}, "l2", "l2 must be a positive number or 'auto'"),
        ({"layers": 9}, "layers", r"layers: layer 9 is out of range: the model has 4 layers \(0..3\)"),
        ({"layers": "1;2"}, "layers", "layers must be 'all' or 0-based layer indices"),
        ({"layers": [0.5]}, "layers", "layers must be 'all' or 0-based layer indices"),
        ({"layers": [0], "feature": "pre-logits"}, "layers", "pre-logits exist after the last block only"),
        ({"feature": "mean"}, "feature", "feature must be one of pre-logits, cls, mean-patch, not 'mean'"),
        ({"num_images": 0}, "num_images", "num_images must be a positive number, not 0"),
        ({"batch_size": 0}, "batch_size", "batch_size must be at least 1, not 0"),
    ],
)
def test_bad_options_name_their_parameter(demo, kwargs, param, needle):
    with pytest.raises(ParameterError, match=needle) as info:
        fewshot(demo, "digits", **{**FAST, **kwargs})
    assert isinstance(info.value, ValueError) and info.value.param == param


def test_datasets_need_test_data_and_matching_labelled_classes(demo, splits, tmp_path):
    pool, test = splits
    alone = fewshot(demo, pool, shots=(1,), seeds=1, use_cache=False)  # split 80/20 like a plain folder
    assert alone.probe.num_train + alone.probe.num_test == len(pool)
    assert 0.15 < alone.probe.num_test / len(pool) < 0.25
    with pytest.raises(ParameterError, match="num_images applies to a data spec"):
        fewshot(demo, pool, test_data=test, num_images=10)
    for name in ("ant", "bee"):
        (tmp_path / "other" / name).mkdir(parents=True)
        Image.new("RGB", (9, 9)).save(tmp_path / "other" / name / "0.png")
    with pytest.raises(VitlensError, match="they must be the same, in the same order"):
        fewshot(demo, pool, test_data=str(tmp_path / "other"), use_cache=False)
    (tmp_path / "loose").mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / "loose" / "0.png")
    unlabelled = open_dataset(tmp_path / "loose", demo, split="all")
    with pytest.raises(VitlensError, match="has no labels"):
        fewshot(demo, unlabelled, test_data=test)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--shots", "0"], "--shots must be positive integers"),
        (["--l2", "0"], "--l2 must be a positive number or 'auto'"),
        (["--layer", "9"], "--layer: layer 9 is out of range"),
        (["--layer", "0", "--feature", "pre-logits"], "--layer [0] need feature cls or mean-patch: pre-logits"),
        (["--feature", "mean"], "--feature must be one of"),
    ],
)
def test_the_cli_speaks_the_flag(tmp_path, args, needle):
    out = tmp_path / "out"
    cli = CliRunner().invoke(app, ["fewshot", "--device", "cpu", "--no-cache", *args, "--out", str(out)])
    assert_one_line_error(cli, 2, needle)
    assert not out.exists()


def test_cli_json_and_files_are_the_results(result, tmp_path):
    args = ["fewshot", "--device", "cpu", "--num-images", str(NUM_IMAGES), "--shots", "1,5", "--seeds", "2"]
    cli = CliRunner().invoke(app, [*args, "--no-cache", "--out", str(tmp_path), "--json"])
    assert cli.exit_code == 0, cli.output
    printed = json.loads(cli.stdout)
    assert list(printed) == [*result.to_dict(), "files", "meta"]
    assert printed["meta"]["command"] == "fewshot" and printed["meta"]["solve_seconds"] >= 0
    assert {k: printed[k] for k in result.to_dict()} == result.to_dict()
    assert load_result(tmp_path) == result


def test_registered_and_run_by_the_report(demo, result, tmp_path):
    assert get("fewshot") is DEFINITION and DEFINITION.compute is fewshot
    assert DEFINITION.result is FewShotProbeResult and DEFINITION.needs_data
    opened = []

    def run_open(spec, *, split, num_images, require_labels=False):
        opened.append((spec, split, num_images))  # the report opens whole splits; a subset keeps this test fast
        return open_dataset(spec, demo, split=split, num_images=NUM_IMAGES, require_labels=require_labels)

    common = {"vit": demo, "shots": (1, 5), "seeds": 2, "l2": 1024.0, "batch_size": None, "open": run_open}
    run = SimpleNamespace(**common, data="digits", cache_dir=None, use_cache=False)
    assert DEFINITION.section(run) == result and opened == [("digits", "train", None), ("digits", "test", None)]

    (tmp_path / "loose").mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / "loose" / "0.png")
    with pytest.raises(NotApplicable, match="has no labels"):
        DEFINITION.section(SimpleNamespace(**common, data=str(tmp_path / "loose"), cache_dir=None, use_cache=False))


# --------------------------------------------------------------------------------------------------------------
# The k-NN probe beside the ridge probe (probe="knn" | "both")

KNN = {**FAST, "knn_k": (1, 10, 20)}


@pytest.fixture(scope="module")
def both(demo):
    return fewshot(demo, "digits", probe="both", **KNN)


def test_both_is_the_ridge_result_plus_the_knn_of_the_same_features(demo, splits, result, both):
    from vitlens.analysis.knn import fewshot_knn

    pool, test = splits
    assert dataclasses.replace(both, knn=None) == result and both.probe_kind == "both"
    expected = fewshot_knn(
        extract_features(demo, pool),
        pool.labels,
        extract_features(demo, test),
        test.labels,
        shots=(1, 5),
        seeds=2,
        k=(1, 10, 20),
    )
    np.testing.assert_array_equal(both.knn.accuracy, expected.accuracy)
    np.testing.assert_array_equal(both.knn.k_used, [[1, 10, 10], [1, 10, 20]])  # 1 shot x 10 classes: a pool of 10
    assert both.knn.temperature == 0.07 and both.knn.layers == result.probe.layers
    text = both.summary()
    assert text.startswith(result.summary() + "; k-NN ") and "best k=" in text
    numbers = both.key_numbers()
    assert numbers["mean_accuracy"] == result.key_numbers()["mean_accuracy"] and numbers["knn_k"] in (1, 10, 20)


def test_knn_alone_and_both_save_and_read_back_equal(demo, both, tmp_path):
    files = both.save(tmp_path / "both", meta={"command": "test"})
    assert [f.name for f in files] == ["fewshot.csv", "fewshot-knn.csv", "fewshot.json", "fewshot.png"]
    saved = json.loads((tmp_path / "both" / "fewshot.json").read_text())
    assert saved["probe"] == "both" and saved["knn"]["k"] == [1, 10, 20] and saved["knn"]["temperature"] == 0.07
    row = saved["knn"]["results"][1]  # the first layer, 1 shot, k = 10
    assert {k: row[k] for k in ("shots", "k", "k_used")} == {"shots": 1, "k": 10, "k_used": 10}
    rows = (tmp_path / "both" / "fewshot-knn.csv").read_text().splitlines()
    assert rows[0] == "shots,layer,seed,k,k_used,accuracy" and len(rows) == 1 + 2 * 1 * 2 * 3
    assert load_result(tmp_path / "both") == both

    alone = fewshot(demo, "digits", probe="KNN", **KNN)
    assert alone.probe is None and dataclasses.replace(alone, probe=both.probe) == both and alone.probe_kind == "knn"
    assert alone.summary().startswith("5-shot k-NN accuracy ")
    assert "mean_accuracy" not in alone.key_numbers() and "knn_mean_accuracy" in alone.key_numbers()
    files = alone.save(tmp_path / "knn", fmt="svg")
    assert [f.name for f in files] == ["fewshot-knn.csv", "fewshot.json", "fewshot.svg"]
    saved = json.loads((tmp_path / "knn" / "fewshot.json").read_text())
    assert "results" not in saved and saved["probe"] == "knn" and saved["num_train"] == alone.knn.num_train
    back = load_result(tmp_path / "knn")
    assert back == alone and back != both
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    assert alone.plot(ax=ax) is ax and len(ax.lines) == 3 + 1  # one line per k, chance
    assert len(both.figure().axes) == 2  # the ridge panel and the k-NN panel


def test_shots_all_is_the_whole_pool_in_one_draw(demo, splits):
    from vitlens.analysis.fewshot import class_counts
    from vitlens.analysis.knn import fewshot_knn

    pool, test = splits
    full = fewshot(demo, pool, test_data=test, shots="all", probe="both", knn_k=(10, 200), use_cache=False)
    largest = int(class_counts(pool.labels, 10).max())
    assert full.full_pool and full.probe.shots == full.knn.shots == (largest,) and full.knn.seeds == (0,)
    np.testing.assert_array_equal(full.knn.k_used, [[10, len(pool)]])  # 200 capped at the whole pool
    feats = extract_features(demo, pool), extract_features(demo, test)
    whole = fewshot_knn(
        feats[0], pool.labels, feats[1], test.labels, shots=(largest,), seeds=1, k=(10, 200), allow_fewer=True
    )
    np.testing.assert_array_equal(full.knn.accuracy, whole.accuracy)
    # The k-NN on the whole pool, written out: every pool image is a candidate neighbour.
    (x,), (q,) = feats[0].values(), feats[1].values()  # the one layer: pre-logits
    x, q = torch.nn.functional.normalize(x.double(), dim=-1), torch.nn.functional.normalize(q.double(), dim=-1)
    sim = q @ x.T  # [M, N]
    top, idx = sim.topk(10, dim=-1)
    votes = torch.zeros(len(q), 10, dtype=torch.float64).scatter_add_(
        1, torch.as_tensor(pool.labels)[idx], (top / 0.07).exp()
    )
    assert full.knn.accuracy[0, 0, 0, 0] == pytest.approx((votes.argmax(1).numpy() == test.labels).mean(), abs=1e-12)
    assert full.probe.short_classes == {} and full.summary().startswith("full-pool accuracy ")
    assert full.to_dict()["full_pool"] is True


def test_the_knn_reads_the_feature_cache(demo, splits, tmp_path, monkeypatch):
    from vitlens.models import ViT

    pool, test = splits
    calls = [0]
    original = ViT.features

    def counting(self, images):
        calls[0] += 1
        return original(self, images)

    monkeypatch.setattr(ViT, "features", counting)
    options = {"test_data": test, "shots": (1, 5), "seeds": 2, "cache_dir": tmp_path}
    first = fewshot(demo, pool, **options)
    passes = calls[0]
    assert passes > 0 and first.cache == {"train": "miss", "test": "miss"}
    again = fewshot(demo, pool, probe="both", **options)
    assert calls[0] == passes and again.cache == {"train": "hit", "test": "hit"}  # no second extraction
    np.testing.assert_array_equal(again.probe.accuracy, first.probe.accuracy)
    assert len(list(tmp_path.glob("features-*.npz"))) == 2


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({"probe": "svm"}, "probe", "probe must be one of lsr, knn, both, not 'svm'"),
        ({"probe": None}, "probe", "probe must be one of lsr, knn, both"),
        ({"knn_k": "10,x"}, "knn_k", "knn_k must be positive integers"),
        ({"knn_k": (0,)}, "knn_k", "knn_k must be positive integers"),
        ({"knn_temperature": 0}, "knn_temperature", "knn_temperature must be a positive number"),
        ({"shots": "al"}, "shots", "shots must be positive integers"),
    ],
)
def test_bad_knn_options_name_their_parameter(demo, kwargs, param, needle):
    with pytest.raises(ParameterError, match=needle) as info:
        fewshot(demo, "digits", **{**FAST, **kwargs})
    assert info.value.param == param
