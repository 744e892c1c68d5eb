"""`vitlens report`: every section's files, index.html / report.md / summary.json, and failures that stop nothing."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, cli_args, save_fixture
from vitlens.cli.app import app

runner = CliRunner()

SECTION_FILES = {
    "info": ["info.json"],
    "filters": ["filters.png", "filters.npz", "filters.json"],
    "pos-sim": ["pos_sim.png", "pos_sim.npz", "pos_sim.json"],
    "attention-distance": [
        "attention_distance.png",
        "attention_distance.csv",
        "attention_distance.npz",
        "attention_distance.json",
    ],
    "tokens": ["tokens.png", "tokens.npz", "tokens.json", "tokens_images.png"],
    "rollout": ["rollout.png", "rollout.npz", "rollout.json"],
    "explain": ["explain.png", "explain.npz", "explain.json"],
    "features": ["features.png", "features.npz", "features.json"],
    "fewshot": ["fewshot.png", "fewshot.csv", "fewshot.json"],
    "cka": ["cka.png", "cka.csv", "cka.npz", "cka.json"],
}
REPORT_FILES = ["index.html", "report.md", "summary.json"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No project settings or feature cache from the machine running the tests."""
    monkeypatch.chdir(tmp_path)
    for var in ("VITLENS_MODEL", "VITLENS_DATA", "VITLENS_OUT", "VITLENS_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VITLENS_CACHE_DIR", str(tmp_path / "cache"))


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]


def assert_links_exist(out: Path) -> None:
    """Every src/href of index.html is inline data, an anchor, or a file of ``out``; so is every Markdown link."""
    parser = _Refs()
    parser.feed((out / "index.html").read_text())
    assert parser.refs
    for ref in parser.refs:
        if ref.startswith(("data:image/png;base64,", "#")):
            continue
        assert (out / ref).is_file(), ref
    for ref in re.findall(r"\]\(([^)]+)\)", (out / "report.md").read_text()):
        assert (out / ref).is_file(), ref


def test_default_report_on_the_demo_writes_every_section(tmp_path):
    result = runner.invoke(app, ["report", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # exactly one object on stdout
    out = tmp_path / "vitlens-report"
    assert summary["status"] == "ok" and summary["failed"] == [] and "meta" in summary
    assert list(summary["sections"]) == list(SECTION_FILES)
    for name, files in SECTION_FILES.items():
        section = summary["sections"][name]
        assert section["status"] == "ok" and section["error"] is None and section["seconds"] >= 0
        assert section["key"] and section["summary"]
        for f in files:
            assert (out / f).is_file(), f
            assert f in section["files"]
    assert len(list((out / "rollout").glob("*.png"))) == 6
    for f in REPORT_FILES:
        assert (out / f).is_file()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["sections"] == summary["sections"]
    assert summary["sections"]["attention-distance"]["summary"]["num_images"] == 128
    assert set(summary["sections"]["fewshot"]["summary"]["mean_accuracy"]) == {"1", "5", "10"}
    assert_links_exist(out)
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 6 and "vit_tiny_patch16_224" in page


def test_sections_subset_and_images(tmp_path):
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("L", (40, 40), 128).save(photo)
    out = tmp_path / "sub"
    args = ["report", "--device", "cpu", "--out", str(out), "--sections", "info, pos-sim,rollout"]
    result = runner.invoke(app, [*args, "--images", str(photo)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    status = {name: s["status"] for name, s in summary["sections"].items()}
    assert status == {
        "info": "ok",
        "filters": "skipped",
        "pos-sim": "ok",
        "attention-distance": "skipped",
        "tokens": "skipped",
        "rollout": "ok",
        "explain": "skipped",
        "features": "skipped",
        "fewshot": "skipped",
        "cka": "skipped",
    }
    assert (out / "rollout" / "photo.png").is_file() and not (out / "filters.png").exists()
    assert summary["sections"]["rollout"]["summary"]["num_images"] == 1
    assert "rollout" in result.stdout and "skipped" in result.stdout  # the summary table
    assert_links_exist(out)


def test_failing_section_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    import vitlens.analysis.filters

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(vitlens.analysis.filters, "filter_pca", boom)
    out = tmp_path / "r"
    result = runner.invoke(
        app, ["report", "--device", "cpu", "--out", str(out), "--sections", "info,filters,pos-sim", "--json"]
    )
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["status"] == "failed" and summary["failed"] == ["filters"]
    assert summary["sections"]["filters"]["error"] == "RuntimeError: boom"
    assert summary["sections"]["pos-sim"]["status"] == "ok" and (out / "pos_sim.png").is_file()
    assert not (out / "filters.png").exists()
    for f in REPORT_FILES:
        assert (out / f).is_file()
    assert "RuntimeError: boom" in (out / "index.html").read_text()
    assert_links_exist(out)


def test_model_without_position_embeddings_fails_only_pos_sim(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5, pos_embed="none"
    ).eval()
    path = save_fixture(tmp_path, "nopos", model)
    out = tmp_path / "r"
    sections = "info,filters,pos-sim,attention-distance"
    args = ["report", str(path), *cli_args("cls"), "--out", str(out), "--sections", sections, "--num-images", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == ["pos-sim"] and summary["sections"]["pos-sim"]["error"]
    assert "\n" not in summary["sections"]["pos-sim"]["error"]
    for name in ("info", "filters", "attention-distance"):
        assert summary["sections"][name]["status"] == "ok"
        for f in SECTION_FILES[name]:
            assert (out / f).is_file()
    assert "failed" in (out / "report.md").read_text()
    assert "failed sections: pos-sim" in result.stderr


def test_unknown_section_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["report", "--sections", "info,heatmaps", "--out", str(tmp_path / "r")])
    assert_one_line_error(result, 2, "heatmaps")
    assert not (tmp_path / "r").exists()


def test_parse_sections_keeps_report_order():
    from vitlens.errors import ParameterError
    from vitlens.report import parse_sections, section_names

    assert (
        parse_sections(None)
        == section_names()
        == (
            "info",
            "filters",
            "pos-sim",
            "attention-distance",
            "tokens",
            "rollout",
            "explain",
            "features",
            "fewshot",
            "cka",
        )
    )
    assert parse_sections("fewshot, info") == ("info", "fewshot")
    with pytest.raises(ParameterError, match=r"^sections: unknown section \(none\)") as info:
        parse_sections(" , ")
    assert info.value.param == "sections"


def test_every_figure_is_byte_identical_across_runs(tmp_path):
    """CI can diff the figures: the same inputs give the same PNG bytes (no timestamps, fixed fonts and seeds)."""
    for name in ("a", "b"):
        args = ["report", "--out", str(tmp_path / name), "--device", "cpu", "--quiet"]
        result = runner.invoke(app, args, env={"VITLENS_CACHE_DIR": str(tmp_path / f"cache-{name}")})
        assert result.exit_code == 0, result.output
    first = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    second = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert first == second and len(first) >= 5 + 6  # five analysis figures and six rollout overlays
    for rel in first:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
