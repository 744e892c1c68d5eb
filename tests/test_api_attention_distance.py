"""``vitlens.attention_distance`` on the demo model and 8 digits: the numbers are the driver's, a spec string is
opened as the CLI opens it, bad options name their parameter, and the result draws, saves, reads back and prints
what the CLI command does."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error
from vitlens import defaults
from vitlens.attention import mean_attention_distance_for
from vitlens.cli.app import app
from vitlens.data import open_dataset
from vitlens.definitions.attention_distance import DEFINITION, AttentionDistanceResult, attention_distance
from vitlens.errors import ParameterError
from vitlens.registry import get
from vitlens.result import load_result

NUM_IMAGES = 8


@pytest.fixture(scope="module")
def dataset(demo):
    return open_dataset("digits", demo.preprocess, split="test", num_images=NUM_IMAGES)


@pytest.fixture(scope="module")
def result(demo, dataset):
    return attention_distance(demo, dataset)


def test_the_numbers_are_the_drivers(demo, dataset, result):
    expected = mean_attention_distance_for(demo, dataset)
    assert isinstance(result, AttentionDistanceResult)
    np.testing.assert_array_equal(result.distance.distance_px, expected.distance_px)
    np.testing.assert_array_equal(result.distance.prefix_mass, expected.prefix_mass)
    assert result.distance.num_images == NUM_IMAGES and result.distance.renormalized is True
    assert result.data == dataset.spec and result.source == demo.source
    assert (result.depth, result.num_heads) == (demo.depth, demo.num_heads) == result.distance.distance_px.shape
    assert result.prefix_tokens == tuple(demo.layout.prefix_kinds)
    key = result.key_numbers()
    assert key["num_images"] == NUM_IMAGES and key["data"] == dataset.spec
    np.testing.assert_allclose(key["mean_px_by_layer"], expected.distance_px.mean(axis=1))


def test_a_spec_string_is_opened_with_split_and_num_images(demo, result, monkeypatch):
    assert attention_distance(demo, "digits", num_images=NUM_IMAGES, split="test") == result
    monkeypatch.setattr(defaults, "ATTENTION_DISTANCE_NUM_IMAGES", 3)  # the paper's 128 when not patched
    assert attention_distance(demo, "digits").distance.num_images == 3


def test_options_reach_the_driver(demo, dataset, result):
    calls = []
    raw = attention_distance(demo, dataset, batch_size=3, renormalize=False, progress=lambda *a: calls.append(a))
    assert raw.distance.renormalized is False and calls[-1] == (NUM_IMAGES, NUM_IMAGES)
    np.testing.assert_allclose(raw.distance.prefix_mass, result.distance.prefix_mass, rtol=1e-6)  # not renormalised
    assert raw != result


def test_plot_and_figure(result):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    assert isinstance(result.plot(), Axes) and isinstance(result.figure(), Figure)
    fig = Figure()
    ax = fig.add_subplot()
    assert result.plot(ax=ax) is ax and ax.collections  # one scatter per head


def test_save_writes_the_cli_files_and_reads_back_equal(result, tmp_path):
    files = result.save(tmp_path, meta={"command": "test"})
    names = ["attention_distance.csv", "attention_distance.json", "attention_distance.npz", "attention_distance.png"]
    assert sorted(f.name for f in files) == names
    saved = json.loads((tmp_path / "attention_distance.json").read_text())
    assert saved.pop("meta") == {"command": "test"}
    assert list(saved) == list(result.to_dict()) and saved == result.to_dict()
    rows = (tmp_path / "attention_distance.csv").read_text().splitlines()
    assert rows[0] == "layer,head,mean_px,std_px,prefix_mass" and len(rows) == 1 + result.depth * result.num_heads
    back = load_result(tmp_path)
    assert isinstance(back, AttentionDistanceResult) and back == result
    assert back != dataclasses.replace(result, data="other")


def test_repr_summary_and_html(result):
    text = repr(result)
    assert "\n" not in text and text.startswith("<AttentionDistanceResult attention-distance: layer 0: ")
    assert f"{NUM_IMAGES} images)" in text
    assert "<img" in result._repr_html_()


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({"data": "digits", "num_images": 0}, "num_images", "num_images must be a positive number, not 0"),
        ({"num_images": 4}, "num_images", "num_images applies to a data spec"),
        ({"batch_size": 0}, "batch_size", "batch_size must be at least 1, not 0"),
        ({"data": "digits", "split": "validation"}, "split", "split must be one of"),
    ],
)
def test_bad_options_name_their_parameter(demo, dataset, kwargs, param, needle):
    kwargs = {"data": dataset, **kwargs}
    with pytest.raises(ParameterError, match=needle) as info:
        attention_distance(demo, **kwargs)
    assert isinstance(info.value, ValueError) and info.value.param == param


def test_the_cli_speaks_the_flag(tmp_path):
    out = tmp_path / "out"
    cli = CliRunner().invoke(app, ["attention-distance", "--device", "cpu", "--num-images", "0", "--out", str(out)])
    assert_one_line_error(cli, 2, "--num-images must be a positive number, not 0")
    assert not out.exists()


def test_cli_json_and_files_are_the_results(result, tmp_path):
    args = ["attention-distance", "--device", "cpu", "--num-images", str(NUM_IMAGES), "--out", str(tmp_path)]
    cli = CliRunner().invoke(app, [*args, "--json"])
    assert cli.exit_code == 0, cli.output
    printed = json.loads(cli.stdout)
    assert list(printed) == [*result.to_dict(), "files", "meta"]
    assert printed["meta"]["batch_size"] >= 1 and printed["meta"]["command"] == "attention-distance"
    assert {k: printed[k] for k in result.to_dict()} == result.to_dict()
    assert load_result(tmp_path) == result


def test_registered_and_run_by_the_report(demo, dataset, result):
    assert get("attention-distance") is DEFINITION and DEFINITION.compute is attention_distance
    assert DEFINITION.result is AttentionDistanceResult and DEFINITION.needs_data
    opened = []

    def run_open(spec, *, split, num_images):
        opened.append((spec, split, num_images))
        return open_dataset(spec, demo.preprocess, split=split, num_images=num_images)

    run = SimpleNamespace(vit=demo, data="digits", split="test", num_images=NUM_IMAGES, batch_size=None, open=run_open)
    assert DEFINITION.section(run) == result and opened == [("digits", "test", NUM_IMAGES)]
