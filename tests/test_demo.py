"""The embedded demo model: it loads offline, every command runs on it by default, and it shows the phenomena."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from vitlens.cli.app import app
from vitlens.models import load_vit
from vitlens.models.checkpoint import read_checkpoint
from vitlens.models.load import demo_checkpoint_path

runner = CliRunner()


def test_demo_ships_small_with_its_metadata():
    path = demo_checkpoint_path()
    assert path.exists() and path.stat().st_size < 5 * 2**20
    meta = read_checkpoint(path).metadata
    assert meta["data"] == "digits" and meta["test_acc"] >= 0.95
    assert meta["class_names"] == [str(i) for i in range(10)]


def test_info_demo_is_the_default():
    explicit = runner.invoke(app, ["info", "demo", "--json", "--device", "cpu"])
    default = runner.invoke(app, ["info", "--json", "--device", "cpu"])
    assert explicit.exit_code == default.exit_code == 0, explicit.output
    a, b = json.loads(explicit.stdout), json.loads(default.stdout)
    assert a["source"] == b["source"] == "demo"
    assert a["grid_size"] == [8, 8] and a["patch_size"] == [4, 4] and a["in_chans"] == 1 and not a["guessed"]


def test_demo_position_embeddings_have_2d_structure():
    from vitlens.analysis import position_similarity

    vit = load_vit("demo", device="cpu")
    sim = position_similarity(vit.position_embedding(), vit.layout)
    by_d = sim.similarity_by_distance
    assert by_d[0] > by_d[1] > by_d[2] > by_d[3]  # neighbours more alike than positions further away
    assert sim.row_col_score > 0.1 and sim.neighbour_minus_far > 0.3


@pytest.mark.parametrize(
    ("command", "files"),
    [
        (["filters"], ["filters.png", "filters.npz", "filters.json"]),
        (["pos-sim"], ["pos_sim.png", "pos_sim.npz", "pos_sim.json"]),
        (["attention-distance", "--num-images", "32"], ["attention_distance.png", "attention_distance.csv"]),
        (["rollout", "--data", "digits", "--num-images", "4"], ["rollout.png", "rollout.npz", "rollout.json"]),
    ],
)
def test_every_command_runs_on_the_demo_by_default(tmp_path, command, files):
    result = runner.invoke(app, [*command, "--device", "cpu", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["meta"]["vitlens_version"]
    for name in files:
        assert (tmp_path / name).stat().st_size > 0, name
    if command[0] == "attention-distance":
        distance = np.asarray(data["distance_px"])
        assert distance.shape == (4, 8) and np.all(distance > 0) and np.all(distance < 32 * np.sqrt(2))
