"""`vitlens cka` end to end on tiny checkpoints: one model and two, its files and JSON, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, fixture_checkpoint, native_kwargs
from vitlens.cli.app import app
from vitlens.data import open_dataset
from vitlens.definitions.cka import cka
from vitlens.models import load_vit

runner = CliRunner()
FILES = ["cka.csv", "cka.json", "cka.npz", "cka.png"]


def _run(*args: str):
    return runner.invoke(app, ["cka", *args])


@pytest.mark.parametrize(("name", "tokens"), [("reg", "all"), ("nonsquare", "all"), ("gap", "mean-patch")])
def test_one_model_end_to_end(tmp_path, name, tokens):
    ckpt, args = fixture_checkpoint(tmp_path, name)
    out = tmp_path / "out"
    result = _run(ckpt, *args, "--num-images", "6", "--minibatch-size", "4", "--tokens", tokens, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == FILES
    data = json.loads((out / "cka.json").read_text())
    assert data["layers_a"] == data["layers_b"] == [0, 1] and data["tokens"] == tokens
    assert data["num_images"] == 4 and data["minibatch_size"] == 4  # the 2 left over do not fill a minibatch
    assert "do not fill a minibatch of 4" in result.stderr
    assert "linear CKA" in result.stdout and "mean CKA of adjacent layers" in result.stdout
    vit = load_vit(ckpt, **native_kwargs(name))
    expected = cka(vit, open_dataset("digits", vit.preprocess, num_images=6), tokens=tokens, minibatch_size=4)
    np.testing.assert_allclose(data["cka"], expected.cka.matrix, atol=1e-12)


def test_two_models_json(tmp_path):
    ckpt, args = fixture_checkpoint(tmp_path, "cls")
    out = tmp_path / "out"
    # The model options (--num-heads) apply to MODEL; MODEL_B (the demo) is loaded with the loader's defaults.
    result = _run(ckpt, "demo", *args, "--num-images", "8", "--tokens", "cls", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    for key in ("cka", "layers_a", "layers_b", "tokens", "num_images", "minibatch_size"):
        assert key in printed
    assert printed["layers_a"] == [0, 1] and printed["layers_b"] == [0, 1, 2, 3]
    assert np.asarray(printed["cka"]).shape == (2, 4) and printed["sources"] == [ckpt, "demo"]
    assert printed["minibatch_size"] == 8 and printed["num_images"] == 8
    csv = (out / "cka.csv").read_text().splitlines()
    assert csv[0] == "layer_a,layer_b_0,layer_b_1,layer_b_2,layer_b_3" and len(csv) == 3
    vit, demo = load_vit(ckpt, **native_kwargs("cls")), load_vit("demo", device="cpu")
    expected = cka(vit, open_dataset("digits", vit.preprocess, num_images=8), demo, tokens="cls")
    np.testing.assert_allclose(printed["cka"], expected.cka.matrix, atol=1e-12)


@pytest.mark.parametrize(
    ("model", "model_b", "flags", "needle"),
    [
        ("cls", "demo", ["--tokens", "all"], "--tokens 'all' pairs patches by grid position"),
        ("gap", None, ["--tokens", "cls"], "--tokens 'cls' needs a class token"),
        ("cls", None, ["--tokens", "pixels"], "--tokens must be one of cls, mean-patch, all"),
        ("cls", None, ["--minibatch-size", "3"], "--minibatch-size must be an integer of at least 4"),
        ("cls", None, ["--layer", "a,b"], "--layer must be comma-separated integers"),
        ("cls", None, ["--layer", "7"], "--layer: layer 7 is out of range"),
        ("cls", "demo", ["--layer-b", "9"], "--layer-b: layer 9 is out of range"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, model, model_b, flags, needle):
    ckpt, args = fixture_checkpoint(tmp_path, model)
    extra = [] if model_b is None else [model_b]
    result = _run(ckpt, *extra, *args, "--num-images", "4", "--out", str(tmp_path / "out"), *flags)
    assert_one_line_error(result, 2, needle)
    assert not (tmp_path / "out" / "cka.json").exists()
