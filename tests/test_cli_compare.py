"""`vitlens compare` end to end on a tiny run folder: files written, `--json`, one-line errors, nothing half-written."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tests.conftest import assert_one_line_error
from tests.test_compare import make_run
from vitlens.cli.app import app

runner = CliRunner()
FAST = ["--num-images", "8", "--fewshot-num-images", "40", "--shots", "1,2", "--seeds", "1", "--device", "cpu"]
FILES = {"cache", "compare.csv", "index.html", "report.md", "summary.json"}


def _run(*args: str):
    return runner.invoke(app, ["compare", *args])


def test_run_folder_files_and_json(tmp_path):
    run = make_run(tmp_path / "run", (1, 2), final=3)
    out = tmp_path / "out"
    result = _run(str(run), *FAST, "--analyses", "pos-sim,attention-distance,cka", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["x"] == "epoch" and [m["epoch"] for m in summary["models"]] == [1, 2, 3]
    assert summary["analyses"] == ["pos-sim", "attention-distance", "cka"] and summary["meta"]["command"] == "compare"
    figures = {"compare_pos_sim.png", "compare_attention_distance.png", "compare_cka.png"}
    assert {p.name for p in out.iterdir()} == FILES | figures
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "epoch" in html
    assert "![cka](compare_cka.png)" in (out / "report.md").read_text()
    rows = (out / "compare.csv").read_text().splitlines()
    assert rows[0] == "model,epoch,analysis,quantity,layer,value" and rows[1].startswith("epoch 1,1,pos-sim,")
    # The cache holds each analysis's own files, readable by load_result.
    from vitlens import load_result

    entry = out / summary["models"][0]["cache"]["cka"]
    assert load_result(entry, "cka").cka.matrix.shape == (4, 4)
    # A rerun reads everything from the cache.
    again = _run(str(run), *FAST, "--analyses", "pos-sim,attention-distance,cka", "--out", str(out))
    assert again.exit_code == 0, again.output
    assert "9 result(s) read from the cache" in " ".join(again.stdout.split())


def test_one_line_errors_and_nothing_written(tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    assert_one_line_error(_run(str(empty), *FAST, "--out", str(out)), 2, "holds no checkpoints")
    run = make_run(tmp_path / "run", (1,), final=2)
    assert_one_line_error(_run(str(run), *FAST, "--analyses", "cka,bogus", "--out", str(out)), 2, "--analyses")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    assert_one_line_error(_run(str(run / "model.safetensors"), str(bad), *FAST, "--out", str(out)), 1, "bad")
    assert not out.exists()
