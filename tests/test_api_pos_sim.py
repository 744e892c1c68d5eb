"""``vitlens.pos_sim`` on the demo model: the numbers are the analysis's, and the result draws, saves, reads back and
prints what the CLI command does."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error
from vitlens.analysis.pos_sim import position_similarity
from vitlens.cli.app import app
from vitlens.definitions.pos_sim import DEFINITION, PosSimResult, pos_sim
from vitlens.errors import ParameterError, VitlensError
from vitlens.registry import get
from vitlens.result import load_result


@pytest.fixture(scope="module")
def result(demo):
    return pos_sim(demo)


def test_the_numbers_are_the_analysis_of_the_models_embedding(demo, result):
    expected = position_similarity(demo.position_embedding(), demo.layout)
    assert isinstance(result, PosSimResult)
    np.testing.assert_array_equal(result.sim.similarity, expected.similarity)
    np.testing.assert_array_equal(result.sim.similarity_by_distance, expected.similarity_by_distance)
    assert result.sim.row_col_score == expected.row_col_score
    assert (result.source, result.arch) == (demo.source, demo.arch)
    assert result.img_size == tuple(demo.layout.img_size) and result.patch_size == tuple(demo.layout.patch_size)
    key = result.key_numbers()
    assert key == {k: result.to_dict()[k] for k in ("grid_size", "row_col_score", "neighbour_minus_far")}


def test_plot_and_figure(result):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    assert isinstance(result.plot(), Axes) and isinstance(result.figure(), Figure)
    fig = Figure()
    ax = fig.add_subplot()
    assert result.plot(ax=ax) is ax and ax.images  # the mosaic is drawn into the Axes given


def test_save_writes_the_cli_files_and_reads_back_equal(result, tmp_path):
    files = result.save(tmp_path, meta={"command": "test"})
    assert sorted(f.name for f in files) == ["pos_sim.json", "pos_sim.npz", "pos_sim.png"]
    saved = json.loads((tmp_path / "pos_sim.json").read_text())
    assert saved.pop("meta") == {"command": "test"}
    assert list(saved) == list(result.to_dict()) and saved == result.to_dict()
    assert saved["similarity_file"] == "pos_sim.npz" and "similarity" not in saved
    back = load_result(tmp_path)
    assert isinstance(back, PosSimResult) and back == result
    assert back != dataclasses.replace(result, source="other")
    svg = result.save(tmp_path / "svg", fmt="SVG")
    assert [f.name for f in svg][-1] == "pos_sim.svg"


def test_repr_summary_and_html(result):
    text = repr(result)
    assert "\n" not in text and text.startswith("<PosSimResult pos-sim: row/column score +")
    assert result.summary() in text
    assert "<img" in result._repr_html_()


def test_bad_option_names_its_parameter_and_the_cli_its_flag(result, tmp_path):
    with pytest.raises(ParameterError, match="fmt must be one of") as info:
        result.save(tmp_path / "never", fmt="gif")
    assert isinstance(info.value, ValueError) and info.value.param == "fmt"
    assert not (tmp_path / "never").exists()
    cli = CliRunner().invoke(app, ["pos-sim", "--device", "cpu", "--format", "gif", "--out", str(tmp_path / "x")])
    assert_one_line_error(cli, 2, "--format must be one of")


def test_a_nan_position_embedding_is_a_vitlens_error(demo, monkeypatch):
    monkeypatch.setattr(demo, "position_embedding", lambda: demo.model.pos_embed.detach()[0] * float("nan"))
    with pytest.raises(VitlensError, match="NaN/inf"):
        pos_sim(demo)


def test_cli_json_is_the_result_with_the_array_instead_of_its_file(result, tmp_path):
    cli = CliRunner().invoke(app, ["pos-sim", "--device", "cpu", "--out", str(tmp_path), "--json"])
    assert cli.exit_code == 0, cli.output
    printed = json.loads(cli.stdout)
    payload = {k: v for k, v in result.to_dict().items() if k != "similarity_file"}
    assert list(printed) == [*payload, "similarity", "files", "meta"]
    assert {k: printed[k] for k in payload} == payload
    np.testing.assert_array_equal(printed["similarity"], result.sim.similarity)
    assert load_result(tmp_path) == result


def test_registered_and_run_by_the_report(demo, result):
    assert get("pos-sim") is DEFINITION and DEFINITION.compute is pos_sim and DEFINITION.result is PosSimResult
    assert not DEFINITION.needs_data
    assert DEFINITION.section(SimpleNamespace(vit=demo)) == result
