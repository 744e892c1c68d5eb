"""``vitlens.cka`` on the demo model and 8 digits, and on tiny fixtures: block outputs from timm's own
``forward_intermediates`` give the same matrix; two models see the same images; the result draws, saves, reads back
and prints what the CLI command does; bad options name their parameter."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vitlens
from tests.conftest import assert_one_line_error, native_kwargs, save_fixture
from vitlens.analysis.cka import linear_cka
from vitlens.cli.app import app
from vitlens.data import open_dataset
from vitlens.definitions.cka import DEFINITION, CKAResult, cka
from vitlens.errors import ParameterError
from vitlens.models import load_vit
from vitlens.registry import get
from vitlens.result import load_result

NUM_IMAGES = 8


@pytest.fixture(scope="module")
def dataset(demo):
    return open_dataset("digits", demo.preprocess, split="test", num_images=NUM_IMAGES)


@pytest.fixture(scope="module")
def result(demo, dataset):
    return cka(demo, dataset)


def _intermediates(vit, dataset) -> list[torch.Tensor]:
    """Every block's output ``[images, N, D]`` from timm's forward_intermediates (not vitlens's hooks)."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.inference_mode():
        out = vit.model.forward_intermediates(
            images, norm=False, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
    return [torch.cat([prefix, patches], dim=1) for patches, prefix in out]


def test_self_matrix_equals_the_plain_cka_of_timm_block_outputs(demo, dataset, result):
    assert isinstance(result, CKAResult) and vitlens.cka is cka
    c = result.cka
    assert c.matrix.shape == (demo.depth, demo.depth) and c.tokens == "mean-patch"
    assert c.num_images == NUM_IMAGES and c.minibatch_size == NUM_IMAGES and c.num_minibatches == 1
    np.testing.assert_allclose(c.matrix, c.matrix.T, atol=0)
    np.testing.assert_allclose(np.diagonal(c.matrix), 1, atol=1e-12)
    blocks = _intermediates(demo, dataset)
    means = [b[:, 1:].mean(dim=1) for b in blocks]  # demo: one class token, then the patches
    plain = np.array([[linear_cka(x, y) for y in means] for x in means])
    np.testing.assert_allclose(c.matrix, plain, atol=1e-6)
    assert 0.2 < c.matrix[0, -1] < 0.99  # layers differ, but not unrelated


def test_does_not_depend_on_batch_size_and_minibatches_are_whole(demo, dataset):
    a = cka(demo, dataset, minibatch_size=4, batch_size=3, tokens="cls")
    b = cka(demo, dataset, minibatch_size=4, batch_size=8, tokens="cls")
    np.testing.assert_allclose(a.cka.matrix, b.cka.matrix, atol=1e-12)
    assert a.cka.num_minibatches == 2 and a.cka.minibatch_size == 4
    swapped = dataset.subset([4, 5, 6, 7, 0, 1, 2, 3], tag="swapped")  # the two minibatches, other order
    np.testing.assert_allclose(cka(demo, swapped, minibatch_size=4, tokens="cls").cka.matrix, a.cka.matrix, atol=1e-12)


def test_two_models_sharing_weights_give_the_self_matrix(demo, dataset, result):
    twin = load_vit("demo", device="cpu")  # another ViT object, the same state
    assert twin.model is not demo.model
    two = cka(demo, dataset, twin)
    np.testing.assert_allclose(two.cka.matrix, result.cka.matrix, atol=1e-10)
    np.testing.assert_allclose(np.diagonal(two.cka.matrix), 1, atol=1e-10)
    assert two.sources == (demo.source, twin.source) and "mean diagonal CKA 1.000" in two.summary()
    same_object = cka(demo, dataset, demo, layers=[0, 1], layers_b=[-1])
    np.testing.assert_allclose(same_object.cka.matrix, result.cka.matrix[:2, -1:], atol=1e-10)


def test_model_b_sees_the_same_images_with_its_own_preprocessing(demo, dataset):
    other = load_vit("demo", device="cpu", mean="0.3", std="0.2")  # same weights, other normalisation
    got = cka(demo, "digits", other, num_images=NUM_IMAGES, tokens="cls", layers=[-1], layers_b=[0, -1])
    from_dataset = cka(demo, dataset, other, tokens="cls", layers=[-1], layers_b=[0, -1])
    np.testing.assert_allclose(got.cka.matrix, from_dataset.cka.matrix, atol=1e-12)
    mine = _intermediates(demo, dataset)
    theirs = _intermediates(other, open_dataset("digits", other.preprocess, split="test", num_images=NUM_IMAGES))
    plain = [linear_cka(mine[-1][:, 0], theirs[q][:, 0]) for q in (0, -1)]
    np.testing.assert_allclose(got.cka.matrix[0], plain, atol=1e-6)
    assert got.cka.matrix[0, 1] < 1 - 1e-3  # another normalisation is another input: not the self matrix


@pytest.mark.parametrize(("name", "prefix"), [("nonsquare", 1), ("reg", 5)])
def test_every_patch_token_on_non_square_and_register_layouts(tmp_path, name, prefix):
    vit = load_vit(save_fixture(tmp_path, name), **native_kwargs(name))
    data = open_dataset("digits", vit.preprocess, num_images=6)
    got = cka(vit, data, tokens="all", minibatch_size=6)
    blocks = _intermediates(vit, data)
    rows = [b[:, prefix:].reshape(-1, b.shape[-1]) for b in blocks]  # every patch of every image: a row
    assert rows[0].shape[0] == 6 * (24 if name == "nonsquare" else 16)
    plain = np.array([[linear_cka(x, y) for y in rows] for x in rows])
    np.testing.assert_allclose(got.cka.matrix, plain, atol=1e-6)


def test_plot_and_figure(result):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    assert isinstance(result.plot(), Axes) and isinstance(result.figure(), Figure)
    fig = Figure()
    ax = fig.add_subplot()
    assert result.plot(ax=ax) is ax and ax.images
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]


def test_save_writes_the_cli_files_and_reads_back_equal(result, tmp_path):
    files = result.save(tmp_path, meta={"command": "test"})
    assert sorted(f.name for f in files) == ["cka.csv", "cka.json", "cka.npz", "cka.png"]
    saved = json.loads((tmp_path / "cka.json").read_text())
    assert saved.pop("meta") == {"command": "test"}
    assert saved == result.to_dict()
    for key in ("cka", "layers_a", "layers_b", "tokens", "num_images", "minibatch_size"):
        assert key in saved
    back = load_result(tmp_path)
    assert isinstance(back, CKAResult) and back == result
    assert back != dataclasses.replace(result, data="other")
    csv = (tmp_path / "cka.csv").read_text().splitlines()
    assert csv[0] == "layer_a,layer_b_0,layer_b_1,layer_b_2,layer_b_3" and len(csv) == 5
    np.testing.assert_allclose([float(v) for v in csv[1].split(",")[1:]], result.cka.matrix[0])


def test_repr_summary(result):
    text = repr(result)
    assert "\n" not in text and text.startswith("<CKAResult cka: mean CKA of adjacent layers ")


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({"data": "digits", "num_images": 0}, "num_images", "num_images must be a positive number, not 0"),
        ({"num_images": 4}, "num_images", "num_images applies to a data spec"),
        ({"batch_size": 0}, "batch_size", "batch_size must be at least 1, not 0"),
        ({"layers": [99]}, "layers", "out of range"),
        ({"minibatch_size": 3}, "minibatch_size", "minibatch_size must be an integer of at least 4"),
        ({"tokens": "patch"}, "tokens", "tokens must be one of cls, mean-patch, all"),
        ({"data": "digits", "split": "validation"}, "split", "split must be one of"),
    ],
)
def test_bad_options_name_their_parameter(demo, dataset, kwargs, param, needle):
    kwargs = {"data": dataset, **kwargs}
    with pytest.raises(ParameterError, match=needle) as info:
        cka(demo, **kwargs)
    assert info.value.param == param


