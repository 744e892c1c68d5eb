"""`vitlens filters` on tiny checkpoints: files, JSON, values against filter_pca and scikit-learn, one-line errors."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA
from typer.testing import CliRunner

from tests.conftest import VIT_FIXTURES, assert_one_line_error, cli_args, make_vit, save_fixture
from vitlens.analysis import filter_pca
from vitlens.cli.app import app
from vitlens.errors import VitlensError
from vitlens.layout import Preprocess
from vitlens.models.vit import ViT

runner = CliRunner()


def _run(tmp_path, name: str, *extra: str, out_name: str = "out", model=None):
    ckpt = save_fixture(tmp_path, name, model)
    out = tmp_path / out_name
    return runner.invoke(app, ["filters", str(ckpt), *cli_args(name), "--out", str(out), *extra]), out


@functools.cache
def _expected_png_size(k: int, c: int, p: int) -> tuple[int, int]:
    """Pixel size of the figure for K components of C x P x P (built the way the command builds it)."""
    from vitlens.plotting.filters import filters_figure

    result = filter_pca(torch.randn(64, c, p, p, generator=torch.Generator().manual_seed(0)), num_components=k)
    return filters_figure(result).canvas.get_width_height()


def test_json_files_and_values_match_filter_pca(tmp_path):
    result, out = _run(tmp_path, "reg", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert data["components_shape"] == [28, 3, 8, 8]  # the paper's 28, fewer than min(48 filters, 192 values)
    assert data["num_components"] == 28 and data["available_components"] == 48
    assert data["meta"]["command"] == "filters" and "vitlens_version" in data["meta"]

    weight = make_vit("reg").patch_embed.proj.weight.detach()  # the same weights the checkpoint holds
    expected = filter_pca(weight)
    np.testing.assert_allclose(data["explained_variance_ratio"], expected.explained_variance_ratio, rtol=1e-10)
    assert data["cumulative_explained_variance"] == pytest.approx(expected.explained_variance_ratio.sum())

    # Against scikit-learn, written independently of vitlens: same variances, same directions up to sign.
    pca = PCA(n_components=28, svd_solver="full").fit(weight.double().reshape(48, -1).numpy())
    np.testing.assert_allclose(data["explained_variance_ratio"], pca.explained_variance_ratio_, rtol=1e-8)

    assert sorted(p.name for p in out.iterdir()) == ["filters.json", "filters.npz", "filters.png"]
    with np.load(out / "filters.npz") as npz:
        assert npz["components"].shape == (28, 3, 8, 8)
        np.testing.assert_allclose(npz["components"], expected.components, atol=1e-12)
        np.testing.assert_allclose(npz["explained_variance_ratio"], data["explained_variance_ratio"], rtol=1e-12)
        dots = np.abs(np.sum(npz["components"].reshape(28, -1) * pca.components_, axis=1))
        np.testing.assert_allclose(dots, np.ones(28), atol=1e-8)
    saved = json.loads((out / "filters.json").read_text())
    assert saved["explained_variance_ratio"] == data["explained_variance_ratio"]
    assert saved["components_shape"] == [28, 3, 8, 8]

    with Image.open(out / "filters.png") as img:
        assert img.format == "PNG" and img.size == _expected_png_size(28, 3, 8)
        assert np.asarray(img.convert("L")).std() > 10  # not a blank canvas


@pytest.mark.parametrize("name", list(VIT_FIXTURES))
def test_every_layout(tmp_path, name):
    result, out = _run(tmp_path, name, "--json", "--components", "6")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    _, kwargs = VIT_FIXTURES[name]
    p = kwargs["patch_size"]
    assert data["components_shape"] == [6, 3, p, p] and data["patch_size"] == [p, p]
    expected = filter_pca(make_vit(name).patch_embed.proj.weight, num_components=6)
    np.testing.assert_allclose(data["explained_variance_ratio"], expected.explained_variance_ratio, rtol=1e-10)
    with Image.open(out / "filters.png") as img:
        assert img.size == _expected_png_size(6, 3, p)


def test_grey_model_and_too_many_components_are_clamped(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    grey = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=48, depth=1, num_heads=3)
    result, out = _run(tmp_path, "grey", "--components", "100", model=grey)
    assert result.exit_code == 0, result.output
    assert "only 16 components exist" in result.stderr  # min(48 filters, 1*4*4 values)
    with np.load(out / "filters.npz") as npz:
        assert npz["components"].shape == (16, 1, 4, 4)
    assert "16 of 16 components explain 100.0%" in result.stdout


def test_summary_and_quiet(tmp_path):
    result, _ = _run(tmp_path, "cls")
    assert result.exit_code == 0, result.output
    assert "explain" in result.stdout and "filters.png" in result.stdout and "filters.npz" in result.stdout
    quiet, out = _run(tmp_path, "cls", "--quiet", out_name="q")
    assert quiet.exit_code == 0 and quiet.stdout == "" and (out / "filters.png").exists()


def test_png_is_deterministic(tmp_path):
    first, a = _run(tmp_path, "nonsquare", "-q", out_name="a")
    second, b = _run(tmp_path, "nonsquare", "-q", out_name="b")
    assert first.exit_code == second.exit_code == 0
    assert (a / "filters.png").read_bytes() == (b / "filters.png").read_bytes()


@pytest.mark.parametrize(("fmt", "magic"), [("svg", b"<?xml"), ("pdf", b"%PDF")])
def test_vector_formats(tmp_path, fmt, magic):
    result, out = _run(tmp_path, "cls", "-q", "--format", fmt)
    assert result.exit_code == 0, result.output
    assert (out / f"filters.{fmt}").read_bytes().startswith(magic) and not (out / "filters.png").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--components", "0"], "--components must be at least 1"),
        (["--components", "-3"], "--components"),
        (
            ["--format", "jpg"],
            "--format",
        ),
    ],
)
def test_usage_errors_exit_2_and_write_nothing(tmp_path, extra, needle):
    result, out = _run(tmp_path, "cls", *extra)
    assert_one_line_error(result, 2, needle)
    assert not out.exists()


def test_non_finite_weights_are_one_line(tmp_path):
    model = make_vit("cls")
    with torch.no_grad():
        model.patch_embed.proj.weight[0, 0, 0, 0] = float("nan")
    result, out = _run(tmp_path, "cls", model=model)
    assert_one_line_error(result, 1, "NaN/inf")
    assert not out.exists()


def test_hybrid_cnn_stem_through_the_cli(tmp_path):
    # A ResNet-stem hybrid from timm's registry (random weights, one block, small input): not one linear projection.
    out = tmp_path / "out"
    args = ["filters", "vit_tiny_r_s16_p8_224", "--no-pretrained", "--device", "cpu", "--out", str(out)]
    result = runner.invoke(app, [*args, "--model-kwargs", '{"depth": 1, "img_size": 64}'])
    assert_one_line_error(result, 1, "not one linear projection")
    assert not out.exists()


def _hybrid_vit() -> torch.nn.Module:
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer

    def embed(**kw):
        backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU())
        return HybridEmbed(backbone, img_size=kw["img_size"], patch_size=1, in_chans=3, embed_dim=kw["embed_dim"])

    return VisionTransformer(img_size=16, patch_size=2, embed_dim=48, depth=1, num_heads=3, embed_layer=embed)


def _conv_stem_vit() -> torch.nn.Module:
    # A plain ViT whose patchify conv is replaced by a small stem (3x3 convs), as in "Early convolutions help".
    model = make_vit("cls")
    model.patch_embed.proj = torch.nn.Sequential(
        torch.nn.Conv2d(3, 24, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(24, 48, 4, stride=4),
    )
    return model


@pytest.mark.parametrize("build", [_hybrid_vit, _conv_stem_vit])
def test_non_linear_patch_embeddings_are_refused(build):
    model = build()
    vit = ViT(model, Preprocess(tuple(model.patch_embed.img_size)))
    assert not vit.has_linear_patch_embed
    with pytest.raises(VitlensError, match="not one linear projection"):
        vit.patch_projection()
