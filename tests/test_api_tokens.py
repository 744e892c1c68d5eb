"""``vitlens.tokens`` on the demo model and 8 digits: a spec string is opened as the CLI opens it, bad options name
their parameter, and the result draws, saves, reads back and prints what the CLI command does."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

import vitlens
from tests.conftest import assert_one_line_error
from vitlens.cli.app import app
from vitlens.data import open_dataset
from vitlens.definitions.tokens import DEFINITION, TokensResult, tokens
from vitlens.errors import ParameterError
from vitlens.registry import get
from vitlens.result import load_result

NUM_IMAGES = 8


@pytest.fixture(scope="module")
def dataset(demo):
    return open_dataset("digits", demo.preprocess, split="test", num_images=NUM_IMAGES)


@pytest.fixture(scope="module")
def result(demo, dataset):
    return tokens(demo, dataset)


def test_result_facts_and_payload(demo, dataset, result):
    assert isinstance(result, TokensResult) and vitlens.tokens is tokens
    t = result.norms
    assert t.num_images == NUM_IMAGES and result.data == dataset.spec and result.source == demo.source
    assert t.layers.tolist() == list(range(demo.depth)) and t.kinds == ("patch", "cls")
    assert (t.histograms.sum(axis=2) == t.num_tokens[:, None]).all()
    assert t.num_tokens.tolist() == [NUM_IMAGES * demo.layout.num_patches, NUM_IMAGES]
    payload = result.to_dict()
    assert payload["num_images"] == NUM_IMAGES and payload["prefix_tokens"] == ["cls"]
    layer = payload["layers"][-1]
    for key in ("norm_mean", "norm_quantiles", "outlier_fraction", "images_with_outliers", "sink_share_cls"):
        assert key in layer
    assert layer["neighbour_similarity_normal"] == pytest.approx(float(t.neighbour_similarity_normal[-1]))
    assert -1 <= layer["neighbour_similarity_normal"] <= 1
    assert list(layer["norm_quantiles"]["patch"]) == ["0.5", "0.9", "0.99", "max"]
    q = layer["norm_quantiles"]["patch"]
    assert q["0.5"] <= q["0.9"] <= q["0.99"] <= q["max"]
    key = result.key_numbers()
    assert key["num_images"] == NUM_IMAGES and len(key["outlier_fraction_by_layer"]) == demo.depth


def test_a_spec_string_is_opened_with_split_and_num_images(demo, result):
    assert tokens(demo, "digits", num_images=NUM_IMAGES, split="test") == result


def test_a_number_threshold_is_used_as_given(demo, dataset, result):
    median = float(result.norms.norm_quantiles[0, -1, 0])
    given = tokens(demo, dataset, norm_threshold=median, batch_size=3)
    assert given.norms.threshold == median and not given.norms.threshold_auto
    assert 0.3 < given.norms.outlier_fraction[-1] < 0.7  # about half the patch tokens are above the median
    assert tokens(demo, dataset, norm_threshold=str(median)).norms.threshold == median


def test_progress_counts_both_passes_for_auto(demo, dataset):
    calls = []
    tokens(demo, dataset, batch_size=3, progress=lambda *a: calls.append(a))
    assert calls[0] == (0, 2 * NUM_IMAGES) and calls[-1] == (2 * NUM_IMAGES, 2 * NUM_IMAGES)


def test_plot_and_figure(result):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    assert isinstance(result.plot(), Axes) and isinstance(result.figure(), Figure)
    fig = Figure()
    ax = fig.add_subplot()
    assert result.plot(ax=ax) is ax and ax.lines
    assert len(result.figure().axes) >= 3


def test_save_writes_the_cli_files_and_reads_back_equal(result, tmp_path):
    files = result.save(tmp_path, meta={"command": "test"})
    assert sorted(f.name for f in files) == ["tokens.json", "tokens.npz", "tokens.png"]
    saved = json.loads((tmp_path / "tokens.json").read_text())
    assert saved.pop("meta") == {"command": "test"}
    assert saved == result.to_dict()
    back = load_result(tmp_path)
    assert isinstance(back, TokensResult) and back == result
    assert back != dataclasses.replace(result, data="other")
    with np.load(tmp_path / "tokens.npz") as npz:
        np.testing.assert_array_equal(npz["histograms"], result.norms.histograms)
        np.testing.assert_array_equal(npz["neighbour_similarity_normal"], result.norms.neighbour_similarity_normal)


def test_repr_summary(result):
    text = repr(result)
    assert "\n" not in text and text.startswith("<TokensResult tokens: threshold ")


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({"data": "digits", "num_images": 0}, "num_images", "num_images must be a positive number, not 0"),
        ({"num_images": 4}, "num_images", "num_images applies to a data spec"),
        ({"batch_size": 0}, "batch_size", "batch_size must be at least 1, not 0"),
        ({"layers": [99]}, "layers", "out of range"),
        ({"norm_threshold": "high"}, "norm_threshold", "norm_threshold must be 'auto' or a positive number"),
        ({"data": "digits", "split": "validation"}, "split", "split must be one of"),
        ({"image_layer": 9}, "image_layer", "image_layer must be a layer of the model"),
        ({"images": []}, "images", "images must name at least one image"),
    ],
)
def test_bad_options_name_their_parameter(demo, dataset, kwargs, param, needle):
    kwargs = {"data": dataset, **kwargs}
    with pytest.raises(ParameterError, match=needle) as info:
        tokens(demo, **kwargs)
    assert info.value.param == param


def test_the_cli_speaks_the_flag(tmp_path):
    out = tmp_path / "out"
    cli = CliRunner().invoke(app, ["tokens", "--device", "cpu", "--norm-threshold", "-3", "--out", str(out)])
    assert_one_line_error(cli, 2, "--norm-threshold must be 'auto' or a positive number")


def test_cli_json_and_files_are_the_results(result, tmp_path):
    args = ["tokens", "--device", "cpu", "--num-images", str(NUM_IMAGES), "--out", str(tmp_path)]
    cli = CliRunner().invoke(app, [*args, "--json"])
    assert cli.exit_code == 0, cli.output
    printed = json.loads(cli.stdout)
    assert list(printed) == [*result.to_dict(), "files", "meta"]
    assert printed["meta"]["command"] == "tokens"
    assert {k: printed[k] for k in result.to_dict()} == result.to_dict()
    assert load_result(tmp_path) == result


def test_registered_and_run_by_the_report(demo, dataset, with_images):
    assert get("tokens") is DEFINITION and DEFINITION.compute is tokens and DEFINITION.needs_data
    run = SimpleNamespace(
        vit=demo,
        data="digits",
        split="test",
        num_images=NUM_IMAGES,
        batch_size=None,
        open=lambda spec, *, split, num_images: open_dataset(spec, demo.preprocess, split=split, num_images=num_images),
        open_images=lambda: dataset.subset([1, 5], tag="shown"),
    )
    assert DEFINITION.section(run) == tokens(demo, dataset, images=dataset.subset([1, 5], tag="shown"))


@pytest.fixture(scope="module")
def with_images(demo, dataset):
    return tokens(demo, dataset, images=dataset.subset([1, 5], tag="shown"), norm_threshold=5.5)


def test_per_image_maps_save_and_read_back(demo, dataset, with_images, tmp_path):
    from matplotlib.figure import Figure

    maps = with_images.image_maps
    assert with_images.images == (dataset.names[1], dataset.names[5]) and len(with_images.photos) == 2
    assert maps.layer == demo.depth - 1 and maps.norms.shape == (2, *demo.layout.grid_size)
    assert maps.outliers.any()  # 5.5 is below the demo's largest last-layer norms
    payload = with_images.to_dict()
    assert payload["image_layer"] == demo.depth - 1 and payload["image_query"] == "cls"
    assert [e["name"] for e in payload["images"]] == list(with_images.images)
    assert [e["outliers"] for e in payload["images"]] == maps.outliers.sum(axis=(1, 2)).tolist()
    files = with_images.save(tmp_path)
    assert sorted(f.name for f in files) == ["tokens.json", "tokens.npz", "tokens.png", "tokens_images.png"]
    back = load_result(tmp_path)
    assert back == with_images and back.photos is None
    assert isinstance(back.images_figure(), Figure) and len(back.images_figure().axes) >= 6  # maps without photos
    assert len(with_images.images_figure().axes) >= 8  # a photo column too
    # The statistics over the dataset do not change when images are shown.
    assert dataclasses.replace(with_images, images=(), image_maps=None) == tokens(demo, dataset, norm_threshold=5.5)
    with pytest.raises(ParameterError, match="no per-image maps") as info:
        tokens(demo, dataset, norm_threshold=5.5).images_figure()
    assert info.value.param == "images"


def test_image_layer_picks_the_block(demo, dataset, with_images):
    first = tokens(
        demo, dataset, images=dataset.subset([1, 5], tag="shown"), image_layer=0, norm_threshold=5.5
    ).image_maps
    assert first.layer == 0 and not np.array_equal(first.norms, with_images.image_maps.norms)
