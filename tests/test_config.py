"""Project defaults: vitlens.toml / [tool.vitlens] < VITLENS_* variables < command-line flags."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error
from vitlens.cli.app import app
from vitlens.config import load_settings
from vitlens.errors import UsageError

runner = CliRunner()
ENV = ("VITLENS_MODEL", "VITLENS_DATA", "VITLENS_OUT", "VITLENS_DEVICE")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ENV:
        monkeypatch.delenv(var, raising=False)


def test_defaults_without_file_or_env(tmp_path):
    settings = load_settings(tmp_path, env={})
    assert settings.file is None and settings.commands == {}
    assert settings.values["model"] == "demo" and settings.values["data"] == "digits"
    assert set(settings.sources.values()) == {"default"}


def test_file_then_env_with_provenance(tmp_path):
    path = tmp_path / "vitlens.toml"
    path.write_text('model = "a.pth"\ndevice = "cpu"\n[fewshot]\nshots = "1,5"\nnum-images = 20\n')
    settings = load_settings(tmp_path, env={"VITLENS_MODEL": "b.pth"})
    assert settings.file == path
    assert settings.values["model"] == "b.pth" and settings.sources["model"] == "env VITLENS_MODEL"
    assert settings.values["device"] == "cpu" and settings.sources["device"] == str(path)
    assert settings.commands == {"fewshot": {"shots": "1,5", "num_images": 20}}
    assert settings.sources["fewshot.num_images"] == str(path)


def test_nearest_pyproject_with_the_table_is_found_from_a_subfolder(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.vitlens]\ndata = "cifar10"\n')
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    (tmp_path / "a" / "pyproject.toml").write_text('[project]\nname = "inner"\n')  # no table: skipped
    settings = load_settings(sub, env={})
    assert settings.values["data"] == "cifar10" and settings.file == tmp_path / "pyproject.toml"


def test_unknown_keys_are_errors_naming_the_file(tmp_path):
    path = tmp_path / "vitlens.toml"
    path.write_text("colour = 1\n")
    with pytest.raises(UsageError, match="vitlens.toml.*colour"):
        load_settings(tmp_path, env={})
    path.write_text("[fewshot]\nshots = 1\n")
    with pytest.raises(UsageError, match="bogus"):
        load_settings(tmp_path, env={}, commands={"bogus": {}, "other": {}})


def _attention_distance(*args: str) -> dict:
    result = runner.invoke(app, ["attention-distance", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_precedence_file_env_flag_through_the_cli(tmp_path, monkeypatch):
    (tmp_path / "vitlens.toml").write_text('out = "from-file"\ndevice = "cpu"\n[attention-distance]\nnum-images = 5\n')
    got = _attention_distance()
    assert got["num_images"] == 5 and got["meta"]["device"] == "cpu"
    assert (tmp_path / "from-file" / "attention_distance.json").is_file()

    monkeypatch.setenv("VITLENS_OUT", "from-env")
    got = _attention_distance()
    assert (tmp_path / "from-env" / "attention_distance.json").is_file() and got["num_images"] == 5

    got = _attention_distance("--out", "from-flag", "--num-images", "3")
    assert got["num_images"] == 3 and (tmp_path / "from-flag" / "attention_distance.json").is_file()


def test_pyproject_table_per_command_option(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.vitlens]\ndevice = "cpu"\n[tool.vitlens.attention-distance]\nnum_images = 4\n'
    )
    assert _attention_distance()["num_images"] == 4


def test_configured_model_is_the_default_model_argument(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLENS_MODEL", str(tmp_path / "missing.pth"))
    assert_one_line_error(runner.invoke(app, ["info", "--device", "cpu"]), 1, "missing.pth")
    result = runner.invoke(app, ["info", "demo", "--device", "cpu", "--json"])  # the argument wins
    assert result.exit_code == 0 and json.loads(result.stdout)["source"] == "demo"


def test_config_command_shows_sources(tmp_path, monkeypatch):
    (tmp_path / "vitlens.toml").write_text('data = "cifar10"\n[fewshot]\nshots = "1,5"\n')
    monkeypatch.setenv("VITLENS_DEVICE", "cpu")
    result = runner.invoke(app, ["config", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    rows = {row["key"]: row for row in got["settings"]}
    assert got["file"] == str(tmp_path / "vitlens.toml")
    assert rows["data"] == {"key": "data", "value": "cifar10", "source": str(tmp_path / "vitlens.toml")}
    assert rows["device"]["source"] == "env VITLENS_DEVICE"
    assert rows["model"] == {"key": "model", "value": "demo", "source": "default"}
    assert rows["fewshot.shots"]["value"] == "1,5"
    table = runner.invoke(app, ["config"])
    assert table.exit_code == 0 and "env VITLENS_DEVICE" in table.stdout and "fewshot.shots" in table.stdout


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("model = \n", "not valid TOML"),
        ("colour = 1\n", "unknown key 'colour'"),
        ("[heatmap]\nx = 1\n", "unknown command table 'heatmap'"),
        ("[fewshot]\nshotz = 1\n", "has no option 'shotz'"),
    ],
)
def test_bad_configuration_is_one_line_exit_2(tmp_path, text, needle):
    (tmp_path / "vitlens.toml").write_text(text)
    result = runner.invoke(app, ["info", "--device", "cpu"])
    assert_one_line_error(result, 2, needle)
    assert "vitlens.toml" in result.stderr


def test_env_beats_a_command_table_value(tmp_path, monkeypatch):
    (tmp_path / "vitlens.toml").write_text('device = "cpu"\n[attention-distance]\nout = "table"\nnum-images = 2\n')
    _attention_distance()
    assert (tmp_path / "table" / "attention_distance.json").is_file()
    monkeypatch.setenv("VITLENS_OUT", "env")
    _attention_distance()
    assert (tmp_path / "env" / "attention_distance.json").is_file()