def test_layout_errors_name_tokens_and_layers_b(demo, dataset, tmp_path):
    gap = load_vit(save_fixture(tmp_path, "gap"), **native_kwargs("gap"))
    with pytest.raises(ParameterError, match="needs a class token") as info:
        cka(gap, "digits", num_images=4, tokens="cls")
    assert info.value.param == "tokens"
    wide = load_vit(save_fixture(tmp_path, "nonsquare"), **native_kwargs("nonsquare"))
    with pytest.raises(ParameterError, match=r"grids differ \(8x8 and 4x6\)") as info:
        cka(demo, dataset, wide, tokens="all")
    assert info.value.param == "tokens"
    with pytest.raises(ParameterError, match="layers_b: layer 5 is out of range") as info:
        cka(demo, dataset, wide, layers_b=[5])
    assert info.value.param == "layers_b"
    assert cka(demo, dataset, wide, tokens="cls").cka.matrix.shape == (demo.depth, wide.depth)


def test_the_cli_speaks_the_flag(tmp_path):
    cli = CliRunner().invoke(app, ["cka", "--device", "cpu", "--minibatch-size", "2", "--out", str(tmp_path)])
    assert_one_line_error(cli, 2, "--minibatch-size must be an integer of at least 4")


def test_cli_json_and_files_are_the_results(result, tmp_path):
    args = ["cka", "--device", "cpu", "--num-images", str(NUM_IMAGES), "--out", str(tmp_path)]
    cli = CliRunner().invoke(app, [*args, "--json"])
    assert cli.exit_code == 0, cli.output
    printed = json.loads(cli.stdout)
    assert list(printed) == [*result.to_dict(), "files", "meta"]
    assert printed["meta"]["command"] == "cka"
    assert {k: printed[k] for k in result.to_dict()} == result.to_dict()
    assert load_result(tmp_path) == result


def test_registered_and_run_by_the_report(demo, result):
    assert get("cka") is DEFINITION and DEFINITION.compute is cka and DEFINITION.needs_data
    run = SimpleNamespace(
        vit=demo,
        data="digits",
        split="test",
        num_images=NUM_IMAGES,
        batch_size=None,
        open=lambda spec, *, split, num_images: open_dataset(spec, demo.preprocess, split=split, num_images=num_images),
    )
    assert DEFINITION.section(run) == result
