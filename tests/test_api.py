"""The flat public API (``import vitlens``), the registry every caller loops over, the result objects' common
contract, and library errors that speak parameters."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import vitlens
from vitlens.cli.app import app
from vitlens.errors import ParameterError, VitlensError
from vitlens.result import Result, load_result


def test_lists_its_analyses_and_names():
    # That `import vitlens` and the listing stay torch-free is checked in test_imports.py.
    names = ["filters", "pos-sim", "attention-distance", "tokens", "rollout", "explain", "features", "fewshot", "cka"]
    assert [d.name for d in vitlens.analyses()] == names
    for name in vitlens.__all__:
        assert getattr(vitlens, name) is not None, name
    with pytest.raises(AttributeError):
        vitlens.no_such_name  # noqa: B018


def test_every_definition_has_a_public_function_and_result_type():
    for definition in vitlens.analyses():
        assert issubclass(definition.result, Result) and definition.result.analysis == definition.name
        assert getattr(vitlens, definition.compute.__name__) is definition.compute
        assert definition.compute.__doc__ and "Args:" in definition.compute.__doc__


def test_filters_result_contract(demo, tmp_path):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    result = vitlens.filters(demo, num_components=5)
    assert isinstance(result.plot(), Axes) and isinstance(result.figure(), Figure)
    fig = Figure()
    ax = fig.add_subplot()
    assert result.plot(ax=ax) is ax
    files = result.save(tmp_path)
    assert sorted(f.name for f in files) == ["filters.json", "filters.npz", "filters.png"]
    saved = json.loads((tmp_path / "filters.json").read_text())
    assert saved == result.to_dict()
    back = load_result(tmp_path)
    assert back == result and back != vitlens.filters(demo, num_components=4)
    assert (back == "filters") is False  # other types compare unequal, never raise
    assert "\n" not in repr(result) and repr(result).startswith("<FiltersResult filters: 5 components explain")
    assert "<img" in result._repr_html_()


def test_load_result_errors_name_parameters(tmp_path):
    with pytest.raises(ParameterError, match="holds no a saved analysis|holds no"):
        load_result(tmp_path)
    with pytest.raises(ParameterError, match="analysis must be one of"):
        load_result(tmp_path, analysis="nope")


def test_parameter_errors_are_value_errors_and_become_flags_in_the_cli(demo):
    with pytest.raises(ValueError, match="num_components must be at least 1"):
        vitlens.filters(demo, num_components=0)
    assert issubclass(ParameterError, VitlensError)
    result = CliRunner().invoke(app, ["filters", "--components", "0", "--device", "cpu", "--out", "/tmp/x"])
    assert result.exit_code == 2 and "--components must be at least 1" in result.stderr
    with pytest.raises(ParameterError, match="fmt must be one of"):
        vitlens.filters(demo).save("/tmp/never", fmt="gif")


def test_register_refuses_a_dataclass_that_replaced_eq_or_repr():
    from dataclasses import dataclass

    from vitlens.registry import Definition, register

    @dataclass(frozen=True)
    class Bad(Result):
        x: int = 0

    with pytest.raises(RuntimeError, match="repr=False, eq=False"):
        register(Definition("bad", "bad", "", Bad, lambda: Bad(), lambda run: Bad(), False, 99, "x:y"))


def test_every_payload_names_the_prefix_tokens(demo, tmp_path):
    with pytest.raises(ParameterError, match="too few images per class") as info:
        vitlens.fewshot(demo, vitlens.open_dataset("digits", demo, num_images=20))  # 2 per class: none held out
    assert info.value.param == "test_data"
    data = vitlens.open_dataset("digits", demo, num_images=50)
    results = [
        vitlens.filters(demo),
        vitlens.pos_sim(demo),
        vitlens.attention_distance(demo, data),
        vitlens.tokens(demo, data),
        vitlens.rollout(demo, data),
        vitlens.explain(demo, data),
        vitlens.features_pca(demo, data),
        vitlens.fewshot(demo, data, shots=(1,), seeds=1, use_cache=False),
        vitlens.cka(demo, data),
    ]
    assert {r.analysis for r in results} == {d.name for d in vitlens.analyses()}
    for result in results:
        assert result.to_dict()["prefix_tokens"] == list(demo.layout.prefix_kinds) == ["cls"], result.analysis
        result.save(tmp_path / result.analysis)
        assert vitlens.load_result(tmp_path / result.analysis) == result
