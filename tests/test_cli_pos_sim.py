"""`vitlens pos-sim` on tiny checkpoints: every token layout's grid, values against a plain cosine, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import VIT_FIXTURES, assert_one_line_error, cli_args, make_vit, save_fixture
from vitlens.analysis import position_similarity
from vitlens.cli.app import app
from vitlens.layout import TokenLayout

runner = CliRunner()

GRIDS = {
    "cls": (4, 4),
    "reg": (4, 4),
    "reg_no_embed_class": (4, 4),
    "distilled": (4, 4),
    "gap": (4, 4),
    "nonsquare": (4, 6),
    "layerscale": (2, 2),
}


def _run(tmp_path, name: str, *extra: str, out_name: str = "out", model=None, args=None):
    ckpt = save_fixture(tmp_path, name, model)
    out = tmp_path / out_name
    args = cli_args(name) if args is None else args
    return runner.invoke(app, ["pos-sim", str(ckpt), *args, "--out", str(out), *extra]), out


def plain_patch_cosine(model: torch.nn.Module, grid: tuple[int, int]) -> np.ndarray:
    """Cosine similarity [H, W, H, W] written out plainly: timm puts the patch rows last in ``pos_embed[0]``."""
    h, w = grid
    rows = model.pos_embed.detach()[0, -h * w :].double().numpy()  # [H*W, D], prefix rows (if any) skipped
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return (unit @ unit.T).reshape(h, w, h, w)


def _expected_png_size(grid: tuple[int, int]) -> tuple[int, int]:
    from vitlens.plotting.pos_sim import pos_sim_figure

    sim = position_similarity(torch.randn(grid[0] * grid[1], 8, dtype=torch.float64), TokenLayout(grid, (8, 8), ()))
    return pos_sim_figure(sim).canvas.get_width_height()


@pytest.mark.parametrize("name", list(VIT_FIXTURES))
def test_every_layout_gives_its_grid_and_the_plain_cosine(tmp_path, name):
    result, out = _run(tmp_path, name, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # exactly one JSON object on stdout
    h, w = GRIDS[name]
    assert data["grid_size"] == [h, w]
    sim = np.array(data["similarity"])  # nested [H][W][H][W] lists
    assert sim.shape == (h, w, h, w)
    expected = plain_patch_cosine(make_vit(name), (h, w))
    np.testing.assert_allclose(sim, expected, atol=1e-12)
    with np.load(out / "pos_sim.npz") as npz:
        np.testing.assert_allclose(npz["similarity"], expected, atol=1e-12)
    with Image.open(out / "pos_sim.png") as img:
        assert img.format == "PNG" and img.size == _expected_png_size((h, w))
        assert np.asarray(img.convert("L")).std() > 10  # not a blank canvas
    assert data["meta"]["command"] == "pos-sim"


def test_comparison_numbers_match_the_analysis_and_a_plain_formula(tmp_path):
    result, out = _run(tmp_path, "nonsquare", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    model = make_vit("nonsquare")
    layout = TokenLayout((4, 6), (8, 8), ("cls",))
    ref = position_similarity(model.pos_embed.detach()[0], layout)
    by_dist = data["similarity_by_distance"]
    assert by_dist["distance"] == ref.distances.tolist()
    np.testing.assert_allclose(by_dist["mean_similarity"], ref.similarity_by_distance, rtol=1e-12)
    assert data["row_col_score"] == pytest.approx(ref.row_col_score)
    assert data["neighbour_minus_far"] == pytest.approx(ref.neighbour_minus_far)

    # Distance 1 written out: the 8 surrounding positions (diagonals round to 1), averaged over ordered pairs.
    sim = plain_patch_cosine(model, (4, 6))
    near = [
        sim[a, b, c, d]
        for a in range(4)
        for b in range(6)
        for c in range(4)
        for d in range(6)
        if (a, b) != (c, d) and max(abs(a - c), abs(b - d)) == 1
    ]
    assert by_dist["mean_similarity"][0] == pytest.approx(np.mean(near)) and by_dist["num_pairs"][0] == len(near)

    saved = json.loads((out / "pos_sim.json").read_text())
    assert "similarity" not in saved and saved["similarity_file"] == "pos_sim.npz"  # the array lives in the NPZ
    assert saved["similarity_by_distance"] == by_dist and saved["grid_size"] == [4, 6]
    with Image.open(out / "pos_sim.png") as img:
        assert img.width > img.height  # 4 rows of 6 tiles, each 4 x 6 cells


def test_img_size_resamples_the_embedding(tmp_path):
    result, _ = _run(tmp_path, "reg", "--json", args=["--num-heads", "3", "--device", "cpu", "--img-size", "48"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["grid_size"] == [6, 6] and data["img_size"] == [48, 48]
    model = make_vit("reg")
    model.set_input_size(img_size=48)  # timm's own resampling of the 4 x 4 embedding
    np.testing.assert_allclose(np.array(data["similarity"]), plain_patch_cosine(model, (6, 6)), atol=1e-12)


def test_summary_and_quiet(tmp_path):
    result, _ = _run(tmp_path, "cls")
    assert result.exit_code == 0, result.output
    for needle in ("grid distance", "row_col_score", "neighbour_minus_far", "pos_sim.png", "4x4 patches"):
        assert needle in result.stdout, needle
    quiet, out = _run(tmp_path, "cls", "-q", out_name="q")
    assert quiet.exit_code == 0 and quiet.stdout == "" and (out / "pos_sim.png").exists()


def test_png_is_deterministic(tmp_path):
    first, a = _run(tmp_path, "reg_no_embed_class", "-q", out_name="a")
    second, b = _run(tmp_path, "reg_no_embed_class", "-q", out_name="b")
    assert first.exit_code == second.exit_code == 0
    assert (a / "pos_sim.png").read_bytes() == (b / "pos_sim.png").read_bytes()


@pytest.mark.parametrize(("fmt", "magic"), [("svg", b"<?xml"), ("pdf", b"%PDF")])
def test_vector_formats(tmp_path, fmt, magic):
    result, out = _run(tmp_path, "cls", "-q", "--format", fmt)
    assert result.exit_code == 0, result.output
    assert (out / f"pos_sim.{fmt}").read_bytes().startswith(magic) and not (out / "pos_sim.png").exists()


def test_no_position_embedding_is_one_line(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, pos_embed="none")
    result, out = _run(tmp_path, "nope", model=model, args=["--num-heads", "3", "--device", "cpu", "--img-size", "32"])
    assert_one_line_error(result, 1, "no learned absolute position embedding")
    assert not out.exists()


def test_non_finite_embedding_is_one_line(tmp_path):
    model = make_vit("cls")
    with torch.no_grad():
        model.pos_embed[0, 3, 0] = float("inf")
    result, out = _run(tmp_path, "cls", model=model)
    assert_one_line_error(result, 1, "NaN/inf")
    assert not out.exists()


def test_bad_format_is_a_usage_error(tmp_path):
    result, out = _run(tmp_path, "cls", "--format", "gif")
    assert_one_line_error(result, 2, "--format")
    assert not out.exists()
